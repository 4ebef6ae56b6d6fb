"""`xds-server demo`, run as a user runs it: a subprocess, its printed table, its exit code.

The demo brings up the whole examples/demo mesh (the server in-process, four real Envoy
sidecars, the apps) on the pods' fixed addresses (127.0.10.x) and the sidecars' fixed ports.
So that concurrent test runs (xdist workers, several pytest processes) never collide, each
test runs a copy of examples/demo whose pod addresses are moved to a range of this process
(as tests/support/net.py does for test pods); everything else is the shipped YAML. The xDS
server takes any free port.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
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
    # TCP through frontend's local binding to db, and back.
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
    assert all(row["errors"] == 0 for row in _rows(output)), output
