"""Capture mode: the listeners of a sidecar whose pod's traffic is sent to it by iptables
(`xds-server iptables`), routed by each connection's original destination.

Outbound (0.0.0.0:15001): the `original_dst` listener filter restores the address the app
dialled, and filter chains are matched on it (Envoy matches destination port, then IP):

  ClusterIP:port of a visible service  HTTP ports: an HCM whose route configuration holds
                                       only that service port's routes (domain `*`), so the
                                       address dialled picks the service, never the Host
                                       header; TCP ports: tcp_proxy to the service's cluster;
  pod IP:port of a visible endpoint    tcp_proxy to the original destination, over mTLS when
                                       that endpoint accepts it (headless Services,
                                       StatefulSet pods, a pod IP dialled directly: the
                                       routes of a Service apply to its ClusterIP only);
  anything else                        the outbound traffic policy: ALLOW_ANY passes it
                                       through, REGISTRY_ONLY closes it.

A port that does not declare its protocol (no appProtocol, no protocol-named port) is
sniffed as Istio does: the HTTP inspector, enabled for those ports only, tells HTTP (routed)
from the rest (TCP). Envoy closes a connection whose client half-closes before the inspector
has decided; declaring the protocol avoids both that and the inspection.

The service and pod-IP chains are the same for every proxy of a namespace: each service's
chains are encoded once (ServiceOutputs), the namespace's are a byte join (scopes.py), and a
proxy's listener is its own small head plus that join.

Inbound (0.0.0.0:15006): the destination port picks the app port; per port, mTLS and
authorization as the port's mode says; a port no service names passes through to the app.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import wrappers_pb2

from ..model.mesh import Service, ServiceKey
from ..model.security import MtlsMode
from . import names, rbac
from . import tls as tls_contexts
from .clusters import duration, pack
from .http_filters import inbound_http_filters, outbound_http_filters
from .listeners import http_manager, socket, tcp_proxy

ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
HTTP_INSPECTOR = "envoy.filters.listener.http_inspector"
SNIFFED_HTTP = ("http/1.1", "h2c")  # what the HTTP inspector reports for HTTP
# Istio's names: operators know them from `istioctl proxy-config cluster`.
PASSTHROUGH = "PassthroughCluster"
PASSTHROUGH_MTLS = "PassthroughCluster|mtls"
BLACKHOLE = "BlackHoleCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
ANY_ADDRESS = "0.0.0.0"


class OutboundTrafficPolicy(str, Enum):
    """Where a connection to an address the mesh does not know goes (Istio's meshConfig
    outboundTrafficPolicy.mode)."""

    ALLOW_ANY = "ALLOW_ANY"  # through, to the address dialled
    REGISTRY_ONLY = "REGISTRY_ONLY"  # closed


# ------------------------------------------------------------------------------- outbound


def destination_route_name(key: ServiceKey, port: int, *, consumers: bool = False) -> str:
    """The route configuration of one service port as reached by its ClusterIP, e.g.
    `outbound|80||api.shop.svc.cluster.local`; `consumers`: the copy for clients outside the
    service's namespace when consumer routes (GEP-1294) make it differ."""
    return names.cluster_name(key, port) + ("|consumers" if consumers else "")


def destination_routes(
    encoded_vhosts: bytes, key: ServiceKey, *, consumers: bool
) -> dict[int, route_pb2.RouteConfiguration]:
    """Per HTTP service port, a route configuration with that port's virtual host (as built
    for the Host-header mode, VirtualHostsBuilder) answering every Host: reached by address,
    the Host header cannot pick another service."""
    out: dict[int, route_pb2.RouteConfiguration] = {}
    for vhost in route_pb2.RouteConfiguration.FromString(encoded_vhosts).virtual_hosts:
        port_text = vhost.name.rpartition(":")[2]
        if not port_text.isdigit():
            continue
        port = int(port_text)
        config = route_pb2.RouteConfiguration(name=destination_route_name(key, port, consumers=consumers))
        config.validate_clusters.value = False
        copy = config.virtual_hosts.add()
        copy.CopyFrom(vhost)
        del copy.domains[:]
        copy.domains.append("*")
        out[port] = config
    return out


def is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def base_cidr(ip: str) -> address_pb2.CidrRange:
    length = 128 if ipaddress.ip_address(ip).version == 6 else 32
    return address_pb2.CidrRange(address_prefix=ip, prefix_len=wrappers_pb2.UInt32Value(value=length))


def has_cluster_ip(service: Service) -> bool:
    """A ClusterIP to match on: not headless (None), and an address (sources validate it)."""
    return bool(service.cluster_ip) and is_address(service.cluster_ip or "")


