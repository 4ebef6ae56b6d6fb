"""Keeps the cache's Envoy resources in step with the mesh model, incrementally.

The one stateful piece of translate/: it listens to the mesh store, works out what a change
touches, calls the pure builders for exactly that, and writes the results to the cache.
An EndpointSlice change rebuilds one ClusterLoadAssignment; a route change the virtual hosts
of its parent services and the route configurations of the scopes that see them.

Shared resources (one cluster and one assignment per service port, one outbound route
configuration per namespace scope) are built once and shared by every proxy that may see
them; a proxy's own listeners and inbound clusters are built when it connects. Each proxy
gets a `ProxyView` that admits exactly what it may see (scope.py).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import struct_pb2

from ..model.mesh import (
    AppProtocol,
    EndpointSlice,
    Namespace,
    ProxyIdentity,
    Service,
    ServiceKey,
    ServicePort,
    Workload,
)
from ..model.identity import VerifiedProxy
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
    POD,
    SERVICE,
    TRAFFIC_POLICY,
    MeshStore,
    ObjectChange,
)
from ..xds import types
from ..xds.cache import ResourceCache
from ..xds.resource import Resource
from . import names, proxyless
from .clusters import inbound_cluster, service_cluster
from .endpoints import load_assignment, slice_port
from .listeners import inbound_listener, outbound_listener, tcp_upstream_listener
from .routes import inbound_route_configuration, outbound_route_configuration, service_virtual_host
from .scope import ScopeSettings, visible
from .security import SecurityIndex, plaintext_route_name, secure_inbound_routes

log = logging.getLogger(__name__)

ProxyKey = tuple[str, str]  # (namespace, pod)


def identity_from_node(node: base_pb2.Node) -> ProxyIdentity:
    """A proxy's claimed identity from its node: metadata written by `xds-server bootstrap`,
    else an id of the form `<pod>.<namespace>`."""
    meta = node.metadata.fields if node.HasField("metadata") else {}

    def text(key: str) -> str:
        value = meta.get(key)
        return value.string_value if value is not None else ""

    namespace, pod = text("namespace"), text("pod")
    if not namespace and "." in node.id:
        pod, namespace = node.id.rsplit(".", 1)
    labels: tuple[tuple[str, str], ...] = ()
    if "labels" in meta and meta["labels"].HasField("struct_value"):
        labels = tuple(sorted(
            (k, v.string_value) for k, v in meta["labels"].struct_value.fields.items()
        ))
    return ProxyIdentity(
        namespace=namespace or "default",
        service_account=text("service_account") or "default",
        pod=pod or node.id,
        ip=text("pod_ip"),
        labels=labels,
    )


def _port_from(meta: dict[str, struct_pb2.Value], key: str, default: int) -> int:
    value = meta.get(key)
    if value is None:
        return default
    if value.HasField("number_value"):
        return int(value.number_value)
    try:
        return int(value.string_value)
    except ValueError:
        return default


@dataclass
class _Scope:
    """What every proxy of one namespace sees of the shared resources."""

    namespace: str
    services: set[ServiceKey] = field(default_factory=set)
    ordered: list[ServiceKey] = field(default_factory=list)  # `services`, sorted
    entries: list[bytes] = field(default_factory=list)  # their encoded virtual hosts, in order
    clusters: list[str] = field(default_factory=list)  # sorted cluster names of visible services
    proxies: int = 0

    @property
    def route_name(self) -> str:
        return names.outbound_route_name(self.namespace)


@dataclass
class _Proxy:
    key: ProxyKey
    identity: ProxyIdentity
    node_meta: dict
    streams: int = 0
    owned: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    proxyless: bool = False  # a gRPC xDS client/server, not an Envoy (translate/proxyless.py)


class ProxyView:
    """One proxy's window on the cache (see xds/cache.py `View`)."""

    def __init__(self, controller: "MeshController", proxy: _Proxy, scope: _Scope) -> None:
        self._controller = controller
        self._proxy = proxy
        self._scope = scope

    @property
    def key(self) -> Hashable:
        return ("proxy", self._proxy.key)

    def may_see(self, type_url: str, name: str) -> bool:
        return self._controller.allowed(self._proxy, self._scope, type_url, name)

    def get(self, type_url: str, name: str) -> Resource | None:
        if not self.may_see(type_url, name):
            return None
        return self._controller.cache.get(type_url, name)

    def cache_key(self, type_url: str, name: str) -> str:
        return name

    def visible(self, type_url: str) -> Iterable[Resource]:
        return self._controller.visible(self._proxy, self._scope, type_url)


