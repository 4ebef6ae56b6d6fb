"""Incremental translation gives exactly what a from-scratch build gives.

The controller updates scopes (which services each namespace's proxies see, their clusters,
their route configuration) one changed object at a time. After every step of a seeded random
sequence of changes (services added, removed, re-exported, re-ported; namespaces moved between
tenants; routes and policies added, changed, removed; endpoints changed), every resource in
its cache must equal, byte for byte, what a fresh controller builds from the same store with
the same proxies connected, and each proxy's view must admit the same resources.

The batched variant applies several random changes at once (one `MeshStore.sync`), including
NetworkPolicies and the pod labels and service accounts their peers match, mTLS and
authorization policies (some in the root namespace, which select every proxy),
namespaces deleted and re-created, and proxies (sidecars and proxyless gRPC) connecting and
leaving; it runs synchronously and through the time-sliced drain task with a tiny budget
(hundreds of slices per batch), where a checker looks at the cache at every event-loop turn:
no route configuration may name a cluster the cache does not hold, and no EDS cluster may lack
its assignment (make-before-break: a batch is published whole).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2

from tests.support.proxies import verified
from xds_server.model.mesh import (
    AppProtocol,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Namespace,
    Service,
    ServiceKey,
    ServicePort,
    Workload,
)
from xds_server.model.netpol import IpBlock, LabelSelector, NetworkPolicy, Peer, PolicyPort, PolicyRule
from xds_server.model.policy import TrafficPolicy
from xds_server.model.routes import BackendRef, Mirror, ParentRef, Route, RouteRule
from xds_server.model.security import (
    AuthorizationPolicy,
    MTLSPolicy,
    SecuritySettings,
)
from xds_server.model.store import HTTP_ROUTE, KINDS, MeshStore, key_of
from xds_server.sources.policies import (
    parse_authorization_policy_spec,
    parse_mtls_policy_spec,
    parse_traffic_policy_spec,
)
from xds_server.translate import scopes
from xds_server.translate.controller import MeshController, proxy_resources
from xds_server.translate.routes import INVALID_BACKEND_CLUSTER
from xds_server.translate.scope import TENANT_LABEL
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache

NAMESPACES = ("a", "b", "c")
ROOT = "xds-system"  # SecuritySettings' default root namespace
SOURCE = "test"
MTLS = SecuritySettings(mtls=True)




def node(namespace: str, pod: str) -> base_pb2.Node:
    n = base_pb2.Node(id=f"{pod}.{namespace}")
    n.metadata.update({"namespace": namespace, "pod": pod, "pod_ip": f"10.9.{NAMESPACES.index(namespace)}.1"})
    return n


class World:
    """A random mesh kept in a store, with proxies connected to an incremental controller."""

    def __init__(self, seed: int, security: SecuritySettings | None = None, batched: bool = False) -> None:
        self.rng = random.Random(seed)
        self.store = MeshStore()
        self.cache = ResourceCache()
        self.security = security
        # Batched: steps write to `model`, and `commit` hands all of it to the store at once.
        self.model = MeshStore() if batched else self.store
        self.controller = MeshController(self.store, self.cache, security=security)
        self.nodes = [node(ns, f"client-{ns}") for ns in NAMESPACES]
        self.extra: dict[str, base_pb2.Node] = {}  # proxies connected by steps, by node id
        for n in self.nodes:
            self.controller.view_for(verified(n))
        for ns in NAMESPACES:
            self.model.put(SOURCE, Namespace(ns))
        for i in range(12):
            self.add_service(i)
        self.commit()

    def commit(self) -> None:
        if self.model is not self.store:
            self.store.sync(SOURCE, [o for kind in KINDS for o in self.model.all(kind).values()])

    def connected(self) -> list[base_pb2.Node]:
        return self.nodes + [self.extra[k] for k in sorted(self.extra)]

    def service_keys(self) -> list[ServiceKey]:
        return sorted(ServiceKey(ns, name) for ns, name in self.model.all("Service"))

    def add_service(self, i: int) -> None:
        ns = self.rng.choice(NAMESPACES)
        ports = [ServicePort(80, "http", 8080, AppProtocol.HTTP)]
        if self.rng.random() < 0.3:
            ports.append(ServicePort(9090, "grpc", 9090, AppProtocol.GRPC))
        export = self.rng.choice([None, None, ("*",), (".",), ("b",)])
        service = Service(ns, f"svc-{i}", tuple(ports), cluster_ip=f"10.0.0.{i}", export_to=export)
        self.model.put(SOURCE, service)
        pods = [
            Workload(ns, f"svc-{i}-{j}", ip=f"10.1.{i}.{j}", meshed=True,
                     container_ports=(("http", 8080), ("grpc", 9090)))
            for j in range(2)
        ]
        for pod in pods:
            self.model.put(SOURCE, pod)
        self.model.put(SOURCE, EndpointSlice(
            ns, f"svc-{i}-x", f"svc-{i}",
            (EndpointPort("http", 8080, AppProtocol.HTTP), EndpointPort("grpc", 9090, AppProtocol.GRPC)),
            tuple(Endpoint(p.ip, pod=p.name, zone="z") for p in pods),
        ))

    def step(self, i: int) -> str:
        rng = self.rng
        keys = self.service_keys()
        action = rng.choice([
            "add", "remove", "export", "ports", "tenant", "route", "route", "unroute",
            "policy", "unpolicy", "endpoint",
        ])
        if action == "add" or not keys:
            self.add_service(100 + i)
            return "add"
        key = rng.choice(keys)
        service = self.model.get("Service", key.namespace, key.name)
        if action == "remove":
            self.model.remove(SOURCE, key_of(service))
        elif action == "export":
            self.model.put(SOURCE, dataclasses.replace(
                service, export_to=rng.choice([None, ("*",), (".",), ("a", "c")])))
        elif action == "ports":
            ports = list(service.ports)
            if len(ports) > 1:
                ports.pop()
            else:
                ports.append(ServicePort(9090, "grpc", 9090, AppProtocol.GRPC))
            self.model.put(SOURCE, dataclasses.replace(service, ports=tuple(ports)))
        elif action == "tenant":
            ns = rng.choice(NAMESPACES)
            labels = rng.choice([(), ((TENANT_LABEL, "t1"),), ((TENANT_LABEL, "t2"),)])
            self.model.put(SOURCE, Namespace(ns, labels))
        elif action == "route":
            same_ns = [k for k in keys if k.namespace == key.namespace]
            other = rng.choice(same_ns + [ServiceKey(key.namespace, "missing")])
            rule = RouteRule(
                backends=(BackendRef(key, 80, rng.randint(1, 9)), BackendRef(other, 80, 1)),
                mirrors=(Mirror(BackendRef(rng.choice(same_ns), 80)),) if rng.random() < 0.3 else (),
            )
            self.model.put(SOURCE, Route(HTTP_ROUTE, key.namespace, f"route-{rng.randint(0, 5)}",
                                         parents=(ParentRef(key, None),), rules=(rule,)))
        elif action == "unroute":
            routes = list(self.model.all(HTTP_ROUTE))
            if routes:
                ns, name = rng.choice(routes)
                self.model.remove(SOURCE, (HTTP_ROUTE, ns, name))
        elif action == "policy":
            spec = parse_traffic_policy_spec({
                "targetRef": {"name": key.name},
                "loadBalancer": {"simple": rng.choice(["ROUND_ROBIN", "RANDOM"])},
                "timeout": f"{rng.randint(1, 5)}s",
            })
            # Up to two policies per service: the older one applies.
            self.model.put(SOURCE, TrafficPolicy(
                namespace=key.namespace, name=f"p{rng.randint(0, 1)}-{key.name}", spec=spec,
                created=f"2026-01-0{rng.randint(1, 9)}T00:00:00Z",
            ))
        elif action == "unpolicy":
            policies = list(self.model.all("TrafficPolicy"))
            if policies:
                ns, name = rng.choice(policies)
                self.model.remove(SOURCE, ("TrafficPolicy", ns, name))
        elif action == "endpoint":
            for (ns, _name), s in self.model.all("EndpointSlice").items():
                if s.service == key.name and ns == key.namespace:
                    eps = tuple(dataclasses.replace(e, ready=not e.ready) if k == 0 else e
                                for k, e in enumerate(s.endpoints))
                    self.model.put(SOURCE, dataclasses.replace(s, endpoints=eps))
        return action

    def batch_step(self, i: int) -> str:
        """One more change of a batched world: any `step`, or security policies, namespaces
        and proxies."""
        rng = self.rng
        action = rng.choice(["step", "step", "step", "mtls", "authz", "unpolicy", "namespace",
                             "connect", "connect", "leave", "netpol", "netpol", "unnetpol", "label"])
        if action == "step":
            return self.step(i)
        if action == "netpol":
            self.model.put(SOURCE, random_network_policy(rng))
        elif action == "unnetpol":
            keys = sorted(self.model.all("NetworkPolicy"))
            if keys:
                self.model.remove(SOURCE, ("NetworkPolicy", *rng.choice(keys)))
        elif action == "label":
            # A pod's labels and service account: what NetworkPolicy peers resolve to.
            pods = sorted(self.model.all("Pod"))
            if pods:
                pod = self.model.get("Pod", *rng.choice(pods))
                self.model.put(SOURCE, dataclasses.replace(
                    pod, labels=rng.choice([(), (("app", "x"),), (("app", "y"),)]),
                    service_account=rng.choice(["default", "sa1"]),
                ))
        if action == "mtls":
            spec = parse_mtls_policy_spec({"mode": rng.choice(["STRICT", "PERMISSIVE", "DISABLE"])})
            ns = rng.choice((*NAMESPACES, ROOT))
            self.model.put(SOURCE, MTLSPolicy(namespace=ns, name=f"m{rng.randint(0, 1)}", spec=spec))
        elif action == "authz":
            spec = parse_authorization_policy_spec({
                "action": rng.choice(["ALLOW", "DENY"]),
                "rules": [rng.choice([{}, {"from": [{"source": {"namespaces": ["a"]}}]}])],
            })
            ns = rng.choice((*NAMESPACES, ROOT))
            self.model.put(SOURCE, AuthorizationPolicy(namespace=ns, name=f"z{rng.randint(0, 1)}", spec=spec))
        elif action == "unpolicy":
            kind = rng.choice(["MTLSPolicy", "AuthorizationPolicy"])
            keys = sorted(self.model.all(kind))
            if keys:
                self.model.remove(SOURCE, (kind, *rng.choice(keys)))
        elif action == "namespace":
            ns = rng.choice(NAMESPACES)
            if self.model.get("Namespace", "", ns) is not None:
                self.model.remove(SOURCE, ("Namespace", "", ns))
            else:
                self.model.put(SOURCE, Namespace(ns))
        elif action == "connect":
            pods = sorted(self.model.all("Pod"))
            if pods:
                ns, name = rng.choice(pods)
                pod = self.model.get("Pod", ns, name)
                n = base_pb2.Node(id=f"{name}.{ns}")
                n.metadata.update({"namespace": ns, "pod": name, "pod_ip": pod.ip})
                if rng.random() < 0.3:
                    n.user_agent_name = "gRPC Python"  # a proxyless gRPC server
                if n.id not in self.extra:
                    self.extra[n.id] = n
                    self.controller.view_for(verified(n))
        elif action == "leave" and self.extra:
            n = self.extra.pop(rng.choice(sorted(self.extra)))
            self.controller.release(verified(n))
        return action


def random_network_policy(rng: random.Random) -> NetworkPolicy:
    """A NetworkPolicy by pod labels, namespace labels (tenant) or addresses, for either or
    both directions, with or without rules (default deny)."""
    def selector() -> LabelSelector:
        return rng.choice([LabelSelector(), LabelSelector((("app", "x"),)), LabelSelector((("app", "y"),))])

    def peer() -> Peer:
        return rng.choice([
            Peer(pod_selector=selector()),
            Peer(namespace_selector=LabelSelector(((TENANT_LABEL, "t1"),)), pod_selector=selector()),
            Peer(ip_block=IpBlock("10.1.0.0/16", ("10.1.3.0/24",))),
        ])

    def rules() -> tuple[PolicyRule, ...]:
        return tuple(
            PolicyRule(peers=tuple(peer() for _ in range(rng.randint(0, 2))),
                       ports=rng.choice([(), (PolicyPort(port=8080),), (PolicyPort(port="grpc"),)]))
            for _ in range(rng.randint(0, 2))
        )

    return NetworkPolicy(
        namespace=rng.choice(NAMESPACES), name=f"np{rng.randint(0, 1)}", pod_selector=selector(),
        policy_types=rng.choice([frozenset({"Ingress"}), frozenset({"Egress"}), frozenset({"Ingress", "Egress"})]),
        ingress=rules(), egress=rules(),
    )


def snapshot(controller: MeshController, cache: ResourceCache, nodes: list[base_pb2.Node]) -> tuple:
    everything = {
        (t, name): r.body for t in cache.type_urls() for name, r in cache.resources(t).items()
    }
    views = {}
    for n in nodes:
        view = controller.view_for(verified(n))
        views[n.id] = {t: sorted((r.name, r.version) for r in rs) for t, rs in proxy_resources(view).items()}
        controller.release(verified(n))
    return everything, views


def assert_equals_fresh_build(world: World, label: str) -> None:
    fresh_store, fresh_cache = MeshStore(), ResourceCache()
    fresh_store.sync(SOURCE, [obj for kind in KINDS for obj in world.store.all(kind).values()])
    fresh = MeshController(fresh_store, fresh_cache, security=world.security)
    nodes = world.connected()
    for n in nodes:
        fresh.view_for(verified(n))
    got = snapshot(world.controller, world.cache, nodes)
    want = snapshot(fresh, fresh_cache, nodes)
    assert got[1] == want[1], f"{label}: views differ"
    assert sorted(got[0]) == sorted(want[0]), f"{label}: names differ"
    diff = [k for k in got[0] if got[0][k] != want[0][k]]
    assert not diff, f"{label}: content differs for {diff[:5]}"


def broken_references(cache: ResourceCache) -> list[str]:
    """What a proxy could be handed that points at nothing: a route to a cluster the cache
    does not hold, an EDS cluster without its assignment."""
    clusters = cache.resources(types.CLUSTER)
    out = []
    for name, resource in cache.resources(types.ROUTE).items():
        if not name.startswith("outbound|"):
            continue
        config = resource.unpack(route_pb2.RouteConfiguration)
        for vhost in config.virtual_hosts:
            for route in vhost.routes:
                action = route.route
                named = [action.cluster] if action.cluster else []
                named += [c.name for c in action.weighted_clusters.clusters]
                named += [m.cluster for m in action.request_mirror_policies]
                out += [f"{name} -> {c}" for c in named if c != INVALID_BACKEND_CLUSTER and c not in clusters]
    for name, resource in clusters.items():
        if resource.warms_with and cache.get(types.ENDPOINT, resource.warms_with) is None:
            out.append(f"cluster {name} without its assignment")
    return out


@pytest.mark.parametrize("seed", range(6))
def test_incremental_updates_equal_a_fresh_build(seed: int) -> None:
    world = World(seed)
    for i in range(60):
        action = world.step(i)
        assert_equals_fresh_build(world, f"seed {seed}, step {i} ({action})")


@pytest.mark.parametrize("seed", range(4))
def test_batched_updates_equal_a_fresh_build(seed: int) -> None:
    world = World(seed, security=MTLS, batched=True)
    for i in range(30):
        actions = [world.batch_step(i * 10 + k) for k in range(world.rng.randint(1, 8))]
        world.commit()
        assert_equals_fresh_build(world, f"seed {seed}, batch {i} {actions}")


@pytest.mark.parametrize("seed", range(4))
async def test_time_sliced_batches_equal_a_fresh_build(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Whole scope recomputations in slices of two services: changes land between slices.
    monkeypatch.setattr(scopes, "RESCAN_CHUNK", 2)
    world = World(seed, security=MTLS, batched=True)
    controller = world.controller
    controller.start()
    controller.orchestrator.budget = 0.0001  # a slice per output or so: hundreds per batch
    broken: list[str] = []
    turns = 0

    async def check_every_turn() -> None:
        nonlocal turns
        while True:
            broken.extend(broken_references(world.cache))
            turns += 1
            await asyncio.sleep(0)

    checker = asyncio.create_task(check_every_turn())
    try:
        for i in range(20):
            actions = [world.batch_step(i * 10 + k) for k in range(world.rng.randint(1, 8))]
            world.commit()  # queued: the drain task builds it in slices
            if i % 3 == 0:
                world.commit()  # a second batch on top of one being drained
            await controller.settled()
            assert not broken, f"seed {seed}, batch {i} {actions}: {broken[:5]}"
            assert_equals_fresh_build(world, f"seed {seed}, batch {i} {actions}")
    finally:
        checker.cancel()
        await controller.stop()
    assert turns > 100, "the drain never yielded to the loop"


@pytest.mark.parametrize("seed", range(3))
async def test_sliced_store_syncs_reach_the_cache_whole(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source's sync in slices (`MeshStore.sync_in_slices`) is built while it runs, but the
    cache changes only once the store holds the whole new set; the result equals a fresh build."""
    monkeypatch.setattr(scopes, "RESCAN_CHUNK", 2)
    world = World(seed, security=MTLS, batched=True)
    controller = world.controller
    controller.start()
    controller.orchestrator.budget = 0.0001
    written_mid_sync: list[str] = []
    world.cache.add_listener(
        lambda change: written_mid_sync.append(change.type_url) if world.store.syncing else None
    )
    try:
        for i in range(12):
            actions = [world.batch_step(i * 10 + k) for k in range(world.rng.randint(1, 8))]
            objects = [o for kind in KINDS for o in world.model.all(kind).values()]
            await world.store.sync_in_slices(SOURCE, objects, chunk=3)
            await controller.settled()
            assert not written_mid_sync, f"seed {seed}, batch {i} {actions}: {written_mid_sync[:5]}"
            assert not broken_references(world.cache), f"seed {seed}, batch {i} {actions}"
            assert_equals_fresh_build(world, f"seed {seed}, batch {i} {actions}")
    finally:
        await controller.stop()