def service_chains(service: Service, route_names: Mapping[int, str]) -> list[listener_components_pb2.FilterChain]:
    """The chains of a service's ClusterIP: one per port (a duplicate port number, which
    Kubernetes refuses, is skipped: Envoy would reject the whole listener). An undeclared
    port gets two: HTTP when the HTTP inspector saw HTTP, else TCP."""
    ip = service.cluster_ip
    if not ip or not has_cluster_ip(service):
        return []
    chains = []
    seen: set[int] = set()
    for port in service.ports:
        if port.port in seen:
            continue
        seen.add(port.port)
        stat = f"outbound|{port.port}||{service.key.fqdn}"
        chain = listener_components_pb2.FilterChain(name=f"{ip}_{port.port}")
        chain.filter_chain_match.destination_port.value = port.port
        chain.filter_chain_match.prefix_ranges.append(base_cidr(ip))
        route = route_names.get(port.port)
        tcp = tcp_proxy(stat, names.cluster_name(service.key, port.port))
        if port.routes_http and route is not None:
            chain.filters.append(http_manager(stat, route, outbound_http_filters()))
            if port.sniffed:
                chain.filter_chain_match.application_protocols.extend(SNIFFED_HTTP)
                other = listener_components_pb2.FilterChain(name=f"{ip}_{port.port}_tcp")
                other.filter_chain_match.CopyFrom(chain.filter_chain_match)
                del other.filter_chain_match.application_protocols[:]
                other.filters.append(tcp)
                chains.extend([chain, other])
                continue
        else:
            chain.filters.append(tcp)
        chains.append(chain)
    return chains


PodIp = tuple[str, int, bool]  # (pod IP, port, whether it accepts mTLS)


class PodIpChains:
    """The pod-IP chains of one scope (encoded as `Listener.filter_chains` entries), kept as
    its services' endpoints change: per port, the addresses that accept mTLS and those that
    do not, each passed through to the original destination.

    A scope can see 100,000 endpoints, so nothing here is rebuilt whole: each (port, mTLS)
    group keeps its addresses sorted next to their encodings (made once per address), and a
    change re-joins only the groups it touched. The address list goes in a second
    `filter_chain_match` of the chain (protobuf merges a message field that appears twice:
    the port in one, the addresses in the other). Entries hold addresses only
    (PodIpsBuilder checks them); an address counted with and without mTLS (two services
    disagreeing) goes with mTLS: one chain per address and port, as Envoy requires."""

    def __init__(self) -> None:
        self._counts: Counter[PodIp] = Counter()
        self._state: dict[tuple[int, str], bool] = {}  # (port, ip) -> mTLS, while counted
        self._groups: dict[tuple[int, bool], tuple[list[str], list[bytes]]] = {}
        self._encoded: dict[tuple[int, bool], bytes] = {}
        self._dirty: set[tuple[int, bool]] = set()

    def update(self, removed: Iterable[PodIp], added: Iterable[PodIp]) -> bool:
        """Count entries out and in; True when the chains changed."""
        if not self._counts:
            removed = list(removed)
            if not removed:
                return self._fill(added)
        touched: set[tuple[int, str]] = set()
        for entry in removed:
            left = self._counts[entry] - 1
            if left > 0:
                self._counts[entry] = left
            else:
                del self._counts[entry]
            touched.add((entry[1], entry[0]))
        for entry in added:
            self._counts[entry] += 1
            touched.add((entry[1], entry[0]))
        moves: dict[tuple[int, bool], tuple[set[str], set[str]]] = {}  # group -> (out, in)
        for port, ip in touched:
            old = self._state.get((port, ip))
            new: bool | None = True if self._counts.get((ip, port, True)) else (
                False if self._counts.get((ip, port, False)) else None)
            if old == new:
                continue
            if old is not None:
                moves.setdefault((port, old), (set(), set()))[0].add(ip)
            if new is None:
                del self._state[(port, ip)]
            else:
                self._state[(port, ip)] = new
                moves.setdefault((port, new), (set(), set()))[1].add(ip)
        for key, (out, into) in moves.items():
            self._apply(key, out, into)
        return bool(moves)

    def _fill(self, entries: Iterable[PodIp]) -> bool:
        """The first entries of an empty scope: counted, grouped and sorted in bulk."""
        self._counts.update(entries)
        for ip, port, mtls in self._counts:
            if mtls or (port, ip) not in self._state:
                self._state[(port, ip)] = mtls
        members: dict[tuple[int, bool], list[str]] = {}
        for (port, ip), mtls in self._state.items():
            members.setdefault((port, mtls), []).append(ip)
        for key, ips in members.items():
            ips.sort()
            self._groups[key] = (ips, [_prefix_range(ip) for ip in ips])
            self._dirty.add(key)
        return bool(members)

    def _apply(self, key: tuple[int, bool], out: set[str], into: set[str]) -> None:
        ips, entries = self._groups.get(key, ([], []))
        if len(out) + len(into) > 64:  # many at once (a first build): one sort
            ips = sorted((set(ips) - out) | into)
            entries = [_prefix_range(ip) for ip in ips]
        else:  # a few: in place, each a bisect and a move of the tail
            for ip in out:
                at = bisect.bisect_left(ips, ip)
                del ips[at], entries[at]
            for ip in into:
                at = bisect.bisect_left(ips, ip)
                ips.insert(at, ip)
                entries.insert(at, _prefix_range(ip))
        if ips:
            self._groups[key] = (ips, entries)
        else:
            self._groups.pop(key, None)
            self._encoded.pop(key, None)
        self._dirty.add(key)

    def encode(self) -> bytes:
        for key in self._dirty:
            if key in self._groups:
                self._encoded[key] = _pod_ip_chain(*key, self._groups[key][1])
        self._dirty.clear()
        return b"".join(self._encoded[key] for key in sorted(self._encoded))

    def __len__(self) -> int:
        return len(self._state)


