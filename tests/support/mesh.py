"""A whole mesh on one machine, for end-to-end tests with real Envoys and real traffic.

`MeshHarness` runs the server in-process with the Kubernetes-shaped file source on a temp
directory. Each `Pod` gets its own loopback address (so its app, inbound and outbound ports
look like a real pod's), a real HTTP backend on its app port, and a real Envoy sidecar started
from the bootstrap `xds-server bootstrap` writes. Tests write YAML, then send requests to a
pod's outbound listener with the destination in the Host header, as an app would.
"""

from __future__ import annotations

import asyncio
import textwrap
from types import SimpleNamespace
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.support.envoy import EnvoyProcess
from tests.support.net import free_port, next_loopback_ip
from tests.support.upstreams import HttpResponse, HttpUpstream, TcpEchoUpstream, http_request
from xds_server.app import attach_load_reports
from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap
from xds_server.load_reports import LoadAggregator
from xds_server.model.security import SecuritySettings
from xds_server.model.store import MeshStore
from xds_server.sources.mesh_files import MeshDirectory
from xds_server.translate.controller import MeshController
from xds_server.translate.scope import ScopeSettings
from xds_server.xds.cache import ResourceCache
from xds_server.xds.auth import StreamGuard
from xds_server.xds.hooks import StreamHooks
from xds_server.xds.lrs import LrsSettings
from xds_server.xds.server import ServerSettings, XdsServer

T = TypeVar("T")


@dataclass
class Pod:
    namespace: str
    name: str
    service_account: str
    ip: str
    app_port: int
    labels: dict[str, str] = field(default_factory=dict)
    backend: HttpUpstream | TcpEchoUpstream | None = None
    envoy: EnvoyProcess | None = None
    tcp_upstreams: str = ""  # the xds-server.io/tcp-upstreams annotation

    @property
    def outbound(self) -> tuple[str, int]:
        return (self.ip, 15001)

    def manifest(self) -> dict[str, Any]:
        # Loopback "pods" share the host's network: the explicit mode (Host picks the
        # destination); tests/support/podnet.py runs pods as namespaces with capture.
        annotations = {"sidecar.xds-server.io/inject": "true", "sidecar.xds-server.io/interception": "explicit"}
        if self.tcp_upstreams:
            annotations["xds-server.io/tcp-upstreams"] = self.tcp_upstreams
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name, "namespace": self.namespace, "labels": self.labels,
                "annotations": annotations,
            },
            "spec": {
                "serviceAccountName": self.service_account,
                "containers": [
                    {"name": "app", "ports": [{"containerPort": self.app_port}]},
                    {"name": "envoy"},
                ],
            },
            "status": {"podIP": self.ip},
        }

    def request(
        self, host: str, path: str = "/", method: str = "GET",
        headers: dict[str, str] | None = None, timeout: float = 5.0,
    ) -> HttpResponse:
        """What this pod's app sees when it calls `host` through its sidecar."""
        return http_request(
            self.ip, 15001, path, method=method, headers={"Host": host, **(headers or {})},
            timeout=timeout,
        )


