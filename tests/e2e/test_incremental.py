"""Incremental by construction: a change costs what it touches, on the wire and in translation.

- An endpoint change reaches real (delta ADS) Envoys as one ClusterLoadAssignment and nothing
  else: the server's pushes are recorded through its `pushed` hook, the cache shows only
  that assignment's version moved, and `controller.translations` grew by exactly that one
  rebuilt assignment.
- A route change rebuilds the route configurations of the scopes that see its service and
  no other: another scope's route configuration keeps its version, its Envoy hears nothing.
- Without Envoy: in a 1,000-service model an endpoint change does exactly the translation
  work it does in a 10-service model (one assignment), and writes one cache entry.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from tests.support.hooks import OnPush
from tests.support.mesh import MeshHarness, Pod
from tests.support.proxies import verified
from xds_server.model.mesh import (
    AppProtocol,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Namespace,
    Service,
    ServiceKey,
    ServicePort,
    Workload,
)
from xds_server.model.routes import BackendRef, ParentRef, Route, RouteRule
from xds_server.model.store import MeshStore
from xds_server.translate import names
from xds_server.translate.controller import MeshController
from xds_server.translate.scope import EXPORT_ANNOTATION
from xds_server.xds import types
from xds_server.xds.cache import Change, ResourceCache

SHOP, OTHER, LONELY = "shop", "other", "lonely"
API_CLA = names.cluster_name(ServiceKey(SHOP, "api"), 80)
# api and its canary are exported to shop and other, not to lonely.
EXPORT = {EXPORT_ANNOTATION: f".,{OTHER}"}




def versions(mesh: MeshHarness) -> dict[tuple[str, str], str]:
    """Every resource in the cache: (type, name) -> version."""
    return {
        (type_url, name): resource.version
        for type_url in mesh.cache.type_urls()
        for name, resource in mesh.cache.resources(type_url).items()
    }


def changed(before: dict[tuple[str, str], str], after: dict[tuple[str, str], str]) -> set[tuple[str, str]]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


class PushLog:
    """Every response the server writes, by proxy: (type, names sent, names removed)."""

    def __init__(self, mesh: MeshHarness) -> None:
        self.mesh = mesh
        self.pushes: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = []
        self.last = time.monotonic()
        mesh.server.hooks.add(OnPush(self._record))

    def _record(self, conn: Any, push: Any) -> None:
        self.last = time.monotonic()
        response = discovery_pb2.DeltaDiscoveryResponse.FromString(push.data)
        sent = tuple(sorted(r.name for r in response.resources))
        self.pushes.append((conn.proxy_id, push.type_url, sent, tuple(response.removed_resources)))

    def clear(self) -> None:
        self.pushes.clear()

    async def settled(self, quiet: float = 0.5, timeout: float = 15.0) -> None:
        """Wait until no push has been written for `quiet` seconds and every response has
        been acknowledged: the mesh is at rest."""
        deadline = time.monotonic() + timeout
        while True:
            outstanding = [
                (c.proxy_id, t.type_url)
                for c in self.mesh.server.connections
                for t in c.state.types.values()
                if t.pending_nonce is not None or t.dirty
            ]
            if not outstanding and time.monotonic() - self.last >= quiet:
                return
            assert time.monotonic() < deadline, f"not settled: {outstanding}"
            await asyncio.sleep(0.05)


def healthy_hosts(pod: Pod, cluster: str) -> list[str]:
    """The hosts of `cluster` that `pod`'s Envoy would send traffic to."""
    assert pod.envoy is not None
    out = []
    for status in pod.envoy.clusters().get("cluster_statuses", ()):
        if status["name"] != cluster:
            continue
        for host in status.get("host_statuses", ()):
            if host.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY":
                address = host["address"]["socket_address"]
                out.append(f"{address['address']}:{address['port_value']}")
    return sorted(out)


