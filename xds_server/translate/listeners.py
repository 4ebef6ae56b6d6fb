"""Listeners of one sidecar: outbound HTTP, explicit TCP upstreams, and inbound."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2
from google.protobuf.message import Message

from . import rbac
from . import tls as tls_contexts
from .clusters import ads_config_source, duration, pack
from .http_filters import inbound_http_filters, outbound_http_filters
from .security import InboundSecurity

HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"


def socket(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def http_manager(
    stat_prefix: str, route_name: str, filters: list[hcm_pb2.HttpFilter]
) -> listener_components_pb2.Filter:
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


def tcp_proxy(stat_prefix: str, cluster: str) -> listener_components_pb2.Filter:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(proxy))


def outbound_listener(name: str, ip: str, port: int, route_name: str) -> listener_pb2.Listener:
    """Where the app sends plain HTTP; the Host header picks the destination service."""
    return listener_pb2.Listener(
        name=name,
        address=socket(ip, port),
        stat_prefix="outbound",
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[http_manager("outbound", route_name, outbound_http_filters())]
            )
        ],
    )


def tcp_upstream_listener(name: str, ip: str, local_port: int, cluster: str) -> listener_pb2.Listener:
    """An explicit local binding for a TCP upstream (no Host header to route on)."""
    return listener_pb2.Listener(
        name=name,
        address=socket(ip, local_port),
        stat_prefix=f"outbound_tcp_{local_port}",
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            listener_components_pb2.FilterChain(filters=[tcp_proxy(f"outbound_tcp_{local_port}", cluster)])
        ],
    )


def inbound_listener(
    name: str,
    ip: str,
    port: int,
    route_name: str,
    has_http: bool,
    tcp_cluster: str | None,
    security: InboundSecurity | None = None,
    plaintext_route_name: str | None = None,
) -> listener_pb2.Listener:
    """Where peers reach this workload. HTTP is routed by Host to the app port; one plaintext
    TCP app port is reached through the default chain, told apart by the HTTP inspector.
    With `security`, mTLS and authorization apply (see `_secure_inbound_listener`)."""
    if security is not None:
        return _secure_inbound_listener(
            name, ip, port, route_name, plaintext_route_name or route_name, tcp_cluster, security
        )
    listener = listener_pb2.Listener(
        name=name,
        address=socket(ip, port),
        stat_prefix="inbound",
        traffic_direction=base_pb2.INBOUND,
    )
    http_chain = listener_components_pb2.FilterChain(
        filters=[http_manager("inbound", route_name, inbound_http_filters())]
    )
    if tcp_cluster is None:
        listener.filter_chains.append(http_chain)
        return listener
    tcp_chain = listener_components_pb2.FilterChain(filters=[tcp_proxy("inbound_tcp", tcp_cluster)])
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


def _listener_filter(name: str, config: Message) -> listener_components_pb2.ListenerFilter:
    return listener_components_pb2.ListenerFilter(name=name, typed_config=pack(config))


def _secure_inbound_listener(
    name: str,
    ip: str,
    port: int,
    route_name: str,
    plaintext_route_name: str,
    tcp_cluster: str | None,
    security: InboundSecurity,
) -> listener_pb2.Listener:
    """The inbound listener with mTLS and authorization (design: translate/security.py).

    Filter chains, each present only when some app port needs it:
      TLS  (transport "tls"):  HTTP (ALPN h2/http/1.1 when a TCP chain shares TLS) and TCP,
                               both terminating mTLS with SDS `default` / `ROOTCA`;
      plaintext (raw_buffer):  HTTP (ALPN http/1.1 / h2c from the HTTP inspector when a TCP
                               app port shares it), and TCP as the default chain.
    No chain matches a plaintext connection to an all-STRICT workload: it is closed at once.
    HTTP chains run the RBAC filters (per virtual host config, see rbac.py); TCP chains the
    network RBAC of the TCP app port.
    """
    listener = listener_pb2.Listener(
        name=name, address=socket(ip, port), stat_prefix="inbound", traffic_direction=base_pb2.INBOUND
    )
    has_http = bool(security.http_modes)
    has_tcp = tcp_cluster is not None and security.tcp_port is not None
    tls = security.terminates_tls
    tcp_rbac = rbac.network_filters(security.tcp_authz(), "inbound_tcp")

    def http_chain(stat_prefix: str, route: str) -> listener_components_pb2.FilterChain:
        filters = rbac.http_filters() + inbound_http_filters()
        return listener_components_pb2.FilterChain(filters=[http_manager(stat_prefix, route, filters)])

    def tcp_chain(stat_prefix: str) -> listener_components_pb2.FilterChain:
        assert tcp_cluster is not None
        return listener_components_pb2.FilterChain(filters=[*tcp_rbac, tcp_proxy(stat_prefix, tcp_cluster)])

    if tls:
        downstream = tls_contexts.transport_socket(
            tls_contexts.downstream_tls_context(security.trust_domain)
        )
        if has_http:
            chain = http_chain("inbound_mtls", route_name)
            chain.name = "inbound-mtls-http"
            chain.filter_chain_match.transport_protocol = "tls"
            if has_tcp:
                chain.filter_chain_match.application_protocols.extend(tls_contexts.HTTP_ALPN)
            chain.transport_socket.CopyFrom(downstream)
            listener.filter_chains.append(chain)
        if has_tcp:
            chain = tcp_chain("inbound_mtls_tcp")
            chain.name = "inbound-mtls-tcp"
            chain.filter_chain_match.transport_protocol = "tls"
            chain.transport_socket.CopyFrom(downstream)
            listener.filter_chains.append(chain)
        listener.listener_filters.append(
            _listener_filter("envoy.filters.listener.tls_inspector", tls_inspector_pb2.TlsInspector())
        )
    plain_http = has_http and security.accepts_plaintext
    plain_tcp = has_tcp and security.plaintext_tcp
    if plain_http:
        chain = http_chain("inbound", plaintext_route_name)
        chain.name = "inbound-plaintext-http"
        if tls:
            chain.filter_chain_match.transport_protocol = "raw_buffer"
        if plain_tcp:
            chain.filter_chain_match.application_protocols.extend(["http/1.1", "h2c"])
            listener.listener_filters.append(
                _listener_filter("envoy.filters.listener.http_inspector", http_inspector_pb2.HttpInspector())
            )
        listener.filter_chains.append(chain)
    if plain_tcp:
        chain = tcp_chain("inbound_tcp")
        chain.name = "inbound-plaintext-tcp"
        if listener.filter_chains:
            listener.default_filter_chain.CopyFrom(chain)
        else:
            listener.filter_chains.append(chain)
    if listener.listener_filters:
        # The inspectors wait for bytes; a server-speaks-first TCP protocol must not hang.
        listener.listener_filters_timeout.CopyFrom(duration(1))
        listener.continue_on_listener_filters_timeout = True
    return listener


def names_of(listeners: Sequence[listener_pb2.Listener]) -> list[str]:
    return [listener.name for listener in listeners]
