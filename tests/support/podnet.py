"""A mesh on one machine as Kubernetes-like pods made of Linux network namespaces (as root).

Why: the capture mode (iptables send an unmodified app's connections to its sidecar, which
routes by the original destination) can only be tested where each pod has its own network
stack. Here a "node" namespace holds a bridge; every pod is a namespace with one veth (eth0)
on that bridge, an address in 10.77.0.0/16 and a default route via the bridge. Those
addresses exist only inside these namespaces, so parallel tests reuse the same range.
ClusterIPs come from 10.96.0.0/16, which no interface has: no kube-proxy, only sidecars make
them reachable. Each pod has its own /etc/hosts (`ip netns exec` bind-mounts
/etc/netns/NAME/hosts), so `svc`, `svc.ns` and `svc.ns.svc.cluster.local` resolve.

- `PodNetwork`: the node, its pods and their hosts files; `close()` removes every namespace
  and /etc/netns directory it made, by name, also after failures.
- `NetPod`: run programs in the pod (as root or as the proxy UID), apply the real
  `xds-server iptables`, start backends inside it (`in_pod`: a thread that setns()s first),
  drive an unmodified app (`PodClient`, `curl`).
- `PodEnvoy`: a real Envoy inside the pod as UID/GID 1337 (exempt from the capture rules),
  its admin on a Unix socket the test process can reach from the root namespace.
- `CaptureMesh`: the netns counterpart of tests/support/mesh.py `MeshHarness`: the in-process
  server (reached by sidecars over a Unix socket), the file source, pods, services, sidecars.

Where this cannot run (not root, tools missing), creating a `PodNetwork` or `CaptureMesh`
raises `PodNetUnavailable` saying what is missing: tests fail with it, never skip.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import copy
import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, TypeVar

import yaml

from tests.support import netns
from tests.support.envoy import LISTENER_TYPE, EnvoyProcess
from tests.support.grpc_backend import GrpcBackend
from tests.support.programmable import ProgrammableBackend
from tests.support.upstreams import HttpResponse, HttpUpstream, TcpEchoUpstream
from tests.support.mesh import until
from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap
from xds_server.demo.netns import hosts_text, in_netns, service_host_entries
from xds_server.inject.settings import InjectorSettings
from xds_server.inject.template import INIT_CONTAINER, inject_pod
from xds_server.model.security import SecuritySettings
from xds_server.model.store import MeshStore
from xds_server.sources.mesh_files import MeshDirectory
from xds_server.translate.controller import MeshController
from xds_server.translate.scope import ScopeSettings
from xds_server.xds.cache import ResourceCache
from xds_server.xds.hooks import StreamHooks
from xds_server.xds.server import ServerSettings, XdsServer

__all__ = [
    "CLUSTER_DOMAIN",
    "PROXY_UID",
    "CaptureMesh",
    "MeshService",
    "NetPod",
    "PodClient",
    "PodEnvoy",
    "PodHttpResponse",
    "PodNetError",
    "PodNetUnavailable",
    "PodNetwork",
    "in_netns",
    "missing",
    "require",
    "service_host_entries",
    "traversable_tempdir",
]

T = TypeVar("T")

XDS_SERVER = str(Path(sys.executable).parent / "xds-server")
POD_CLIENT = Path(__file__).with_name("pod_client.py")
PROXY_UID = 1337  # the sidecar's UID and GID, exempt from the capture rules
CLUSTER_DOMAIN = "cluster.local"
NETNS_DIR = Path("/var/run/netns")
ETC_NETNS = Path("/etc/netns")


class PodNetUnavailable(RuntimeError):
    """This machine cannot run pods as network namespaces (the message says why)."""


class PodNetError(ConnectionError):
    """A connection made by a pod's app failed; `kind` is refused, reset, closed, timeout,
    unreachable, resolve, error, or hang (the client program itself did not answer)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def missing() -> str | None:
    """Why pods as network namespaces cannot run here, or None (netns.missing() plus what
    this harness uses on top: setpriv, the xds-server command)."""
    why = netns.missing()
    if why is not None:
        return why
    if shutil.which("setpriv") is None:
        return "setpriv not found: install the Debian package util-linux"
    if not os.access(XDS_SERVER, os.X_OK):
        return f"{XDS_SERVER} not found: run `make setup` (the venv's xds-server command)"
    return None


def require() -> None:
    """Raise PodNetUnavailable naming what is missing, if anything."""
    why = missing()
    if why is not None:
        raise PodNetUnavailable(f"pods as network namespaces cannot run here: {why}")


