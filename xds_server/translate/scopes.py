"""Namespace scopes: what every proxy of one namespace sees of the shared resources, that
namespace's outbound route configuration (a byte join of its services' virtual hosts), and
the filter chains of its capture-mode outbound listeners (a byte join of its services'
ClusterIP chains, plus its visible endpoints' pod-IP chains: translate/capture.py).

A scope exists while a proxy of its namespace is connected. It reads every service, every
service's virtual hosts and cluster names and every namespace (`read_each`), so a change of
one service re-checks that one service in each scope (O(log n)), and a Namespace change (a
tenant label) or a big batch recomputes the scope from all services. That recomputation runs
in slices of `RESCAN_CHUNK` services (`Built.pending`), so a Namespace change over 10,000
services never holds the event loop; nothing is published until the whole scope is done.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Protocol

from ..model.mesh import OUTBOUND_PORT, ServiceKey
from ..xds import types
from ..xds.resource import Resource
from . import capture, names
from .batch import Batch
from .dependencies import Parts
from .index import ModelIndex
from .orchestrator import Built
from .reads import Reader
from .routes import outbound_route_configuration
from .scope import ScopeSettings, visible
from .service_outputs import ServiceOutputs
from .views import Published, ScopeView

_by_name = attrgetter("namespace", "name")  # ServiceKey's order, as a C-compared tuple

# Services whose visibility one slice of a whole recomputation checks.
RESCAN_CHUNK = 2000

# What a scope keeps of one visible service: its encoded virtual hosts, cluster names,
# encoded capture chains, endpoints' pod IPs and sniffed ports, and its encoded virtual hosts
# for gRPC, as of its check.
Member = tuple[bytes, list[str], bytes, frozenset[capture.PodIp], frozenset[int], bytes]


class ScopeMembers(Protocol):
    """How many proxies each namespace has connected (the proxy registry keeps it)."""

    def proxies_in(self, namespace: str) -> int: ...


@dataclass
class _Rescan:
    """A whole recomputation in slices: the services to check (keys: each is looked up when
    its turn comes, so it is current), and those found visible so far."""

    todo: list[ServiceKey]
    before: frozenset[ServiceKey]  # what the scope held when it was last published
    clusters_before: list[str]
    position: int = 0
    finalized: bool = False  # every service checked and the scope rebuilt: publish next
    # Each visible service's Member, as of its check (a later change to it reaches the
    # scope as a part, and is checked again).
    visible: dict[ServiceKey, Member] = field(default_factory=dict)


@dataclass
class _Scope:
    namespace: str
    services: set[ServiceKey] = field(default_factory=set)
    ordered: list[ServiceKey] = field(default_factory=list)  # `services`, sorted
    entries: list[bytes] = field(default_factory=list)  # their encoded virtual hosts, in order
    grpc_entries: list[bytes] = field(default_factory=list)  # the same for gRPC (while wanted)
    grpc_published: bool = False  # its gRPC route configuration is in the cache
    member_clusters: dict[ServiceKey, list[str]] = field(default_factory=dict)
    clusters: list[str] = field(default_factory=list)  # sorted cluster names of `services`
    chains: list[bytes] = field(default_factory=list)  # their encoded capture chains, in order
    member_pod_ips: dict[ServiceKey, frozenset[capture.PodIp]] = field(default_factory=dict)
    pod_ips: capture.PodIpChains = field(default_factory=capture.PodIpChains)  # over `services`
    member_sniffed: dict[ServiceKey, frozenset[int]] = field(default_factory=dict)
    sniffed: Counter[int] = field(default_factory=Counter)  # undeclared ports of `services`
    capture_body: bytes | None = None  # the joined chains, made when a proxy asks
    capture_listener: bool = False  # its shared outbound capture listener is in the cache
    rescan: _Rescan | None = None  # a whole recomputation part way through

    @property
    def route_name(self) -> str:
        return names.outbound_route_name(self.namespace)

    @property
    def grpc_route_name(self) -> str:
        return names.proxyless_route_name(self.namespace)


class ScopeBuilder:
    kind, phase, family = "scope", 3, "scope"

    def __init__(
        self, index: ModelIndex, outputs: ServiceOutputs, members: ScopeMembers,
        published: Published, settings: ScopeSettings,
    ) -> None:
        self.index = index
        self.outputs = outputs
        self.members = members
        self.published = published
        self.settings = settings
        self._scopes: dict[str, _Scope] = {}
        self._views: dict[str, ScopeView] = {}

    def capture_chains(self, namespace: str) -> bytes:
        """The filter chains (encoded) of the namespace's capture-mode outbound listeners:
        every visible service's ClusterIP chains, then the pod-IP chains of their endpoints.
        Joined on the first ask after a change (read by proxies after `capture-chains`)."""
        scope = self._scopes.get(namespace)
        if scope is None:
            return b""
        if scope.capture_body is None:
            pod_ips = scope.pod_ips.encode()
            scope.capture_body = b"".join([*scope.chains, pod_ips])
        return scope.capture_body

    def sniffed_ports(self, namespace: str) -> list[int]:
        """The undeclared ClusterIP ports of the namespace's visible services: where its
        capture-mode sidecars run the HTTP inspector (read after `capture-chains`)."""
        scope = self._scopes.get(namespace)
        return sorted(scope.sniffed) if scope is not None else []

    def services_of(self, namespace: str) -> set[ServiceKey]:
        """The services the scope sees (as built; read by proxies after `scope-services`)."""
        scope = self._scopes.get(namespace)
        return scope.services if scope is not None else set()

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        assert isinstance(arg, str)
        namespace = arg
        scope = self._scopes.get(namespace)
        if self.members.proxies_in(namespace) <= 0:
            if scope is None:
                return Built(alive=False)
            del self._scopes[namespace]
            self._views.pop(namespace, None)
            batch.remove(types.ROUTE, [scope.route_name, scope.grpc_route_name])
            batch.remove(types.LISTENER, [names.capture_outbound_listener_name(namespace)])
            batch.on_publish(lambda: self.published.scopes.pop(namespace, None))
            return Built(alive=False)
        for lookup in ("service", "vhosts", "proxyless-vhosts", "clusters", "capture", "namespace"):
            reader.read_each(lookup)
        # Its gRPC route configuration exists while a proxyless proxy is connected, its capture
        # listener while a capture-mode one is (a change rebuilds the scope whole).
        reader.derived("proxyless-connected")
        reader.derived("capture-connected")
        if scope is None:
            scope = self._scopes[namespace] = _Scope(namespace)
            parts = None
        keys = self._changed_services(parts)
        rescan = scope.rescan
        changed: bool
        if keys is None:  # (re)start from every service
            # What proxies were last given stays the baseline, even across a restart.
            before = rescan.before if rescan is not None else frozenset(scope.services)
            clusters_before = rescan.clusters_before if rescan is not None else list(scope.clusters)
            rescan = scope.rescan = _Rescan(list(self.index.services), before, clusters_before)
        elif rescan is not None and not rescan.finalized:  # changed meanwhile: checked now
            for key in keys:
                if self._visible(key, namespace):
                    rescan.visible[key] = self._member(scope, key)
                else:
                    rescan.visible.pop(key, None)
        if rescan is not None and not rescan.finalized:
            # Slices: the services' checks, then the sorted scope, then (below) the publish.
            if rescan.position < len(rescan.todo):
                self._scan(scope, rescan)
            else:
                self._rescope(scope, rescan.visible)
                rescan.finalized = True
            return Built(pending=True)
        if rescan is not None:
            scope.rescan = None
            before, clusters_before = rescan.before, rescan.clusters_before
            self._rescope_services(scope, keys or ())  # what changed since the rebuild
            changed = True  # a whole recomputation is always published
        else:
            assert keys is not None
            before, clusters_before = frozenset(scope.services), list(scope.clusters)
            changed = self._rescope_services(scope, keys)
        gained_or_lost = before ^ scope.services
        capture_changed = scope.capture_body is None
        if changed or gained_or_lost or scope.clusters != clusters_before or namespace not in self._views:
            self._publish(scope, batch, gained_or_lost, scope.clusters != clusters_before)
        emits = {("scope-services", namespace)} if gained_or_lost else set()
        translations = 0
        if capture_changed or scope.capture_listener != self.outputs.capture_connected:
            emits.add(("capture-chains", namespace))
            translations = self._publish_capture_listener(scope, batch)
        return Built(frozenset(emits), translations=translations)

    def _publish_capture_listener(self, scope: _Scope, batch: Batch) -> int:
        """The namespace's outbound capture listener (translate/capture.py), shared by its
        capture-mode sidecars on the standard port: built and hashed once per change, not
        once per proxy; a proxy's view admits it (views.py)."""
        name = names.capture_outbound_listener_name(scope.namespace)
        if not self.outputs.capture_connected:
            if scope.capture_listener:
                batch.remove(types.LISTENER, [name])
                scope.capture_listener = False
            return 0
        head = capture.outbound_listener_head(
            name, OUTBOUND_PORT, self.settings.outbound_traffic_policy, self.sniffed_ports(scope.namespace)
        )
        body = capture.outbound_listener_bytes(head, self.capture_chains(scope.namespace))
        batch.put([Resource.from_bytes(types.LISTENER, name, body)])
        scope.capture_listener = True
        return 1

    def _changed_services(self, parts: Parts) -> set[ServiceKey] | None:
        """The services to re-check, or None to recompute the scope from every service (a
        Namespace changed, or so many services did that one pass is cheaper)."""
        if parts is None:
            return None
        keys: set[ServiceKey] = set()
        for lookup, key in (p for p in parts if isinstance(p, tuple)):
            if lookup == "namespace":
                return None
            keys.add(key)
        if len(keys) > max(64, len(self.index.services) // 16):
            return None
        return keys

    def _visible(self, key: ServiceKey, namespace: str) -> bool:
        service = self.index.services.get(key)
        return service is not None and visible(service, namespace, self.index.namespaces, self.settings)

    def _entry(self, scope: _Scope, key: ServiceKey) -> bytes:
        return self.outputs.vhosts.get((key, key.namespace == scope.namespace), b"")

    def _grpc_entry(self, scope: _Scope, key: ServiceKey) -> bytes:
        return self.outputs.grpc_vhosts.get((key, key.namespace == scope.namespace), b"")

    def _chains(self, scope: _Scope, key: ServiceKey) -> bytes:
        return self.outputs.capture_chains.get((key, key.namespace == scope.namespace), b"")

    def _member(self, scope: _Scope, key: ServiceKey) -> Member:
        return (
            self._entry(scope, key), self.outputs.clusters.get(key, []), self._chains(scope, key),
            self.outputs.pod_ips.get(key, frozenset()), self.outputs.sniffed_ports.get(key, frozenset()),
            self._grpc_entry(scope, key),
        )

    def _scan(self, scope: _Scope, rescan: _Rescan) -> bool:
        """Check the next slice of services; True when every one has been checked."""
        services, namespaces, settings = self.index.services, self.index.namespaces, self.settings
        namespace = scope.namespace
        end = min(len(rescan.todo), rescan.position + RESCAN_CHUNK)
        found = rescan.visible
        for key in rescan.todo[rescan.position:end]:
            service = services.get(key)
            if service is not None and visible(service, namespace, namespaces, settings):
                found[key] = self._member(scope, key)
            else:
                found.pop(key, None)
        rescan.position = end
        return end == len(rescan.todo)

    def _rescope(self, scope: _Scope, members: dict[ServiceKey, Member]) -> bool:
        scope.services = set(members)
        # Sorted by plain tuples: the dataclass's own __lt__ is a Python call per comparison.
        scope.ordered = sorted(members, key=_by_name)
        scope.entries = [members[key][0] for key in scope.ordered]
        scope.grpc_entries = [members[key][5] for key in scope.ordered]
        scope.member_clusters = {key: members[key][1] for key in scope.ordered}
        scope.clusters = sorted([name for member in members.values() for name in member[1]])
        scope.chains = [members[key][2] for key in scope.ordered]
        # Pod IPs by difference: a Namespace label rescans every service, but few (if any)
        # of their endpoints changed; the chains of 100,000 endpoints are not rebuilt for it.
        before, after = scope.member_pod_ips, {key: member[3] for key, member in members.items() if member[3]}
        removed: list[capture.PodIp] = []
        added: list[capture.PodIp] = []
        for key in before.keys() | after.keys():
            old, new = before.get(key, frozenset()), after.get(key, frozenset())
            if old is not new and old != new:
                removed.extend(old - new)
                added.extend(new - old)
        scope.member_pod_ips = after
        scope.pod_ips.update(removed, added)
        scope.member_sniffed = {key: member[4] for key, member in members.items() if member[4]}
        scope.sniffed = Counter(p for ports in scope.member_sniffed.values() for p in ports)
        scope.capture_body = None
        return True

    def _rescope_services(self, scope: _Scope, keys: Iterable[ServiceKey]) -> bool:
        changed = False
        for key in keys:
            was = key in scope.services
            now = self._visible(key, scope.namespace)
            i = bisect.bisect_left(scope.ordered, _by_name(key), key=_by_name)
            if was and not now:
                scope.services.discard(key)
                del scope.ordered[i], scope.entries[i], scope.chains[i], scope.grpc_entries[i]
                changed = True
                scope.capture_body = None
            elif now and not was:
                scope.services.add(key)
                scope.ordered.insert(i, key)
                scope.entries.insert(i, self._entry(scope, key))
                scope.grpc_entries.insert(i, self._grpc_entry(scope, key))
                scope.chains.insert(i, self._chains(scope, key))
                changed = True
                scope.capture_body = None
            elif now:
                entry = self._entry(scope, key)
                if scope.entries[i] != entry:
                    scope.entries[i] = entry
                    changed = True
                grpc_entry = self._grpc_entry(scope, key)
                if scope.grpc_entries[i] != grpc_entry:
                    scope.grpc_entries[i] = grpc_entry
                    changed = True
                chains = self._chains(scope, key)
                if scope.chains[i] != chains:
                    scope.chains[i] = chains
                    scope.capture_body = None
            old_ips = scope.member_pod_ips.pop(key, frozenset()) if was else frozenset()
            new_ips = self.outputs.pod_ips.get(key, frozenset()) if now else frozenset()
            if new_ips:
                scope.member_pod_ips[key] = new_ips
            if old_ips != new_ips and scope.pod_ips.update(old_ips - new_ips, new_ips - old_ips):
                scope.capture_body = None
            old_ports = scope.member_sniffed.pop(key, frozenset()) if was else frozenset()
            new_ports = self.outputs.sniffed_ports.get(key, frozenset()) if now else frozenset()
            if new_ports:
                scope.member_sniffed[key] = new_ports
            if old_ports != new_ports:
                scope.sniffed.subtract(old_ports)
                scope.sniffed.update(new_ports)
                scope.sniffed += Counter()
                scope.capture_body = None
            old_names = scope.member_clusters.pop(key, []) if was else []
            new_names = self.outputs.clusters.get(key, []) if now else []
            if now:
                scope.member_clusters[key] = new_names
            if old_names != new_names:
                for name in old_names:
                    _sorted_remove(scope.clusters, name)
                for name in new_names:
                    bisect.insort(scope.clusters, name)
        return changed

    def _publish(
        self, scope: _Scope, batch: Batch, gained_or_lost: frozenset[ServiceKey], clusters_changed: bool
    ) -> None:
        # A byte join of entries kept in order: a change to one service costs no per-service
        # translation here, whatever the number of services.
        head = outbound_route_configuration(scope.route_name, []).SerializeToString(deterministic=True)
        body = b"".join([head, *scope.entries])
        batch.put([Resource.from_bytes(types.ROUTE, scope.route_name, body)])
        # The same join of the services' gRPC forms, for proxyless gRPC clients.
        if self.outputs.proxyless_connected:
            head = outbound_route_configuration(scope.grpc_route_name, []).SerializeToString(deterministic=True)
            body = b"".join([head, *scope.grpc_entries])
            batch.put([Resource.from_bytes(types.ROUTE, scope.grpc_route_name, body)])
            scope.grpc_published = True
        elif scope.grpc_published:
            batch.remove(types.ROUTE, [scope.grpc_route_name])
            scope.grpc_published = False
        # Copies of the sets the views read, made only when they changed.
        last = self._views.get(scope.namespace)  # the latest made, published or still in the batch
        view = self._views[scope.namespace] = ScopeView(
            scope.namespace,
            frozenset(scope.services) if last is None or gained_or_lost else last.services,
            tuple(scope.clusters) if last is None or clusters_changed else last.clusters,
        )
        batch.on_publish(lambda: self.published.scopes.__setitem__(scope.namespace, view))
        # Visibility changed but the clusters and assignments did not, so the cache reports
        # nothing: streams re-check them against every view, so they reach the proxies that
        # may now see them and leave those that may not.
        shared = [n for key in gained_or_lost for n in self.outputs.clusters.get(key, ())]
        if shared:
            batch.touch(types.CLUSTER, shared)
            batch.touch(types.ENDPOINT, shared)


def _sorted_remove(items: list[str], item: str) -> None:
    """Remove `item` from the sorted list `items` (if there)."""
    i = bisect.bisect_left(items, item)
    if i < len(items) and items[i] == item:
        del items[i]