class ProxylessView(ProxyView):
    """A proxyless gRPC client's or server's view: listeners named after its targets, and
    clusters reshaped for gRPC (translate/proxyless.py)."""

    def may_see(self, type_url: str, name: str) -> bool:
        if type_url == types.LISTENER and proxyless.is_client_target(name):
            return True
        return super().may_see(type_url, name)

    def get(self, type_url: str, name: str) -> Resource | None:
        return proxyless.view_get(self, type_url, name, super().get)

    def visible(self, type_url: str) -> Iterable[Resource]:
        return proxyless.view_visible(self, type_url, super().visible(type_url))


class MeshController:
    def __init__(
        self,
        store: MeshStore,
        cache: ResourceCache,
        settings: ScopeSettings | None = None,
        security: SecuritySettings | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.settings = settings or ScopeSettings()
        # mTLS modes and authorization policies (translate/security.py).
        self.security = SecurityIndex(security)
        # What a service's clusters say about mTLS (see `_cluster_security`).
        self._service_ids: dict[ServiceKey, tuple[tuple[str, ...], tuple[bool, ...]]] = {}
        # Proxyless gRPC: clusters reshaped for gRPC and client listeners, built when asked.
        self.proxyless_clusters: dict[str, tuple[str, Resource]] = {}
        self.proxyless_listeners: dict[tuple[str, str], Resource] = {}
        # Indexes over the model.
        self._ip_owners: dict[str, set[ServiceKey]] = {}  # cluster IP -> services claiming it
        self._services: dict[ServiceKey, Service] = {}
        self._slices: dict[ServiceKey, dict[str, EndpointSlice]] = defaultdict(dict)
        self._workloads: dict[ProxyKey, Workload] = {}
        self._workload_by_ip: dict[str, Workload] = {}
        self._routes: dict[tuple[str, str, str], Route] = {}
        self._routes_by_parent: dict[ServiceKey, set[tuple[str, str, str]]] = defaultdict(set)
        # Routes naming a service as a backendRef or mirror: they re-resolve when it comes or goes.
        self._routes_by_backend_index: dict[ServiceKey, set[tuple[str, str, str]]] = defaultdict(set)
        self._policies: dict[tuple[str, str], TrafficPolicy] = {}
        self._policies_by_target: dict[ServiceKey, dict[tuple[str, str], TrafficPolicy]] = defaultdict(dict)
        self._policy_by_target: dict[ServiceKey, TrafficPolicy] = {}
        self._namespaces: dict[str, Namespace] = {}
        self._services_by_pod: dict[ProxyKey, set[ServiceKey]] = defaultdict(set)
        # Derived state.
        self._cluster_owner: dict[str, ServiceKey] = {}
        self._service_clusters: dict[ServiceKey, list[str]] = {}
        self._vhost_entries: dict[tuple[ServiceKey, bool], bytes] = {}
        self._scopes: dict[str, _Scope] = {}
        self._scope_cluster_cache: dict[str, tuple[int, list[Resource]]] = {}
        self._proxies: dict[ProxyKey, _Proxy] = {}
        self._proxy_names: dict[str, ProxyKey] = {}
        self.translations = 0  # builder calls, for tests and benchmarks of incrementality
        store.add_listener(self.on_changes)
        self.on_changes([ObjectChange(k, None, o) for k, o in self._all_objects()])

    def _all_objects(self) -> Iterable[tuple[tuple[str, str, str], object]]:
        for kind in (NAMESPACE, SERVICE, ENDPOINT_SLICE, POD, HTTP_ROUTE, GRPC_ROUTE, TRAFFIC_POLICY,
                     MTLS_POLICY, AUTHORIZATION_POLICY):
            for (namespace, name), obj in self.store.all(kind).items():
                yield (kind, namespace, name), obj

    # Model changes --------------------------------------------------------------------------

    def on_changes(self, changes: list[ObjectChange]) -> None:
        services: set[ServiceKey] = set()  # clusters, assignments and virtual hosts
        endpoints: set[ServiceKey] = set()  # assignments only
        vhosts: set[ServiceKey] = set()
        proxies: set[ProxyKey] = set()
        rescope = False  # every scope recomputed from scratch (namespaces, or a big batch)
        rescoped: set[ServiceKey] = set()  # Services whose visibility is re-checked one by one
        reclustered: set[ServiceKey] = set()  # clusters and assignments (mTLS modes changed)
        for change in changes:
            kind = change.kind
            if kind == SERVICE:
                for obj in (change.old, change.new):
                    if obj is not None:
                        services.add(obj.key)
                        rescoped.add(obj.key)
                        proxies |= self._pods_backing(obj.key)
                        # Services sharing its cluster IP may gain or lose that domain.
                        vhosts |= self._ip_owners.get(obj.cluster_ip or "", set())
                self._apply_service(change)
            elif kind == ENDPOINT_SLICE:
                for obj in (change.old, change.new):
                    if obj is not None:
                        endpoints.add(obj.service_key)
                proxies |= self._slice_members_changed(change)
                self._apply_slice(change)
            elif kind == POD:
                for obj in (change.old, change.new):
                    if obj is not None:
                        proxies.add((obj.namespace, obj.name))
                        endpoints |= self._services_by_pod.get((obj.namespace, obj.name), set())
                self._apply_workload(change)
            elif kind in (HTTP_ROUTE, GRPC_ROUTE):
                for obj in (change.old, change.new):
                    if obj is not None:
                        # Only the parents' virtual hosts hold a route's rules; its backends'
                        # own virtual hosts do not change (when a backend service appears or
                        # goes, `_routes_by_backend` below re-resolves the parents).
                        vhosts |= {p.service for p in obj.parents}
                self._apply_route(change)
            elif kind == TRAFFIC_POLICY:
                for obj in (change.old, change.new):
                    if obj is not None:
                        target = ServiceKey(obj.namespace, obj.spec.target_ref.name)
                        services.add(target)
                        proxies |= self._pods_backing(target)
                self._apply_policy(change)
            elif kind in (MTLS_POLICY, AUTHORIZATION_POLICY):
                # Inbound listeners and routes of the workloads it may select; for mTLS also
                # the endpoints clients see (whether to originate mTLS to them).
                namespaces = self.security.apply(change)
                proxies |= {k for k in self._proxies if namespaces is None or k[0] in namespaces}
                if kind == MTLS_POLICY:
                    reclustered |= {
                        k for k in self._services if namespaces is None or k.namespace in namespaces
                    }
            elif kind == NAMESPACE:
                if change.new is None:
                    self._namespaces.pop(change.key[2], None)
                else:
                    self._namespaces[change.new.name] = change.new
                rescope = True
                proxies |= set(self._proxies)
        # Backends named by routes whose service appeared or vanished: re-resolve those routes.
        for key in list(services):
            for route_key in self._routes_by_backend(key):
                vhosts |= {p.service for p in self._routes[route_key].parents}
        # Per-scope updates below need the clusters these services had before this change.
        old_clusters = {key: self._service_clusters.get(key, []) for key in rescoped}
        for key in services | reclustered:
            self._rebuild_service(key)
        for key in endpoints - services - reclustered:
            if self._cluster_security_changed(key):
                self._rebuild_service(key)  # its clusters check the servers' SPIFFE IDs
            else:
                self._rebuild_assignments(key)
        changed_vhosts = {k for k in (services | vhosts) if self._rebuild_vhosts(k)}
        # Services some scope gained or lost (export annotation, tenant label, new or gone).
        regated: set[ServiceKey] = set()
        # A few Services changed: re-check just those in every scope (O(scopes x changed));
        # a big batch (a source's first sync) is cheaper as one pass over every service.
        rescope = rescope or len(rescoped) > max(64, len(self._services) // 16)
        gated: set[str] = set()  # scopes whose set of services changed
        for scope in self._scopes.values() if rescope or rescoped else ():
            if rescope:
                diff = self._rescope(scope)
            else:
                diff = self._rescope_services(scope, rescoped, old_clusters)
            if diff:
                regated |= diff
                gated.add(scope.namespace)
                # Their TCP upstream listeners depend on what the scope sees.
                proxies |= {k for k in self._proxies if k[0] == scope.namespace}
        for scope in self._scopes.values():
            touched = scope.services & changed_vhosts
            if touched and not rescope:
                self._refresh_entries(scope, touched)
            if rescope or scope.namespace in gated or touched:
                self._rebuild_scope_routes(scope)
        for key in proxies:
            if key in self._proxies:
                self._rebuild_proxy(self._proxies[key])
        if regated:
            # Visibility changed but the clusters and assignments did not, so the cache
            # reported nothing: tell the server to re-check them against every view, so
            # they reach the proxies that may now see them and leave those that may not.
            shared = [n for key in regated for n in self._service_clusters.get(key, ())]
            self.cache.touch(types.CLUSTER, shared)
            self.cache.touch(types.ENDPOINT, shared)

    @staticmethod
    def _slice_members_changed(change: ObjectChange) -> set[ProxyKey]:
        """The pods whose app ports a slice change may change (see `app_ports`): those that
        joined or left it, or all of its pods when its ports or its service changed. An
        endpoint change (readiness, zone) of a pod that stays rebuilds no proxy."""
        old, new = change.old, change.new

        def pods(s: EndpointSlice | None) -> set[ProxyKey]:
            return {(s.namespace, e.pod) for e in s.endpoints if e.pod} if s is not None else set()

        if old is None or new is None or old.ports != new.ports or old.service != new.service:
            return pods(old) | pods(new)
        return pods(old) ^ pods(new)

    def _apply_service(self, change: ObjectChange) -> None:
        if change.old is not None and change.old.cluster_ip:
            owners = self._ip_owners.get(change.old.cluster_ip)
            if owners is not None:
                owners.discard(change.old.key)
                if not owners:
                    del self._ip_owners[change.old.cluster_ip]
        if change.new is None:
            self._services.pop(change.old.key, None)
        else:
            self._services[change.new.key] = change.new
            if change.new.cluster_ip and change.new.cluster_ip.lower() != "none":
                owners = self._ip_owners.setdefault(change.new.cluster_ip, set())
                owners.add(change.new.key)
                if len(owners) > 1:
                    log.warning(
                        "services share a cluster IP; only the first keeps it as a route domain",
                        extra={"cluster_ip": change.new.cluster_ip,
                               "services": sorted(str(k) for k in owners)},
                    )

    def _routable(self, service: Service) -> Service:
        """The service as its virtual hosts see it. Two services claiming one cluster IP (an
        error a real cluster never makes, but a file can) would give Envoy a duplicate domain,
        and Envoy rejects the whole route configuration: one odd object must not break the
        namespace, so only the first service (by name) keeps the IP."""
        owners = self._ip_owners.get(service.cluster_ip or "")
        if owners and len(owners) > 1 and min(owners) != service.key:
            return dataclasses.replace(service, cluster_ip=None)
        return service

    def _apply_slice(self, change: ObjectChange) -> None:
        if change.old is not None:
            key = change.old.service_key  # a property making a new key: once per slice
            self._slices[key].pop(change.old.name, None)
            for endpoint in change.old.endpoints:
                if endpoint.pod:
                    self._services_by_pod[(change.old.namespace, endpoint.pod)].discard(key)
        if change.new is not None:
            key = change.new.service_key
            self._slices[key][change.new.name] = change.new
            for endpoint in change.new.endpoints:
                if endpoint.pod:
                    self._services_by_pod[(change.new.namespace, endpoint.pod)].add(key)

    def _apply_workload(self, change: ObjectChange) -> None:
        if change.old is not None:
            self._workloads.pop((change.old.namespace, change.old.name), None)
            if self._workload_by_ip.get(change.old.ip) is change.old:
                del self._workload_by_ip[change.old.ip]
        if change.new is not None:
            self._workloads[(change.new.namespace, change.new.name)] = change.new
            if change.new.ip:
                self._workload_by_ip[change.new.ip] = change.new

    def _apply_route(self, change: ObjectChange) -> None:
        if change.old is not None:
            self._routes.pop(change.old.key, None)
            for parent in change.old.parents:
                self._routes_by_parent[parent.service].discard(change.old.key)
            for backend in _route_backends(change.old):
                routes = self._routes_by_backend_index[backend]
                routes.discard(change.old.key)
                if not routes:
                    del self._routes_by_backend_index[backend]
        if change.new is not None:
            self._routes[change.new.key] = change.new
            for parent in change.new.parents:
                self._routes_by_parent[parent.service].add(change.new.key)
            for backend in _route_backends(change.new):
                self._routes_by_backend_index[backend].add(change.new.key)

    def _apply_policy(self, change: ObjectChange) -> None:
        if change.old is not None:
            self._policies.pop((change.old.namespace, change.old.name), None)
            old_target = ServiceKey(change.old.namespace, change.old.spec.target_ref.name)
            self._policies_by_target[old_target].pop((change.old.namespace, change.old.name), None)
        if change.new is not None:
            self._policies[(change.new.namespace, change.new.name)] = change.new
            new_target = ServiceKey(change.new.namespace, change.new.spec.target_ref.name)
            self._policies_by_target[new_target][(change.new.namespace, change.new.name)] = change.new
        # Several policies may target one service: the oldest wins (Gateway API convention).
        targets = {
            ServiceKey(p.namespace, p.spec.target_ref.name)
            for p in (change.old, change.new) if p is not None
        }
        for target in targets:
            by_name = self._policies_by_target.get(target, {})
            candidates = sorted(by_name.values(), key=lambda p: (p.created or "~", p.name))
            if not by_name:
                self._policies_by_target.pop(target, None)
            if candidates:
                self._policy_by_target[target] = candidates[0]
            else:
                self._policy_by_target.pop(target, None)

    def _routes_by_backend(self, key: ServiceKey) -> list[tuple[str, str, str]]:
        # An index, not a scan of every route: a full build asks this for every service.
        return list(self._routes_by_backend_index.get(key, ()))

    def _pods_backing(self, key: ServiceKey) -> set[ProxyKey]:
        return {
            (s.namespace, e.pod)
            for s in self._slices.get(key, {}).values() for e in s.endpoints if e.pod
        }

    def policy_for(self, key: ServiceKey) -> TrafficPolicySpec | None:
        policy = self._policy_by_target.get(key)
        return policy.spec if policy is not None else None

    # Shared resources ------------------------------------------------------------------------

    def _rebuild_service(self, key: ServiceKey) -> None:
        service = self._services.get(key)
        old = set(self._service_clusters.get(key, ()))
        if service is None:
            self._service_clusters.pop(key, None)
            self._service_ids.pop(key, None)
            for name in old:
                self._cluster_owner.pop(name, None)
                self.proxyless_clusters.pop(name, None)
            self.cache.update(types.CLUSTER, remove=old)
            self.cache.update(types.ENDPOINT, remove=old)
            return
        policy = self.policy_for(key)
        ids, all_mtls = self._cluster_security(key)
        clusters = [service_cluster(service, port, policy, mtls_ids=ids) for port in service.ports]
        for cluster, enabled in zip(clusters, all_mtls):
            proxyless.mark_proxyless_mtls(cluster, enabled)
        self.translations += len(clusters)
        new = {c.name for c in clusters}
        for name in new:
            self._cluster_owner[name] = key
        for name in old - new:
            self._cluster_owner.pop(name, None)
            self.proxyless_clusters.pop(name, None)
        self._service_clusters[key] = sorted(new)
        self.cache.update(types.CLUSTER, upsert=clusters, remove=old - new)
        self._rebuild_assignments(key)
        self.cache.update(types.ENDPOINT, remove=old - new)

    def _rebuild_assignments(self, key: ServiceKey) -> None:
        service = self._services.get(key)
        if service is None:
            return
        slices = self._slices.get(key, {}).values()
        mtls = self.security.endpoint_mtls if self.security.settings.mtls else None
        assignments = [
            load_assignment(service, port, slices, self._workload_lookup, mtls)
            for port in service.ports
        ]
        self.translations += len(assignments)
        self.cache.update(types.ENDPOINT, upsert=assignments)

    def _cluster_security(self, key: ServiceKey) -> tuple[tuple[str, ...], tuple[bool, ...]]:
        """What a service's clusters say about mTLS (remembered, to tell when an endpoint
        change must rebuild them): the SPIFFE IDs of its mTLS-capable workloads (what its
        clients accept from its servers) and, per port, whether every endpoint accepts mTLS
        (gRPC clients, which cannot choose per endpoint, then originate it)."""
        service = self._services.get(key)
        if not self.security.settings.mtls or service is None:
            return (), ()
        workloads = []
        for endpoint_slice in self._slices.get(key, {}).values():
            for endpoint in endpoint_slice.endpoints:
                owner = self._workload_lookup(key.namespace, endpoint.pod, endpoint.address)
                if owner is not None:
                    workloads.append(owner)
        ids = self.security.spiffe_ids(workloads)
        flags = tuple(self._all_endpoints_mtls(key, port) for port in service.ports) if ids else ()
        self._service_ids[key] = (ids, flags)
        return ids, flags

    def _all_endpoints_mtls(self, key: ServiceKey, port: ServicePort) -> bool:
        found = False
        for endpoint_slice in self._slices.get(key, {}).values():
            target = slice_port(port, endpoint_slice)
            if target is None:
                continue
            for endpoint in endpoint_slice.endpoints:
                owner = self._workload_lookup(key.namespace, endpoint.pod, endpoint.address)
                if owner is None or not self.security.endpoint_mtls(owner, target):
                    return False
                found = True
        return found

    def _cluster_security_changed(self, key: ServiceKey) -> bool:
        if not self.security.settings.mtls or key not in self._services:
            return False
        before = self._service_ids.get(key, ((), ()))
        return self._cluster_security(key) != before

    def _workload_lookup(self, namespace: str, pod: str, ip: str) -> Workload | None:
        if pod:
            found = self._workloads.get((namespace, pod))
            if found is not None:
                return found
        return self._workload_by_ip.get(ip)

    def _rebuild_vhosts(self, key: ServiceKey) -> bool:
        """Re-encode the service's virtual hosts (local and remote forms); True if changed."""
        service = self._services.get(key)
        changed = False
        for local in (True, False):
            entry = self._encode_vhosts(service, local) if service is not None else None
            if entry is None:
                changed = self._vhost_entries.pop((key, local), None) is not None or changed
            elif self._vhost_entries.get((key, local)) != entry:
                self._vhost_entries[(key, local)] = entry
                changed = True
        return changed

    def _encode_vhosts(self, service: Service, local: bool) -> bytes:
        service = self._routable(service)
        routes = [self._routes[k] for k in sorted(self._routes_by_parent.get(service.key, ()))]
        policy = self.policy_for(service.key)
        http_ports = [p for p in service.ports if p.app_protocol.is_http]
        default = _default_port(http_ports)
        hosts = []
        for port in http_ports:
            attached = [
                r for r in routes
                if any(p.service == service.key and p.port in (None, port.port) for p in r.parents)
            ]
            hosts.append(service_virtual_host(
                service, port, attached, policy, self._services,
                local=local, default_port=port is default,
            ))
            self.translations += 1
        # Encoded as RouteConfiguration.virtual_hosts entries: a scope's route configuration
        # is then a byte join of its services' entries, never a re-translation.
        return route_pb2.RouteConfiguration(virtual_hosts=hosts).SerializeToString(deterministic=True)

    # Scopes ---------------------------------------------------------------------------------

    def _rescope(self, scope: _Scope) -> set[ServiceKey]:
        """Recompute what the scope sees from every service; returns the services it gained
        or lost."""
        before = scope.services
        scope.services = {
            key for key, service in self._services.items()
            if visible(service, scope.namespace, self._namespaces, self.settings)
        }
        # Sorted by plain tuples: the dataclass's own __lt__ is a Python call per comparison.
        scope.ordered = sorted(scope.services, key=_by_name)
        scope.entries = [self._scope_entry(scope, key) for key in scope.ordered]
        scope.clusters = sorted(
            name for key in scope.services for name in self._service_clusters.get(key, ())
        )
        self._scope_cluster_cache.pop(scope.namespace, None)
        return before ^ scope.services

    def _rescope_services(
        self, scope: _Scope, keys: Iterable[ServiceKey], old_clusters: dict[ServiceKey, list[str]]
    ) -> set[ServiceKey]:
        """`_rescope` for a few changed services only (their clusters were `old_clusters`)."""
        diff: set[ServiceKey] = set()
        clusters_changed = False
        for key in keys:
            service = self._services.get(key)
            was = key in scope.services
            now = service is not None and visible(service, scope.namespace, self._namespaces, self.settings)
            if was != now:
                diff.add(key)
                i = bisect.bisect_left(scope.ordered, _by_name(key), key=_by_name)
                if now:
                    scope.services.add(key)
                    scope.ordered.insert(i, key)
                    scope.entries.insert(i, self._scope_entry(scope, key))
                else:
                    scope.services.discard(key)
                    del scope.ordered[i], scope.entries[i]
            old_names = old_clusters.get(key, []) if was else []
            new_names = self._service_clusters.get(key, []) if now else []
            if old_names != new_names:
                clusters_changed = True
                for name in old_names:
                    _sorted_remove(scope.clusters, name)
                for name in new_names:
                    bisect.insort(scope.clusters, name)
        if diff or clusters_changed:
            self._scope_cluster_cache.pop(scope.namespace, None)
        return diff

    def _scope_entry(self, scope: _Scope, key: ServiceKey) -> bytes:
        return self._vhost_entries.get((key, key.namespace == scope.namespace), b"")

    def _refresh_entries(self, scope: _Scope, keys: Iterable[ServiceKey]) -> None:
        """Re-read the encoded virtual hosts of these (visible) services into the scope."""
        for key in keys:
            i = bisect.bisect_left(scope.ordered, _by_name(key), key=_by_name)
            scope.entries[i] = self._scope_entry(scope, key)

    def _rebuild_scope_routes(self, scope: _Scope) -> None:
        # A byte join of entries kept in order (see _rescope, _refresh_entries): a change to
        # one service costs no per-service work here, whatever the number of services.
        head = outbound_route_configuration(scope.route_name, []).SerializeToString(deterministic=True)
        body = b"".join([head, *scope.entries])
        self.cache.update(types.ROUTE, upsert=[Resource.from_bytes(types.ROUTE, scope.route_name, body)])

    def _scope_for(self, namespace: str) -> _Scope:
        scope = self._scopes.get(namespace)
        if scope is None:
            scope = _Scope(namespace)
            self._scopes[namespace] = scope
            self._rescope(scope)
            self._rebuild_scope_routes(scope)
        return scope

    # Proxies --------------------------------------------------------------------------------

    def view_for(self, node: VerifiedProxy | base_pb2.Node) -> ProxyView:
        """The server calls this on a stream's first request (see XdsServer `view_for`)."""
        claim = node.claim if isinstance(node, VerifiedProxy) else None
        identity = claim.identity if claim is not None else identity_from_node(node)
        key = (identity.namespace, identity.pod)
        proxy = self._proxies.get(key)
        if proxy is None:
            if claim is not None:  # the ports the claim read, where workload_of looks for them
                meta = {p: struct_pb2.Value(number_value=getattr(claim, p))
                        for p in ("inbound_port", "outbound_port")}
            else:
                meta = dict(node.metadata.fields) if node.HasField("metadata") else {}
            is_proxyless = claim.proxyless if claim is not None else proxyless.is_proxyless(node)
            proxy = _Proxy(key, identity, meta, proxyless=is_proxyless)
            self._proxies[key] = proxy
            scope = self._scope_for(identity.namespace)
            scope.proxies += 1
            self._rebuild_proxy(proxy)
        proxy.streams += 1
        view = ProxylessView if proxy.proxyless else ProxyView
        return view(self, proxy, self._scopes[identity.namespace])

    def release(self, node: VerifiedProxy | base_pb2.Node) -> None:
        """A stream ended; the last stream of a proxy takes its own resources with it."""
        identity = node.identity if isinstance(node, VerifiedProxy) else identity_from_node(node)
        key = (identity.namespace, identity.pod)
        proxy = self._proxies.get(key)
        if proxy is None:
            return
        proxy.streams -= 1
        if proxy.streams > 0:
            return
        del self._proxies[key]
        for type_url, owned in proxy.owned.items():
            for name in owned:
                self._proxy_names.pop(name, None)
            self.cache.update(type_url, remove=owned)
        scope = self._scopes.get(identity.namespace)
        if scope is not None:
            scope.proxies -= 1
            if scope.proxies <= 0:
                del self._scopes[identity.namespace]
                self._scope_cluster_cache.pop(identity.namespace, None)
                self.cache.update(types.ROUTE, remove=[scope.route_name])

    def workload_of(self, proxy: _Proxy) -> Workload:
        identity = proxy.identity
        known = self._workloads.get(proxy.key)
        if known is not None:
            return known
        meta = proxy.node_meta
        # Not (yet) in the model: a VM or a test proxy; trust its declared ports and address.
        return Workload(
            namespace=identity.namespace,
            name=identity.pod,
            ip=identity.ip or "127.0.0.1",
            service_account=identity.service_account,
            labels=identity.labels,
            meshed=True,
            inbound_port=_port_from(meta, "inbound_port", 15006),
            outbound_port=_port_from(meta, "outbound_port", 15001),
        )

    def app_ports(self, workload: Workload) -> list[tuple[int, AppProtocol, Service, ServicePort]]:
        """The app ports peers reach through this sidecar: (port, protocol, service, service port)."""
        found: dict[int, tuple[int, AppProtocol, Service, ServicePort]] = {}
        for key in sorted(self._services_by_pod.get((workload.namespace, workload.name), ())):
            service = self._services.get(key)
            if service is None:
                continue
            for endpoint_slice in self._slices.get(key, {}).values():
                if not any(e.pod == workload.name for e in endpoint_slice.endpoints):
                    continue
                for port in service.ports:
                    target = slice_port(port, endpoint_slice)
                    if target is not None and target not in found:
                        found[target] = (target, port.app_protocol, service, port)
        return [found[p] for p in sorted(found)]

    def _rebuild_proxy(self, proxy: _Proxy) -> None:
        if proxy.proxyless:
            self._rebuild_proxyless(proxy)
            return
        workload = self.workload_of(proxy)
        namespace, pod = proxy.key
        ip = workload.ip or "127.0.0.1"
        scope = self._scopes.get(namespace) or self._scope_for(namespace)
        listeners = [
            outbound_listener(
                names.outbound_listener_name(namespace, pod), ip, workload.outbound_port, scope.route_name
            )
        ]
        for upstream in workload.tcp_upstreams:
            service = self._services.get(upstream.service)
            if service is None or upstream.service not in scope.services or service.port(upstream.port) is None:
                log.warning(
                    "TCP upstream names a service this proxy cannot see",
                    extra={"proxy": f"{namespace}/{pod}", "service": str(upstream.service),
                           "port": upstream.port},
                )
                continue
            listeners.append(tcp_upstream_listener(
                names.tcp_listener_name(namespace, pod, upstream.local_port), ip, upstream.local_port,
                names.cluster_name(upstream.service, upstream.port),
            ))
        clusters = []
        routes = []
        ports = self.app_ports(workload)
        if ports:
            clusters = [inbound_cluster(namespace, pod, ip, p, proto) for p, proto, _, _ in ports]
            http = [(p, proto) for p, proto, _, _ in ports if proto.is_http]
            tcp = next((p for p, proto, _, _ in ports if not proto.is_http), None)
            route_name = names.inbound_route_name(namespace, pod)
            policies = {
                s.key: spec for _, _, s, _ in ports if (spec := self.policy_for(s.key)) is not None
            }
            # Service ports with their target resolved to the app port the slices say.
            backed = [(s, dataclasses.replace(sp, target_port=p)) for p, _, s, sp in ports]
            security = self.security.inbound(workload, [(p, proto) for p, proto, _, _ in ports])
            routes.extend(secure_inbound_routes(
                inbound_route_configuration(
                    route_name, http, backed, policies, namespace=namespace, pod=pod
                ),
                security, namespace=namespace, pod=pod,
            ))
            listeners.append(inbound_listener(
                names.inbound_listener_name(namespace, pod), ip, workload.inbound_port, route_name,
                has_http=bool(http),
                tcp_cluster=names.inbound_cluster_name(tcp, namespace, pod) if tcp is not None else None,
                security=security,
                plaintext_route_name=plaintext_route_name(security, route_name, namespace, pod),
            ))
        self.translations += 1
        self._replace_owned(proxy, types.CLUSTER, clusters)
        self._replace_owned(proxy, types.ROUTE, routes)
        self._replace_owned(proxy, types.LISTENER, listeners)

    def _rebuild_proxyless(self, proxy: _Proxy) -> None:
        """An xDS-enabled gRPC server's listeners: one per app port (from the services it
        backs) and container port, with the port's mTLS mode and authorization."""
        workload = self.workload_of(proxy)
        ports = {p for p, _, _, _ in self.app_ports(workload)} | {p for _, p in workload.container_ports}
        grpc_ports = [(p, AppProtocol.GRPC) for p in sorted(ports)]
        security = self.security.inbound(workload, grpc_ports)
        listeners = [
            proxyless.server_listener(
                workload.ip or "127.0.0.1", port, security.http_modes[port],
                security.authz[port], self.security.settings.trust_domain,
            )
            for port, _ in grpc_ports
        ]
        self.translations += 1
        self._replace_owned(proxy, types.LISTENER, listeners)

    def _replace_owned(self, proxy: _Proxy, type_url: str, messages: list) -> None:
        resources = [Resource.from_message(m) for m in messages]
        new = {r.name for r in resources}
        old = proxy.owned[type_url]
        for name in new:
            self._proxy_names[name] = proxy.key
        for name in old - new:
            self._proxy_names.pop(name, None)
        proxy.owned[type_url] = new
        self.cache.update(type_url, upsert=resources, remove=old - new)

    # Views ----------------------------------------------------------------------------------

    def allowed(self, proxy: _Proxy, scope: _Scope, type_url: str, name: str) -> bool:
        owner = self._proxy_names.get(name)
        if owner is not None:
            return owner == proxy.key
        if type_url in (types.CLUSTER, types.ENDPOINT):
            service = self._cluster_owner.get(name)
            if service is not None:
                return service in scope.services
        elif type_url == types.ROUTE and name.startswith("outbound|http|"):
            return name == scope.route_name
        elif type_url == types.SECRET:
            return False  # secrets are issued per identity by the CA, never shared
        return True  # raw resources (--resources) are for every proxy

    def visible(self, proxy: _Proxy, scope: _Scope, type_url: str) -> list[Resource]:
        if type_url == types.CLUSTER:
            generation = self.cache.generation(types.CLUSTER)
            cached = self._scope_cluster_cache.get(scope.namespace)
            if cached is None or cached[0] != generation:
                shared = [r for n in scope.clusters if (r := self.cache.get(types.CLUSTER, n))]
                raw = [
                    r for n, r in self.cache.resources(types.CLUSTER).items()
                    if n not in self._cluster_owner and n not in self._proxy_names
                ]
                cached = (generation, shared + raw)
                self._scope_cluster_cache[scope.namespace] = cached
            own = [r for n in proxy.owned.get(types.CLUSTER, ()) if (r := self.cache.get(types.CLUSTER, n))]
            return cached[1] + own
        return [
            r for n, r in self.cache.resources(type_url).items()
            if self.allowed(proxy, scope, type_url, n)
        ]


def proxy_resources(view: ProxyView) -> dict[str, list[Resource]]:
    """Everything one proxy receives, by type: what `xds-server translate` prints."""
    clusters = list(view.visible(types.CLUSTER))
    endpoints = [
        r for c in clusters if c.warms_with and (r := view.get(types.ENDPOINT, c.warms_with))
    ]
    return {
        types.LISTENER: sorted(view.visible(types.LISTENER), key=lambda r: r.name),
        types.ROUTE: sorted(view.visible(types.ROUTE), key=lambda r: r.name),
        types.CLUSTER: sorted(clusters, key=lambda r: r.name),
        types.ENDPOINT: sorted(endpoints, key=lambda r: r.name),
    }


_by_name = attrgetter("namespace", "name")  # ServiceKey's order, as a C-compared tuple


def _sorted_remove(items: list[str], item: str) -> None:
    """Remove `item` from the sorted list `items` (if there)."""
    i = bisect.bisect_left(items, item)
    if i < len(items) and items[i] == item:
        del items[i]


def _route_backends(route: Route) -> set[ServiceKey]:
    """Services a route resolves against (backendRefs and mirrors): its virtual hosts
    change when one of them appears or disappears."""
    return {
        ref.service
        for rule in route.rules
        for ref in (*rule.backends, *(m.backend for m in rule.mirrors))
    }


def _default_port(ports: list[ServicePort]) -> ServicePort | None:
    """The port a Host header without a port means: 80 if the service has it, else the first."""
    return next((p for p in ports if p.port == 80), ports[0] if ports else None)
