"""The end-to-end scenario of go-control-plane's integration test, round-based.

Shape (as in go-control-plane pkg/test/resource/v3 + pkg/test/main): N EDS clusters with a
ClusterLoadAssignment each pointing at real upstreams, HTTP listeners whose
HttpConnectionManager uses RDS (one RouteConfiguration each), and TCP listeners using
tcp_proxy to a cluster. Unlike go-control-plane, names stay stable across rounds and the
*contents* change, so every round updates every resource in place:

* listener j (HTTP listeners first, then TCP) goes to cluster (j + round) % 4;
* every cluster has connect_timeout 1s + round ms and metadata {"xds-test": {"round": r}};
* every route adds response header `x-round: r` (and request header `x-round`, which the
  echo upstream reflects) and `x-route: <route name>`;
* every ClusterLoadAssignment carries endpoint metadata {"xds-test": {"round": r}};
* every HTTP listener's HCM has server_name "xds-test-round-r" (the `server` response
  header); TCP listeners change through their target cluster;
* every listener has listener-level metadata {"xds-test": {"round": r}} (unless
  listener_update="in_place"), which forces a full listener update.

Every resource changes every round on purpose: Envoy keeps the old version_info of a
resource whose content did not change, so "all versions == vN" is a usable wait condition.
Measured on Envoy 1.40: when only filter chains change, Envoy updates the listener in place
(stat listener_manager.listener_in_place_updated) and /config_dump keeps the listener's OLD
version_info although the new config is active; hence the listener metadata by default.

So a request through listener j tells the test which round Envoy applied: the `x-round`
header (HTTP) and the upstream's name in the body (HTTP and TCP).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

__all__ = [
    "CLA_TYPE",
    "CLUSTER_TYPE",
    "LISTENER_TYPE",
    "METADATA_NAMESPACE",
    "NUM_CLUSTERS",
    "NUM_HTTP_LISTENERS",
    "NUM_TCP_LISTENERS",
    "ROUTE_TYPE",
    "cluster_name",
    "config_source",
    "http_listener_name",
    "make_cla",
    "make_cluster",
    "make_http_listener",
    "make_route",
    "make_snapshot",
    "make_tcp_listener",
    "resource_names",
    "route_name",
    "server_name",
    "target_cluster",
    "tcp_listener_name",
    "type_url",
    "upstream_name",
]

NUM_CLUSTERS = 4
NUM_HTTP_LISTENERS = 2
NUM_TCP_LISTENERS = 2
METADATA_NAMESPACE = "xds-test"

Address = tuple[str, int]
UpstreamSpec = Address | Sequence[Address]


def type_url(message_or_class: Message | type[Message]) -> str:
    """"type.googleapis.com/" + the message's full name."""
    return "type.googleapis.com/" + message_or_class.DESCRIPTOR.full_name


CLUSTER_TYPE = type_url(cluster_pb2.Cluster)
CLA_TYPE = type_url(endpoint_pb2.ClusterLoadAssignment)
LISTENER_TYPE = type_url(listener_pb2.Listener)
ROUTE_TYPE = type_url(route_pb2.RouteConfiguration)


def cluster_name(k: int) -> str:
    return f"cluster-{k}"


def route_name(i: int) -> str:
    return f"route-{i}"


def http_listener_name(i: int) -> str:
    return f"listener-http-{i}"


def tcp_listener_name(i: int) -> str:
    return f"listener-tcp-{i}"


def server_name(round: int) -> str:
    """HCM server_name of the HTTP listeners in `round` (the `server` response header)."""
    return f"xds-test-round-{round}"


def upstream_name(k: int) -> str:
    """Suggested name for the upstream behind cluster k (what its body will report)."""
    return f"upstream-{k}"


def target_cluster(round: int, listener_index: int) -> int:
    """Cluster index that listener `listener_index` (HTTP 0..1, then TCP 2..3) uses in `round`."""
    return (listener_index + round) % NUM_CLUSTERS


