"""`xds-server demo`, run as a user runs it: a subprocess, its printed table, its exit code.

The demo brings up the whole examples/demo mesh (the server in-process, four real Envoy
sidecars, the apps) in one of two modes: capture (pods as network namespaces, as root with
iproute2/iptables/setpriv: the app dials `http://api/` and `db:5432` by name) or the loopback
explicit mode, on the pods' fixed addresses (127.0.10.x) and the sidecars' fixed ports. So
that concurrent loopback runs (xdist workers, several pytest processes) never collide, each
test runs a copy of examples/demo whose pod addresses are moved to a range of this process
(as tests/support/net.py does for test pods); everything else is the shipped YAML. The xDS
server takes any free port. Capture runs need nothing of the kind: their names carry the
demo's PID, their addresses exist only inside their namespaces.

The capture tests run with `--mode capture`, which fails (never skips) saying what this
machine lacks; the fallback is shown by making the machine lack something for real.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "demo"
DEMO_NETWORK = "127.0.10."  # the pods' addresses in examples/demo
# One table row: round, requests, then "count ( share %)" per version (v1, v2), errors,
# upstream 5xx, retries, retried ok, "ok/total OK" db round trips, p50, p99.
ROW = re.compile(
    r"^\s*(?P<round>\d+)\s+(?P<requests>\d+)\s+"
    r"(?P<v1>\d+) \(\s*(?P<v1_share>[\d.]+) %\)\s+(?P<v2>\d+) \(\s*(?P<v2_share>[\d.]+) %\)\s+"
    r"(?P<errors>\d+)\s+(?P<upstream_5xx>\d+)\s+(?P<retries>\d+)\s+(?P<retried_ok>\d+)\s+"
    r"(?P<db_ok>\d+)/(?P<db_total>\d+) (?:OK|FAIL)\s+(?P<p50>[\d.]+)\s+(?P<p99>[\d.]+)\s*$",
    re.M,
)


def _rows(output: str) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in m.groupdict().items()} for m in ROW.finditer(output)]


def _sidecar_pids(output: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"sidecar pid (\d+) LIVE", output)]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie holds no ports and runs nothing)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XDS_SERVER_LOG_LEVEL", None)
    return env


def _command(tmp_path: Path, third_octet: int) -> list[str]:
    """`xds-server demo` on a copy of examples/demo with the pods on 127.<pid>.<third>.x."""
    network = f"127.{10 + os.getpid() % 240}.{third_octet}."
    source = tmp_path / "demo"
    source.mkdir()
    files = sorted(DEMO.glob("*.yaml"))
    assert files
    for file in files:
        text = file.read_text()
        (source / file.name).write_text(text.replace(DEMO_NETWORK, network))
    return [sys.executable, "-m", "xds_server.cli", "demo", "--source", str(source),
            "--xds-address", "127.0.0.1:0"]


def test_shipped_demo_mesh_validates() -> None:
    done = subprocess.run([sys.executable, "-m", "xds_server.cli", "validate", str(DEMO)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "no problems found" in done.stdout, done.stdout + done.stderr
    assert DEMO_NETWORK in (DEMO / "frontend.yaml").read_text()  # what _command relocates


CAPTURE_LINE = ("pods: network namespaces, traffic captured by iptables (xds-server iptables "
                "in each pod), sidecars as UID 1337; the app calls http://api/ and db:5432 by name")
EXPLICIT_LINE = "pods on loopback addresses (explicit mode): "


def _leftovers(pid: int) -> list[str]:
    """Network namespaces and /etc/netns dirs the demo process `pid` made and left behind."""
    prefix = f"xdemo-{pid}-"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.startswith(prefix)]
    etc = Path("/etc/netns")
    return names + ([str(p) for p in etc.iterdir() if p.name.startswith(prefix)] if etc.is_dir() else [])


def _run_once(tmp_path: Path, third_octet: int, *args: str, env: dict[str, str] | None = None,
              rounds: int = 1) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [*_command(tmp_path, third_octet), "--rounds", str(rounds), "--requests", "200",
         "--interval", "0", *args],
        cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, out, err


def _check_split_retries_and_db(output: str, rounds: int = 1) -> None:
    rows = _rows(output)
    assert len(rows) == rounds, output
    for row in rows:
        assert row["requests"] == 200
        assert row["v1"] + row["v2"] == 200, output
        assert row["errors"] == 0, output
        assert row["retries"] == row["upstream_5xx"], output
        assert row["retried_ok"] == row["retries"], output
        assert row["db_total"] > 0 and row["db_ok"] == row["db_total"], output
    v1, v2 = sum(r["v1"] for r in rows), sum(r["v2"] for r in rows)
    assert 80 <= 100 * v1 / (v1 + v2) <= 97, output  # the HTTPRoute's 90/10
    assert v2 > 0 and sum(r["upstream_5xx"] for r in rows) >= 1, output  # the canary's 503s, hidden


def test_capture_mode_pods_are_namespaces_and_the_app_dials_names(tmp_path: Path) -> None:
    """As root with the tools: four pods as network namespaces, the capture rules applied,
    the app in frontend's namespace resolves api and db through its own /etc/hosts to
    ClusterIPs and reaches them through its sidecar; the split, the hidden retries and the db
    round trips show in every row; nothing is left behind."""
    proc, output, errors = _run_once(tmp_path, 202, "--mode", "capture", rounds=3)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}\n{errors}"
    assert CAPTURE_LINE in output, output
    assert EXPLICIT_LINE not in output, output
    assert re.search(r"getaddrinfo gives them \(its /etc/hosts\): api -> 10\.96\.\d+\.\d+, "
                     r"db -> 10\.96\.\d+\.\d+", output), output
    assert "GET http://api/; TCP round trips to db:5432" in output, output
    # Pods on their namespace addresses, not on loopback.
    assert re.search(r"demo/frontend-0\s+10\.89\.\d+\.\d+\s+sidecar pid \d+ LIVE", output), output
    _check_split_retries_and_db(output, rounds=3)
    assert "4 pod network namespaces and the node's" in output, output
    pids = _sidecar_pids(output)
    assert len(pids) == 4, output
    assert not [pid for pid in pids if _alive(pid)], "Envoy sidecars left running"
    assert _leftovers(proc.pid) == []


def test_fallback_says_why_in_one_line_when_iptables_is_missing(tmp_path: Path) -> None:
    """A machine without iptables (PATH has ip and setpriv only): the demo runs the loopback
    explicit mode and says so, and why, in one line."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("ip", "setpriv"):
        found = shutil.which(tool)
        if found:
            (tools / tool).symlink_to(found)
    env = {**_env(), "PATH": str(tools)}
    env.pop("XDS_SERVER_DEMO_MODE", None)
    proc, output, errors = _run_once(tmp_path, 203, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}\n{errors}"
    reason = [line for line in output.splitlines() if line.startswith(EXPLICIT_LINE)]
    why = ("network namespaces need root" if os.geteuid() != 0 else
           "ip not found, install the Debian package iproute2" if not shutil.which("ip") else
           "iptables not found, install the Debian package iptables")
    assert reason == [EXPLICIT_LINE + why], output
    assert "pods: network namespaces" not in output, output
    assert "Host: api to its sidecar" in output, output
    _check_split_retries_and_db(output)


