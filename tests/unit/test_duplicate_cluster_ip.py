"""Two Services claiming one cluster IP must not give Envoy a duplicate domain: Envoy rejects
the whole route configuration, which would break routing for the entire namespace."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import struct_pb2

from tests.support.proxies import verified
from xds_server.model.mesh import AppProtocol, Service, ServicePort
from xds_server.model.store import SERVICE, MeshStore
from xds_server.translate import names
from xds_server.translate.controller import MeshController
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache


def _service(name: str, ip: str) -> Service:
    return Service("shop", name, ports=(ServicePort(80, "http", 8080, AppProtocol.HTTP),), cluster_ip=ip)


def _domains(cache: ResourceCache) -> list[str]:
    config = cache.get(types.ROUTE, names.outbound_route_name("shop")).unpack(route_pb2.RouteConfiguration)
    return [d for vhost in config.virtual_hosts for d in vhost.domains]


def test_a_shared_cluster_ip_is_kept_by_one_service_and_moves_when_it_leaves() -> None:
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache)
    meta = struct_pb2.Struct()
    meta.update({"namespace": "shop", "pod": "client"})
    controller.view_for(verified(base_pb2.Node(id="client.shop", metadata=meta)))
    store.sync("files", [_service("api", "10.96.0.10"), _service("web", "10.96.0.10")])

    domains = _domains(cache)
    assert len(domains) == len(set(domains)), "duplicate domain: Envoy would reject the config"
    assert domains.count("10.96.0.10:80") == 1
    assert "api.shop:80" in domains and "web.shop:80" in domains  # both still routable by name

    store.sync("files", [_service("web", "10.96.0.10")])  # api leaves: web gets the IP
    domains = _domains(cache)
    assert "10.96.0.10:80" in domains and not any(d.startswith("api.") for d in domains)
    assert store.get(SERVICE, "shop", "web") is not None
