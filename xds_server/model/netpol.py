"""Kubernetes NetworkPolicy (`networking.k8s.io/v1`) in the model, and what it means for a pod
when the sidecars enforce it by identity.

Semantics are Kubernetes' (https://kubernetes.io/docs/concepts/services-networking/network-policies/):
a pod selected by some policy for a direction (Ingress, Egress) accepts, in that direction,
only what one of those policies' rules allows; a pod selected by none is not isolated. A rule
matches when one of its peers does (no peers: any peer) and one of its ports does (no ports:
any port). A peer is pods (`podSelector` in the policy's namespace, `namespaceSelector` for
every pod of the matching namespaces, both: those pods in those namespaces) or an `ipBlock`.

How a peer becomes something a sidecar can check (`resolve_ingress`, `resolve_egress`):

- Ingress from pods: the SPIFFE principal of their service account when the selector matches
  every pod of that service account in that namespace that has a sidecar (identity is per
  service account, so the check holds whatever IP the peer uses); otherwise (the selector
  matches only some pods of the account) the principal AND the source IP of each matching
  pod, said in `notes`; a matching pod without a sidecar has no identity: its source IP
  alone, said in `notes`.
- Egress to pods: the destination address (pod IPs; a Service's ClusterIP:port when every
  endpoint of it is an allowed pod on an allowed target port), since a client sidecar decides
  before any handshake. The destination's identity is still checked by the mTLS the client
  sidecar originates (the service's SPIFFE IDs).
- ipBlock: the source (ingress) or destination (egress) address, with `except`.
- Ports: TCP only (sidecars carry TCP); numbers, `endPort` ranges and named ports (the
  selected pod's container ports for ingress, the destination pod's for egress).

Pure functions over model values: no I/O, no Envoy types.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from .mesh import EndpointSlice, Namespace, Service, Workload, slice_port

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set on every Namespace by Kubernetes
Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
Direction = Literal["Ingress", "Egress"]


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        return self.key not in labels


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """metav1.LabelSelector: every label and every expression must match; empty: everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels) and all(
            r.matches(labels) for r in self.expressions
        )

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels]
        for r in self.expressions:
            if r.operator in ("In", "NotIn"):
                parts.append(f"{r.key} {r.operator.lower()} ({','.join(r.values)})")
            else:
                parts.append(("" if r.operator == "Exists" else "!") + r.key)
        return ",".join(parts) or "(all)"


@dataclass(frozen=True, slots=True)
class IpBlock:
    cidr: str
    except_: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.cidr + (f" except {','.join(self.except_)}" if self.except_ else "")