def plain_pod(mesh: MeshHarness, namespace: str, name: str) -> Pod:
    """A pod without a sidecar: its endpoints point straight at its app port."""
    pod = mesh.pod(namespace, name)
    manifest = pod.manifest()
    manifest["metadata"]["annotations"]["sidecar.xds-server.io/inject"] = "false"
    manifest["spec"]["containers"] = manifest["spec"]["containers"][:1]
    mesh.write(f"pod-{namespace}-{name}.yaml", manifest)
    return pod


class Shop:
    """Three scopes with a sidecar each (shop, other, lonely), and a meshed api pod."""

    def __init__(self, mesh: MeshHarness) -> None:
        self.mesh = mesh
        self.frontend = mesh.pod(SHOP, "frontend")
        self.api_1 = mesh.pod(SHOP, "api-1")  # meshed: reached through its own sidecar
        self.canary = plain_pod(mesh, SHOP, "api-canary-1")
        self.client = mesh.pod(OTHER, "client")
        self.loner = mesh.pod(LONELY, "loner")
        self.catalog = plain_pod(mesh, SHOP, "catalog-1")
        self.lonely_db = plain_pod(mesh, LONELY, "db-1")
        mesh.service(SHOP, "api", pods=[self.api_1], annotations=EXPORT)
        mesh.service(SHOP, "api-canary", pods=[self.canary], annotations=EXPORT)
        mesh.service(SHOP, "catalog", pods=[self.catalog])
        mesh.service(LONELY, "db", pods=[self.lonely_db])
        self.log = PushLog(mesh)

    async def start(self) -> None:
        sidecars = (self.frontend, self.api_1, self.client, self.loner)
        await asyncio.gather(*(self.mesh.sidecar(p) for p in sidecars))
        for pod, host in ((self.frontend, "api"), (self.client, f"api.{SHOP}")):
            await self.mesh.until(
                lambda p=pod, h=host: p.request(h).status == 200, message=f"{pod.name} -> {host}"
            )
        await self.mesh.until(lambda: self.loner.request("db").status == 200, message="loner -> db")
        await self.log.settled()
        self.log.clear()


@pytest.fixture
async def shop(tmp_path: Path):
    mesh = await MeshHarness(tmp_path / "mesh").start()
    try:
        world = Shop(mesh)
        await world.start()
        yield world
    finally:
        await mesh.stop()




@pytest.mark.envoy
@pytest.mark.slow
async def test_endpoint_change_sends_and_rebuilds_one_assignment(shop: Shop) -> None:
    mesh = shop.mesh
    api_2 = plain_pod(mesh, SHOP, "api-2")  # not yet an endpoint of anything
    await shop.log.settled()
    shop.log.clear()
    before, translations = versions(mesh), mesh.controller.translations

    # Scale api out: its EndpointSlice gains api-2 (the Service itself is unchanged).
    mesh.service(SHOP, "api", pods=[shop.api_1, api_2], annotations=EXPORT)

    # Rebuilt: exactly one ClusterLoadAssignment; nothing else in the cache moved.
    assert mesh.controller.translations - translations == 1
    assert changed(before, versions(mesh)) == {(types.ENDPOINT, API_CLA)}

    # It reaches Envoy: the new host is there and takes traffic.
    assert shop.frontend.envoy is not None
    await mesh.until(lambda: len(healthy_hosts(shop.frontend, API_CLA)) == 2, message="2 api hosts")
    await mesh.until(
        lambda: shop.frontend.request("api").json["name"] == "api-2", message="traffic reaches api-2"
    )
    await shop.log.settled()

    # On the wire: that one assignment, once, to each proxy that sees api; nothing else.
    sent = sorted(shop.log.pushes)
    expected = sorted(
        (f"{pod.name}.{pod.namespace}", types.ENDPOINT, (API_CLA,), ())
        for pod in (shop.frontend, shop.api_1, shop.client)
    )
    assert sent == expected

    # Readiness flips are endpoint changes too: the same single assignment, nothing else.
    shop.log.clear()
    before, translations = versions(mesh), mesh.controller.translations
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "api-1", "namespace": SHOP, "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": "IPv4",
        "ports": [{"name": "main", "port": 8080, "appProtocol": "http"}],
        "endpoints": [
            {"addresses": [p.ip], "conditions": {"ready": ready},
             "targetRef": {"kind": "Pod", "name": p.name, "namespace": SHOP}}
            for p, ready in ((shop.api_1, True), (api_2, False))
        ],
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": SHOP, "annotations": EXPORT},
        "spec": {"ports": [{"name": "main", "port": 80, "targetPort": 8080, "appProtocol": "http"}]},
    }
    mesh.write(f"svc-{SHOP}-api.yaml", service, slice_)
    assert mesh.controller.translations - translations == 1
    assert changed(before, versions(mesh)) == {(types.ENDPOINT, API_CLA)}
    await mesh.until(
        lambda: healthy_hosts(shop.frontend, API_CLA) == [f"{shop.api_1.ip}:15006"], message="api-2 drained"
    )
    await shop.log.settled()
    assert sorted(shop.log.pushes) == expected
    for _ in range(5):
        assert (await asyncio.to_thread(shop.frontend.request, "api")).json["name"] == "api-1"


