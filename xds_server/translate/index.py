"""The model index: the lookups translation needs over the mesh store, kept current.

`ModelIndex.apply(change)` updates the lookups from one `ObjectChange` and returns the
dependency keys (`Dep`) whose answers may have changed. It knows nothing of Envoy or of the
builders: builders read through a `Reader` (translate/reads.py), which records the keys of
the lookups they use, and the dependency tracker matches both (translate/dependencies.py).

Dependency keys are plain tuples, `(lookup, argument...)`:

  ("service", ServiceKey)            the Service object
  ("slices", ServiceKey)             the EndpointSlices of a service
  ("pod-slices", namespace, pod)     which services and slice ports a pod backs (membership
                                     and ports only: a readiness flip does not change it)
  ("workload", namespace, pod)       a Pod by name;  ("workload-ip", ip) a Pod by IP
  ("routes-of", ServiceKey)          routes whose parentRefs name the service
  ("policy", ServiceKey)             the TrafficPolicy that applies to the service
  ("ip-owners", ip)                  services claiming a cluster IP
  ("namespace", name)                a Namespace (its tenant label)
  ("mtls", namespace), ("authz", namespace)
                                     the security policies of a namespace (the root
                                     namespace's apply everywhere: readers record both)
  ("netpol", namespace), ("netpol-peers",)
                                     NetworkPolicies (see netpol_index.py)
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Hashable, Iterable

from ..model.mesh import EndpointSlice, Namespace, Service, ServiceKey, Workload
from ..model.netpol import PodView
from ..model.policy import TrafficPolicy, TrafficPolicySpec
from ..model.routes import Route
from ..model.security import SecuritySettings
from ..model.store import (
    AUTHORIZATION_POLICY,
    ENDPOINT_SLICE,
    GRPC_ROUTE,
    HTTP_ROUTE,
    MTLS_POLICY,
    NAMESPACE,
    NETWORK_POLICY,
    POD,
    SERVICE,
    TRAFFIC_POLICY,
    ObjectChange,
)
from .netpol_index import PEERS, NetworkPolicyIndex
from .security import SecurityIndex

log = logging.getLogger(__name__)

Dep = tuple[Hashable, ...]
PodKey = tuple[str, str]  # (namespace, pod)
RouteKey = tuple[str, str, str]


class ModelIndex:
    def __init__(self, security: SecuritySettings | None = None) -> None:
        self.security = SecurityIndex(security)
        self.netpols = NetworkPolicyIndex()
        self.services: dict[ServiceKey, Service] = {}
        self.slices: dict[ServiceKey, dict[str, EndpointSlice]] = defaultdict(dict)
        self.workloads: dict[PodKey, Workload] = {}
        self.workload_by_ip: dict[str, Workload] = {}
        self.workloads_in: dict[str, dict[str, Workload]] = {}  # namespace -> pod name -> Pod
        self.routes: dict[RouteKey, Route] = {}
        self.routes_by_parent: dict[ServiceKey, set[RouteKey]] = defaultdict(set)
        self.policies_by_target: dict[ServiceKey, dict[tuple[str, str], TrafficPolicy]] = defaultdict(dict)
        self.policy_by_target: dict[ServiceKey, TrafficPolicy] = {}
        self.namespaces: dict[str, Namespace] = {}
        self.services_by_pod: dict[PodKey, set[ServiceKey]] = defaultdict(set)
        self.ip_owners: dict[str, set[ServiceKey]] = {}  # cluster IP -> services claiming it

    # Lookups ---------------------------------------------------------------------------------

    def workload(self, namespace: str, pod: str, ip: str) -> Workload | None:
        """The Pod behind an endpoint: by name (targetRef), else by IP."""
        if pod:
            found = self.workloads.get((namespace, pod))
            if found is not None:
                return found
        return self.workload_by_ip.get(ip)

    def policy(self, key: ServiceKey) -> TrafficPolicySpec | None:
        policy = self.policy_by_target.get(key)
        return policy.spec if policy is not None else None

    def _beside_a_peer(self, pod: Workload) -> bool:
        """Whether a pod backs a service that another pod a NetworkPolicy peer matches backs."""
        for key in self.services_by_pod.get((pod.namespace, pod.name), ()):
            for endpoint_slice in self.slices.get(key, {}).values():
                for endpoint in endpoint_slice.endpoints:
                    if not endpoint.pod or endpoint.pod == pod.name:
                        continue
                    other = self.workloads.get((endpoint_slice.namespace, endpoint.pod))
                    if other is not None and self.netpols.matched(other, self.namespaces):
                        return True
        return False

    def netpol_view(self) -> PodView:
        """What NetworkPolicy peers resolve against (model/netpol.py)."""
        return self.netpols.view(
            self.workloads, self.namespaces, self.security.settings.trust_domain,
            self.services, self.slices, self.services_by_pod, self.workloads_in,
        )

    def routes_of(self, key: ServiceKey) -> list[Route]:
        return [self.routes[k] for k in sorted(self.routes_by_parent.get(key, ()))]

    # Changes ---------------------------------------------------------------------------------

    def apply(self, change: ObjectChange) -> set[Dep]:
        """Record one change; return the dependency keys it may have changed."""
        kind = change.kind
        if kind == SERVICE:
            deps = self._apply_service(change)
            return deps | {PEERS} if self.netpols.service_changed() else deps
        if kind == ENDPOINT_SLICE:
            deps = self._apply_slice(change)
            if self.netpols.slice_changed(change, self.workloads, self.namespaces):
                deps.add(PEERS)
            return deps
        if kind == POD:
            deps = self._apply_workload(change)
            if self.netpols.pod_changed(change, self.workloads.values(), self.namespaces, self._beside_a_peer):
                deps.add(PEERS)
            return deps
        if kind == NETWORK_POLICY:
            return self.netpols.apply(change)
        if kind in (HTTP_ROUTE, GRPC_ROUTE):
            return self._apply_route(change)
        if kind == TRAFFIC_POLICY:
            return self._apply_policy(change)
        if kind in (MTLS_POLICY, AUTHORIZATION_POLICY):
            lookup = "mtls" if kind == MTLS_POLICY else "authz"
            namespaces = self.security.apply(change)
            if namespaces is None:  # the root namespace's policies apply everywhere
                namespaces = {self.security.settings.root_namespace}
            return {(lookup, ns) for ns in namespaces}
        if kind == NAMESPACE:
            if change.new is None:
                self.namespaces.pop(change.key[2], None)
            else:
                self.namespaces[change.new.name] = change.new
            if self.netpols.namespace_changed():
                return {("namespace", change.key[2]), PEERS}
            return {("namespace", change.key[2])}
        return set()

    def _apply_service(self, change: ObjectChange) -> set[Dep]:
        deps: set[Dep] = set()
        old, new = change.old, change.new
        for obj in (old, new):
            if obj is not None:
                deps.add(("service", obj.key))
                if obj.cluster_ip:
                    deps.add(("ip-owners", obj.cluster_ip))
        if old is not None and old.cluster_ip:
            owners = self.ip_owners.get(old.cluster_ip)
            if owners is not None:
                owners.discard(old.key)
                if not owners:
                    del self.ip_owners[old.cluster_ip]
        if new is None:
            self.services.pop(old.key, None)
        else:
            self.services[new.key] = new
            if new.cluster_ip and new.cluster_ip.lower() != "none":
                owners = self.ip_owners.setdefault(new.cluster_ip, set())
                owners.add(new.key)
                if len(owners) > 1:
                    log.warning(
                        "services share a cluster IP; only the first keeps it as a route domain",
                        extra={"cluster_ip": new.cluster_ip, "services": sorted(str(k) for k in owners)},
                    )
        return deps

    def _apply_slice(self, change: ObjectChange) -> set[Dep]:
        old, new = change.old, change.new
        deps: set[Dep] = {("pod-slices", ns, pod) for ns, pod in _members_changed(old, new)}
        if old is not None:
            key = old.service_key  # a property making a new key: once per slice
            deps.add(("slices", key))
            self.slices[key].pop(old.name, None)
            for endpoint in old.endpoints:
                if endpoint.pod:
                    self.services_by_pod[(old.namespace, endpoint.pod)].discard(key)
        if new is not None:
            key = new.service_key
            deps.add(("slices", key))
            self.slices[key][new.name] = new
            for endpoint in new.endpoints:
                if endpoint.pod:
                    self.services_by_pod[(new.namespace, endpoint.pod)].add(key)
        return deps

    def _apply_workload(self, change: ObjectChange) -> set[Dep]:
        deps: set[Dep] = set()
        old: Workload | None = change.old
        new: Workload | None = change.new
        if old is not None:
            deps |= {("workload", old.namespace, old.name), ("workload-ip", old.ip)}
            self.workloads.pop((old.namespace, old.name), None)
            in_namespace = self.workloads_in.get(old.namespace)
            if in_namespace is not None:
                in_namespace.pop(old.name, None)
                if not in_namespace:
                    del self.workloads_in[old.namespace]
            if self.workload_by_ip.get(old.ip) is old:
                del self.workload_by_ip[old.ip]
        if new is not None:
            deps |= {("workload", new.namespace, new.name), ("workload-ip", new.ip)}
            self.workloads[(new.namespace, new.name)] = new
            self.workloads_in.setdefault(new.namespace, {})[new.name] = new
            if new.ip:
                self.workload_by_ip[new.ip] = new
        return deps

    def _apply_route(self, change: ObjectChange) -> set[Dep]:
        deps: set[Dep] = set()
        old, new = change.old, change.new
        if old is not None:
            self.routes.pop(old.key, None)
            for parent in old.parents:
                deps.add(("routes-of", parent.service))
                self.routes_by_parent[parent.service].discard(old.key)
        if new is not None:
            self.routes[new.key] = new
            for parent in new.parents:
                deps.add(("routes-of", parent.service))
                self.routes_by_parent[parent.service].add(new.key)
        return deps

    def _apply_policy(self, change: ObjectChange) -> set[Dep]:
        old, new = change.old, change.new
        if old is not None:
            self.policies_by_target[_target(old)].pop((old.namespace, old.name), None)
        if new is not None:
            self.policies_by_target[_target(new)][(new.namespace, new.name)] = new
        # Several policies may target one service: the oldest wins (Gateway API convention).
        targets = {_target(p) for p in (old, new) if p is not None}
        for target in targets:
            by_name = self.policies_by_target.get(target, {})
            candidates = sorted(by_name.values(), key=lambda p: (p.created or "~", p.name))
            if not by_name:
                self.policies_by_target.pop(target, None)
            if candidates:
                self.policy_by_target[target] = candidates[0]
            else:
                self.policy_by_target.pop(target, None)
        return {("policy", t) for t in targets}


def _target(policy: TrafficPolicy) -> ServiceKey:
    return ServiceKey(policy.namespace, policy.spec.target_ref.name)


def _members_changed(old: EndpointSlice | None, new: EndpointSlice | None) -> set[PodKey]:
    """The pods whose backed services or app ports a slice change may change: those that
    joined or left it, or all of its pods when its ports or its service changed. An endpoint
    change (readiness, zone) of a pod that stays changes none."""

    def pods(s: EndpointSlice | None) -> set[PodKey]:
        return {(s.namespace, e.pod) for e in s.endpoints if e.pod} if s is not None else set()

    if old is None or new is None or old.ports != new.ports or old.service != new.service:
        return pods(old) | pods(new)
    return pods(old) ^ pods(new)


def all_deps(changes: Iterable[ObjectChange], index: ModelIndex) -> set[Dep]:
    """Apply several changes; the union of what they changed."""
    out: set[Dep] = set()
    for change in changes:
        out |= index.apply(change)
    return out