@dataclass(frozen=True, slots=True)
class Peer:
    """Exactly one of: pods (one or both selectors) or an ipBlock."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IpBlock | None = None

    def __str__(self) -> str:
        if self.ip_block is not None:
            return f"ipBlock {self.ip_block}"
        where = "this namespace" if self.namespace_selector is None else f"namespaces {self.namespace_selector}"
        return f"pods {self.pod_selector or LabelSelector()} in {where}"


@dataclass(frozen=True, slots=True)
class PolicyPort:
    protocol: str = "TCP"
    port: int | str | None = None  # None: every port; a string: a container port's name
    end_port: int | None = None

    def __str__(self) -> str:
        port = "all" if self.port is None else str(self.port)
        return f"{self.protocol}/{port}" + (f"-{self.end_port}" if self.end_port else "")


@dataclass(frozen=True, slots=True)
class PolicyRule:
    peers: tuple[Peer, ...] = ()  # empty: any peer
    ports: tuple[PolicyPort, ...] = ()  # empty: any port


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = LabelSelector()
    policy_types: frozenset[str] = frozenset({"Ingress"})
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    created: str = ""

    def selects(self, workload: Workload, direction: Direction) -> bool:
        return (
            direction in self.policy_types
            and workload.namespace == self.namespace
            and self.pod_selector.matches(workload.label_map)
        )

    def rules(self, direction: Direction) -> tuple[PolicyRule, ...]:
        return self.ingress if direction == "Ingress" else self.egress


# What a sidecar checks -----------------------------------------------------------------------

PortRange = tuple[int, int]  # inclusive


@dataclass(frozen=True, slots=True)
class Cidr:
    cidr: str
    except_: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Allowed:
    """One rule as a sidecar checks it: a connection matches when its peer is one of
    `principals` (the mTLS peer's SPIFFE ID), of `guarded` (that principal from that source
    IP), or in `cidrs` (source address ingress, destination address egress); `any_peer`: every
    peer; and its (destination) port is in `ports` (None: any port). `name` names the rule."""

    name: str
    any_peer: bool = False
    principals: tuple[str, ...] = ()
    guarded: tuple[tuple[str, str], ...] = ()
    cidrs: tuple[Cidr, ...] = ()
    ports: tuple[PortRange, ...] | None = None

    @property
    def empty(self) -> bool:
        return (not self.any_peer and not self.principals and not self.guarded and not self.cidrs) or (
            self.ports is not None and not self.ports
        )


@dataclass(frozen=True, slots=True)
class Note:
    """Where a policy's rule could not be expressed by identity, and what was done instead:
    `policy` (namespace/name), `field` (its path in the policy) and the message."""

    policy: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.policy} {self.field}: {self.message}"


@dataclass(frozen=True, slots=True)
class Enforcement:
    """A pod's NetworkPolicy for one direction: `isolated` when some policy selects it for
    that direction; then only `allowed` passes. `policies` names the selecting policies;
    `notes` says where identity could not express a rule (and what was done instead)."""

    isolated: bool = False
    policies: tuple[str, ...] = ()
    allowed: tuple[Allowed, ...] = ()
    notes: tuple[Note, ...] = ()


Backing = tuple[Service, tuple[tuple[int, int], ...], tuple[Workload, ...]]


@dataclass(frozen=True, slots=True)
class PodView:
    """The pods and namespaces a resolution reads."""

    workloads: Iterable[Workload]
    namespaces: Mapping[str, Namespace]
    trust_domain: str = "cluster.local"
    # For egress by ClusterIP: the services some of these pods back, each with its
    # ((service port, target port), ...) and its endpoints' pods.
    backing: Callable[[Iterable[tuple[str, str]]], list[Backing]] = lambda pods: []
    # The pods of one namespace (a peer without a namespaceSelector looks only there); None:
    # filter `workloads`.
    in_namespace: Callable[[str], Iterable[Workload]] | None = None

    def candidates(self, peer: Peer, policy_namespace: str) -> Iterable[Workload]:
        """The pods a pod peer can match."""
        if peer.namespace_selector is None:
            if self.in_namespace is not None:
                return self.in_namespace(policy_namespace)
            return [w for w in self.workloads if w.namespace == policy_namespace]
        return self.workloads

    def namespace_labels(self, name: str) -> dict[str, str]:
        found = self.namespaces.get(name)
        labels = found.label_map if found is not None else {}
        labels.setdefault(NAMESPACE_NAME_LABEL, name)
        return labels


def _sorted_policies(policies: Iterable[NetworkPolicy]) -> list[NetworkPolicy]:
    return sorted(policies, key=lambda p: (p.namespace, p.name))


def peer_matches(peer: Peer, policy_namespace: str, workload: Workload, view: PodView) -> bool:
    """Whether a pod is one of the pods a (pod) peer names."""
    if peer.ip_block is not None:
        return False
    if peer.namespace_selector is None:
        if workload.namespace != policy_namespace:
            return False
    elif not peer.namespace_selector.matches(view.namespace_labels(workload.namespace)):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(workload.label_map)


class _Matcher:
    """peer_matches over many pods: each namespace selector judged once per namespace."""

    def __init__(self, view: PodView) -> None:
        self.view = view
        self._namespaces: dict[tuple[LabelSelector, str], bool] = {}

    def __call__(self, peer: Peer, policy_namespace: str, workload: Workload) -> bool:
        if peer.ip_block is not None:
            return False
        selector = peer.namespace_selector
        if selector is None:
            if workload.namespace != policy_namespace:
                return False
        else:
            key = (selector, workload.namespace)
            found = self._namespaces.get(key)
            if found is None:
                found = self._namespaces[key] = selector.matches(self.view.namespace_labels(workload.namespace))
            if not found:
                return False
        return peer.pod_selector is None or peer.pod_selector.matches(workload.label_map)


def _port_ranges(ports: tuple[PolicyPort, ...], named: Mapping[str, int]) -> tuple[PortRange, ...] | None:
    """The TCP port ranges of a rule on a pod whose container ports are `named` (None: all)."""
    if not ports:
        return None
    out: set[PortRange] = set()
    for port in ports:
        if port.protocol != "TCP":
            continue  # sidecars carry TCP only: a UDP/SCTP entry allows no TCP
        if port.port is None:
            return None
        if isinstance(port.port, str):
            number = named.get(port.port)
            if number is not None:
                out.add((number, number))
            continue
        out.add((port.port, port.end_port or port.port))
    return tuple(sorted(out))


def _named_ports(workload: Workload) -> dict[str, int]:
    return {name: number for name, number in workload.container_ports if name}


def _cidr(block: IpBlock) -> Cidr:
    return Cidr(block.cidr, block.except_)


def _host(ip: str) -> str:
    return f"{ip}/{128 if ':' in ip else 32}"


def _address(ip: str) -> bool:
    """A usable address (sources check them; model values built by hand may not be)."""
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return False
    return True


def resolve_ingress(workload: Workload, policies: Iterable[NetworkPolicy], view: PodView) -> Enforcement:
    """What the sidecar of `workload` lets in (see the module's docstring)."""
    selecting = [p for p in _sorted_policies(policies) if p.selects(workload, "Ingress")]
    if not selecting:
        return Enforcement()
    matches = _Matcher(view)
    sizes: dict[str, Counter[str]] = {}  # namespace -> service account -> sidecar pods

    def account_size(namespace: str, account: str) -> int:
        """The sidecar pods of a service account (identity is per account)."""
        if namespace not in sizes:
            sizes[namespace] = Counter(p.service_account for p in view.candidates(Peer(), namespace)
                                       if p.mtls_capable)
        return sizes[namespace][account]

    named = _named_ports(workload)
    allowed: list[Allowed] = []
    notes: list[Note] = []
    for policy in selecting:
        key = f"{policy.namespace}/{policy.name}"
        for index, rule in enumerate(policy.ingress):
            name = f"{key} ingress[{index}]"
            ports = _port_ranges(rule.ports, named)
            if not rule.peers:
                allowed.append(Allowed(name, any_peer=True, ports=ports))
                continue
            principals: set[str] = set()
            guarded: set[tuple[str, str]] = set()
            cidrs: list[Cidr] = []
            for peer_index, peer in enumerate(rule.peers):
                where = f"spec.ingress[{index}].from[{peer_index}]"
                if peer.ip_block is not None:
                    cidrs.append(_cidr(peer.ip_block))
                    continue
                matched = [w for w in view.candidates(peer, policy.namespace) if matches(peer, policy.namespace, w)]
                by_account: dict[tuple[str, str], list[Workload]] = {}
                for pod in matched:
                    if not pod.mtls_capable:
                        if _address(pod.ip):
                            cidrs.append(Cidr(_host(pod.ip)))
                            notes.append(Note(key, where, f"pod {pod.namespace}/{pod.name} has no sidecar "
                                              f"(no identity): matched by its source IP {pod.ip}"))
                        continue
                    by_account.setdefault((pod.namespace, pod.service_account), []).append(pod)
                for (namespace, account), members in sorted(by_account.items()):
                    spiffe = f"spiffe://{view.trust_domain}/ns/{namespace}/sa/{account}"
                    if len(members) == account_size(namespace, account):
                        principals.add(spiffe)
                        continue
                    ips = sorted(m.ip for m in members if _address(m.ip))
                    guarded.update((spiffe, _host(ip)) for ip in ips)
                    notes.append(Note(
                        key, where,
                        f"selects {len(members)} of the {account_size(namespace, account)} pods of "
                        f"service account {namespace}/{account}; identity cannot tell them apart: "
                        f"matched by principal and source IP ({', '.join(ips) or 'none'})",
                    ))
            allowed.append(Allowed(name, principals=tuple(sorted(principals)), guarded=tuple(sorted(guarded)),
                                   cidrs=tuple(cidrs), ports=ports))
    return Enforcement(True, tuple(f"{p.namespace}/{p.name}" for p in selecting), tuple(allowed), tuple(notes))


def resolve_egress(workload: Workload, policies: Iterable[NetworkPolicy], view: PodView) -> Enforcement:
    """Where the sidecar of `workload` lets its app connect (see the module's docstring)."""
    selecting = [p for p in _sorted_policies(policies) if p.selects(workload, "Egress")]
    if not selecting:
        return Enforcement()
    matches = _Matcher(view)
    allowed: list[Allowed] = []
    notes: list[Note] = []
    for policy in selecting:
        key = f"{policy.namespace}/{policy.name}"
        for index, rule in enumerate(policy.egress):
            name = f"{key} egress[{index}]"
            if not rule.peers:
                allowed.append(Allowed(name, any_peer=True, ports=_port_ranges(rule.ports, {})))
                if any(isinstance(p.port, str) for p in rule.ports):
                    notes.append(Note(key, f"spec.egress[{index}].ports",
                                      "a named port with no peers (any destination) allows nothing: "
                                      "the destination's container ports are unknown"))
                continue
            blocks = [p.ip_block for p in rule.peers if p.ip_block is not None]
            for block in blocks:
                ports = _port_ranges(rule.ports, {})
                allowed.append(Allowed(name, cidrs=(_cidr(block),), ports=ports))
            pod_peers = [p for p in rule.peers if p.ip_block is None]
            if not pod_peers:
                continue
            matched = {(w.namespace, w.name): w for p in pod_peers for w in view.candidates(p, policy.namespace)
                       if matches(p, policy.namespace, w) and _address(w.ip)}
            # Pod IPs, grouped by their ports (named ports resolve per destination pod).
            by_ports: dict[tuple[PortRange, ...] | None, list[str]] = {}
            for pod in sorted(matched.values(), key=lambda w: w.ip):
                by_ports.setdefault(_port_ranges(rule.ports, _named_ports(pod)), []).append(_host(pod.ip))
            for ports, ips in sorted(by_ports.items(), key=lambda item: str(item[0])):
                allowed.append(Allowed(name, cidrs=tuple(Cidr(ip) for ip in ips), ports=ports))
            # ClusterIPs: a Service whose endpoints are all allowed, per service port whose
            # target port is allowed on every one of them (Kubernetes judges after DNAT).
            for service, port_map, backends in view.backing(matched.keys()):
                if not service.cluster_ip or not _address(service.cluster_ip) or not backends:
                    continue
                keys = {(b.namespace, b.name) for b in backends}
                inside = keys & matched.keys()
                if not inside:
                    continue
                if inside != keys:
                    notes.append(Note(key, f"spec.egress[{index}].to",
                                      f"only some endpoints of service {service.namespace}/{service.name} "
                                      f"are allowed: its ClusterIP is not (the allowed pods stay "
                                      f"reachable by pod IP)"))
                    continue
                open_ports = []
                for service_port, target in port_map:
                    if all(_port_allows(_port_ranges(rule.ports, _named_ports(b)), target) for b in backends):
                        open_ports.append((service_port, service_port))
                if open_ports:
                    allowed.append(Allowed(name, cidrs=(Cidr(_host(service.cluster_ip)),),
                                           ports=tuple(sorted(open_ports))))
    return Enforcement(True, tuple(f"{p.namespace}/{p.name}" for p in selecting), tuple(allowed), tuple(notes))


def _port_allows(ranges: tuple[PortRange, ...] | None, port: int) -> bool:
    return ranges is None or any(lo <= port <= hi for lo, hi in ranges)


def selected_by(workload: Workload, policies: Iterable[NetworkPolicy]) -> dict[str, list[str]]:
    """{policy: directions it selects the pod for}."""
    out: dict[str, list[str]] = {}
    for policy in _sorted_policies(policies):
        directions: list[str] = [d for d in ("Ingress", "Egress") if policy.selects(workload, d)]
        if directions:
            out[f"{policy.namespace}/{policy.name}"] = directions
    return out


# What operators see (the admin API, `xds-server validate`) ------------------------------------


def view_of(
    workloads: Iterable[Workload],
    namespaces: Mapping[str, Namespace],
    services: Iterable[Service],
    slices: Iterable[EndpointSlice],
    trust_domain: str = "cluster.local",
) -> PodView:
    """A PodView over plain collections (the translator keeps an index instead)."""
    pods = {(w.namespace, w.name): w for w in workloads}
    by_service: dict[tuple[str, str], list[EndpointSlice]] = {}
    for endpoint_slice in slices:
        by_service.setdefault((endpoint_slice.namespace, endpoint_slice.service), []).append(endpoint_slice)
    known = {(s.namespace, s.name): s for s in services}

    def backing(wanted: Iterable[tuple[str, str]]) -> list[Backing]:
        wanted = set(wanted)
        out: list[Backing] = []
        for key in sorted(known):
            members = by_service.get(key, [])
            backends = sorted({(m.namespace, e.pod) for m in members for e in m.endpoints
                               if e.pod and (m.namespace, e.pod) in pods})
            if not wanted & set(backends):
                continue
            ports = {(p.port, t) for p in known[key].ports for m in members
                     if (t := slice_port(p, m)) is not None}
            out.append((known[key], tuple(sorted(ports)), tuple(pods[b] for b in backends)))
        return out

    return PodView(list(pods.values()), namespaces, trust_domain, backing)


def enforced_by_sidecar(workload: Workload) -> str | None:
    """Why the pod's NetworkPolicy is not enforced, or None when its sidecar enforces it."""
    if workload.proxyless:
        return "a proxyless gRPC workload has no sidecar to enforce NetworkPolicy"
    if not workload.meshed:
        return "the pod has no sidecar: nothing enforces NetworkPolicy for it"
    if not workload.capture:
        return "an explicit-mode sidecar does not enforce NetworkPolicy (capture mode does)"
    return None


def _allowed_json(allowed: Allowed) -> dict[str, object]:
    peers: list[str] = ["any peer"] if allowed.any_peer else []
    peers += [f"principal {p}" for p in allowed.principals]
    peers += [f"principal {p} from {ip}" for p, ip in allowed.guarded]
    peers += [f"address {c.cidr}" + (f" except {','.join(c.except_)}" if c.except_ else "") for c in allowed.cidrs]
    ports = "all" if allowed.ports is None else [
        str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in allowed.ports
    ]
    return {"rule": allowed.name, "peers": peers, "tcp_ports": ports}


def describe(workload: Workload, policies: Iterable[NetworkPolicy], view: PodView) -> dict[str, object]:
    """Which NetworkPolicies select a pod, and what they allow, per direction."""
    policies = list(policies)
    out: dict[str, object] = {
        "pod": f"{workload.namespace}/{workload.name}",
        "selected_by": selected_by(workload, policies),
        "enforced": enforced_by_sidecar(workload) is None,
    }
    why = enforced_by_sidecar(workload)
    if why is not None:
        out["not_enforced_because"] = why
    for direction, enforcement in (("ingress", resolve_ingress(workload, policies, view)),
                                   ("egress", resolve_egress(workload, policies, view))):
        out[direction] = {
            "isolated": enforcement.isolated,
            "policies": list(enforcement.policies),
            "allows": [_allowed_json(a) for a in enforcement.allowed if not a.empty]
            if enforcement.isolated else "everything (no policy selects the pod for this direction)",
            "notes": sorted({str(n) for n in enforcement.notes}),
        }
    return out


__all__ = [
    "Allowed", "Cidr", "Enforcement", "IpBlock", "LabelSelector", "NetworkPolicy", "Note", "Peer",
    "PodView", "PolicyPort", "PolicyRule", "Requirement", "describe", "enforced_by_sidecar",
    "peer_matches", "resolve_egress", "resolve_ingress", "selected_by", "view_of",
]
