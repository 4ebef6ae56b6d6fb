"""Multi-tenancy is enforced by the server: a proxy never learns what its namespace may not see.

The mesh: two tenants (namespaces `team-a` and `team-b`, labelled `xds-server.io/tenant: a`
and `b`) and a namespace in no tenant, `shared`, whose `common` service follows the mesh
default (exported everywhere) and whose `hidden` service says `xds-server.io/export-to: "."`.

Checked three ways, from the wire up:
- what the server sends to a raw xDS client claiming to be a `team-a` proxy (wildcard CDS,
  explicit EDS/RDS requests for B's names, LDS, delta subscriptions),
- what a real `team-a` Envoy holds (config_dump),
- what a `team-a` app gets when it calls B through its sidecar: 404 from the sidecar itself,
  while A->A and A->shared work;
and visibility follows Namespace tenant labels and Service export annotations live.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from tests.support.envoy import config_section
from tests.support.mesh import MeshHarness, Pod
from tests.support.xds_client import XdsClient, delta_resources, sotw_resources
from xds_server.translate import names
from xds_server.translate.scope import EXPORT_ANNOTATION, TENANT_LABEL
from xds_server.xds import types

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

A, B, SHARED = "team-a", "team-b", "shared"


def fqdn(service: str, namespace: str) -> str:
    return f"{service}.{namespace}.svc.cluster.local"


def cluster(service: str, namespace: str, port: int = 80) -> str:
    return f"outbound|{port}||{fqdn(service, namespace)}"


API_A, API_B = cluster("api-a", A), cluster("api-b", B)
COMMON, HIDDEN = cluster("common", SHARED), cluster("hidden", SHARED)


def mentions_b(text: str) -> bool:
    return f".{B}" in text or f"{B}/" in text or text.endswith(f"|{B}")


def namespaces_doc(b_tenant: str | None = "b") -> list[dict[str, Any]]:
    def ns(name: str, tenant: str | None) -> dict[str, Any]:
        labels = {TENANT_LABEL: tenant} if tenant else {"purpose": "shared"}
        return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}

    return [ns(A, "a"), ns(B, b_tenant), ns(SHARED, None)]


def write_namespaces(mesh: MeshHarness, b_tenant: str | None = "b") -> None:
    mesh.write("namespaces.yaml", *namespaces_doc(b_tenant))


def proxy_node(namespace: str, pod: str, ip: str = "", interception: str = "explicit") -> base_pb2.Node:
    """A node as `xds-server bootstrap` writes it: the server scopes by its namespace. The
    loopback pods of this module use the explicit mode (Host-routed route configurations)."""
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "service_account": "default", "pod": pod, "pod_ip": ip,
                     "interception": interception})
    return base_pb2.Node(id=f"{pod}.{namespace}", cluster=f"default.{namespace}", metadata=metadata)


class Tenants:
    """The mesh of this module: pods with running backends, services, no sidecars yet."""

    def __init__(self, mesh: MeshHarness) -> None:
        self.mesh = mesh
        write_namespaces(mesh)
        self.a_client = mesh.pod(A, "a-client")
        self.a_api = mesh.pod(A, "a-api")
        self.b_client = mesh.pod(B, "b-client")
        self.b_api = mesh.pod(B, "b-api")
        self.common = mesh.pod(SHARED, "common")
        self.hidden = mesh.pod(SHARED, "hidden")
        mesh.service(A, "api-a", pods=[self.a_api])
        mesh.service(B, "api-b", pods=[self.b_api])
        mesh.service(SHARED, "common", pods=[self.common])
        self.export_hidden(".")

    def export_hidden(self, export_to: str | None) -> None:
        annotations = {EXPORT_ANNOTATION: export_to} if export_to is not None else {}
        self.mesh.service(SHARED, "hidden", pods=[self.hidden], annotations=annotations)

    async def sidecars(self, *pods: Pod) -> None:
        await asyncio.gather(*(self.mesh.sidecar(p) for p in pods))


@pytest.fixture
async def mesh(tmp_path: Path):
    harness = await MeshHarness(tmp_path / "mesh").start()
    yield harness
    await harness.stop()


@pytest.fixture
async def tenants(mesh: MeshHarness) -> Tenants:
    return Tenants(mesh)  # on the event loop: the server's debouncer lives there


# ------------------------------------------------------------------------- what is sent


async def test_server_sends_a_tenant_a_proxy_nothing_of_tenant_b(mesh: MeshHarness, tenants: Tenants) -> None:
    async with XdsClient(mesh.server.address) as b_client, XdsClient(mesh.server.address) as a_client:
        # A tenant-B proxy is connected, so its own listeners and inbound clusters exist too.
        b = b_client.ads(node=proxy_node(B, "b-api", tenants.b_api.ip))
        await b.request(types.LISTENER)
        b_listeners = sotw_resources(await b.recv())
        assert names.inbound_listener_name(B, "b-api") in b_listeners

        ads = a_client.ads(node=proxy_node(A, "raw-a"))
        # Wildcard CDS: A's, and the shared service exported everywhere; nothing of B, and
        # not `hidden` (exported to its own namespace only).
        await ads.request(types.CLUSTER)
        cds = await ads.recv()
        clusters = sotw_resources(cds)
        assert {API_A, COMMON} <= set(clusters)
        assert API_B not in clusters and HIDDEN not in clusters
        assert not [n for n in clusters if mentions_b(n)], sorted(clusters)
        await ads.ack(cds)

        # Explicit EDS for A's, shared's and B's assignments: B's is never delivered.
        await ads.request(types.ENDPOINT, [API_A, COMMON, API_B, HIDDEN])
        eds = await ads.recv()
        assignments = sotw_resources(eds)
        assert set(assignments) == {API_A, COMMON}
        await ads.ack(eds)

        # Explicit RDS for A's scope and B's scope: only A's, and it has no B virtual host.
        await ads.request(types.ROUTE, [names.outbound_route_name(A), names.outbound_route_name(B)])
        rds = await ads.recv()
        routes = sotw_resources(rds)
        assert set(routes) == {names.outbound_route_name(A)}
        config = routes[names.outbound_route_name(A)]
        assert isinstance(config, route_pb2.RouteConfiguration)
        domains = [d for vh in config.virtual_hosts for d in vh.domains]
        assert "api-a" in domains and f"common.{SHARED}" in domains
        assert not [d for d in domains if mentions_b(d) or d.startswith("hidden")], domains
        clusters_routed = {r.route.cluster for vh in config.virtual_hosts for r in vh.routes}
        assert not [c for c in clusters_routed if mentions_b(c)]
        await ads.ack(rds)

        # LDS wildcard: none of the B proxy's listeners.
        await ads.request(types.LISTENER)
        lds = await ads.recv()
        listeners = sotw_resources(lds)
        assert listeners and not [n for n in listeners if mentions_b(n)], sorted(listeners)
        await ads.ack(lds)

        # B's endpoints change: the A proxy (which asked for B's assignment) hears nothing.
        b_api_2 = mesh.pod(B, "b-api-2")
        mesh.service(B, "api-b", pods=[tenants.b_api, b_api_2])
        await ads.expect_silence(0.5)

        # The same through delta: explicit subscriptions to B's names deliver nothing.
        delta = a_client.ads_delta(node=proxy_node(A, "raw-a-delta"))
        await delta.request(types.CLUSTER, [API_A, API_B])
        response = await delta.recv()
        assert set(delta_resources(response)) == {API_A}
        assert not response.removed_resources
        await delta.ack(response)
        await delta.request(types.ENDPOINT, [API_B, HIDDEN])
        await delta.request(types.ROUTE, [names.outbound_route_name(B)])
        await delta.expect_silence(0.5)


# -------------------------------------------------------------------- what Envoy holds


async def test_a_capture_mode_proxy_of_tenant_a_gets_no_route_of_tenant_b(mesh: MeshHarness, tenants: Tenants) -> None:
    """Capture mode's per-service route configurations (reached by ClusterIP) are scoped as
    the clusters are: B's is never delivered to A's proxy, nor the Host-routed form."""
    a_route, b_route = API_A, API_B  # a service port's route configuration bears its cluster's name
    async with XdsClient(mesh.server.address) as client:
        ads = client.ads(node=proxy_node(A, "capture-a", interception="capture"))
        await ads.request(types.ROUTE, [a_route, b_route, names.outbound_route_name(A)])
        rds = await ads.recv()
        assert set(sotw_resources(rds)) == {a_route}
        await ads.ack(rds)


async def test_tenant_a_envoy_holds_and_reaches_only_what_it_may_see(mesh: MeshHarness, tenants: Tenants) -> None:
    t = tenants
    await t.sidecars(t.a_client, t.a_api, t.b_api, t.common, t.hidden)
    client = t.a_client
    assert client.envoy is not None

    # Traffic: A->A and A->shared (exported) work through both sidecars.
    for host, backend in (("api-a", "a-api"), (f"common.{SHARED}", "common")):
        response = await mesh.until(
            lambda h=host: (r := client.request(h, "/x")).status == 200 and r, message=host
        )
        assert response.json["name"] == backend

    # The config the Envoy accepted: not one cluster, assignment or virtual host of B.
    dump = await asyncio.to_thread(client.envoy.config_dump, True)
    clusters = [
        e["cluster"]["name"] for e in config_section(dump, "clusters").get("dynamic_active_clusters", ())
    ]
    assert {API_A, COMMON} <= set(clusters)
    assert not [c for c in clusters if mentions_b(c)], clusters
    assert HIDDEN not in clusters
    endpoints = [
        e["endpoint_config"]["cluster_name"]
        for e in config_section(dump, "endpoints").get("dynamic_endpoint_configs", ())
    ]
    assert API_A in endpoints and not [e for e in endpoints if mentions_b(e)]
    for entry in config_section(dump, "routes").get("dynamic_route_configs", ()):
        for vhost in entry["route_config"].get("virtual_hosts", ()):
            assert not [d for d in vhost.get("domains", ()) if mentions_b(d)], vhost
    assert t.b_api.ip not in str(dump)  # not even B's pod address

    # A->B: the sidecar itself answers 404 (no virtual host for that name); B never sees it.
    no_route_before = await asyncio.to_thread(client.envoy.stats, "^http.outbound.no_route$")
    for host in ("api-b", f"api-b.{B}", f"{fqdn('api-b', B)}:80", f"hidden.{SHARED}"):
        response = await asyncio.to_thread(client.request, host, "/x")
        assert response.status == 404, (host, response)
        assert response.headers.get("server") == "envoy"
    no_route_after = await asyncio.to_thread(client.envoy.stats, "^http.outbound.no_route$")
    assert no_route_after["http.outbound.no_route"] - no_route_before.get("http.outbound.no_route", 0) == 4
    assert t.b_api.backend is not None and t.b_api.backend.requests_total == 0
    assert t.hidden.backend is not None and t.hidden.backend.requests_total == 0

    # `hidden` (export-to ".") is still seen in its own namespace.
    assert t.common.envoy is not None
    response = await mesh.until(
        lambda: (r := t.common.request("hidden", "/")).status == 200 and r, message="hidden from shared"
    )
    assert response.json["name"] == "hidden"


# ------------------------------------------------------------------ changes apply live


def active_clusters(pod: Pod) -> set[str]:
    assert pod.envoy is not None
    return set(pod.envoy.dynamic_versions()["clusters"])


async def test_tenant_label_change_adds_and_removes_visibility_live(mesh: MeshHarness, tenants: Tenants) -> None:
    t = tenants
    await t.sidecars(t.a_client, t.b_api)
    client = t.a_client
    async with XdsClient(mesh.server.address) as raw:
        ads = raw.ads(node=proxy_node(A, "raw-a"))
        await ads.request(types.CLUSTER)
        first = await ads.recv()
        assert API_B not in sotw_resources(first)
        await ads.ack(first)
        assert API_B not in await asyncio.to_thread(active_clusters, client)

        # team-b joins tenant a: A's proxies now see api-b, and reach it.
        write_namespaces(mesh, b_tenant="a")
        update = await ads.recv()
        assert API_B in sotw_resources(update)
        await ads.ack(update)
        await mesh.until(lambda: API_B in active_clusters(client), message="api-b cluster in A's Envoy")
        response = await mesh.until(
            lambda: (r := client.request(f"api-b.{B}", "/")).status == 200 and r, message="A->B after relabel"
        )
        assert response.json["name"] == "b-api"

        # Back to tenant b: gone from the raw client's CDS, from Envoy, and unreachable.
        write_namespaces(mesh, b_tenant="b")
        update = await ads.recv()
        assert API_B not in sotw_resources(update)
        await ads.ack(update)
        await mesh.until(lambda: API_B not in active_clusters(client), message="api-b cluster removed")
        await mesh.until(lambda: client.request(f"api-b.{B}", "/").status == 404, message="A->B 404 again")

        # No tenant label at all: team-b becomes shared and follows the mesh default ("*").
        write_namespaces(mesh, b_tenant=None)
        update = await ads.recv()
        assert API_B in sotw_resources(update)
        await ads.ack(update)
        await mesh.until(lambda: API_B in active_clusters(client), message="api-b visible once untenanted")


async def test_export_annotation_change_adds_and_removes_visibility_live(mesh: MeshHarness, tenants: Tenants) -> None:
    t = tenants
    await t.sidecars(t.a_client, t.hidden)
    client = t.a_client
    async with XdsClient(mesh.server.address) as raw:
        delta = raw.ads_delta(node=proxy_node(A, "raw-a"))
        await delta.request(types.CLUSTER, ["*"])
        first = await delta.recv()
        assert HIDDEN not in delta_resources(first)
        await delta.ack(first)
        assert HIDDEN not in await asyncio.to_thread(active_clusters, client)

        # Exported everywhere: appears, and A's app reaches it.
        t.export_hidden("*")
        update = await delta.recv()
        assert HIDDEN in delta_resources(update)
        await delta.ack(update)
        await mesh.until(lambda: HIDDEN in active_clusters(client), message="hidden cluster in A's Envoy")
        response = await mesh.until(
            lambda: (r := client.request(f"hidden.{SHARED}", "/")).status == 200 and r, message="A->hidden"
        )
        assert response.json["name"] == "hidden"

        # Exported to team-b only: removed for A (delta names it in removed_resources).
        t.export_hidden(f".,{B}")
        update = await delta.recv()
        assert HIDDEN in update.removed_resources
        await delta.ack(update)
        await mesh.until(lambda: HIDDEN not in active_clusters(client), message="hidden cluster removed")
        await mesh.until(lambda: client.request(f"hidden.{SHARED}", "/").status == 404, message="A->hidden 404")

        # Exported to team-a by name: visible again.
        t.export_hidden(f"{A},{B}")
        update = await delta.recv()
        assert HIDDEN in delta_resources(update)
        await delta.ack(update)
        await mesh.until(lambda: HIDDEN in active_clusters(client), message="hidden exported to team-a")