def _pod_ip_chain(port: int, mtls: bool, ranges: list[bytes]) -> bytes:
    chain = listener_components_pb2.FilterChain(name=f"pod-ips_{port}" + ("_mtls" if mtls else ""))
    chain.filter_chain_match.destination_port.value = port
    cluster = PASSTHROUGH_MTLS if mtls else PASSTHROUGH
    chain.filters.append(tcp_proxy(f"outbound|{port}|pod-ip", cluster))
    body = chain.SerializeToString(deterministic=True) + _field(_CHAIN_MATCH, b"".join(ranges))
    return _field(_LISTENER_CHAINS, body)


_LISTENER_CHAINS = 3  # Listener.filter_chains
_CHAIN_MATCH = 1  # FilterChain.filter_chain_match
_MATCH_PREFIX_RANGES = 3  # FilterChainMatch.prefix_ranges
_prefix_ranges: dict[str, bytes] = {}  # address -> its encoded prefix_ranges entry


def _prefix_range(ip: str) -> bytes:
    """A `prefix_ranges` entry for one address (a host route): CidrRange{address_prefix,
    prefix_len: {value}}, encoded by hand (base_cidr's message, 10 times faster)."""
    entry = _prefix_ranges.get(ip)
    if entry is None:
        if len(_prefix_ranges) >= 1_000_000:  # bounded: addresses come and go
            _prefix_ranges.clear()
        cidr = _field(1, ip.encode()) + _HOST_LENGTH[6 if ":" in ip else 4]
        entry = _prefix_ranges[ip] = _field(_MATCH_PREFIX_RANGES, cidr)
    return entry


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (a message or bytes): tag, length, payload."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# CidrRange.prefix_len (a UInt32Value) of a host route, by IP version: 32 or 128.
_HOST_LENGTH = {4: _field(2, b"\x08\x20"), 6: _field(2, b"\x08\x80\x01")}


def encode_chains(chains: Iterable[listener_components_pb2.FilterChain]) -> bytes:
    """Chains as `Listener.filter_chains` entries: listeners are then byte joins."""
    encoded: bytes = listener_pb2.Listener(filter_chains=list(chains)).SerializeToString(deterministic=True)
    return encoded


def _original_dst() -> listener_components_pb2.ListenerFilter:
    return listener_components_pb2.ListenerFilter(
        name=ORIGINAL_DST_FILTER, typed_config=pack(original_dst_pb2.OriginalDst())
    )


def outbound_listener_head(
    name: str, port: int, policy: OutboundTrafficPolicy, sniffed_ports: Iterable[int] = ()
) -> listener_pb2.Listener:
    """Everything of the outbound capture listener but the service and pod-IP chains. With
    `sniffed_ports` (undeclared service ports), the HTTP inspector looks at connections to
    those ports only: a server-speaks-first protocol elsewhere never waits for it."""
    fallback = PASSTHROUGH if policy is OutboundTrafficPolicy.ALLOW_ANY else BLACKHOLE
    listener = listener_pb2.Listener(
        name=name,
        address=socket(ANY_ADDRESS, port),
        stat_prefix="outbound",
        traffic_direction=base_pb2.OUTBOUND,
        listener_filters=[_original_dst()],
    )
    listener.default_filter_chain.name = policy.value
    listener.default_filter_chain.filters.append(tcp_proxy(policy.value, fallback))
    ports = sorted(set(sniffed_ports))
    if ports:
        inspector = listener.listener_filters.add(
            name=HTTP_INSPECTOR, typed_config=pack(http_inspector_pb2.HttpInspector())
        )
        rules = []
        for sniffed in ports:
            rule = listener_components_pb2.ListenerFilterChainMatchPredicate()
            rule.destination_port_range.start = sniffed
            rule.destination_port_range.end = sniffed + 1
            rules.append(rule)
        enabled = inspector.filter_disabled.not_match
        if len(rules) == 1:  # a match set needs two rules or more
            enabled.CopyFrom(rules[0])
        else:
            enabled.or_match.rules.extend(rules)
        # A client that waits for the server on a sniffed port goes on as TCP after 1 s.
        listener.listener_filters_timeout.CopyFrom(duration(1))
        listener.continue_on_listener_filters_timeout = True
    return listener


