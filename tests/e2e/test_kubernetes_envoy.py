"""The Kubernetes source end to end: objects in the (fake) API server, read through the real
`kubernetes` client, reach real Envoy sidecars, and real traffic follows them, through
endpoint changes, a compacted watch and an API server outage.

The mesh is `MeshHarness` (in-process xDS server, per-pod loopback IPs, real sidecars) with a
`KubernetesSource` feeding its `MeshStore` instead of a directory of YAML.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.support.fake_apiserver import FakeApiServer
from tests.support.mesh import MeshHarness, Pod
from tests.support.net import next_loopback_ip
from tests.support.upstreams import HttpUpstream
from xds_server.sources.kubernetes import KubernetesSource, KubeSettings

pytestmark = [pytest.mark.envoy, pytest.mark.slow, pytest.mark.timeout(90)]

NS = "shop"
CLUSTER = "outbound|80||{}.shop.svc.cluster.local"


# Objects, shaped as tests/integration/test_kubernetes_source.py shapes them --------------------


def namespace(name: str) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {}}}


_cluster_ips: dict[str, str] = {}


def service(name: str, port: int = 80) -> dict:
    # Each Service its own clusterIP, as a real cluster allocates them.
    ip = _cluster_ips.setdefault(name, f"10.96.0.{10 + len(_cluster_ips)}")
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": NS},
            "spec": {"clusterIP": ip,
                     "ports": [{"name": "http", "port": port, "targetPort": 8080}]}}


def endpoint_slice(name: str, svc: str, pods: list[Pod]) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [p.ip], "conditions": {"ready": True},
             "targetRef": {"kind": "Pod", "name": p.name, "namespace": p.namespace}}
            for p in pods
        ],
    }


def pod_object(p: Pod) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels,
                     # Loopback pods: the explicit mode, as tests/support/mesh.py's.
                     "annotations": {"sidecar.xds-server.io/inject": "true",
                                     "sidecar.xds-server.io/interception": "explicit"}},
        "spec": {"serviceAccountName": p.service_account,
                 "containers": [{"name": "app", "ports": [{"containerPort": p.app_port}]}]},
        "status": {"phase": "Running", "podIP": p.ip},
    }


def http_route(name: str, parent: str, backends: list[str]) -> dict:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{"backendRefs": [{"name": b, "port": 80} for b in backends]}],
        },
    }


# The mesh, fed by the API server ----------------------------------------------------------------


class KubeMesh(MeshHarness):
    """`MeshHarness` whose store is fed by a `KubernetesSource` watching `fake`."""

    def __init__(self, directory: Path, fake: FakeApiServer) -> None:
        super().__init__(directory)
        self.fake = fake
        settings = KubeSettings(watch_timeout=5, backoff_initial=0.05, backoff_max=0.4,
                                absent_recheck=0.3, leader=None, write_status=False)
        self.kube = KubernetesSource(self.store, fake.kubeconfig(directory / "kubeconfig"),
                                     settings=settings)
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> KubeMesh:
        self._task = asyncio.create_task(self.kube.run(self._stop))
        await asyncio.wait_for(self.kube.wait_synced(), 10)
        await self.server.start()
        return self

    async def stop(self) -> None:
        try:
            await super().stop()
        finally:
            self._stop.set()
            if self._task is not None:
                await asyncio.wait_for(self._task, 15)
            self.kube.close()

    def write(self, name: str, *objects: Any) -> None:  # pragma: no cover - guard
        raise AssertionError("KubeMesh takes its objects from the API server, not files")

    def kube_pod(self, name: str, account: str = "default") -> Pod:
        """A pod with a running backend, created in the API server (no sidecar yet)."""
        p = Pod(NS, name, account, next_loopback_ip(), 8080, {"app": name})
        p.backend = HttpUpstream(name, p.ip, p.app_port).start()
        self.pods.append(p)
        self.fake.create(pod_object(p))
        return p


@pytest.fixture
def fake() -> FakeApiServer:
    with FakeApiServer(bookmark_interval=0.2) as server:
        server.create(namespace(NS))
        yield server


@pytest.fixture
async def mesh(tmp_path: Path, fake: FakeApiServer):
    harness = await KubeMesh(tmp_path / "mesh", fake).start()
    yield harness
    await harness.stop()


def answered_by(client: Pod, host: str, name: str):
    """A probe: `client`'s app calls `host` and `name`'s backend answers."""
    def probe():
        r = client.request(host, "/hello", timeout=2)
        return r.status == 200 and r.json["name"] == name and r
    return probe


async def _frontend_and_api(mesh: KubeMesh, fake: FakeApiServer) -> tuple[Pod, Pod]:
    api = mesh.kube_pod("api-1", "api")
    frontend = mesh.kube_pod("frontend-1", "frontend")
    fake.create(service("api"))
    fake.create(endpoint_slice("api-1", "api", [api]))
    fake.create(http_route("api-route", "api", ["api"]))
    await asyncio.gather(mesh.sidecar(api), mesh.sidecar(frontend))
    return frontend, api


async def test_objects_in_the_api_reach_envoy_and_an_endpoint_change_moves_traffic(
    mesh: KubeMesh, fake: FakeApiServer
) -> None:
    frontend, api = await _frontend_and_api(mesh, fake)
    await mesh.until(lambda: mesh.store.get("HTTPRoute", NS, "api-route"), message="route")
    response = await mesh.until(answered_by(frontend, "api", "api-1"), message="api-1 answers")
    assert response.json["path"] == "/hello"
    # It went through api's sidecar (inbound), not straight to the app.
    stats = await asyncio.to_thread(api.envoy.stats, "^http.inbound.downstream_rq_2xx$")
    assert stats["http.inbound.downstream_rq_2xx"] >= 1

    # The EndpointSlice now names a second pod: traffic moves there.
    api2 = mesh.kube_pod("api-2", "api")
    await mesh.sidecar(api2)
    fake.update(endpoint_slice("api-1", "api", [api2]))
    await mesh.until(answered_by(frontend, "api", "api-2"), message="traffic on api-2")
    hosts = await asyncio.to_thread(frontend.envoy.cluster_hosts)
    # (a meshed pod is reached on its sidecar's inbound port)
    assert [h.split(":")[0] for h in hosts[CLUSTER.format("api")]] == [api2.ip]
    for _ in range(5):  # and only there
        assert (await asyncio.to_thread(frontend.request, "api")).json["name"] == "api-2"


async def test_a_service_deleted_while_the_watch_is_down_leaves_envoy_after_the_relist(
    mesh: KubeMesh, fake: FakeApiServer
) -> None:
    frontend, api = await _frontend_and_api(mesh, fake)
    fake.create(service("legacy"))
    fake.create(endpoint_slice("legacy-1", "legacy", [api]))
    await mesh.until(answered_by(frontend, "legacy", "api-1"), message="legacy answers")
    await asyncio.to_thread(fake.wait_for_watches, 1, "Service")

    fake.go_down()
    fake.delete("Service", NS, "legacy")  # deleted while the watch cannot see it...
    fake.compact()  # ... and the history that would say so is gone: the resume gets 410
    # Meanwhile the mesh keeps the last state it knew.
    assert mesh.store.get("Service", NS, "legacy") is not None
    assert (await asyncio.to_thread(frontend.request, "legacy")).status == 200
    fake.come_up()

    await mesh.until(lambda: CLUSTER.format("legacy") not in
                     frontend.envoy.cluster_hosts(), message="legacy cluster removed")
    await mesh.until(lambda: frontend.request("legacy", timeout=2).status == 404,
                     message="legacy answers 404")
    assert (await asyncio.to_thread(frontend.request, "api")).json["name"] == "api-1"
    relists = [r for r in fake.requests(path="/api/v1/services")
               if r.query.get("watch") != "true" and r.status == 200]
    assert len(relists) == 2, "the 410 did not lead to a re-list"


async def test_an_unreachable_api_server_keeps_the_mesh_and_the_change_arrives_after(
    mesh: KubeMesh, fake: FakeApiServer
) -> None:
    frontend, _api = await _frontend_and_api(mesh, fake)
    api2 = mesh.kube_pod("api-2", "api")
    await mesh.sidecar(api2)
    await mesh.until(answered_by(frontend, "api", "api-1"), message="api-1 answers")
    await asyncio.to_thread(fake.wait_for_watches, 1, "EndpointSlice")

    fake.go_down()
    try:
        fake.update(endpoint_slice("api-1", "api", [api2]))  # made during the outage
        # Several failed reconnects (backoff 0.05..0.4 s); traffic keeps flowing meanwhile,
        # on the last config.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.5
        while loop.time() < deadline:
            r = await asyncio.to_thread(frontend.request, "api", "/", timeout=2)
            assert r.status == 200 and r.json["name"] == "api-1"
            await asyncio.sleep(0.1)
        assert mesh.kube.synced
    finally:
        fake.come_up()

    await mesh.until(answered_by(frontend, "api", "api-2"), message="the outage's change")
    # Resumed from the last resourceVersion: nothing compacted, so no re-list.
    lists = [r for r in fake.requests(path="/endpointslices")
             if "watch" not in r.query and r.status == 200]
    assert len(lists) == 1
