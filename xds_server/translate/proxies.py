"""Connected proxies: the registry (who is connected, with how many streams) and the builder
of each proxy's own resources (its listeners, inbound clusters and inbound routes).

A proxy is registered by `(namespace, pod)` from its verified claim (model/identity.py). Its
first stream registers it (and its namespace's scope); its last stream takes its own
resources with it. What a proxy's build reads (its Pod, the services it backs, the mTLS and
authorization policies that may select it, its scope) is recorded like any other output's.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message

from ..model.identity import Proof, ProxyClaim, proves_pod
from ..model.netpol import Enforcement
from ..model.mesh import OUTBOUND_PORT, AppProtocol, Service, ServiceKey, ServicePort, Workload
from ..xds import types
from ..xds.resource import Resource
from . import capture, names, netpol, proxyless
from .batch import Batch
from .clusters import inbound_cluster
from .dependencies import Parts
from .endpoints import slice_port
from .index import Dep
from .listeners import inbound_listener, outbound_listener, tcp_upstream_listener
from .orchestrator import Built
from .rbac import PortAuthz
from .reads import Reader
from .routes import inbound_route_configuration
from .scopes import ScopeBuilder
from .security import plaintext_route_name, secure_inbound_routes
from .service_outputs import ServiceOutputs
from .views import Published, ProxyKey

log = logging.getLogger(__name__)

AppPort = tuple[int, AppProtocol, Service, ServicePort]  # (port, protocol, service, service port)
# The name a stranger's workload gets: no pod has it (a `~` is not in any Kubernetes name),
# so it backs no service and has no inbound side.
STRANGER = "~stranger"


@dataclass
class Proxy:
    key: ProxyKey
    claim: ProxyClaim
    proof: Proof | None = None  # what its first stream proved (every stream of a key proves the same)
    streams: int = 0

    @property
    def proxyless(self) -> bool:
        """A gRPC xDS client/server, not an Envoy (translate/proxyless.py)."""
        return self.claim.proxyless


class ProxyRegistry:
    def __init__(self, outputs: ServiceOutputs) -> None:
        self._outputs = outputs
        self.proxies: dict[ProxyKey, Proxy] = {}
        self._per_namespace: dict[str, int] = {}
        self._proxyless = 0
        self._capture = 0

    def proxies_in(self, namespace: str) -> int:
        return self._per_namespace.get(namespace, 0)

    def connect(self, claim: ProxyClaim, proof: Proof | None = None) -> tuple[Proxy, set[Dep]]:
        """A stream opened; returns the proxy and what its arrival changed. `claim.key` is the
        proxy's key: the caller gives a stream that does not prove its pod a key of its own
        (`stranger_key`), so it never shares a proven pod's resources."""
        proxy = self.proxies.get(claim.key)
        deps: set[Dep] = set()
        if proxy is None:
            proxy = self.proxies[claim.key] = Proxy(claim.key, claim, proof)
            deps.add(("proxy", claim.key))
            count = self._per_namespace[claim.namespace] = self.proxies_in(claim.namespace) + 1
            if count == 1:
                deps.add(("scope", claim.namespace))
            if proxy.proxyless:
                self._proxyless += 1
                if self._proxyless == 1:
                    self._outputs.proxyless_connected = True
                    deps.add(("proxyless-connected",))
            elif claim.capture:
                self._capture += 1
                if self._capture == 1:
                    self._outputs.capture_connected = True
                    deps.add(("capture-connected",))
        proxy.streams += 1
        return proxy, deps

    def disconnect(self, key: ProxyKey) -> set[Dep]:
        """A stream ended; the last one of a proxy unregisters it."""
        proxy = self.proxies.get(key)
        if proxy is None:
            return set()
        proxy.streams -= 1
        if proxy.streams > 0:
            return set()
        del self.proxies[key]
        deps: set[Dep] = {("proxy", key)}
        namespace = key[0]
        count = self._per_namespace[namespace] = self.proxies_in(namespace) - 1
        if count <= 0:
            del self._per_namespace[namespace]
            deps.add(("scope", namespace))
        if proxy.proxyless:
            self._proxyless -= 1
            if self._proxyless == 0:
                self._outputs.proxyless_connected = False
                deps.add(("proxyless-connected",))
        elif proxy.claim.capture:
            self._capture -= 1
            if self._capture == 0:
                self._outputs.capture_connected = False
                deps.add(("capture-connected",))
        return deps


