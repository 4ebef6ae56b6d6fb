"""Keeps the cache's Envoy resources in step with the mesh model, incrementally.

The composition of translate/'s stateful parts, and the view provider the xDS server uses:

  index.py            the model index: the lookups the builders need, kept from store changes
  reads.py            the tracking reader builders read the index through
  dependencies.py     which output read what: a change finds its dependents there
  service_outputs.py  per service: clusters, assignments, virtual hosts (shared by proxies)
  scopes.py           per namespace: what its proxies see, its outbound route configuration
  proxies.py          the proxy registry and each proxy's own listeners, clusters and routes
  orchestrator.py     batches of changes -> dirty outputs -> rebuilt -> published to the cache
  views.py            what one proxy may see of the cache

Shared resources (one cluster and one assignment per service port, one outbound route
configuration per namespace scope) are built once and shared by every proxy that may see
them; a proxy's own resources are built when it connects. Each proxy gets a view that admits
exactly what it may see (scope.py).

Without a running drain task every store change is applied before the store call returns (the
offline `xds-server translate`, tests, benchmarks); `start()` moves the work to a time-sliced
asyncio task (the server: translate/orchestrator.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from ..model.identity import VerifiedProxy, proves_pod
from ..model.security import SecuritySettings
from ..model.store import KINDS, MeshStore, ObjectChange
from ..xds.cache import ResourceCache
from .index import ModelIndex
from .orchestrator import Collector, Orchestrator
from .proxies import ProxyBuilder, ProxyRegistry, identity_key, stranger_key
from .scope import ScopeSettings
from .scopes import ScopeBuilder
from .service_outputs import (
    AssignmentsBuilder,
    CaptureBuilder,
    PodIpsBuilder,
    ClusterSecurityBuilder,
    ClustersBuilder,
    ProxylessClustersBuilder,
    ProxylessVirtualHostsBuilder,
    ServiceOutputs,
    VirtualHostsBuilder,
)
from .views import ProxyKey, ProxylessView, ProxyView, Published, proxy_resources

__all__ = ["MeshController", "ProxyView", "ProxylessView", "proxy_resources"]

# How long a proxy's first request may spend building its own resources inline (when a drain
# task runs), so it usually gets them in its first response.
CONNECT_BUDGET = 0.015


class MeshController:
    def __init__(
        self,
        store: MeshStore,
        cache: ResourceCache,
        settings: ScopeSettings | None = None,
        security: SecuritySettings | None = None,
        *,
        collector: Collector | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.settings = settings or ScopeSettings()
        self.index = ModelIndex(security)
        self.published = Published()
        outputs = ServiceOutputs()
        self.registry = ProxyRegistry(outputs)
        # id(stream's VerifiedProxy) -> (that object, the key it holds instead of its claim's).
        # The object is held, so its id cannot be reused before release() pops it; the key
        # is remembered because the model may have changed by then.
        self._stranger_streams: dict[int, tuple[VerifiedProxy, ProxyKey]] = {}
        mtls = self.index.security.settings.mtls
        self.scopes = ScopeBuilder(self.index, outputs, self.registry, self.published, self.settings)
        self.proxy_builder = ProxyBuilder(
            self.registry, self.scopes, self.published, self.index.security.settings.trust_domain, mtls
        )
        # Without mTLS a service's clusters say nothing about its servers: no such builder.
        security_builders = [ClusterSecurityBuilder(outputs, mtls)] if mtls else []
        self.orchestrator = Orchestrator(self.index, cache, [
            *security_builders,
            ClustersBuilder(outputs, self.published),
            AssignmentsBuilder(mtls),
            ProxylessClustersBuilder(outputs, self.published),
            VirtualHostsBuilder(outputs),
            ProxylessVirtualHostsBuilder(outputs),
            PodIpsBuilder(outputs, mtls),
            CaptureBuilder(outputs, self.published),
            self.scopes,
            self.proxy_builder,
        ], hold=lambda: store.syncing, collector=collector)
        store.add_listener(self.orchestrator.submit)
        self.orchestrator.submit([
            ObjectChange((kind, namespace, name), None, obj)
            for kind in KINDS for (namespace, name), obj in store.all(kind).items()
        ])

    @property
    def translations(self) -> int:
        """Builder calls so far, for tests and benchmarks of incrementality."""
        return self.orchestrator.translations

    # The view provider --------------------------------------------------------------------------

    def view_for(self, verified: VerifiedProxy) -> ProxyView:
        """The server calls this on a stream's first request (see XdsServer `view_for`).

        Pod-scoped config goes only to a stream that proves that pod (model/identity.py
        `proves_pod`); another stream claiming it gets a key of its own, as does one whose
        identity differs from the streams already holding that key."""
        key = self._key_of(verified)
        claim = verified.claim
        if key != claim.key:
            self._stranger_streams[id(verified)] = (verified, key)
            claim = dataclasses.replace(claim, pod=key[1])
        proxy, deps = self.registry.connect(claim, verified.proof)
        if deps:
            self.orchestrator.emit(deps)
            self._build_inline()
        view = ProxylessView if proxy.proxyless else ProxyView
        return view(self.cache, self.published, proxy.key)

    def _key_of(self, verified: VerifiedProxy) -> ProxyKey:
        claim, proof = verified.claim, verified.proof
        if proof is None:
            return claim.key
        known = self.index.workloads.get(claim.key)
        proven = proves_pod(proof, claim, known.service_account if known else None, known.ip if known else "")
        held = self.registry.proxies.get(claim.key)
        if proven and (held is None or identity_key(held.proof) == identity_key(proof)):
            return claim.key
        return stranger_key(claim, proof)

    def pod_of(self, namespace: str, pod: str) -> tuple[str, str] | None:
        """A pod the mesh knows: (its service account, its IP); None otherwise. The stream
        guard verifies claimed pods with it (xds/auth.py `PodLookup`)."""
        known = self.index.workloads.get((namespace, pod))
        return (known.service_account, known.ip) if known is not None else None

    def release(self, verified: VerifiedProxy) -> None:
        """A stream ended; the last stream of a proxy takes its own resources with it."""
        held = self._stranger_streams.pop(id(verified), None)
        key = held[1] if held is not None and held[0] is verified else verified.key
        deps = self.registry.disconnect(key)
        if deps:
            self.orchestrator.emit(deps)

    # Driving --------------------------------------------------------------------------------

    def _build_inline(self) -> None:
        if self.orchestrator.running:  # else `emit` has built everything already
            self.orchestrator.step(time.perf_counter() + CONNECT_BUDGET)

    def start(self) -> asyncio.Task[None]:
        """From now on, work in a time-sliced task of the running loop."""
        return self.orchestrator.start()

    async def settled(self) -> None:
        """Wait until every change so far is in the cache."""
        await self.orchestrator.settled()

    async def stop(self) -> None:
        await self.orchestrator.stop()