def outbound_listener_bytes(head: listener_pb2.Listener, chains: bytes) -> bytes:
    encoded: bytes = head.SerializeToString(deterministic=True)
    return encoded + chains


# -------------------------------------------------------------------------------- inbound


@dataclass(frozen=True)
class InboundPort:
    """One app port of the workload as the inbound capture listener serves it."""

    port: int
    http: bool
    mode: MtlsMode
    authz: rbac.PortAuthz
    cluster: str
    route: str | None  # HTTP ports: their route configuration


def inbound_listener(
    name: str, port: int, app_ports: Iterable[InboundPort], trust_domain: str, passthrough: bool
) -> listener_pb2.Listener:
    """Chains by destination port: per app port, mTLS (transport `tls`) and/or plaintext
    (`raw_buffer`) as its mode accepts; `passthrough`: connections to other ports reach the
    app as they are (plaintext only)."""
    listener = listener_pb2.Listener(
        name=name,
        address=socket(ANY_ADDRESS, port),
        stat_prefix="inbound",
        traffic_direction=base_pb2.INBOUND,
        listener_filters=[_original_dst()],
    )
    any_tls = False
    for app in app_ports:
        stat = f"inbound|{app.port}"
        if app.http:
            assert app.route is not None
            filters = [http_manager(stat, app.route, rbac.http_filters() + inbound_http_filters())]
        else:
            filters = [*rbac.network_filters(app.authz, stat), tcp_proxy(stat, app.cluster)]
        both = app.mode.accepts_tls and app.mode.accepts_plaintext
        if app.mode.accepts_tls:
            any_tls = True
            chain = listener.filter_chains.add(name=f"{stat}|mtls")
            chain.filter_chain_match.destination_port.value = app.port
            chain.filter_chain_match.transport_protocol = "tls"
            chain.filters.extend(filters)
            context = tls_contexts.downstream_tls_context(trust_domain)
            chain.transport_socket.CopyFrom(tls_contexts.transport_socket(context))
        if app.mode.accepts_plaintext:
            chain = listener.filter_chains.add(name=f"{stat}|plaintext")
            chain.filter_chain_match.destination_port.value = app.port
            if both:
                chain.filter_chain_match.transport_protocol = "raw_buffer"
            chain.filters.extend(filters)
    if any_tls:
        listener.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())
            )
        )
        # The inspector waits for bytes; a server-speaks-first protocol must not hang.
        listener.listener_filters_timeout.CopyFrom(duration(1))
        listener.continue_on_listener_filters_timeout = True
    if passthrough:
        listener.default_filter_chain.name = "inbound-passthrough"
        listener.default_filter_chain.filters.append(tcp_proxy("inbound-passthrough", INBOUND_PASSTHROUGH))
    return listener


# ------------------------------------------------------------------------------- clusters


def static_clusters(trust_domain: str, mtls: bool) -> list[cluster_pb2.Cluster]:
    """The clusters the capture chains name: to the original destination (plain, and over
    mTLS to any workload of the trust domain), a black hole, and the inbound passthrough."""

    def original_dst(name: str) -> cluster_pb2.Cluster:
        return cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.ORIGINAL_DST,
            lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
            connect_timeout=duration(10),
        )

    clusters = [original_dst(PASSTHROUGH), original_dst(INBOUND_PASSTHROUGH)]
    blackhole = cluster_pb2.Cluster(name=BLACKHOLE, type=cluster_pb2.Cluster.STATIC, connect_timeout=duration(1))
    clusters.append(blackhole)
    if mtls:
        secure = original_dst(PASSTHROUGH_MTLS)
        context = tls_pb2.UpstreamTlsContext(
            common_tls_context=tls_contexts.common_tls_context(
                tls_contexts.SDS, [tls_contexts.trust_domain_matcher(trust_domain)], ()
            )
        )
        secure.transport_socket.CopyFrom(tls_contexts.transport_socket(context))
        clusters.append(secure)
    return clusters
