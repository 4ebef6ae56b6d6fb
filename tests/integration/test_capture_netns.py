"""`xds-server iptables` in real network namespaces (as root): the rules it applies capture
a pod's outbound TCP into the outbound port and inbound TCP into the inbound port, with the
original destination readable by the listener (SO_ORIGINAL_DST); the sidecar's own traffic
(UID/GID 1337), loopback and excluded ports are not captured; applying twice leaves the same
rules and `--cleanup` removes them.

The listeners and the app are `tests/support/capture_probe.py`, run with the system Python so
the proxy UID can run it too. Where the machine cannot make namespaces, these tests fail
saying what is missing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import netns

ROOT = Path(__file__).resolve().parents[2]
XDS_SERVER = str(Path(sys.executable).parent / "xds-server")
PROBE = (ROOT / "tests" / "support" / "capture_probe.py").read_text()
PYTHON = "/usr/bin/python3"
PROXY_UID = 1337


@pytest.fixture
def pod() -> Iterator[netns.Pod]:
    why = netns.missing()
    if why is not None:
        pytest.fail(why)
    with netns.pod() as made:
        yield made


def iptables(pod: netns.Pod, *args: str) -> subprocess.CompletedProcess[str]:
    return pod.run([XDS_SERVER, "iptables", *args])


def capture_rules(pod: netns.Pod) -> list[str]:
    saved = pod.run(["iptables-save", "-t", "nat"]).stdout.splitlines()
    return [line for line in saved if "XDS_" in line]


@pytest.fixture
def listeners(pod: netns.Pod) -> Iterator[None]:
    """Probe listeners in the pod (15001, 15006, 9000, 8080, 15090) and the node (80)."""
    procs = [
        subprocess.Popen(pod.command([PYTHON, "-c", PROBE, "listen", "15001", "15006", "9000",
                                      "8080", "15090"]), stdout=subprocess.PIPE, text=True),
        subprocess.Popen(["ip", "netns", "exec", pod.node, PYTHON, "-c", PROBE, "listen", "80"],
                         stdout=subprocess.PIPE, text=True),
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)


def connect(pod: netns.Pod, host: str, port: int, *, uid: int | None = None) -> str:
    """What a client in the pod gets back (as root, the app, or as `uid`)."""
    argv = [PYTHON, "-c", PROBE, "connect", host, str(port)]
    if uid is not None:
        argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
    return pod.run(argv).stdout.strip()


def connect_from_node(pod: netns.Pod, port: int) -> str:
    return pod.node_run([PYTHON, "-c", PROBE, "connect", pod.ip, str(port)]).stdout.strip()


def test_applying_twice_leaves_the_same_rules_and_cleanup_removes_them(pod: netns.Pod) -> None:
    first = iptables(pod, "--exclude-inbound-ports", "15090")
    assert first.returncode == 0, first.stderr
    rules = capture_rules(pod)
    assert "-A OUTPUT -p tcp -j XDS_OUTPUT" in rules
    assert "-A PREROUTING -p tcp -j XDS_INBOUND" in rules
    assert any("--to-ports 15001" in line for line in rules)
    assert any("--to-ports 15006" in line for line in rules)

    again = iptables(pod, "--exclude-inbound-ports", "15090")
    assert again.returncode == 0, again.stderr
    assert capture_rules(pod) == rules  # not doubled

    dry = iptables(pod, "--exclude-inbound-ports", "15090", "--dry-run")
    assert dry.returncode == 0
    assert capture_rules(pod) == rules  # a dry run changes nothing...
    printed = {line for line in dry.stdout.splitlines() if line.startswith("-A")}
    assert printed == {line for line in rules if line.startswith("-A")}  # ...and prints them

    removed = iptables(pod, "--cleanup")
    assert removed.returncode == 0, removed.stderr
    assert capture_rules(pod) == []
    assert iptables(pod, "--cleanup").returncode == 0  # removing nothing is fine


def test_outbound_connections_reach_the_outbound_port_with_their_destination(
    pod: netns.Pod, listeners: None
) -> None:
    before = connect(pod, pod.node_ip, 80)
    assert before == f"80 {pod.node_ip}:80"  # not captured yet: the node's listener answers
    assert iptables(pod, "--exclude-inbound-ports", "15090").returncode == 0

    # An app dialling a Service address or anything else: its sidecar's outbound port, which
    # reads where the connection was going.
    assert connect(pod, "10.96.0.10", 80) == "15001 10.96.0.10:80"
    assert connect(pod, pod.node_ip, 80) == f"15001 {pod.node_ip}:80"
    # The sidecar's own connections go out as they are (no loop).
    assert connect(pod, pod.node_ip, 80, uid=PROXY_UID) == f"80 {pod.node_ip}:80"
    # Loopback is the pod talking to itself.
    assert connect(pod, "127.0.0.1", 9000) == "9000 127.0.0.1:9000"
    # The pod's own IP from the app: through the inbound side; from the sidecar: direct.
    assert connect(pod, pod.ip, 9000) == f"15006 {pod.ip}:9000"
    assert connect(pod, pod.ip, 9000, uid=PROXY_UID) == f"9000 {pod.ip}:9000"


def test_inbound_connections_reach_the_inbound_port_except_excluded_ports(
    pod: netns.Pod, listeners: None
) -> None:
    assert connect_from_node(pod, 8080) == f"8080 {pod.ip}:8080"
    assert iptables(pod, "--exclude-inbound-ports", "15090").returncode == 0
    assert connect_from_node(pod, 8080) == f"15006 {pod.ip}:8080"
    assert connect_from_node(pod, 15090) == f"15090 {pod.ip}:15090"  # excluded


def test_excluded_outbound_cidrs_and_ports_go_out_as_they_are(
    pod: netns.Pod, listeners: None
) -> None:
    applied = iptables(pod, "--exclude-outbound-cidrs", f"{pod.node_ip}/32",
                       "--exclude-outbound-ports", "443")
    assert applied.returncode == 0, applied.stderr
    assert connect(pod, pod.node_ip, 80) == f"80 {pod.node_ip}:80"
    assert connect(pod, "10.96.0.10", 80) == "15001 10.96.0.10:80"


def test_only_included_outbound_ports_are_captured(pod: netns.Pod, listeners: None) -> None:
    assert iptables(pod, "--include-outbound-ports", "8080").returncode == 0
    assert connect(pod, "10.96.0.10", 8080) == "15001 10.96.0.10:8080"
    assert connect(pod, pod.node_ip, 80) == f"80 {pod.node_ip}:80"


@pytest.mark.parametrize("args, named", [
    (["--exclude-outbound-cidrs", "10.0.0.0/33"], "--exclude-outbound-cidrs"),
    (["--include-outbound-cidrs", "fd00::/8"], "--include-outbound-cidrs"),
    (["--exclude-inbound-ports", "70000"], "--exclude-inbound-ports"),
    (["--outbound-port", "0"], "--outbound-port"),
    (["--inbound-port", "15001"], "--inbound-port"),
])
def test_invalid_options_are_refused_naming_the_option(
    pod: netns.Pod, args: list[str], named: str
) -> None:
    result = iptables(pod, *args)
    assert result.returncode != 0
    assert named in result.stderr and "Traceback" not in result.stderr
    assert capture_rules(pod) == []  # nothing half-applied


def test_a_pod_namespace_is_removed_by_name_even_after_a_failure() -> None:
    why = netns.missing()
    if why is not None:
        pytest.fail(why)
    made: list[netns.Pod] = []
    with pytest.raises(RuntimeError), netns.pod() as p:
        made.append(p)
        raise RuntimeError("a failing test")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert made and made[0].netns not in listed and made[0].node not in listed
