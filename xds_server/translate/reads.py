"""A tracking reader of the model index: builders read the model only through it, and it
records the dependency key (translate/index.py) of every lookup they make. Those records are
what the dependency tracker (translate/dependencies.py) uses to find, for a change, exactly
the outputs that read what changed: no builder declares its dependencies by hand.

Builders may also read what other builders produced (a service's virtual hosts, its cluster
names, a scope's services): `derived(key)` records those reads the same way.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import TypeVar, overload

from ..model.mesh import AppProtocol, EndpointSlice, Namespace, Service, ServiceKey, Workload
from ..model.netpol import Enforcement
from ..model.policy import TrafficPolicySpec
from ..model.routes import Route
from ..model.security import MtlsMode
from .index import Dep, ModelIndex
from .netpol_index import PEERS
from .rbac import PortAuthz
from .security import InboundSecurity


_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")
_T = TypeVar("_T")


class _RecordingMapping(Mapping[_K, _V]):
    """A read-only mapping that records a `(lookup, key)` read for every key asked for."""

    def __init__(self, data: Mapping[_K, _V], lookup: str, reads: set[Dep]) -> None:
        self._data = data
        self._lookup = lookup
        self._reads = reads

    def __getitem__(self, key: _K) -> _V:
        self._reads.add((self._lookup, key))
        return self._data[key]

    @overload
    def get(self, key: _K) -> _V | None: ...
    @overload
    def get(self, key: _K, default: _V | _T) -> _V | _T: ...
    def get(self, key: _K, default: _V | _T | None = None) -> _V | _T | None:
        self._reads.add((self._lookup, key))
        return self._data.get(key, default)

    def __contains__(self, key: object) -> bool:
        self._reads.add((self._lookup, key))
        return key in self._data

    def __iter__(self) -> Iterator[_K]:  # iterating would read everything: not allowed
        raise TypeError("iterate the index through a lookup that records what it reads")

    def __len__(self) -> int:
        return len(self._data)


class Reader:
    """One build's window on the index. `reads` collects the keys of every lookup made."""

    __slots__ = ("each", "index", "reads")

    def __init__(self, index: ModelIndex, reads: set[Dep] | None = None) -> None:
        self.index = index
        self.reads: set[Dep] = reads if reads is not None else set()
        self.each: set[str] = set()

    def read_each(self, lookup: str) -> None:
        """Record a read of every key of `lookup` (each one a part of the output: see
        DependencyTracker.read_each). For outputs over the whole mesh, such as a scope."""
        self.each.add(lookup)

    def derived(self, *key: Hashable) -> None:
        """Record a read of another builder's output (see the builders' `emits`)."""
        self.reads.add(key)

    # The model --------------------------------------------------------------------------------

    def service(self, key: ServiceKey) -> Service | None:
        self.reads.add(("service", key))
        return self.index.services.get(key)

    def services(self) -> Mapping[ServiceKey, Service]:
        """Services by key, for builders that resolve references (route backends)."""
        return _RecordingMapping(self.index.services, "service", self.reads)

    def slices(self, key: ServiceKey) -> list[EndpointSlice]:
        self.reads.add(("slices", key))
        return list(self.index.slices.get(key, {}).values())

    def workload(self, namespace: str, pod: str, ip: str) -> Workload | None:
        """The Pod behind an endpoint: by name, else by IP (only then is the IP read)."""
        if pod:
            self.reads.add(("workload", namespace, pod))
            found = self.index.workloads.get((namespace, pod))
            if found is not None:
                return found
        self.reads.add(("workload-ip", ip))
        return self.index.workload_by_ip.get(ip)

    def pod(self, namespace: str, pod: str) -> Workload | None:
        self.reads.add(("workload", namespace, pod))
        return self.index.workloads.get((namespace, pod))

    def backed_by(self, namespace: str, pod: str) -> list[tuple[Service, list[EndpointSlice]]]:
        """The services a pod backs (sorted) with their slices that list it. Recorded as the
        pod's membership (`pod-slices`), not the slices' contents: an endpoint's readiness
        does not change which app ports the pod serves."""
        self.reads.add(("pod-slices", namespace, pod))
        out = []
        for key in sorted(self.index.services_by_pod.get((namespace, pod), ())):
            service = self.service(key)
            if service is None:
                continue
            slices = [
                s for s in self.index.slices.get(key, {}).values()
                if any(e.pod == pod for e in s.endpoints)
            ]
            out.append((service, slices))
        return out

    def routes_of(self, key: ServiceKey) -> list[Route]:
        self.reads.add(("routes-of", key))
        return self.index.routes_of(key)

    def policy(self, key: ServiceKey) -> TrafficPolicySpec | None:
        self.reads.add(("policy", key))
        return self.index.policy(key)

    def ip_owners(self, ip: str) -> set[ServiceKey]:
        self.reads.add(("ip-owners", ip))
        return self.index.ip_owners.get(ip, set())

    def namespaces(self) -> Mapping[str, Namespace]:
        return _RecordingMapping(self.index.namespaces, "namespace", self.reads)

    # Security -------------------------------------------------------------------------------

    def _security_of(self, namespace: str) -> None:
        root = self.index.security.settings.root_namespace
        self.reads.update((("mtls", namespace), ("mtls", root)))

    def endpoint_mtls(self, workload: Workload, port: int) -> bool:
        self._security_of(workload.namespace)
        return self.index.security.endpoint_mtls(workload, port)

    def mode(self, workload: Workload, port: int | None) -> MtlsMode:
        self._security_of(workload.namespace)
        return self.index.security.mode(workload, port)

    def inbound(self, workload: Workload, ports: Iterable[tuple[int, AppProtocol]]) -> InboundSecurity:
        """The workload's mTLS modes and authorization per app port."""
        self.selected_by_policies(workload.namespace)
        return self.index.security.inbound(workload, ports)

    def selected_by_policies(self, namespace: str) -> None:
        """Record that what is built may change with any mTLS or authorization policy that can
        select a workload of `namespace` (its own and the root namespace's)."""
        root = self.index.security.settings.root_namespace
        self.reads.update((("mtls", namespace), ("mtls", root), ("authz", namespace), ("authz", root)))

    # NetworkPolicy --------------------------------------------------------------------------

    def network_policy(self, workload: Workload) -> tuple[Enforcement, Enforcement]:
        """The pod's NetworkPolicy (ingress, egress). Only an isolated pod's build depends on
        what the peers resolve to."""
        self.reads.add(("netpol", workload.namespace))
        index = self.index
        ingress, egress = index.netpols.enforcement(workload, index.netpol_view)
        if ingress.isolated or egress.isolated:
            self.reads.add(PEERS)
        return ingress, egress

    def spiffe_ids(self, workloads: list[Workload]) -> tuple[str, ...]:
        return self.index.security.spiffe_ids(workloads)  # settings only: nothing to record


__all__ = ["PortAuthz", "Reader"]
