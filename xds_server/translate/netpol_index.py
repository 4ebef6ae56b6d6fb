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
Namespace's labels; a slice or Service backed by such pods. A mesh without NetworkPolicies
pays nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping

from ..model.mesh import EndpointSlice, Namespace, Service, ServiceKey, Workload
from ..model.netpol import Backing, Enforcement, NetworkPolicy, PodView, peer_matches, resolve_egress, resolve_ingress
from ..model.store import ObjectChange
from .endpoints import slice_port

PEERS: tuple[Hashable, ...] = ("netpol-peers",)
PodKey = tuple[str, str]


class NetworkPolicyIndex:
    def __init__(self) -> None:
        self.by_namespace: dict[str, dict[str, NetworkPolicy]] = defaultdict(dict)
        self._accounts: set[tuple[str, str]] | None = None  # (ns, sa) of pods peers match

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
        self._accounts = None
        return deps

    # Which changes matter -------------------------------------------------------------------

    def _matched_by_a_peer(self, workload: Workload, namespaces: Mapping[str, Namespace]) -> bool:
        view = PodView((), namespaces)
        return any(
            peer_matches(peer, policy.namespace, workload, view)
            for policy in self.all()
            for rules in (policy.ingress, policy.egress)
            for rule in rules
            for peer in rule.peers
        )

    def _peer_accounts(self, workloads: Iterable[Workload], namespaces: Mapping[str, Namespace]) -> set[tuple[str, str]]:
        if self._accounts is None:
            self._accounts = {
                (w.namespace, w.service_account) for w in workloads if self._matched_by_a_peer(w, namespaces)
            }
        return self._accounts

    def pod_changed(
        self, change: ObjectChange, workloads: Iterable[Workload], namespaces: Mapping[str, Namespace]
    ) -> bool:
        """Whether a Pod change (already applied to `workloads`) can change a resolution."""
        if not self:
            return False
        accounts = self._peer_accounts(workloads, namespaces)  # before this change's own effect
        for pod in (change.old, change.new):
            if pod is None:
                continue
            if (pod.namespace, pod.service_account) in accounts or self._matched_by_a_peer(pod, namespaces):
                self._accounts = None
                return True
        return False

    def namespace_changed(self) -> bool:
        if not self:
            return False
        self._accounts = None
        return True

    def slice_changed(self, change: ObjectChange, workloads: Mapping[PodKey, Workload],
                      namespaces: Mapping[str, Namespace]) -> bool:
        if not any(rule.peers for p in self.all() for rule in p.egress):
            return False
        for obj in (change.old, change.new):
            if obj is None:
                continue
            for endpoint in obj.endpoints:
                pod = workloads.get((obj.namespace, endpoint.pod)) if endpoint.pod else None
                if pod is not None and self._matched_by_a_peer(pod, namespaces):
                    return True
        return False

    def service_changed(self) -> bool:
        return any(rule.peers for p in self.all() for rule in p.egress)

    # Resolution -----------------------------------------------------------------------------

    def view(
        self,
        workloads: Mapping[PodKey, Workload],
        namespaces: Mapping[str, Namespace],
        trust_domain: str,
        services: Mapping[ServiceKey, Service],
        slices: Mapping[ServiceKey, Mapping[str, EndpointSlice]],
        services_by_pod: Mapping[PodKey, set[ServiceKey]],
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

        return PodView(workloads.values(), namespaces, trust_domain, backing)

    def enforcement(self, workload: Workload, view_of: Callable[[], PodView]) -> tuple[Enforcement, Enforcement]:
        """(ingress, egress) of a pod."""
        policies = self.policies(workload.namespace)
        if not policies:
            return Enforcement(), Enforcement()
        view = view_of()
        return resolve_ingress(workload, policies, view), resolve_egress(workload, policies, view)
