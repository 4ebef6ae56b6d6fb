"""The plan: which pods run where, with which app ports and env, read from the mesh; and the
early checks that every address the demo needs is free."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import is_loopback
from ..model.mesh import ENVOY_ADMIN_PORT, AppProtocol, EndpointSlice, Workload
from ..model.store import ENDPOINT_SLICE, POD, MeshStore
from ..sources.k8s_objects import SIDECAR_CONTAINERS
from .apps import App, HttpApp, TcpEchoApp
from .errors import DemoError
from .netns import listen_in
from .sidecar import Sidecar

CALLS_ENV = "DEMO_CALLS"  # the Service the calling app sends HTTP to (by name)
CALLS_TCP_ENV = "DEMO_CALLS_TCP"  # host:port[,host:port] it makes TCP round trips to (capture)
FAIL_EVERY_ENV = "DEMO_FAIL_EVERY"


@dataclass
class PodPlan:
    workload: Workload
    env: dict[str, str]
    ports: dict[int, AppProtocol]  # app port -> what speaks on it
    apps: list[App] = field(default_factory=list)
    sidecar: Sidecar | None = None

    @property
    def version(self) -> str:
        return self.workload.label_map.get("version", "")


def _container_env(source: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(namespace, pod) -> env of its app containers. The model has no env (the control plane
    never needs it); the demo's apps read their settings from it, as real apps would."""
    from ..sources.mesh_files import DEFAULT_NAMESPACE, mesh_files

    out: dict[tuple[str, str], dict[str, str]] = {}
    for path in mesh_files(source):
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue  # reported by validation
        objects: list[Any] = []
        for doc in documents:
            if isinstance(doc, list):
                objects += doc
            elif isinstance(doc, dict) and doc.get("kind") == "List":
                objects += doc.get("items") or []
            else:
                objects.append(doc)
        for obj in objects:
            if not isinstance(obj, dict) or obj.get("kind") != "Pod":
                continue
            meta = obj.get("metadata") or {}
            env: dict[str, str] = {}
            for container in (obj.get("spec") or {}).get("containers") or []:
                if not isinstance(container, dict) or container.get("name") in SIDECAR_CONTAINERS:
                    continue
                for item in container.get("env") or []:
                    if isinstance(item, dict) and "name" in item:
                        env[str(item["name"])] = str(item.get("value", ""))
            out[(meta.get("namespace") or DEFAULT_NAMESPACE, str(meta.get("name")))] = env
    return out


def plan_pods(store: MeshStore, source: Path) -> list[PodPlan]:
    """Every pod with an IP, the app ports its EndpointSlices (or containers) name, its env."""
    env = _container_env(source)
    workloads = [w for w in store.all(POD).values() if isinstance(w, Workload) and w.ip]
    ports: dict[tuple[str, str], dict[int, AppProtocol]] = {}
    by_ip = {(w.namespace, w.ip): w for w in workloads}
    for slice_ in store.all(ENDPOINT_SLICE).values():
        if not isinstance(slice_, EndpointSlice):
            continue
        for endpoint in slice_.endpoints:
            workload = by_ip.get((slice_.namespace, endpoint.address))
            if workload is None or (endpoint.pod and endpoint.pod != workload.name):
                continue
            for port in slice_.ports:
                ports.setdefault((workload.namespace, workload.name), {})[port.port] = port.app_protocol
    plans: list[PodPlan] = []
    for w in sorted(workloads, key=lambda w: (w.namespace, w.name)):
        key = (w.namespace, w.name)
        pod_ports = ports.get(key) or {port: AppProtocol.HTTP for _, port in w.container_ports}
        plans.append(PodPlan(w, env.get(key, {}), dict(sorted(pod_ports.items()))))
    return plans


async def start_apps(plan: PodPlan, netns: str | None = None) -> None:
    """The pod's apps, one per app port: HTTP (tuned by DEMO_FAIL_EVERY) or a TCP echo; on
    the pod's IP, or with `netns` on all addresses inside that network namespace."""
    workload = plan.workload
    fail_text = plan.env.get(FAIL_EVERY_ENV) or "0"
    if not fail_text.isdigit():
        raise DemoError(f"pod {workload.name}: {FAIL_EVERY_ENV} must be a whole "
                        f"number (answer 503 to every Nth request), got {fail_text!r}")
    fail_every = int(fail_text)
    for port, protocol in plan.ports.items():
        if protocol.is_http:
            service = workload.label_map.get("app", workload.name)
            app: App = HttpApp(workload.ip, port, workload.name, service, plan.version, fail_every)
        else:
            app = TcpEchoApp(workload.ip, port)
        try:
            await app.start(listen_in(netns, port) if netns else None)
        except OSError as err:
            raise DemoError(f"cannot start {workload.name}'s app on "
                            f"{workload.ip}:{port}: {err}") from None
        plan.apps.append(app)


def check_bindable(plans: list[PodPlan]) -> None:
    """Fail early, and clearly, if an address the demo needs is taken or not configured."""
    needed: list[tuple[str, int, str]] = []
    for plan in plans:
        w = plan.workload
        if not is_loopback(w.ip):
            raise DemoError(
                f"pod {w.namespace}/{w.name} has IP {w.ip}: the demo runs every pod on this "
                "machine, so pod IPs must be loopback addresses (like 127.0.10.2)"
            )
        needed += [(w.ip, port, f"{w.name}'s app") for port in plan.ports]
        if w.meshed:
            needed += [
                (w.ip, w.inbound_port, f"{w.name}'s sidecar inbound"),
                (w.ip, w.outbound_port, f"{w.name}'s sidecar outbound"),
                (w.ip, ENVOY_ADMIN_PORT, f"{w.name}'s Envoy admin"),
            ]
            needed += [(w.ip, t.local_port, f"{w.name}'s TCP binding to {t.service.name}")
                       for t in w.tcp_upstreams]
    for ip, port, what in needed:
        check_free(ip, port, what, "is another demo running? Stop it first (Ctrl-C), or free the port.")


def check_free(ip: str, port: int, what: str, hint: str) -> None:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise DemoError(f"{ip}:{port} ({what}) is already in use: {hint}") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise DemoError(
                    f"cannot bind {ip}: this system does not route all of 127.0.0.0/8 to "
                    f"loopback (macOS: `sudo ifconfig lo0 alias {ip}`)"
                ) from None
            raise DemoError(f"cannot bind {ip}:{port} ({what}): {err}") from None


def tcp_targets(plan: PodPlan) -> list[tuple[str, int]]:
    """(host, port) of the pod's DEMO_CALLS_TCP (e.g. db:5432): what its app dials by name."""
    out = []
    for item in (plan.env.get(CALLS_TCP_ENV) or "").split(","):
        host, _, port = item.strip().rpartition(":")
        if not item.strip():
            continue
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise DemoError(f"pod {plan.workload.name}: {CALLS_TCP_ENV} takes host:port "
                            f"items separated by commas (e.g. db:5432), got {item.strip()!r}")
        out.append((host, int(port)))
    return out
