"""Listeners of one sidecar: outbound HTTP, explicit TCP upstreams, and inbound."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from .clusters import ads_config_source, duration, pack
from .http_filters import inbound_http_filters, outbound_http_filters

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"


def socket(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def _http_manager(stat_prefix: str, route_name: str, filters: list) -> listener_components_pb2.Filter:
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,  # HTTP/1.1 and h2c (gRPC) alike
        rds=hcm_pb2.Rds(route_config_name=route_name, config_source=ads_config_source()),
        http_filters=filters,
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.UNESCAPE_AND_REDIRECT,
        # A sidecar is not an edge proxy: keep the app's view of the client.
        use_remote_address=wrappers_pb2.BoolValue(value=False),
        stream_idle_timeout=duration(300),
    )
    return listener_components_pb2.Filter(name=HCM, typed_config=pack(manager))


def _tcp_proxy(stat_prefix: str, cluster: str) -> listener_components_pb2.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(proxy))


def outbound_listener(name: str, ip: str, port: int, route_name: str) -> listener_pb2.Listener:
    """Where the app sends plain HTTP; the Host header picks the destination service."""
    return listener_pb2.Listener(
        name=name,
        address=socket(ip, port),
        stat_prefix="outbound",
        traffic_direction=1,  # OUTBOUND
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[_http_manager("outbound", route_name, outbound_http_filters())]
            )
        ],
    )


def tcp_upstream_listener(name: str, ip: str, local_port: int, cluster: str) -> listener_pb2.Listener:
    """An explicit local binding for a TCP upstream (no Host header to route on)."""
    return listener_pb2.Listener(
        name=name,
        address=socket(ip, local_port),
        stat_prefix=f"outbound_tcp_{local_port}",
        traffic_direction=1,
        filter_chains=[
            listener_components_pb2.FilterChain(filters=[_tcp_proxy(f"outbound_tcp_{local_port}", cluster)])
        ],
    )


def inbound_listener(
    name: str,
    ip: str,
    port: int,
    route_name: str,
    has_http: bool,
    tcp_cluster: str | None,
) -> listener_pb2.Listener:
    """Where peers reach this workload. HTTP is routed by Host to the app port; one plaintext
    TCP app port is reached through the default chain, told apart by the HTTP inspector."""
    listener = listener_pb2.Listener(
        name=name,
        address=socket(ip, port),
        stat_prefix="inbound",
        traffic_direction=2,  # INBOUND
    )
    http_chain = listener_components_pb2.FilterChain(
        filters=[_http_manager("inbound", route_name, inbound_http_filters())]
    )
    if tcp_cluster is None:
        listener.filter_chains.append(http_chain)
        return listener
    tcp_chain = listener_components_pb2.FilterChain(filters=[_tcp_proxy("inbound_tcp", tcp_cluster)])
    if not has_http:
        listener.filter_chains.append(tcp_chain)
        return listener
    http_chain.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
    listener.filter_chains.append(http_chain)
    listener.default_filter_chain.CopyFrom(tcp_chain)
    listener.listener_filters.append(
        listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.http_inspector",
            typed_config=pack(http_inspector_pb2.HttpInspector()),
        )
    )
    # The inspector waits for bytes; a server-speaks-first TCP protocol must not hang.
    listener.listener_filters_timeout.CopyFrom(duration(1))
    listener.continue_on_listener_filters_timeout = True
    return listener


def names_of(listeners: Sequence[listener_pb2.Listener]) -> list[str]:
    return [listener.name for listener in listeners]
