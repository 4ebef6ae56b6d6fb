"""Per-proxy views of the cache: what one proxy may see (see xds/cache.py `View`).

Views read the cache and `Published`, the few facts the orchestrator updates when it
publishes a batch (translate/batch.py): which cluster names are a service's, which names a
proxy owns, what each namespace scope sees. They never build or mutate anything.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

from ..model.mesh import ServiceKey
from ..xds import types
from ..xds.cache import ResourceCache
from ..xds.resource import Resource
from . import names, proxyless

ProxyKey = tuple[str, str]  # (namespace, pod)


@dataclass
class ScopeView:
    """What every proxy of one namespace sees of the shared resources, as published."""

    namespace: str
    services: frozenset[ServiceKey] = frozenset()
    clusters: tuple[str, ...] = ()  # sorted cluster names of the visible services
    # (cache generation, resources) of `visible(CLUSTER)`: shared by the scope's proxies.
    cluster_cache: tuple[int, list[Resource]] | None = None

    @property
    def route_name(self) -> str:
        return names.outbound_route_name(self.namespace)

    @property
    def grpc_route_name(self) -> str:
        return names.proxyless_route_name(self.namespace)


@dataclass
class Published:
    cluster_owner: dict[str, ServiceKey] = field(default_factory=dict)
    proxy_names: dict[str, ProxyKey] = field(default_factory=dict)
    owned: dict[ProxyKey, dict[str, frozenset[str]]] = field(default_factory=dict)
    scopes: dict[str, ScopeView] = field(default_factory=dict)
    # Service clusters reshaped for gRPC, by name (translate/proxyless.py `client_cluster`).
    proxyless_clusters: dict[str, Resource] = field(default_factory=dict)
    # Route configurations of one service port reached by address (translate/capture.py).
    route_owner: dict[str, ServiceKey] = field(default_factory=dict)
    capture_proxies: set[ProxyKey] = field(default_factory=set)  # the sidecars that use them
    # Capture-mode sidecars on the standard outbound port: they share their namespace's
    # outbound listener (`names.capture_outbound_listener_name`).
    shared_outbound: set[ProxyKey] = field(default_factory=set)

    def scope(self, namespace: str) -> ScopeView:
        scope = self.scopes.get(namespace)
        return scope if scope is not None else ScopeView(namespace)


class ProxyView:
    """One sidecar's window on the cache."""

    def __init__(self, cache: ResourceCache, published: Published, key: ProxyKey) -> None:
        self._cache = cache
        self._published = published
        self._proxy = key

    @property
    def key(self) -> Hashable:
        return ("proxy", self._proxy)

    @property
    def _scope(self) -> ScopeView:
        return self._published.scope(self._proxy[0])

    def may_see(self, type_url: str, name: str) -> bool:
        published = self._published
        owner = published.proxy_names.get(name)
        if owner is not None:
            return owner == self._proxy
        if type_url in (types.CLUSTER, types.ENDPOINT):
            service = published.cluster_owner.get(name)
            if service is not None:
                return service in self._scope.services
        elif type_url == types.ROUTE:
            if name.startswith("outbound|http|"):  # the Host-routed form: not for capture mode
                return name == names.outbound_route_name(self._proxy[0]) and \
                    self._proxy not in published.capture_proxies
            if name.startswith("outbound|grpc|"):
                return False  # for proxyless gRPC clients (ProxylessView)
            service = published.route_owner.get(name)
            if service is not None:
                return self._proxy in published.capture_proxies and service in self._scope.services
        elif type_url == types.LISTENER and name.startswith("outbound|capture|"):
            return self._proxy in published.shared_outbound and \
                name == names.capture_outbound_listener_name(self._proxy[0])
        elif type_url == types.SECRET:
            return False  # secrets are issued per identity by the CA, never shared
        return True  # raw resources (--resources) are for every proxy

    def get(self, type_url: str, name: str) -> Resource | None:
        if not self.may_see(type_url, name):
            return None
        return self._cache.get(type_url, name)

    def cache_key(self, type_url: str, name: str) -> str:
        return name

    def visible(self, type_url: str) -> Iterable[Resource]:
        if type_url == types.CLUSTER:
            return self._visible_clusters()
        return [r for n, r in self._cache.resources(type_url).items() if self.may_see(type_url, n)]

    def _visible_clusters(self) -> list[Resource]:
        published, cache, scope = self._published, self._cache, self._scope
        generation = cache.generation(types.CLUSTER)
        cached = scope.cluster_cache
        if cached is None or cached[0] != generation:
            # A derived cache of the published state (not a build): the same list for every
            # proxy of the scope until the clusters change.
            shared = [r for n in scope.clusters if (r := cache.get(types.CLUSTER, n))]
            raw = [
                r for n, r in cache.resources(types.CLUSTER).items()
                if n not in published.cluster_owner and n not in published.proxy_names
            ]
            cached = (generation, shared + raw)
            if self._proxy[0] in published.scopes:
                scope.cluster_cache = cached
        own = published.owned.get(self._proxy, {}).get(types.CLUSTER, frozenset())
        return cached[1] + [r for n in own if (r := cache.get(types.CLUSTER, n))]


class ProxylessView(ProxyView):
    """A proxyless gRPC client's or server's view: listeners named after its targets, its
    namespace's route configuration translated for gRPC, and clusters reshaped for gRPC
    (translate/proxyless.py)."""

    def may_see(self, type_url: str, name: str) -> bool:
        if type_url == types.LISTENER and proxyless.is_client_target(name):
            return True
        if type_url == types.ROUTE and name.startswith(("outbound|grpc|", "outbound|http|")):
            # Only the gRPC form: the Envoy one may hold fields gRPC rejects.
            return name == names.proxyless_route_name(self._proxy[0])
        return super().may_see(type_url, name)

    def get(self, type_url: str, name: str) -> Resource | None:
        resource = super().get(type_url, name)
        if resource is None:
            if type_url == types.LISTENER and proxyless.is_client_target(name):
                return proxyless.client_listener_resource(name, self._scope.grpc_route_name)
            return None
        if type_url == types.CLUSTER:
            return self._published.proxyless_clusters.get(name, resource)
        return resource

    def visible(self, type_url: str) -> Iterable[Resource]:
        found = super().visible(type_url)
        if type_url != types.CLUSTER:
            return list(found)
        reshaped = self._published.proxyless_clusters
        return [reshaped.get(r.name, r) for r in found]


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