class MeshHarness:
    def __init__(
        self, directory: Path, *, scope: ScopeSettings | None = None,
        security: SecuritySettings | None = None, hooks: Iterable[StreamHooks] = (),
        cache: ResourceCache | None = None, load_reports: LrsSettings | None = None,
    ) -> None:
        """`security`: mTLS/authorization settings of the controller; `hooks`: the server's
        stream hooks (authentication, SDS: xds/auth.py, sds.py) built on `cache`."""
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store = MeshStore()
        self.cache = cache if cache is not None else ResourceCache()
        self.controller = MeshController(self.store, self.cache, scope, security)
        self.source = MeshDirectory(directory, self.store)
        self.server = XdsServer(
            self.cache,
            ServerSettings(address="127.0.0.1:0", debounce_quiet=0.02, debounce_max=0.2),
            view_for=self.controller.view_for,
            release_view=self.controller.release,
            hooks=hooks,
        )
        self.pods: list[Pod] = []
        # LRS served as `serve` serves it (app.py), when asked: `self.load` aggregates.
        self.load: LoadAggregator | None = None
        if load_reports is not None:
            # LRS streams authenticate as the xDS streams do: the hooks' stream guard, if any.
            guard = next((h for h in self.server.hooks if isinstance(h, StreamGuard)), None)
            self.load = attach_load_reports(self.server, self.store, load_reports,
                                            SimpleNamespace(guard=guard))

    async def start(self) -> MeshHarness:
        # Writes load synchronously (see write()); the directory watcher is not started, so a
        # test's changes apply at once and in order. Hot reload has tests of its own.
        self.source.load()
        await self.server.start()
        return self

    async def stop(self) -> None:
        await asyncio.gather(
            *(asyncio.to_thread(p.envoy.stop) for p in self.pods if p.envoy is not None)
        )
        for pod in self.pods:
            if pod.backend is not None:
                pod.backend.stop()
        await self.server.stop(0.2)

    # Writing the mesh -----------------------------------------------------------------------

    def write(self, name: str, *objects: dict[str, Any] | str) -> None:
        """Write objects (dicts or YAML text) to one file and load it now."""
        docs = [yaml.safe_load(textwrap.dedent(o)) if isinstance(o, str) else o for o in objects]
        (self.directory / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
        errors = self.source.load()
        bad = [e for e in errors if e.severity == "error"]
        assert not bad, "\n".join(str(e) for e in bad)

    def service(
        self, namespace: str, name: str, port: int = 80, *, app_protocol: str = "http",
        pods: list[Pod] = (), target_port: int | None = None, annotations: dict | None = None,
        extra_ports: list[dict] = (),
    ) -> None:
        """A Service and its EndpointSlice, backed by `pods` (ready)."""
        target = target_port or (pods[0].app_port if pods else port)
        ports = [{"name": "main", "port": port, "targetPort": target, "appProtocol": app_protocol}]
        ports += list(extra_ports)
        service = {
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
            "spec": {"ports": ports},
        }
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1", "namespace": namespace,
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": "main", "port": target, "appProtocol": app_protocol}],
            "endpoints": [
                {
                    "addresses": [p.ip], "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace},
                }
                for p in pods
            ],
        }
        self.write(f"svc-{namespace}-{name}.yaml", service, slice_)

    # Pods -----------------------------------------------------------------------------------

    def pod(
        self, namespace: str, name: str, *, service_account: str = "default", app: str = "http",
        labels: dict[str, str] | None = None, app_port: int = 8080, tcp_upstreams: str = "",
    ) -> Pod:
        """A pod with its backend running and its manifest written (no sidecar yet)."""
        ip = next_loopback_ip()
        pod = Pod(namespace, name, service_account, ip, app_port, labels or {"app": name},
                  tcp_upstreams=tcp_upstreams)
        if app == "http":
            pod.backend = HttpUpstream(name, ip, app_port).start()
        elif app == "tcp":
            pod.backend = TcpEchoUpstream(name, ip, app_port).start()
        self.pods.append(pod)
        self.write(f"pod-{namespace}-{name}.yaml", pod.manifest())
        return pod

    async def sidecar(self, pod: Pod, *, delta: bool = True, token: str | None = None) -> Pod:
        """Start the pod's Envoy from the generated bootstrap and wait until it is LIVE."""
        spec = SidecarSpec(
            namespace=pod.namespace, service_account=pod.service_account, pod=pod.name,
            pod_ip=pod.ip, xds_address=self.server.address,
            admin_address=f"{pod.ip}:{free_port(pod.ip)}", labels=pod.labels, delta=delta,
            interception="explicit", token=token,
        )
        pod.envoy = EnvoyProcess(sidecar_bootstrap(spec), name=f"{pod.namespace}-{pod.name}")
        await asyncio.to_thread(pod.envoy.start)
        await asyncio.to_thread(pod.envoy.wait_ready, 20)
        return pod

    async def until(self, probe, timeout: float = 10.0, message: str = "condition"):
        """Poll a blocking probe (run in a thread) until it returns something truthy."""
        return await until(probe, timeout, message)


async def until(probe: Callable[[], T], timeout: float = 10.0, message: str = "condition") -> T:
    """Poll a blocking probe (run in a thread) until it returns something truthy; exceptions
    count as "not yet" (a connection refused while a listener comes up)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            last = await asyncio.to_thread(probe)
            if last:
                return last  # type: ignore[no-any-return]
        except Exception as err:
            last = err
        if loop.time() > deadline:
            raise AssertionError(f"{message}: not reached in {timeout}s (last: {last!r})")
        await asyncio.sleep(0.05)