def config_source(ads: bool, xds_cluster: str = "xds_cluster") -> config_source_pb2.ConfigSource:
    """ADS config source, or a per-type GRPC api_config_source to `xds_cluster`."""
    src = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.ApiVersion.V3)
    if ads:
        src.ads.SetInParent()
    else:
        api = src.api_config_source
        api.api_type = config_source_pb2.ApiConfigSource.GRPC
        api.transport_api_version = config_source_pb2.ApiVersion.V3
        api.grpc_services.add().envoy_grpc.cluster_name = xds_cluster
    return src


def _round_metadata(round: int) -> base_pb2.Metadata:
    md = base_pb2.Metadata()
    md.filter_metadata[METADATA_NAMESPACE].CopyFrom(
        struct_pb2.Struct(fields={"round": struct_pb2.Value(number_value=round)})
    )
    return md


def _socket_address(ip: str, port: int) -> address_pb2.Address:
    addr = address_pb2.Address()
    addr.socket_address.address = ip
    addr.socket_address.port_value = int(port)
    return addr


def make_cluster(k: int, round: int, ads: bool = True, xds_cluster: str = "xds_cluster") -> cluster_pb2.Cluster:
    """EDS cluster k; round-specific connect_timeout and metadata."""
    c = cluster_pb2.Cluster(name=cluster_name(k), type=cluster_pb2.Cluster.EDS)
    c.connect_timeout.FromMilliseconds(1000 + round)
    c.eds_cluster_config.eds_config.CopyFrom(config_source(ads, xds_cluster))
    c.metadata.CopyFrom(_round_metadata(round))
    return c


def make_cla(k: int, round: int, upstreams: Sequence[Address]) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints of cluster k: one locality (set, weighted: proxyless gRPC requires it)."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(k))
    loc = cla.endpoints.add()
    loc.locality.region = "test"
    loc.locality.zone = f"zone-{k}"
    loc.load_balancing_weight.value = 1
    for ip, port in upstreams:
        lb = loc.lb_endpoints.add()
        lb.endpoint.address.CopyFrom(_socket_address(ip, port))
        lb.metadata.CopyFrom(_round_metadata(round))
    return cla


def make_route(i: int, round: int) -> route_pb2.RouteConfiguration:
    """RouteConfiguration for HTTP listener i: everything to its round's cluster, x-round headers."""
    rc = route_pb2.RouteConfiguration(name=route_name(i))
    vh = rc.virtual_hosts.add(name=f"{route_name(i)}-vhost", domains=["*"])
    r = vh.routes.add(name=f"{route_name(i)}-default")
    r.match.prefix = "/"
    r.route.cluster = cluster_name(target_cluster(round, i))
    for headers in (rc.response_headers_to_add, rc.request_headers_to_add):
        for key, value in (("x-round", str(round)), ("x-route", route_name(i))):
            hv = headers.add()
            hv.header.key = key
            hv.header.value = value
            hv.append_action = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    return rc


def make_http_listener(
    i: int,
    round: int,
    listen_ip: str,
    port: int,
    ads: bool = True,
    xds_cluster: str = "xds_cluster",
    full_update: bool = True,
) -> listener_pb2.Listener:
    """HTTP listener i on listen_ip:port, HCM with RDS for route_name(i), server_name per round."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"http_{i}",
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        # The per-round change of this listener; Envoy puts it in the `server` header.
        server_name=server_name(round),
    )
    hcm.rds.route_config_name = route_name(i)
    hcm.rds.config_source.CopyFrom(config_source(ads, xds_cluster))
    router = hcm.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    lis = listener_pb2.Listener(name=http_listener_name(i))
    lis.address.CopyFrom(_socket_address(listen_ip, port))
    if full_update:
        lis.metadata.CopyFrom(_round_metadata(round))
    flt: listener_components_pb2.Filter = lis.filter_chains.add().filters.add(
        name="envoy.filters.network.http_connection_manager"
    )
    flt.typed_config.Pack(hcm)
    return lis


def make_tcp_listener(
    i: int, round: int, listen_ip: str, port: int, full_update: bool = True
) -> listener_pb2.Listener:
    """TCP listener i (global index NUM_HTTP_LISTENERS + i) proxying to its round's cluster."""
    tcp = tcp_proxy_pb2.TcpProxy(
        stat_prefix=f"tcp_{i}",
        cluster=cluster_name(target_cluster(round, NUM_HTTP_LISTENERS + i)),
    )
    lis = listener_pb2.Listener(name=tcp_listener_name(i))
    lis.address.CopyFrom(_socket_address(listen_ip, port))
    if full_update:
        lis.metadata.CopyFrom(_round_metadata(round))
    lis.filter_chains.add().filters.add(name="envoy.filters.network.tcp_proxy").typed_config.Pack(tcp)
    return lis