@pytest.mark.envoy
@pytest.mark.slow
async def test_route_change_rebuilds_only_the_route_configurations_that_see_it(shop: Shop) -> None:
    mesh = shop.mesh
    assert shop.loner.envoy is not None
    loner_rds = (await asyncio.to_thread(shop.loner.envoy.subscription_versions))["rds"]
    before, translations = versions(mesh), mesh.controller.translations

    # Requests to api carrying `x-canary: yes` go to api-canary.
    mesh.write("route-api.yaml", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "api-canary", "namespace": SHOP},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "api", "port": 80}],
            "rules": [
                {"matches": [{"headers": [{"name": "x-canary", "value": "yes"}]}],
                 "backendRefs": [{"name": "api-canary", "port": 80}]},
                {"backendRefs": [{"name": "api", "port": 80}]},
            ],
        },
    })

    # Rebuilt: api's virtual hosts (as seen from its own namespace and from others), and the
    # two route configurations that hold them. lonely's does not see api: untouched.
    assert mesh.controller.translations - translations == 2
    assert changed(before, versions(mesh)) == {
        (types.ROUTE, names.outbound_route_name(SHOP)),
        (types.ROUTE, names.outbound_route_name(OTHER)),
    }
    assert (types.ROUTE, names.outbound_route_name(LONELY)) in before

    for pod, host in ((shop.frontend, "api"), (shop.client, f"api.{SHOP}")):
        response = await mesh.until(
            lambda p=pod, h=host: (r := p.request(h, headers={"x-canary": "yes"})).json["name"] == "api-canary-1" and r,
            message=f"{pod.name} routed to the canary",
        )
        assert response.status == 200
        assert (await asyncio.to_thread(pod.request, host)).json["name"] == "api-1"
    await shop.log.settled()

    # On the wire: each scope's own route configuration, once per proxy; lonely hears nothing.
    expected = sorted(
        (f"{pod.name}.{pod.namespace}", types.ROUTE, (names.outbound_route_name(pod.namespace),), ())
        for pod in (shop.frontend, shop.api_1, shop.client)
    )
    assert sorted(shop.log.pushes) == expected
    assert (await asyncio.to_thread(shop.loner.envoy.subscription_versions))["rds"] == loner_rds


# --------------------------------------------------------------------- without Envoy


def _model(services: int, interception: str = "explicit") -> tuple[MeshStore, MeshController, ResourceCache]:
    """`services` HTTP services over 10 namespaces, two meshed pods each, an HTTPRoute on
    every tenth; a proxy connected in every namespace and on both pods of svc-5, all in the
    given interception mode."""
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache)
    objects: list[Any] = []
    for n in range(10):
        objects.append(Namespace(f"ns-{n}"))
    for i in range(services):
        ns = f"ns-{i % 10}"
        port = ServicePort(80, "http", 8080, AppProtocol.HTTP)
        objects.append(Service(ns, f"svc-{i}", (port,)))
        pods = [Workload(ns, f"svc-{i}-{k}", f"10.{i // 250}.{i % 250}.{k + 1}", meshed=True) for k in range(2)]
        objects += pods
        objects.append(_slice(ns, i, pods, ready=(True, True)))
        if i % 10 == 0:
            objects.append(Route(
                "HTTPRoute", ns, f"route-{i}", parents=(ParentRef(ServiceKey(ns, f"svc-{i}")),),
                rules=(RouteRule(backends=(BackendRef(ServiceKey(ns, f"svc-{(i + 1) % services}"), 80),)),),
            ))
    store.sync("test", objects)
    for n in range(10):
        controller.view_for(verified(_node(f"ns-{n}", "client", interception)))
    for k in range(2):
        controller.view_for(verified(_node("ns-5", f"svc-5-{k}", interception)))
    return store, controller, cache