def test_explicit_mode_on_request(tmp_path: Path) -> None:
    proc, output, errors = _run_once(tmp_path, 204, env={**_env(), "XDS_SERVER_DEMO_MODE": "explicit"})
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}\n{errors}"
    assert (EXPLICIT_LINE + "requested (--mode explicit or XDS_SERVER_DEMO_MODE=explicit)") in output, output
    _check_split_retries_and_db(output)


def test_once_shows_the_split_retries_and_db_round_trips(tmp_path: Path) -> None:
    done = subprocess.run(
        [*_command(tmp_path, 200), "--once", "--requests", "200"], cwd=ROOT, env=_env(),
        capture_output=True, text=True, timeout=120,
    )
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output}\n{done.stderr}"
    rows = _rows(output)
    assert len(rows) == 1, output
    row = rows[0]
    assert row["requests"] == 200
    assert row["v1"] + row["v2"] == 200, output
    # The HTTPRoute's 90/10 split, with room for chance (binomial, n=200: sd ~2 %).
    assert 80 <= row["v1_share"] <= 97, output
    assert row["v2"] > 0, output
    # api-v2 answers 503 to every 5th request; the TrafficPolicy's retries hide every one.
    assert row["errors"] == 0, output
    assert row["upstream_5xx"] >= 1, output
    assert row["retries"] == row["upstream_5xx"], output
    assert row["retried_ok"] == row["retries"], output
    # TCP to db (by name, or through frontend's local binding), and back.
    assert row["db_total"] > 0 and row["db_ok"] == row["db_total"], output
    pids = _sidecar_pids(output)
    assert len(pids) == 4, output  # frontend, api-v1, api-v2, db
    assert not [pid for pid in pids if _alive(pid)], "Envoy sidecars left running"


def test_ctrl_c_stops_everything_cleanly(tmp_path: Path) -> None:
    # Its own process group, signalled as a whole: what a terminal does on Ctrl-C.
    proc = subprocess.Popen(
        [*_command(tmp_path, 201), "--requests", "50", "--interval", "0.2"], cwd=ROOT, env=_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        assert proc.stdout is not None
        # Wait for a couple of rounds: the mesh is up and traffic flows.
        while len(_rows("\n".join(lines))) < 2:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            assert time.monotonic() < deadline, "\n".join(lines)
        output = "\n".join(lines)
        assert len(_rows(output)) >= 2, f"{output}\n{proc.stderr.read() if proc.poll() is not None else ''}"
        pids = _sidecar_pids(output)
        assert len(pids) == 4 and all(_alive(pid) for pid in pids), output

        os.killpg(proc.pid, signal.SIGINT)
        rest, errors = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "\n".join(lines) + "\n" + rest
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}\n{errors}"
    assert "Traceback" not in errors, errors
    assert re.search(r"stopped: 4 Envoy sidecars", output), output
    assert not [pid for pid in pids if _alive(pid)], f"Envoy sidecars left running: {pids}"
    if CAPTURE_LINE in output:  # the default where it can: every namespace gone too
        assert _leftovers(proc.pid) == []
    assert all(row["errors"] == 0 for row in _rows(output)), output


def test_fallback_without_root_says_so(tmp_path: Path) -> None:
    """Not root (as root here: the demo run as nobody through setpriv): the loopback mode,
    and the one line saying that network namespaces need root."""
    shared = Path(tempfile.mkdtemp(prefix="xds-demo-test-", dir="/tmp"))  # nobody must read it
    try:
        shared.chmod(0o755)
        command = _command(shared, 205)
        (shared / "demo").chmod(0o755)
        for file in (shared / "demo").iterdir():
            file.chmod(0o644)
        env = {**_env(), "HOME": str(shared)}
        env.pop("XDS_SERVER_DEMO_MODE", None)
        if os.geteuid() == 0:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        done = subprocess.run([*command, "--once"], cwd=shared, env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    output = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{output}\n{done.stderr}"
    reason = [line for line in output.splitlines() if line.startswith(EXPLICIT_LINE)]
    assert reason == [EXPLICIT_LINE + "network namespaces need root"], output
    _check_split_retries_and_db(output)
