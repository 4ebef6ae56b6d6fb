"""The NetworkPolicies the controller knows, and which model changes can change what they
mean for a pod (model/netpol.py resolves them).

Dependency keys (translate/index.py):

  ("netpol", namespace)   the NetworkPolicies of a namespace (they select only its pods)
  ("netpol-peers",)       what the policies' peers resolve to: the pods they match (labels,
                          IPs, service accounts, sidecars), namespace labels, and the services
                          those pods back (egress by ClusterIP)

Only the builds of pods some policy isolates read ("netpol-peers",), and a change emits it
only when it can matter: a pod that a peer selector matches (before or after), or that
shares a service account with such a pod (the principal-or-IP decision counts them); a
Namespace's labels; with egress pod peers, a slice listing such pods or any Service. A mesh
without NetworkPolicies pays nothing. Resolutions are kept until one of those changes, shared
by the pods the same policies select.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping

from ..model.mesh import EndpointSlice, Namespace, Service, ServiceKey, Workload
from ..model.netpol import (
    Backing, Enforcement, NetworkPolicy, Peer, PodView, peer_matches, resolve_egress, resolve_ingress,
)
from ..model.store import ObjectChange
from .endpoints import slice_port

PEERS: tuple[Hashable, ...] = ("netpol-peers",)
PodKey = tuple[str, str]


class NetworkPolicyIndex:
    def __init__(self) -> None:
        self.by_namespace: dict[str, dict[str, NetworkPolicy]] = defaultdict(dict)
        self._peers: list[tuple[str, Peer]] | None = None  # (policy namespace, pod peer)
        self._egress_peers = False
        # (namespace, service account) -> pods a peer matches; None: to be counted again
        self._accounts: Counter[tuple[str, str]] | None = None
        # Resolutions shared by the pods selected by the same policies (see `enforcement`);
        # emptied whenever what peers resolve to may have changed.
        self._resolved: dict[Hashable, tuple[Enforcement, Enforcement]] = {}

    def __bool__(self) -> bool:
        return bool(self.by_namespace)

    def policies(self, namespace: str) -> list[NetworkPolicy]:
        return list(self.by_namespace.get(namespace, {}).values())

    def all(self) -> list[NetworkPolicy]:
        return [p for by_name in self.by_namespace.values() for p in by_name.values()]

    def apply(self, change: ObjectChange) -> set[tuple[Hashable, ...]]:
        deps: set[tuple[Hashable, ...]] = {PEERS}
        for obj in (change.old, change.new):
            if obj is not None:
                deps.add(("netpol", obj.namespace))
        if change.old is not None:
            self.by_namespace[change.old.namespace].pop(change.old.name, None)
            if not self.by_namespace[change.old.namespace]:
                del self.by_namespace[change.old.namespace]
        if change.new is not None:
            self.by_namespace[change.new.namespace][change.new.name] = change.new
        self._peers, self._accounts = None, None
        self._resolved.clear()
        return deps

    # Which changes matter -------------------------------------------------------------------

    def _peer_list(self) -> list[tuple[str, Peer]]:
        if self._peers is None:
            self._peers = [
                (policy.namespace, peer)
                for policy in self.all()
                for rules in (policy.ingress, policy.egress)
                for rule in rules
                for peer in rule.peers
                if peer.ip_block is None
            ]
            self._egress_peers = any(
                p.ip_block is None for policy in self.all() for rule in policy.egress for p in rule.peers
            )
        return self._peers

    def matched(self, workload: Workload, namespaces: Mapping[str, Namespace]) -> bool:
        view = PodView((), namespaces)
        return any(peer_matches(peer, namespace, workload, view) for namespace, peer in self._peer_list())

    def _changed(self) -> bool:
        self._resolved.clear()
        return True

    def pod_changed(
        self, change: ObjectChange, workloads: Iterable[Workload], namespaces: Mapping[str, Namespace],
        beside_a_peer: Callable[[Workload], bool],
    ) -> bool:
        """Whether a Pod change (already applied to `workloads`) can change a resolution: the
        pod is matched by a peer (before or after), or shares a service account with a
        matched pod (the principal-or-address choice counts them), or (egress) backs a
        service beside a matched pod (`beside_a_peer`: whether its ClusterIP is allowed
        depends on every backend). O(peers) per change, plus the pod's services for egress."""
        if not self:
            return False
        if self._accounts is None:  # counted from the state after this change: say changed
            self._accounts = Counter(
                (w.namespace, w.service_account) for w in workloads if self.matched(w, namespaces)
            )
            return self._changed()
        old: Workload | None = change.old
        new: Workload | None = change.new
        old_matched = old is not None and self.matched(old, namespaces)
        new_matched = new is not None and self.matched(new, namespaces)
        accounts = self._accounts
        emit = old_matched or new_matched or any(
            accounts.get((w.namespace, w.service_account), 0) > 0 for w in (old, new) if w is not None
        ) or (self._egress_peers and any(beside_a_peer(w) for w in (old, new) if w is not None))
        if old_matched:
            assert old is not None
            key = (old.namespace, old.service_account)
            accounts[key] -= 1
            if accounts[key] <= 0:
                del accounts[key]
        if new_matched:
            assert new is not None
            accounts[(new.namespace, new.service_account)] += 1
        return self._changed() if emit else False

    def namespace_changed(self) -> bool:
        if not self:
            return False
        self._accounts = None
        return self._changed()

    def slice_changed(self, change: ObjectChange, workloads: Mapping[PodKey, Workload],
                      namespaces: Mapping[str, Namespace]) -> bool:
        if not self:
            return False
        self._peer_list()
        if not self._egress_peers:
            return False
        for obj in (change.old, change.new):
            if obj is None:
                continue
            for endpoint in obj.endpoints:
                pod = workloads.get((obj.namespace, endpoint.pod)) if endpoint.pod else None
                if pod is not None and self.matched(pod, namespaces):
                    return self._changed()
        return False

    def service_changed(self) -> bool:
        if not self:
            return False
        self._peer_list()
        return self._changed() if self._egress_peers else False

    # Resolution -----------------------------------------------------------------------------

    def view(
        self,
        workloads: Mapping[PodKey, Workload],
        namespaces: Mapping[str, Namespace],
        trust_domain: str,
        services: Mapping[ServiceKey, Service],
        slices: Mapping[ServiceKey, Mapping[str, EndpointSlice]],
        services_by_pod: Mapping[PodKey, set[ServiceKey]],
        workloads_in: Mapping[str, Mapping[str, Workload]],
    ) -> PodView:
        def backing(pods: Iterable[PodKey]) -> list[Backing]:
            keys: set[ServiceKey] = set()
            for pod in pods:
                keys |= services_by_pod.get(pod, set())
            out: list[Backing] = []
            for key in sorted(keys):
                service = services.get(key)
                if service is None:
                    continue
                members = list(slices.get(key, {}).values())
                backends = {
                    (s.namespace, e.pod): workloads[(s.namespace, e.pod)]
                    for s in members for e in s.endpoints
                    if e.pod and (s.namespace, e.pod) in workloads
                }
                ports: set[tuple[int, int]] = set()
                for port in service.ports:
                    for endpoint_slice in members:
                        target = slice_port(port, endpoint_slice)
                        if target is not None:
                            ports.add((port.port, target))
                out.append((service, tuple(sorted(ports)), tuple(backends[k] for k in sorted(backends))))
            return out

        def in_namespace(namespace: str) -> Iterable[Workload]:
            return workloads_in.get(namespace, {}).values()

        return PodView(workloads.values(), namespaces, trust_domain, backing, in_namespace)

    def enforcement(self, workload: Workload, view_of: Callable[[], PodView]) -> tuple[Enforcement, Enforcement]:
        """(ingress, egress) of a pod. A resolution depends on the pod only through which
        policies select it and (ingress) its named container ports, so pods alike share one."""
        policies = self.policies(workload.namespace)
        if not policies:
            return Enforcement(), Enforcement()
        ingress = tuple(sorted(p.name for p in policies if p.selects(workload, "Ingress")))
        egress = tuple(sorted(p.name for p in policies if p.selects(workload, "Egress")))
        if not ingress and not egress:
            return Enforcement(), Enforcement()
        key = (workload.namespace, ingress, egress, workload.container_ports)
        found = self._resolved.get(key)
        if found is None:
            if len(self._resolved) >= 4096:  # bounded: one entry per distinct selection
                self._resolved.clear()
            view = view_of()
            found = self._resolved[key] = (
                resolve_ingress(workload, policies, view), resolve_egress(workload, policies, view)
            )
        return found