def _slice(ns: str, i: int, pods: list[Workload], ready: tuple[bool, ...]) -> EndpointSlice:
    return EndpointSlice(
        ns, f"svc-{i}-abc", f"svc-{i}", (EndpointPort("http", 8080, AppProtocol.HTTP),),
        tuple(Endpoint(p.ip, ready=r, pod=p.name) for p, r in zip(pods, ready, strict=True)),
    )


def _node(namespace: str, pod: str, interception: str = "explicit") -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "pod": pod, "interception": interception})
    return base_pb2.Node(id=f"{pod}.{namespace}", metadata=metadata)


def _endpoint_change_work(services: int, interception: str = "explicit") -> list[tuple[int, list[Change]]]:
    """(translations, cache changes) of: a readiness flip of svc-5's endpoints, then a
    third pod joining svc-5."""
    store, controller, cache = _model(services, interception)
    writes: list[Change] = []
    cache.add_listener(writes.append)
    ns = "ns-5"
    pods = [store.get("Pod", ns, f"svc-5-{k}") for k in range(2)]
    out = []

    start = controller.translations
    store.put("test", _slice(ns, 5, pods, ready=(True, False)))
    out.append((controller.translations - start, list(writes)))

    writes.clear()
    start = controller.translations
    third = Workload(ns, "svc-5-2", "10.99.0.3", meshed=True)
    store.put("test", third)
    store.put("test", _slice(ns, 5, [*pods, third], ready=(True, False, True)))
    out.append((controller.translations - start, list(writes)))
    return out


def test_endpoint_change_work_does_not_grow_with_the_mesh() -> None:
    small, large = _endpoint_change_work(10), _endpoint_change_work(1000)
    cla = names.cluster_name(ServiceKey("ns-5", "svc-5"), 80)
    for (work_small, writes_small), (work_large, writes_large) in zip(small, large, strict=True):
        assert work_small == work_large == 1  # one ClusterLoadAssignment
        assert writes_small == writes_large == [Change(types.ENDPOINT, frozenset({cla}), frozenset())]


def test_capture_mode_endpoint_work_grows_with_the_namespaces_that_see_it_not_the_mesh() -> None:
    """Capture-mode outbound listeners match endpoints by pod IP (translate/capture.py): a
    readiness flip costs one assignment as before; a new endpoint also rebuilds the outbound
    listener each namespace's capture-mode sidecars share (10 here: svc-5 is visible
    everywhere), once per namespace and whatever the mesh's size, never once per proxy."""
    small, large = _endpoint_change_work(10, "capture"), _endpoint_change_work(1000, "capture")
    cla = names.cluster_name(ServiceKey("ns-5", "svc-5"), 80)
    (flip_small, flip_writes_small), (join_small, join_writes_small) = small
    (flip_large, flip_writes_large), (join_large, join_writes_large) = large
    assert flip_small == flip_large == 1
    assert flip_writes_small == flip_writes_large == [Change(types.ENDPOINT, frozenset({cla}), frozenset())]
    assert join_small == join_large == 1 + 10  # the assignment, and 10 namespaces' listeners
    listeners = {names.capture_outbound_listener_name(f"ns-{n}") for n in range(10)}
    for writes in (join_writes_small, join_writes_large):
        assert writes == [  # in xDS order: the assignment before the listeners
            Change(types.ENDPOINT, frozenset({cla}), frozenset()),
            Change(types.LISTENER, frozenset(listeners), frozenset()),
        ]
