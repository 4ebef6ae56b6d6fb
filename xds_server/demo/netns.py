"""Pods as Linux network namespaces, for the demo's capture mode (as root).

What a Kubernetes node gives a pod, made with iproute2 on this machine:

- a "node" namespace holding a bridge; each pod a namespace with one veth (eth0) on that
  bridge, its pod IP and a default route via the bridge. The node routes nothing beyond the
  bridge, so a Service ClusterIP (a range no interface has) is reachable only through the
  pod's sidecar, as in a mesh without kube-proxy;
- a hosts file per pod (`ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts):
  `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local` resolve to ClusterIPs through the
  ordinary getaddrinfo, and a resolv.conf that fails unknown names at once;
- sockets opened inside a pod (`listen_in`: a thread that setns()s into it first), for the
  apps the demo serves from its own event loop.

Every name carries this process's PID and a random tag (`xdemo-PID-TAG-...`), so runs never
collide; `close()` deletes exactly the namespaces and /etc/netns directories it made, by name
(a namespace takes its veths and iptables rules with it). `sweep_leftovers()` deletes those of
earlier demo runs whose process is gone (a run killed with SIGKILL cannot clean up).

`capture_unavailable()` is the decision: why this machine cannot run the pods this way, or None.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import DemoError

T = TypeVar("T")

PROXY_UID = 1337  # the sidecar's UID and GID (InjectorSettings' default): exempt from capture
CLUSTER_DOMAIN = "cluster.local"
NETNS_DIR = Path("/var/run/netns")
ETC_NETNS = Path("/etc/netns")
CLONE_NEWNET = 0x40000000
PREFIX = "xdemo"
MODE_ENV = "XDS_SERVER_DEMO_MODE"  # auto (default), capture, explicit
MODES = ("auto", "capture", "explicit")
# (tool, the Debian package that has it)
TOOLS = (("ip", "iproute2"), ("iptables", "iptables"), ("iptables-restore", "iptables"),
         ("iptables-save", "iptables"), ("setpriv", "util-linux"))


def _world_executable(path: Path) -> bool:
    """Whether a UID other than the owner (the proxy UID) can reach and run `path`."""
    try:
        if not path.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)
    except OSError:
        return False


def capture_unavailable(envoy_binary: str | None = None, *, euid: int | None = None,
                        which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why the pods cannot be network namespaces here (one short reason), or None.

    Reads what the capture mode needs: root (namespaces, veths, iptables), the tools on PATH,
    and an Envoy binary the proxy UID can run (its directories must be traversable)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return "network namespaces need root"
    for tool, package in TOOLS:
        if which(tool) is None:
            return f"{tool} not found, install the Debian package {package}"
    if envoy_binary is not None and not _world_executable(Path(envoy_binary).resolve()):
        return f"the Envoy binary {envoy_binary} is not executable by the proxy UID {PROXY_UID}"
    return None


def choose_mode(requested: str, envoy_binary: str | None) -> tuple[str, str | None]:
    """("capture" or "explicit", why not capture). `requested`: auto (capture when it can),
    capture (it must: a reason raises DemoError), explicit."""
    if requested not in MODES:
        raise DemoError(f"--mode / {MODE_ENV}: expected one of {', '.join(MODES)}, got {requested!r}")
    if requested == "explicit":
        return "explicit", f"requested (--mode explicit or {MODE_ENV}=explicit)"
    why = capture_unavailable(envoy_binary)
    if why is None:
        return "capture", None
    if requested == "capture":
        raise DemoError(f"pods as network namespaces cannot run here: {why}")
    return "explicit", why


def xds_server_command() -> list[str]:
    """How to run this installation's `xds-server` (the venv's script, else PATH, else -m)."""
    beside = Path(sys.executable).parent / "xds-server"
    if os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("xds-server")
    return [found] if found else [sys.executable, "-m", "xds_server.cli"]


# ------------------------------------------------------------------ threads in a namespace

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Call `fn` in a fresh thread that first joins the network namespace `netns` (namespaces
    are per thread; Python 3.11 has no os.setns). Sockets it makes belong to that namespace
    for good, whichever thread uses them later. The caller's thread never moves."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as err:  # handed to the caller
            box["error"] = err

    thread = threading.Thread(target=target, name=f"in-netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def listen_in(netns: str, port: int, host: str = "0.0.0.0") -> socket.socket:
    """A listening, non-blocking TCP socket on (host, port) inside the pod `netns`."""
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    return in_netns(netns, make)


# ------------------------------------------------------------------------------- names


def service_host_entries(services: Iterable[tuple[str, str, str]], namespace: str) -> dict[str, str]:
    """Hosts-file names of Services (name, namespace, ClusterIP) as a pod in `namespace`
    resolves them: `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`, and the short `svc`
    for its own namespace (Kubernetes' search path)."""
    out: dict[str, str] = {}
    for name, ns, ip in services:
        for host in (f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.{CLUSTER_DOMAIN}"):
            out[host] = ip
        if ns == namespace:
            out[name] = ip
    return out


def hosts_text(entries: Mapping[str, str]) -> str:
    by_ip: dict[str, list[str]] = {}
    for name, ip in entries.items():
        by_ip.setdefault(ip, []).append(name)
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{' '.join(names)}" for ip, names in by_ip.items()]
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------- network


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise DemoError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


WORKDIR_PREFIX = "xds-server-demo-"  # + PID + "-": the demo's temp workdir


def sweep_leftovers(tempdir: Path | None = None) -> list[str]:
    """Delete the namespaces (and /etc/netns dirs) of earlier demo runs whose process is gone,
    and their temp workdirs in `tempdir`; what was removed. Runs still alive are never
    touched. (The Envoys of a run killed with SIGKILL are not stopped here: they hold
    nothing the next run needs, in namespaces no name reaches any more; stop them by PID.)"""
    removed = []
    for path in tempdir.glob(f"{WORKDIR_PREFIX}*-*") if tempdir is not None else ():
        match = re.fullmatch(rf"{WORKDIR_PREFIX}(\d+)-.*", path.name)
        if match is not None and path.is_dir() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    done = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    for line in done.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}-(\d+)-[0-9a-f]{{6}}-.*", name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        removed.append(name)
    return removed


@dataclass
class NetPod:
    name: str  # the Kubernetes pod
    namespace: str  # the Kubernetes namespace
    netns: str
    ip: str

    @property
    def etc_dir(self) -> Path:
        return ETC_NETNS / self.netns

    def command(self, argv: Iterable[str], uid: int | None = None) -> list[str]:
        """argv inside this pod (`ip netns exec`, which execs: a Popen's PID is the program's),
        as `uid` (and the same GID, no supplementary groups) if given."""
        user = [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return ["ip", "netns", "exec", self.netns, *user, *argv]


@dataclass
class PodNetwork:
    """The node namespace, its bridge and the pods (see the module doc). Use start(), then
    add_pod() per pod, and close() (idempotent, never raises) in a finally."""

    pod_prefix: str = "10.89"  # pods: 10.89.0.2, ... (only inside these namespaces)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    pods: list[NetPod] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # namespaces, in creation order
    services: list[tuple[str, str, str]] = field(default_factory=list)  # name, ns, ClusterIP

    @property
    def base(self) -> str:
        return f"{PREFIX}-{os.getpid()}-{self.tag}"

    @property
    def node(self) -> str:
        return f"{self.base}-node"

    @property
    def bridge(self) -> str:
        return f"xdb{self.tag}"

    @property
    def bridge_ip(self) -> str:
        return f"{self.pod_prefix}.0.1"

    def start(self) -> None:
        self.created.append(self.node)  # first: close() removes a half-made node too
        _ip("netns", "add", self.node)
        _ip("-n", self.node, "link", "set", "lo", "up")
        _ip("-n", self.node, "link", "add", self.bridge, "type", "bridge")
        _ip("-n", self.node, "addr", "add", f"{self.bridge_ip}/16", "dev", self.bridge)
        _ip("-n", self.node, "link", "set", self.bridge, "up")

        def forward() -> None:
            # Pods reach each other through the bridge; with no ICMP rate limit, a dial to
            # anything else (a ClusterIP without a sidecar) fails at once ("unreachable").
            for key, value in (("ipv4/ip_forward", "1"), ("ipv4/icmp_ratelimit", "0")):
                Path("/proc/sys/net", key).write_text(value)

        in_netns(self.node, forward)

    def add_pod(self, name: str, namespace: str, ip: str) -> NetPod:
        """A pod namespace with eth0 (`ip`/16) on the bridge, a default route, loopback up,
        its hosts file and resolv.conf."""
        index = len(self.created)
        pod = NetPod(name, namespace, f"{self.base}-{index}-{name}"[:200], ip)
        peer = f"xdv{self.tag}{index}"  # the node's end; at most 15 characters
        self.created.append(pod.netns)  # before creating it: close() removes half-made pods
        self.pods.append(pod)
        _ip("netns", "add", pod.netns)
        _ip("-n", pod.netns, "link", "add", "eth0", "type", "veth", "peer", "name", peer,
            "netns", self.node)
        _ip("-n", self.node, "link", "set", peer, "master", self.bridge)
        _ip("-n", self.node, "link", "set", peer, "up")
        _ip("-n", pod.netns, "addr", "add", f"{ip}/16", "dev", "eth0")
        _ip("-n", pod.netns, "link", "set", "lo", "up")
        _ip("-n", pod.netns, "link", "set", "eth0", "up")
        _ip("-n", pod.netns, "route", "add", "default", "via", self.bridge_ip)
        pod.etc_dir.mkdir(parents=True, exist_ok=True)
        # No DNS server in a pod: a name that is not in its hosts file fails at once.
        (pod.etc_dir / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self._write_hosts(pod)
        return pod

    def hosts_for(self, pod: NetPod) -> dict[str, str]:
        """{name: IP} in the pod's hosts file."""
        return {pod.name: pod.ip, **service_host_entries(self.services, pod.namespace)}

    def set_services(self, services: Iterable[tuple[str, str, str]]) -> None:
        """(Re)write every pod's hosts file for these Services (name, namespace, ClusterIP)."""
        self.services = sorted(services)
        for pod in self.pods:
            self._write_hosts(pod)

    def _write_hosts(self, pod: NetPod) -> None:
        if not pod.etc_dir.is_dir():
            return
        # In place (same inode): programs already running have this very file bind-mounted.
        with open(pod.etc_dir / "hosts", "w") as f:
            f.write(hosts_text(self.hosts_for(pod)))

    def close(self) -> None:
        """Delete every namespace and /etc/netns directory this network made, by name."""
        for name in reversed(self.created):
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
            shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        self.created.clear()
        self.pods.clear()