def _ip(*args: str) -> None:
    """Run `ip ARGS`; a failure raises with ip's own message."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _traversable_base() -> Path:
    base = Path(tempfile.gettempdir())
    if any(not (p.stat().st_mode & 0o001) for p in (base, *base.parents)):
        base = Path("/tmp")
    return base


def traversable_tempdir(prefix: str) -> Path:
    """A new 0755 temp dir every UID can traverse (the proxy UID must reach files in it);
    pytest's tmp dirs are 0700, so this is under /tmp unless $TMPDIR is traversable."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=_traversable_base()))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------------- pods


class _Stoppable(Protocol):
    def stop(self) -> Any: ...


def _user_prefix(user: int | None, group: int | None = None) -> list[str]:
    if user is None:
        return []
    gid = user if group is None else group
    return ["setpriv", f"--reuid={user}", f"--regid={gid}", "--clear-groups"]


def _kill(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM the PID, SIGKILL after `timeout`, reap. Never by name."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)


class NetPod:
    """One pod: a network namespace with eth0 on the node's bridge, its IP, its Kubernetes
    name, namespace, service account and labels, and whatever the test started in it
    (programs, backends, clients, its sidecar), all stopped by `close()`."""

    def __init__(
        self, network: PodNetwork, name: str, namespace: str, netns: str, ip: str, *,
        service_account: str = "default", labels: Mapping[str, str] | None = None,
    ) -> None:
        self.network = network
        self.name = name
        self.namespace = namespace
        self.netns = netns
        self.ip = ip
        self.service_account = service_account
        self.labels: dict[str, str] = dict(labels) if labels is not None else {"app": name}
        self.app_port: int | None = None  # set by CaptureMesh.pod
        self.has_sidecar = False  # CaptureMesh.pod: manifest carries a sidecar container
        self.tcp_upstreams = ""  # the xds-server.io/tcp-upstreams annotation
        self.backend: HttpUpstream | TcpEchoUpstream | GrpcBackend | None = None
        self.envoy: PodEnvoy | None = None
        self._stoppables: list[_Stoppable] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._clients: list[PodClient] = []
        self._app: PodClient | None = None

    def __repr__(self) -> str:
        return f"NetPod({self.namespace}/{self.name}, ip={self.ip}, netns={self.netns})"

    @property
    def etc_dir(self) -> Path:
        return ETC_NETNS / self.netns

    # Programs ----------------------------------------------------------------------------

    def command(self, argv: Sequence[str], user: int | None = None, group: int | None = None) -> list[str]:
        """argv run in this pod (`ip netns exec`), as `user` if given (`setpriv`); both
        exec, so the PID of a Popen of it is the program's own."""
        return ["ip", "netns", "exec", self.netns, *_user_prefix(user, group), *argv]

    def run(
        self, argv: Sequence[str], *, user: int | None = None, timeout: float = 30.0,
        input: str | None = None, env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a program in the pod to completion; its output as text (never raises on a
        non-zero exit: check returncode)."""
        return subprocess.run(
            self.command(argv, user), capture_output=True, text=True, timeout=timeout,
            input=input, env=dict(env) if env is not None else None,
        )

    def popen(self, argv: Sequence[str], *, user: int | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a program in the pod; killed by PID when the pod closes."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(argv, user), **kwargs)
        self._procs.append(proc)
        return proc

    def apply_capture(self, *extra_args: str) -> subprocess.CompletedProcess[str]:
        """Apply the real `xds-server iptables` capture rules in this pod (defaults: outbound
        15001, inbound 15006, proxy UID/GID 1337); raises with its stderr on failure."""
        done = self.run([XDS_SERVER, "iptables", *extra_args])
        if done.returncode != 0:
            raise RuntimeError(
                f"xds-server iptables {' '.join(extra_args)} failed in {self.netns} "
                f"({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def capture_rules(self) -> list[str]:
        """The nat-table rules of the capture chains (XDS_*) now in the pod."""
        saved = self.run(["iptables-save", "-t", "nat"]).stdout.splitlines()
        return [line for line in saved if "XDS_" in line]

    def curl(self, url: str, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        """A stock client: curl in the pod (root, so captured), silent but showing errors,
        no proxy from the environment, `-m timeout`; extra args are curl's own."""
        if shutil.which("curl") is None:
            raise PodNetUnavailable("curl not found: install the Debian package curl")
        argv = ["curl", "-sS", "--noproxy", "*", "-m", str(timeout), *args, url]
        return self.run(argv, timeout=timeout + 10)

    # In-process servers in the pod -------------------------------------------------------

    def in_pod(self, fn: Callable[[], T]) -> T:
        """Call `fn` in a thread inside this pod's network namespace (see `in_netns`)."""
        return in_netns(self.netns, fn)

    def http_echo(self, port: int = 8080, name: str | None = None, host: str = "0.0.0.0") -> HttpUpstream:
        """tests.support.upstreams.HttpUpstream listening in this pod (all its addresses,
        loopback included), started; stopped when the pod closes."""
        upstream = self.in_pod(lambda: HttpUpstream(name or self.name, host, port).start())
        assert isinstance(upstream, HttpUpstream)
        self._stoppables.append(upstream)
        return upstream

    def tcp_echo(
        self, port: int, name: str | None = None, host: str = "0.0.0.0", prefix: bytes | None = None
    ) -> TcpEchoUpstream:
        """tests.support.upstreams.TcpEchoUpstream listening in this pod, started."""
        upstream = self.in_pod(lambda: TcpEchoUpstream(name or self.name, host, port, prefix).start())
        assert isinstance(upstream, TcpEchoUpstream)
        self._stoppables.append(upstream)
        return upstream

    def grpc_backend(self, port: int, name: str | None = None, host: str = "0.0.0.0") -> GrpcBackend:
        """tests.support.grpc_backend.GrpcBackend (answers `Who` with its name) in this pod."""
        backend = self.in_pod(lambda: GrpcBackend(name or self.name, host, port).start())
        self._stoppables.append(backend)
        return backend

    def programmable(self, port: int = 8080, name: str | None = None, host: str = "0.0.0.0",
                     **behaviour: Any) -> ProgrammableBackend:
        """tests.support.programmable.ProgrammableBackend (fails, delays, counts on demand:
        `behaviour` are its settings) listening in this pod, started."""
        backend = self.in_pod(lambda: ProgrammableBackend(name or self.name, host, port, **behaviour).start())
        self._stoppables.append(backend)
        return backend

    # The app -----------------------------------------------------------------------------

    def client(self, user: int | None = None) -> PodClient:
        """A new unmodified app process in this pod (see PodClient); closed with the pod."""
        made = PodClient(self, user=user)
        self._clients.append(made)
        return made

    @property
    def app(self) -> PodClient:
        """This pod's default app client (started on first use)."""
        if self._app is None or not self._app.alive:
            self._app = self.client()
        return self._app

    def http(
        self, url: str, method: str = "GET", headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        body: bytes | str | None = None, timeout: float = 5.0,
    ) -> PodHttpResponse:
        """What this pod's app gets for an HTTP request (through its sidecar when captured)."""
        return self.app.http(url, method=method, headers=headers, body=body, timeout=timeout)

    def http_many(
        self, url: str, count: int, *, concurrency: int = 1, together: bool = False, method: str = "GET",
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None, timeout: float = 5.0,
    ) -> list[PodHttpResponse | PodNetError]:
        """What this pod's app gets for `count` requests, `concurrency` at a time (see
        PodClient.http_many)."""
        return self.app.http_many(url, count, concurrency=concurrency, together=together, method=method,
                                  headers=headers, timeout=timeout)

    def tcp(self, host: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
        """What this pod's app reads back after sending `payload` and half-closing."""
        return self.app.tcp(host, port, payload, timeout=timeout)

    # Kubernetes --------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """The Pod object: status.podIP is this pod's IP; with a sidecar, as the injector
        (`xds-server inject`, the admission webhook) makes it: its capture init container and
        native Envoy sidecar (capture is the default interception: no annotation)."""
        annotations: dict[str, str] = {}
        containers: list[dict[str, Any]] = [
            {"name": "app", "ports": [{"containerPort": self.app_port}] if self.app_port else []}
        ]
        if self.tcp_upstreams:
            annotations["xds-server.io/tcp-upstreams"] = self.tcp_upstreams
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name, "namespace": self.namespace, "labels": self.labels,
                "annotations": annotations,
            },
            "spec": {"serviceAccountName": self.service_account, "containers": containers},
            "status": {"podIP": self.ip},
        }
        if not self.has_sidecar:
            return pod
        injected, outcome = inject_pod(pod, InjectorSettings())
        assert outcome.injected, outcome.reason
        return injected

    def injected_capture_command(self) -> list[str]:
        """The command of the capture init container the injector gives this pod: what
        `apply_capture` runs (with this environment's `xds-server`)."""
        init = next(c for c in self.manifest()["spec"]["initContainers"] if c["name"] == INIT_CONTAINER)
        command = list(init.get("command", [])) + list(init.get("args", []))
        assert command[:2] == ["xds-server", "iptables"], command
        return command[2:]

    # Cleanup -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the sidecar, clients, programs and backends started in this pod. Idempotent;
        every step runs even if an earlier one fails."""
        steps: list[Callable[[], Any]] = []
        if self.envoy is not None:
            steps.append(self.envoy.stop)
        steps += [c.close for c in self._clients]
        steps += [functools.partial(_kill, p) for p in self._procs]
        steps += [s.stop for s in self._stoppables]
        for step in steps:
            with contextlib.suppress(Exception):
                step()
        self._clients.clear()
        self._procs.clear()
        self._stoppables.clear()


# ------------------------------------------------------------------------------ network

_live_networks: weakref.WeakSet[PodNetwork] = weakref.WeakSet()


@atexit.register
def _close_leftovers() -> None:
    """Last resort: never leave namespaces behind when the test process exits."""
    for network in list(_live_networks):
        network.close()


def _node_sysctls() -> None:
    for key, value in (("ipv4/ip_forward", "1"), ("ipv4/icmp_ratelimit", "0")):
        Path("/proc/sys/net", key).write_text(value)


class PodNetwork:
    """A node namespace with a bridge and pods on it (see the module doc).

    Use `with PodNetwork() as net:` or start()/close(). Names carry a random tag, so
    parallel tests (pytest-xdist) never collide; `close()` deletes exactly what this
    instance created, by name, even after a failure half-way through creating it.
    """

    def __init__(self, *, pod_prefix: str = "10.77", cluster_ip_prefix: str = "10.96") -> None:
        require()
        self.tag = uuid.uuid4().hex[:8]
        self.node = f"xpn-{self.tag}-node"
        self.bridge = f"xb{self.tag}"
        self.pod_prefix = pod_prefix
        self.cluster_ip_prefix = cluster_ip_prefix
        self.bridge_ip = f"{pod_prefix}.0.1"
        self.pods: list[NetPod] = []
        self.namespaces: list[str] = []  # every namespace this instance created (or tried to)
        self._etc_dirs: list[Path] = []
        self._next_host = 2
        self._next_cluster_ip = 10
        self._names: dict[str, str] = {}
        self._services: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    # Lifecycle ---------------------------------------------------------------------------

    def start(self) -> PodNetwork:
        """Create the node namespace and its bridge (idempotent)."""
        if self._closed:
            raise RuntimeError("this PodNetwork is closed: make a new one")
        if self._started:
            return self
        self._started = True
        _live_networks.add(self)
        try:
            self.namespaces.append(self.node)
            _ip("netns", "add", self.node)
            _ip("-n", self.node, "link", "set", "lo", "up")
            _ip("-n", self.node, "link", "add", self.bridge, "type", "bridge")
            _ip("-n", self.node, "addr", "add", f"{self.bridge_ip}/16", "dev", self.bridge)
            _ip("-n", self.node, "link", "set", self.bridge, "up")
            # The node routes nothing beyond the bridge (no default route): with forwarding
            # on and no ICMP rate limit, a pod dialling anything else (a ClusterIP without a
            # sidecar) is told "unreachable" at once instead of waiting for a timeout.
            in_netns(self.node, _node_sysctls)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop everything in the pods, then delete every namespace and /etc/netns/<name>
        directory this instance made, by name. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        for pod in reversed(self.pods):
            pod.close()
        for name in reversed(self.namespaces):  # a namespace takes its veth ends with it
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
        for directory in self._etc_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        _live_networks.discard(self)

    def __enter__(self) -> PodNetwork:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # Pods --------------------------------------------------------------------------------

    def _next_pod_ip(self) -> str:
        with self._lock:
            n = self._next_host
            self._next_host += 1
        if n >= 65535:
            raise RuntimeError("pod range exhausted")
        return f"{self.pod_prefix}.{n >> 8}.{n & 255}"

    def allocate_cluster_ip(self) -> str:
        """A fresh ClusterIP: in a range no interface has, reachable only through sidecars."""
        with self._lock:
            n = self._next_cluster_ip
            self._next_cluster_ip += 1
        if n >= 65535:
            raise RuntimeError("ClusterIP range exhausted")
        return f"{self.cluster_ip_prefix}.{n >> 8}.{n & 255}"

    def add_pod(
        self, name: str, namespace: str = "default", *, service_account: str = "default",
        labels: Mapping[str, str] | None = None,
    ) -> NetPod:
        """A new pod namespace: eth0 on the bridge with the next pod IP, a default route via
        the bridge, loopback up, its own hosts file and a resolv.conf that fails at once."""
        self.start()
        index = len(self.namespaces)
        ns_name = f"xpn-{self.tag}-{index}-{name}"[:100]
        peer = f"xv{self.tag}{index}"  # node side of the veth; at most 15 characters
        ip = self._next_pod_ip()
        self.namespaces.append(ns_name)  # before creating: close() removes half-made pods
        pod = NetPod(self, name, namespace, ns_name, ip, service_account=service_account, labels=labels)
        self.pods.append(pod)
        _ip("netns", "add", ns_name)
        _ip("-n", ns_name, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", self.node)
        _ip("-n", self.node, "link", "set", peer, "master", self.bridge)
        _ip("-n", self.node, "link", "set", peer, "up")
        _ip("-n", ns_name, "addr", "add", f"{ip}/16", "dev", "eth0")
        _ip("-n", ns_name, "link", "set", "lo", "up")
        _ip("-n", ns_name, "link", "set", "eth0", "up")
        _ip("-n", ns_name, "route", "add", "default", "via", self.bridge_ip)
        self._etc_dirs.append(pod.etc_dir)
        pod.etc_dir.mkdir(parents=True, exist_ok=True)
        # No DNS server in a pod: an unknown name fails at once instead of waiting on the
        # host's nameserver, which the pod cannot reach.
        (pod.etc_dir / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self._write_hosts(pod)
        return pod

    # Names -------------------------------------------------------------------------------

    def set_hosts(
        self, names: Mapping[str, str] | None = None, *, services: Iterable[tuple[str, str, str]] | None = None
    ) -> None:
        """(Re)write every pod's hosts file: `names` ({host: ip}) for every pod, plus each
        Service (name, namespace, cluster IP) in the forms the pod's namespace resolves
        (service_host_entries). None keeps what was set before; pods added later get the
        same. Files are rewritten in place, so running programs see the change."""
        with self._lock:
            if names is not None:
                self._names = dict(names)
            if services is not None:
                self._services = list(services)
        for pod in self.pods:
            self._write_hosts(pod)

    def hosts_for(self, pod: NetPod) -> dict[str, str]:
        """{host: ip} in `pod`'s hosts file."""
        entries = {pod.name: pod.ip}
        entries.update(self._names)
        entries.update(service_host_entries(self._services, pod.namespace))
        return entries

    def _write_hosts(self, pod: NetPod) -> None:
        path = pod.etc_dir / "hosts"
        if not pod.etc_dir.exists():
            return
        # In place (same inode): `ip netns exec` bind-mounted this very file into programs
        # already running; a rename would leave them the old one.
        with open(path, "w") as f:
            f.write(hosts_text(self.hosts_for(pod)))


# ------------------------------------------------------------------------------- client


@dataclass
class PodHttpResponse(HttpResponse):
    """tests.support.upstreams.HttpResponse plus every header as sent, in order
    (`headers` keeps the last value of a repeated name), and the seconds the app waited
    for it (measured in the pod, from connecting to the end of the body)."""

    header_list: list[tuple[str, str]] = field(default_factory=list)
    elapsed: float = 0.0


def _http_command(
    url: str, method: str, headers: Mapping[str, str] | Sequence[tuple[str, str]] | None,
    body: bytes | str | None, timeout: float,
) -> dict[str, Any]:
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or ())
    raw = body.encode() if isinstance(body, str) else body
    return {
        "op": "http", "url": url, "method": method, "headers": pairs,
        "body": base64.b64encode(raw).decode() if raw is not None else None, "timeout": timeout,
    }


class PodClient:
    """An unmodified app in a pod: tests/support/pod_client.py started with `ip netns exec`
    (the pod's network and hosts file), driven over JSON lines. A failed connection raises
    PodNetError (with `kind`); a client that stops answering is killed, never waited on."""

    def __init__(self, pod: NetPod, user: int | None = None) -> None:
        self.pod = pod
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self._proc: subprocess.Popen[bytes] = subprocess.Popen(
            pod.command([sys.executable, "-u", str(POD_CLIENT)], user),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
        )
        self._buffer = b""
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def _call(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        with self._lock:
            if not self.alive:
                raise PodNetError("hang", f"pod client exited ({self._proc.returncode}): {self._stderr_text()}")
            assert self._proc.stdin is not None and self._proc.stdout is not None
            try:
                self._proc.stdin.write(json.dumps(command).encode() + b"\n")
                self._proc.stdin.flush()
            except BrokenPipeError as err:
                raise PodNetError("hang", f"pod client gone: {self._stderr_text()}") from err
            fd = self._proc.stdout.fileno()
            deadline = time.monotonic() + timeout + 10  # the client's own timeout, then some
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    _kill(self._proc)
                    raise PodNetError("hang", f"pod client did not answer {command.get('op')} in time")
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise PodNetError("hang", f"pod client exited: {self._stderr_text()}")
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise PodNetError(str(answer.get("kind", "error")), str(answer.get("error", "")))
        return answer

    def http(
        self, url: str, method: str = "GET", headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        body: bytes | str | None = None, timeout: float = 5.0,
    ) -> PodHttpResponse:
        """One request on a fresh connection to the URL's host (resolved in the pod); no
        redirects followed. `json` is the parsed body when it is JSON."""
        return self._response(self._call(_http_command(url, method, headers, body, timeout), timeout))

    def http_many(
        self, url: str, count: int, *, concurrency: int = 1, together: bool = False, method: str = "GET",
        headers: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        body: bytes | str | None = None, timeout: float = 5.0,
    ) -> list[PodHttpResponse | PodNetError]:
        """`count` requests as `http` makes them (each on its own connection), made by the
        app `concurrency` at a time from threads; `together`: the first `concurrency` leave
        at the same moment (a burst). One result per request, in order: the response, or
        the PodNetError its connection failed with."""
        command = {**_http_command(url, method, headers, body, timeout), "op": "http_many",
                   "count": count, "concurrency": concurrency, "together": together}
        rounds = -(-count // max(1, concurrency))
        answer = self._call(command, timeout * rounds + 10)
        return [
            self._response(a) if a.get("ok") else PodNetError(str(a.get("kind", "error")), str(a.get("error", "")))
            for a in answer["results"]
        ]

    @staticmethod
    def _response(answer: Mapping[str, Any]) -> PodHttpResponse:
        header_list = [(str(k), str(v)) for k, v in answer["headers"]]
        data = base64.b64decode(answer["body"])
        header_map = dict(header_list)
        parsed: Any = None
        if header_map.get("content-type", "").startswith("application/json"):
            with contextlib.suppress(ValueError):
                parsed = json.loads(data)
        return PodHttpResponse(status=int(answer["status"]), headers=header_map, body=data, json=parsed,
                               header_list=header_list, elapsed=float(answer.get("elapsed", 0.0)))

    def tcp(self, host: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
        """Connect, send `payload`, half-close, return everything read until EOF."""
        answer = self._call({
            "op": "tcp", "host": host, "port": port, "payload": base64.b64encode(payload).decode(),
            "timeout": timeout,
        }, timeout)
        return base64.b64decode(answer["reply"])

    def connect(self, host: str, port: int, timeout: float = 5.0) -> tuple[str, str]:
        """Only connect (then close): ("local ip:port", "peer ip:port") as the app saw them."""
        answer = self._call({"op": "connect", "host": host, "port": port, "timeout": timeout}, timeout)
        return str(answer["local"]), str(answer["peer"])

    def resolve(self, host: str) -> list[str]:
        """IPv4 addresses getaddrinfo gives the app for `host` (PodNetError kind "resolve")."""
        return [str(a) for a in self._call({"op": "resolve", "host": host}, 5.0)["addresses"]]

    def close(self) -> None:
        """End the program (EOF, then by PID). Idempotent."""
        if self._proc.stdin is not None and not self._proc.stdin.closed:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(2)
        except subprocess.TimeoutExpired:
            _kill(self._proc)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._stderr.close()

    def __enter__(self) -> PodClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# -------------------------------------------------------------------------------- Envoy


class PodEnvoy(EnvoyProcess):
    """A real Envoy inside a pod, as UID/GID 1337 so the capture rules' owner match lets its
    own connections out: `ip netns exec POD setpriv --reuid=1337 --regid=1337 --clear-groups
    envoy ...` (each execs: the PID is Envoy's, stop() kills it and removes its dir).

    The test process, in the root namespace, cannot reach 127.0.0.1 inside the pod, so the
    admin is a Unix socket in the workdir (mode 0666) and every admin helper of EnvoyProcess
    (server_state, stats, config_dump, listeners, clusters, wait_until, wait_ready) speaks
    HTTP over it. The workdir belongs to the proxy UID; the bootstrap stays 0600, its owner.
    """

    def __init__(
        self, pod: NetPod, bootstrap: Mapping[str, Any], *, name: str | None = None,
        uid: int = PROXY_UID, gid: int = PROXY_UID, log_level: str = "warning",
        concurrency: int = 1, drain_time_s: int = 1, extra_args: Sequence[str] = (),
    ) -> None:
        name = name or f"{pod.namespace}-{pod.name}"
        workdir = traversable_tempdir(f"podenvoy-{name}-")
        os.chown(workdir, uid, gid)
        self.pod = pod
        self.uid, self.gid = uid, gid
        self.admin_socket = workdir / "admin.sock"
        config: dict[str, Any] = copy.deepcopy(dict(bootstrap))
        config["admin"] = {"address": {"pipe": {"path": str(self.admin_socket), "mode": 0o666}}}
        super().__init__(config, name=name, log_level=log_level, concurrency=concurrency,
                         drain_time_s=drain_time_s, extra_args=extra_args, workdir=workdir)
        self._own_dir = True  # made here: removed on stop (unless $KEEP_ENVOY_LOGS)
        pod._stoppables.append(self)  # closing the pod (or its network) stops it too

    def command(self) -> list[str]:
        return self.pod.command(super().command(), self.uid, self.gid)

    def start(self, timeout: float = 20.0) -> PodEnvoy:  # type: ignore[override]
        """Start Envoy in the pod and wait until its admin answers (not until LIVE)."""
        # start() writes the bootstrap 0600 into an existing file, which keeps its owner.
        self.bootstrap_path.touch(mode=0o600)
        os.chown(self.bootstrap_path, self.uid, self.gid)
        super().start(timeout)
        return self

    def __repr__(self) -> str:
        return f"PodEnvoy(name={self.name!r}, pid={self.pid}, pod={self.pod.netns}, admin={self.admin_socket})"


# --------------------------------------------------------------------------------- mesh


@dataclass
class MeshService:
    """A Service CaptureMesh wrote: its ClusterIP and its ports (as in the manifest)."""

    namespace: str
    name: str
    cluster_ip: str
    ports: list[dict[str, Any]]
    pods: list[NetPod] = field(default_factory=list)

    @property
    def host(self) -> str:
        """The fully qualified name (resolves in every pod)."""
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"


class CaptureMesh:
    """A whole mesh as network-namespace pods, for end-to-end tests of the capture mode:
    the netns counterpart of tests/support/mesh.py MeshHarness (same calls).

    The server runs in-process with the file source on `directory` and also listens on a
    Unix socket (in a 0755 temp dir the proxy UID can traverse), which sidecars inside the
    pods reach through Envoy's `pipe` address: nothing crosses namespaces over TCP. Use
    `async with CaptureMesh(dir) as mesh:` or `await start()` / `await stop()`; stop()
    removes every Envoy, backend, client, namespace and the socket dir, also after a
    failed start.
    """

    def __init__(
        self, directory: Path, *, scope: ScopeSettings | None = None,
        security: SecuritySettings | None = None, hooks: Iterable[StreamHooks] = (),
        cache: ResourceCache | None = None,
    ) -> None:
        require()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.network = PodNetwork()
        self.socket_dir = _traversable_base() / f"xds-podnet-{self.network.tag}"  # made in start()
        self.socket_path = self.socket_dir / "xds.sock"
        self.store = MeshStore()
        self.cache = cache if cache is not None else ResourceCache()
        self.controller = MeshController(self.store, self.cache, scope, security)
        self.source = MeshDirectory(directory, self.store)
        self.server = XdsServer(
            self.cache,
            ServerSettings(address="127.0.0.1:0", unix_socket=str(self.socket_path),
                           debounce_quiet=0.02, debounce_max=0.2),
            view_for=self.controller.view_for,
            release_view=self.controller.release,
            hooks=hooks,
        )
        self.pods: list[NetPod] = []
        self.services: dict[tuple[str, str], MeshService] = {}

    @property
    def xds_address(self) -> str:
        """What a sidecar's bootstrap names: the server's Unix socket."""
        return f"unix:{self.socket_path}"

    async def start(self) -> CaptureMesh:
        try:
            self.socket_dir.mkdir(mode=0o755)
            self.socket_dir.chmod(0o755)  # whatever the umask: the proxy UID must traverse it
            self.network.start()
            # Writes load synchronously (see write()), as in MeshHarness.
            self.source.load()
            await self.server.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        """Stop every sidecar, then the pods' programs and the network, then the server.
        Idempotent; each step runs even if an earlier one failed."""
        try:
            envoys = [p.envoy for p in self.pods if p.envoy is not None]
            await asyncio.gather(*(asyncio.to_thread(e.stop) for e in envoys), return_exceptions=True)
        finally:
            try:
                await asyncio.to_thread(self.network.close)
            finally:
                try:
                    await self.server.stop(0.2)
                finally:
                    shutil.rmtree(self.socket_dir, ignore_errors=True)

    async def __aenter__(self) -> CaptureMesh:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # Writing the mesh --------------------------------------------------------------------

    def write(self, name: str, *objects: dict[str, Any] | str) -> None:
        """Write objects (dicts or YAML text) to one file and load it now."""
        docs = [yaml.safe_load(textwrap.dedent(o)) if isinstance(o, str) else o for o in objects]
        (self.directory / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
        errors = self.source.load()
        bad = [e for e in errors if e.severity == "error"]
        assert not bad, "\n".join(str(e) for e in bad)

    def service(
        self, namespace: str, name: str, port: int = 80, *, app_protocol: str | None = "http",
        pods: Sequence[NetPod] = (), target_port: int | None = None,
        annotations: Mapping[str, str] | None = None, extra_ports: Sequence[Mapping[str, Any]] = (),
        ports: Sequence[Mapping[str, Any]] | None = None,
    ) -> MeshService:
        """A Service with a ClusterIP (kept when rewritten) and its EndpointSlice backed by
        `pods` (ready, targetRef to each); every pod's hosts file then names it.

        `ports`, if given, are the Service's ports as in a manifest (name, port, targetPort,
        appProtocol); otherwise one port "main" (`port` -> `target_port` or the first pod's
        app port, `app_protocol`) plus `extra_ports`."""
        if ports is None:
            target = target_port or (pods[0].app_port if pods and pods[0].app_port else port)
            main: dict[str, Any] = {"name": "main", "port": port, "targetPort": target}
            if app_protocol:
                main["appProtocol"] = app_protocol
            ports = [main, *extra_ports]
        port_list = [dict(p) for p in ports]
        known = self.services.get((namespace, name))
        cluster_ip = known.cluster_ip if known is not None else self.network.allocate_cluster_ip()
        service = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "annotations": dict(annotations or {})},
            "spec": {"clusterIP": cluster_ip, "ports": port_list},
        }
        slice_ports = []
        for p in port_list:
            entry: dict[str, Any] = {"port": int(p.get("targetPort", p["port"])), "protocol": "TCP"}
            if "name" in p:
                entry["name"] = p["name"]
            if "appProtocol" in p:
                entry["appProtocol"] = p["appProtocol"]
            slice_ports.append(entry)
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1", "namespace": namespace,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": slice_ports,
            "endpoints": [
                {
                    "addresses": [p.ip], "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace},
                }
                for p in pods
            ],
        }
        self.write(f"svc-{namespace}-{name}.yaml", service, slice_)
        made = MeshService(namespace, name, cluster_ip, port_list, list(pods))
        self.services[(namespace, name)] = made
        self.network.set_hosts(services=[(s.name, s.namespace, s.cluster_ip) for s in self.services.values()])
        return made

    # Pods --------------------------------------------------------------------------------

    def pod(
        self, namespace: str, name: str, *, app: str | None = "http", app_port: int = 8080,
        labels: Mapping[str, str] | None = None, service_account: str = "default",
        sidecar: bool = True, tcp_upstreams: str = "", capture_args: Sequence[str] = (),
    ) -> NetPod:
        """A pod with its backend (`app`: "http" echo, "tcp" echo, "grpc", or None) on
        `app_port` inside it and its manifest written; with `sidecar`, the manifest has the
        `envoy` container and the capture rules are applied (`capture_args` go to
        `xds-server iptables`). The sidecar itself starts with `await sidecar(pod)`."""
        pod = self.network.add_pod(name, namespace, service_account=service_account,
                                   labels=labels or {"app": name})
        self.pods.append(pod)
        pod.app_port = app_port
        pod.has_sidecar = sidecar
        pod.tcp_upstreams = tcp_upstreams
        if app == "http":
            pod.backend = pod.http_echo(app_port, name)
        elif app == "tcp":
            pod.backend = pod.tcp_echo(app_port, name)
        elif app == "grpc":
            pod.backend = pod.grpc_backend(app_port, name)
        elif app is not None:
            raise ValueError(f"app must be http, tcp, grpc or None, not {app!r}")
        self.write(f"pod-{namespace}-{name}.yaml", pod.manifest())
        if sidecar:
            # Exactly what the injected init container runs, then the test's own options.
            pod.apply_capture(*pod.injected_capture_command(), *capture_args)
        return pod

    async def sidecar(self, pod: NetPod, *, delta: bool = True, timeout: float = 20.0) -> NetPod:
        """Start the pod's Envoy (PodEnvoy) from the generated capture-mode bootstrap, the
        xDS server on its Unix socket, and wait until it is LIVE."""
        spec = SidecarSpec(
            namespace=pod.namespace, service_account=pod.service_account, pod=pod.name,
            pod_ip=pod.ip, xds_address=self.xds_address, interception="capture",
            admin_address="127.0.0.1:15000",  # replaced by PodEnvoy's Unix-socket admin
            labels=pod.labels, delta=delta,
        )
        envoy = PodEnvoy(pod, sidecar_bootstrap(spec))
        pod.envoy = envoy  # set first: stop() stops it even if it never became ready
        await asyncio.to_thread(envoy.start)
        await asyncio.to_thread(envoy.wait_ready, timeout)
        return pod

    def sent(self, pod: NetPod, type_url: str = LISTENER_TYPE) -> dict[str, str]:
        """{name: version} of the resources of `type_url` the server has sent the pod's
        sidecar on its open stream(s) ({} when it has none)."""
        out: dict[str, str] = {}
        for conn in list(self.server.connections):
            node = conn.state.node
            if node is not None and node.id == f"{pod.name}.{pod.namespace}":
                state = conn.state.types.get(type_url)
                if state is not None:
                    out.update(state.known or {r.name: r.version for r in state.last_full.values()})
        return out

    def connection_peers(self, pod: NetPod) -> list[str]:
        """How the pod's sidecar streams reached the server (gRPC peer strings: "unix:..."
        for the Unix socket)."""
        return [c.peer for c in list(self.server.connections)
                if c.state.node is not None and c.state.node.id == f"{pod.name}.{pod.namespace}"]

    async def until(
        self, probe: Callable[[], T], timeout: float = 10.0, message: str = "condition"
    ) -> T:
        """Poll a blocking probe (run in a thread) until it returns something truthy."""
        return await until(probe, timeout, message)

