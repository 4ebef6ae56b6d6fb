"""NetworkPolicy (model/netpol.py) -> Envoy network RBAC filters in a capture-mode sidecar.

NetworkPolicy is about connections (L3/L4), so it is a network filter at the head of every
filter chain, before the HTTP connection manager or tcp_proxy, and separate from the
AuthorizationPolicy filters that follow it: a connection must pass both. Inbound (15006) it is
on every app port's chains and the passthrough chain; outbound (15001) on every chain of the
pod's own copy of the outbound listener (a pod isolated for egress does not share its
namespace's listener). The capture listeners restore the original destination
(`original_dst`), so `destination_ip`/`destination_port` are what the app dialled or the port
the peer reached, and `direct_remote_ip` is the connecting pod's own address.

Identity: an allowed principal matches the mTLS peer certificate's URI SAN
(`authenticated.principal_name`), so a peer reusing an allowed pod's IP, but not its service
account's certificate, matches nothing. Plaintext peers (no certificate) match only address
rules (ipBlock, or the source-IP fallback of model/netpol.py).

Pure functions: no I/O, no globals, no clock.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import range_pb2

from ..model.netpol import Allowed, Cidr, Enforcement
from .clusters import pack

NETWORK_RBAC = "envoy.filters.network.rbac"
INGRESS_STAT_PREFIX = "netpol_ingress."
EGRESS_STAT_PREFIX = "netpol_egress."


def ingress_filter(enforcement: Enforcement) -> listener_components_pb2.Filter | None:
    """The inbound filter (None: the pod is not isolated for ingress)."""
    return _filter(enforcement, INGRESS_STAT_PREFIX, egress=False)


def egress_filter(enforcement: Enforcement) -> listener_components_pb2.Filter | None:
    """The outbound filter (None: the pod is not isolated for egress)."""
    return _filter(enforcement, EGRESS_STAT_PREFIX, egress=True)


def _filter(enforcement: Enforcement, stat_prefix: str, *, egress: bool) -> listener_components_pb2.Filter | None:
    if not enforcement.isolated:
        return None
    policies: dict[str, rbac_pb2.Policy] = {}
    for allowed in enforcement.allowed:
        if allowed.empty:
            continue  # e.g. pods that do not exist (yet): allows nothing
        name = allowed.name
        if name in policies:  # one rule may give several entries (pods by port, ClusterIPs)
            name = f"{allowed.name} ({sum(1 for k in policies if k.startswith(allowed.name))})"
        policies[name] = _policy(allowed, egress=egress)
    # ALLOW with no policies denies everything: Kubernetes' default deny of an isolated pod.
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=policies)
    config = network_rbac_pb2.RBAC(rules=rules, stat_prefix=stat_prefix)
    return listener_components_pb2.Filter(name=NETWORK_RBAC, typed_config=pack(config))


def _policy(allowed: Allowed, *, egress: bool) -> rbac_pb2.Policy:
    ports = _ports(allowed.ports)
    if egress:
        # Where the app connects: the original destination's address.
        if allowed.any_peer:
            return rbac_pb2.Policy(permissions=[ports], principals=[rbac_pb2.Principal(any=True)])
        where = _or_permissions([_destination(c) for c in allowed.cidrs])
        return rbac_pb2.Policy(
            permissions=[_and_permissions([where, ports])], principals=[rbac_pb2.Principal(any=True)]
        )
    if allowed.any_peer:
        return rbac_pb2.Policy(permissions=[ports], principals=[rbac_pb2.Principal(any=True)])
    peers: list[rbac_pb2.Principal] = [_principal(p) for p in allowed.principals]
    peers += [
        rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=[_principal(p), _source(Cidr(ip))]))
        for p, ip in allowed.guarded
    ]
    peers += [_source(c) for c in allowed.cidrs]
    return rbac_pb2.Policy(permissions=[ports], principals=peers)


def _range(cidr: str) -> address_pb2.CidrRange:
    network = ipaddress.ip_network(cidr, strict=False)
    out = address_pb2.CidrRange(address_prefix=str(network.network_address))
    out.prefix_len.value = network.prefixlen
    return out


def _source(cidr: Cidr) -> rbac_pb2.Principal:
    inside = rbac_pb2.Principal(direct_remote_ip=_range(cidr.cidr))
    if not cidr.except_:
        return inside
    excluded = [rbac_pb2.Principal(direct_remote_ip=_range(c)) for c in cidr.except_]
    outside = rbac_pb2.Principal(not_id=rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=excluded)))
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=[inside, outside]))


def _destination(cidr: Cidr) -> rbac_pb2.Permission:
    inside = rbac_pb2.Permission(destination_ip=_range(cidr.cidr))
    if not cidr.except_:
        return inside
    excluded = [rbac_pb2.Permission(destination_ip=_range(c)) for c in cidr.except_]
    outside = rbac_pb2.Permission(not_rule=rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=excluded)))
    return _and_permissions([inside, outside])


def _principal(spiffe_id: str) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(
        principal_name=string_pb2.StringMatcher(exact=spiffe_id)
    ))


def _ports(ports: tuple[tuple[int, int], ...] | None) -> rbac_pb2.Permission:
    if ports is None:
        return rbac_pb2.Permission(any=True)
    out = []
    for low, high in ports:
        if low == high:
            out.append(rbac_pb2.Permission(destination_port=low))
        else:  # Int32Range: end exclusive
            out.append(rbac_pb2.Permission(destination_port_range=range_pb2.Int32Range(start=low, end=high + 1)))
    return _or_permissions(out)


def _or_permissions(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    if len(rules) == 1:
        return rules[0]
    # An empty OR set matches nothing (Envoy); never produced for a non-empty rule.
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=rules))


def _and_permissions(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    rules = [r for r in rules if not r.HasField("any")] or [rbac_pb2.Permission(any=True)]
    if len(rules) == 1:
        return rules[0]
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=rules))


def guard_listener(listener: listener_pb2.Listener, head: listener_components_pb2.Filter) -> None:
    """Put `head` first in every chain of `listener` (in place), the default chain too."""
    chains: Iterable[listener_components_pb2.FilterChain] = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains = [*chains, listener.default_filter_chain]
    for chain in chains:
        filters = list(chain.filters)
        del chain.filters[:]
        chain.filters.append(head)
        chain.filters.extend(filters)


# A pod's own outbound listener is its head plus its namespace's chains, as bytes (capture.py):
# the guarded copy of one (chains, guard) pair is made once and shared by the pods that have it.
_guarded: dict[bytes, bytes] = {}  # digest of (chains, guard) -> guarded chains


def guarded_chains(chains: bytes, head: listener_components_pb2.Filter) -> bytes:
    """Encoded `Listener.filter_chains` entries with `head` first in every chain."""
    key = hashlib.blake2b(chains + head.SerializeToString(deterministic=True), digest_size=16).digest()
    found = _guarded.get(key)
    if found is None:
        if len(_guarded) >= 64:  # bounded: one entry per distinct (scope, egress rules)
            _guarded.clear()
        parsed = listener_pb2.Listener.FromString(chains)
        guard_listener(parsed, head)
        found = _guarded[key] = parsed.SerializeToString(deterministic=True)
    return found