def _normalize(spec: UpstreamSpec) -> list[Address]:
    if len(spec) == 2 and isinstance(spec[0], str):
        ip, port = spec  # type: ignore[misc]
        return [(str(ip), int(port))]
    return [(str(ip), int(port)) for ip, port in spec]  # type: ignore[misc]


def make_snapshot(
    round: int,
    upstreams: Sequence[UpstreamSpec],
    http_ports: Sequence[int],
    tcp_ports: Sequence[int],
    listen_ip: str = "127.0.0.1",
    *,
    ads: bool = True,
    xds_cluster: str = "xds_cluster",
    listener_update: Literal["full", "in_place"] = "full",
) -> dict[str, list[Message]]:
    """All resources of `round`: {type_url: [messages]} for clusters, CLAs, routes, listeners.

    upstreams: 4 entries, cluster k's endpoints; each an (ip, port) or a list of them.
    http_ports / tcp_ports: 2 ports each for the listeners on `listen_ip`.
    ads: EDS/RDS config sources use ADS, else a GRPC api_config_source to `xds_cluster`.
    listener_update: "full" adds per-round listener metadata (Envoy rebuilds the listener and
    config_dump shows the new version); "in_place" changes only filter chains.
    """
    full = listener_update == "full"
    if len(upstreams) != NUM_CLUSTERS:
        raise ValueError(f"need {NUM_CLUSTERS} upstreams, got {len(upstreams)}")
    if len(http_ports) != NUM_HTTP_LISTENERS or len(tcp_ports) != NUM_TCP_LISTENERS:
        raise ValueError(f"need {NUM_HTTP_LISTENERS} HTTP and {NUM_TCP_LISTENERS} TCP ports")
    if round < 0:
        raise ValueError("round must be >= 0")
    clusters = [make_cluster(k, round, ads, xds_cluster) for k in range(NUM_CLUSTERS)]
    clas = [make_cla(k, round, _normalize(upstreams[k])) for k in range(NUM_CLUSTERS)]
    routes = [make_route(i, round) for i in range(NUM_HTTP_LISTENERS)]
    listeners: list[Message] = [
        make_http_listener(i, round, listen_ip, http_ports[i], ads, xds_cluster, full) for i in range(NUM_HTTP_LISTENERS)
    ]
    listeners += [make_tcp_listener(i, round, listen_ip, tcp_ports[i], full) for i in range(NUM_TCP_LISTENERS)]
    return {
        CLUSTER_TYPE: list(clusters),
        CLA_TYPE: list(clas),
        ROUTE_TYPE: list(routes),
        LISTENER_TYPE: listeners,
    }


def resource_names(snapshot: dict[str, list[Message]]) -> dict[str, list[str]]:
    """{type_url: [resource names]}; CLAs are named by cluster_name, as in xDS."""
    out: dict[str, list[str]] = {}
    for url, msgs in snapshot.items():
        out[url] = [getattr(m, "cluster_name", "") if url == CLA_TYPE else m.name for m in msgs]
    return out
