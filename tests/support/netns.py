"""Pods as network namespaces, for tests (as root): each pod its own namespace with one veth
and a default route, its peer in a "node" namespace; every namespace a test creates has a
unique name and is removed by name, also after a failure.

Addresses are private and exist only inside these namespaces.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


def missing() -> str | None:
    """Why pods as network namespaces cannot run here, or None."""
    if os.geteuid() != 0:
        return "network-namespace pods need root (ip netns, veth, iptables)"
    for tool in ("ip", "iptables", "iptables-restore", "iptables-save"):
        if shutil.which(tool) is None:
            return f"{tool} not found: install the Debian packages iproute2 and iptables (make setup does, as root)"
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass(frozen=True)
class Pod:
    """One pod: its namespace, its IP and the node namespace at the other end of its veth."""

    netns: str
    ip: str
    node: str
    node_ip: str

    def command(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=30,
                              **kwargs)  # type: ignore[call-overload]

    def node_run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.node, *argv], capture_output=True,
                              text=True, timeout=30)


@contextmanager
def pod(subnet: int = 250) -> Iterator[Pod]:
    """A pod namespace 10.<subnet>.0.2/24 whose veth peer (10.<subnet>.0.1) is in a node
    namespace; both removed on exit."""
    tag = uuid.uuid4().hex[:8]
    pod_ns, node_ns = f"xt-pod-{tag}", f"xt-node-{tag}"
    pod_ip, node_ip = f"10.{subnet}.0.2", f"10.{subnet}.0.1"
    try:
        ip("netns", "add", pod_ns)
        ip("netns", "add", node_ns)
        ip("-n", pod_ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{tag}")
        ip("-n", pod_ns, "link", "set", f"v{tag}", "netns", node_ns)
        ip("-n", pod_ns, "addr", "add", f"{pod_ip}/24", "dev", "eth0")
        ip("-n", node_ns, "addr", "add", f"{node_ip}/24", "dev", f"v{tag}")
        for ns, dev in ((pod_ns, "eth0"), (node_ns, f"v{tag}")):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", pod_ns, "route", "add", "default", "via", node_ip)
        yield Pod(pod_ns, pod_ip, node_ns, node_ip)
    finally:
        for ns in (pod_ns, node_ns):  # deleting a namespace deletes its veth end too
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)