def stranger_key(claim: ProxyClaim, proof: Proof) -> ProxyKey:
    """The key of a stream that claims a pod it does not prove: its own, named after what it
    proved, so it gets its namespace's shared config and nothing of that pod's."""
    return (claim.namespace, f"{claim.pod}~{proof.service_account}")


def identity_key(proof: Proof | None) -> tuple[str, ...]:
    return () if proof is None else (proof.namespace, proof.service_account, proof.pod)


class ProxyBuilder:
    kind, phase, family = "proxy", 4, "proxy"

    def __init__(
        self, registry: ProxyRegistry, scopes: ScopeBuilder, published: Published, trust_domain: str,
        mtls: bool = False,
    ) -> None:
        self.registry = registry
        self.scopes = scopes
        self.published = published
        self.trust_domain = trust_domain
        self.mtls = mtls
        self._owned: dict[ProxyKey, dict[str, set[str]]] = {}
        self._static_clusters = [
            Resource.from_message(c) for c in capture.static_clusters(trust_domain, mtls)
        ]

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built:
        assert isinstance(arg, tuple)
        key: ProxyKey = arg
        proxy = self.registry.proxies.get(key)
        if proxy is None:
            self._replace(key, {}, batch)
            self._publish_mode(key, False, False, batch)
            return Built(alive=False)
        # Whatever the proxy serves, the policies that may select it decide its inbound side.
        reader.selected_by_policies(key[0])
        captured = shared = False
        if proxy.proxyless:
            built = {types.LISTENER: self._proxyless_listeners(proxy, reader)}
        else:
            workload = self.workload_of(proxy, reader)
            # Explicit if the pod or the node says so (they agree when the injector wrote both).
            captured = workload.capture and proxy.claim.capture
            shared = captured and workload.outbound_port == OUTBOUND_PORT
            if captured:
                ingress, egress = reader.network_policy(workload)
                # A pod isolated for egress gets its own outbound listener (guarded chains).
                shared = shared and not egress.isolated
                built = self._capture_sidecar(proxy, workload, reader, ingress, egress)
                # The clusters its chains name: the same for every proxy, shared by name.
                batch.put(self._static_clusters)
            else:
                built = self._sidecar(proxy, reader)
        self._replace(key, built, batch)
        self._publish_mode(key, captured, shared, batch)
        return Built(translations=1)

    def _publish_mode(self, key: ProxyKey, captured: bool, shared: bool, batch: Batch) -> None:
        """Record whether the proxy is in capture mode and shares its namespace's outbound
        listener, which its view reads; a change makes its streams look at that listener
        again (no cache change announces it)."""
        published = self.published
        was_shared = key in published.shared_outbound
        if captured:
            batch.on_publish(lambda: published.capture_proxies.add(key))
        else:
            batch.on_publish(lambda: published.capture_proxies.discard(key))
        if shared != was_shared:
            batch.on_publish(lambda: (published.shared_outbound.add if shared else published.shared_outbound.discard)(key))
            batch.touch(types.LISTENER, [names.capture_outbound_listener_name(key[0])])

    # What a proxy is ----------------------------------------------------------------------------

    @staticmethod
    def workload_of(proxy: Proxy, reader: Reader) -> Workload:
        known = reader.pod(*proxy.key)
        if known is not None:
            if proves_pod(proxy.proof, proxy.claim, known.service_account, known.ip):
                return known
            # The pod appeared after the stream, and it is not this stream's: nothing of it.
            log.warning("a proxy claims a pod its credential does not prove: no pod-scoped config",
                        extra={"proxy": f"{proxy.key[0]}/{proxy.key[1]}", "proof": str(proxy.proof)})
            return Workload(namespace=proxy.key[0], name=STRANGER, meshed=True, capture=proxy.claim.capture)
        claim = proxy.claim
        # Not (yet) in the model: a VM or a test proxy; trust its declared ports and address.
        return Workload(
            namespace=claim.namespace,
            name=claim.pod,
            ip=claim.ip or "127.0.0.1",
            service_account=claim.service_account,
            labels=claim.labels,
            meshed=True,
            inbound_port=claim.inbound_port,
            outbound_port=claim.outbound_port,
            capture=claim.capture,
        )

    @staticmethod
    def app_ports(workload: Workload, reader: Reader) -> list[AppPort]:
        """Every (app port, protocol, service, service port) peers reach through this sidecar:
        all the Services and ports that select the pod, several of them on one app port if so,
        by app port, then service and port."""
        found: dict[tuple[int, str, str, int], AppPort] = {}
        for service, slices in reader.backed_by(workload.namespace, workload.name):
            for endpoint_slice in slices:
                for port in service.ports:
                    target = slice_port(port, endpoint_slice)
                    key = (target or 0, service.namespace, service.name, port.port)
                    if target is not None and key not in found:
                        found[key] = (target, port.app_protocol, service, port)
        return [found[k] for k in sorted(found)]

    @staticmethod
    def distinct_ports(entries: list[AppPort]) -> list[tuple[int, AppProtocol]]:
        """One (app port, protocol) per app port: the first service's protocol for it."""
        ports: dict[int, AppProtocol] = {}
        for port, protocol, _, _ in entries:
            ports.setdefault(port, protocol)
        return sorted(ports.items())

    # Builds ---------------------------------------------------------------------------------

    def _sidecar(self, proxy: Proxy, reader: Reader) -> dict[str, list[Message]]:
        workload = self.workload_of(proxy, reader)
        namespace, pod = proxy.key
        ip = workload.ip or "127.0.0.1"
        route_name = names.outbound_route_name(namespace)
        listeners: list[Message] = [
            outbound_listener(names.outbound_listener_name(namespace, pod), ip, workload.outbound_port, route_name)
        ]
        visible: set[ServiceKey] = set()
        if workload.tcp_upstreams:
            reader.derived("scope-services", namespace)
            visible = self.scopes.services_of(namespace)
        for upstream in workload.tcp_upstreams:
            service = reader.service(upstream.service)
            if service is None or upstream.service not in visible or service.port(upstream.port) is None:
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
        clusters: list[Message] = []
        routes: list[Message] = []
        entries = self.app_ports(workload, reader)
        if entries:
            ports = self.distinct_ports(entries)
            clusters = [inbound_cluster(namespace, pod, ip, p, proto) for p, proto in ports]
            http = [(p, proto) for p, proto in ports if proto.is_http]
            tcp = next((p for p, proto in ports if not proto.is_http), None)
            inbound_route = names.inbound_route_name(namespace, pod)
            policies = {
                s.key: spec for _, _, s, _ in entries if (spec := reader.policy(s.key)) is not None
            }
            # Every (Service, port) that selects the pod, its target resolved to the app port
            # the slices say: each gets its own domains, several on one app port if need be.
            backed = [(s, dataclasses.replace(sp, target_port=p)) for p, _, s, sp in entries]
            security = reader.inbound(workload, ports)
            routes.extend(secure_inbound_routes(
                inbound_route_configuration(inbound_route, http, backed, policies, namespace=namespace, pod=pod),
                security, namespace=namespace, pod=pod,
            ))
            listeners.append(inbound_listener(
                names.inbound_listener_name(namespace, pod), ip, workload.inbound_port, inbound_route,
                has_http=bool(http),
                tcp_cluster=names.inbound_cluster_name(tcp, namespace, pod) if tcp is not None else None,
                security=security,
                plaintext_route_name=plaintext_route_name(security, inbound_route, namespace, pod),
            ))
        return {types.CLUSTER: clusters, types.ROUTE: routes, types.LISTENER: listeners}

    def _capture_sidecar(
        self, proxy: Proxy, workload: Workload, reader: Reader,
        ingress: Enforcement, egress: Enforcement,
    ) -> dict[str, list[Any]]:
        """A sidecar whose pod's traffic is captured (translate/capture.py). Outbound, on the
        standard port, it shares its namespace's listener (scopes.py; its view admits it), so
        an endpoint change costs one listener per namespace, not one per proxy; on another
        port, its own copy (its head plus the namespace's chains). Inbound, the destination
        port picks the app port."""
        namespace, pod = proxy.key
        ip = workload.ip or "127.0.0.1"
        listeners: list[Any] = []
        egress_guard = netpol.egress_filter(egress)
        if workload.outbound_port != OUTBOUND_PORT or egress_guard is not None:
            reader.derived("capture-chains", namespace)
            head = capture.outbound_listener_head(
                names.outbound_listener_name(namespace, pod), workload.outbound_port,
                self.scopes.settings.outbound_traffic_policy, self.scopes.sniffed_ports(namespace),
            )
            chains = self.scopes.capture_chains(namespace)
            if egress_guard is not None:
                netpol.guard_listener(head, egress_guard)  # its default (passthrough) chain
                chains = netpol.guarded_chains(chains, egress_guard)
            listeners.append(Resource.from_bytes(
                types.LISTENER, head.name, capture.outbound_listener_bytes(head, chains)
            ))
        entries = self.app_ports(workload, reader)
        ports = self.distinct_ports(entries)
        clusters: list[Any] = [inbound_cluster(namespace, pod, ip, p, proto) for p, proto in ports]
        policies = {s.key: spec for _, _, s, _ in entries if (spec := reader.policy(s.key)) is not None}
        routes: list[Any] = []
        app_ports: list[capture.InboundPort] = []
        for port, protocol in ports:
            security = reader.inbound(workload, [(port, protocol)])
            mode = security.http_modes[port] if protocol.is_http else security.tcp_mode
            route_name = None
            if protocol.is_http:
                route_name = names.inbound_port_route_name(port, namespace, pod)
                backed = [(s, dataclasses.replace(sp, target_port=p)) for p, _, s, sp in entries if p == port]
                config = inbound_route_configuration(
                    route_name, [(port, protocol)], backed, policies, namespace=namespace, pod=pod
                )
                routes.extend(secure_inbound_routes(config, security, namespace=namespace, pod=pod)[:1])
            app_ports.append(capture.InboundPort(
                port=port, http=protocol.is_http, mode=mode, authz=security.authz.get(port, PortAuthz()),
                cluster=names.inbound_cluster_name(port, namespace, pod), route=route_name,
            ))
        # Ports no service names reach the app as they are, unless the workload is STRICT.
        passthrough = reader.mode(workload, None).accepts_plaintext
        inbound = capture.inbound_listener(
            names.inbound_listener_name(namespace, pod), workload.inbound_port, app_ports,
            self.trust_domain, passthrough,
        )
        ingress_guard = netpol.ingress_filter(ingress)
        if ingress_guard is not None:
            netpol.guard_listener(inbound, ingress_guard)
        listeners.append(inbound)
        return {types.CLUSTER: clusters, types.ROUTE: routes, types.LISTENER: listeners}

    def _proxyless_listeners(self, proxy: Proxy, reader: Reader) -> list[Message]:
        """An xDS-enabled gRPC server's listeners: one per app port (from the services it
        backs) and container port, with the port's mTLS mode and authorization."""
        workload = self.workload_of(proxy, reader)
        ports = {p for p, _, _, _ in self.app_ports(workload, reader)} | {p for _, p in workload.container_ports}
        grpc_ports = [(p, AppProtocol.GRPC) for p in sorted(ports)]
        security = reader.inbound(workload, grpc_ports)
        return [
            proxyless.server_listener(
                workload.ip or "127.0.0.1", port, security.http_modes[port], security.authz[port],
                self.trust_domain,
            )
            for port, _ in grpc_ports
        ]

    def _replace(self, key: ProxyKey, built: dict[str, list[Message]], batch: Batch) -> None:
        """Write the proxy's resources, removing those it no longer has."""
        owned = self._owned.setdefault(key, {})
        for type_url in (types.CLUSTER, types.ROUTE, types.LISTENER):
            resources = [
                m if isinstance(m, Resource) else Resource.from_message(m) for m in built.get(type_url, ())
            ]
            new = {r.name for r in resources}
            old = owned.get(type_url, set())
            batch.put(resources)
            batch.remove(type_url, old - new)
            owned[type_url] = new
        if not built:
            del self._owned[key]
        snapshot = {t: frozenset(n) for t, n in owned.items()}
        published = self.published

        def publish() -> None:
            before = published.owned.pop(key, {})
            for names_ in before.values():
                for name in names_:
                    if published.proxy_names.get(name) == key:
                        del published.proxy_names[name]
            if built:
                published.owned[key] = snapshot
                for names_ in snapshot.values():
                    for name in names_:
                        published.proxy_names[name] = key

        batch.on_publish(publish)
