"""Incremental translation gives exactly what a from-scratch build gives.

The controller updates scopes (which services each namespace's proxies see, their clusters,
their route configuration) one changed object at a time. After every step of a seeded random
sequence of changes (services added, removed, re-exported, re-ported; namespaces moved between
tenants; routes and policies added, changed, removed; endpoints changed), every resource in
its cache must equal, byte for byte, what a fresh controller builds from the same store with
the same proxies connected, and each proxy's view must admit the same resources.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from envoy.config.core.v3 import base_pb2

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
from xds_server.model.policy import TrafficPolicy, TrafficPolicySpec
from xds_server.model.routes import BackendRef, Mirror, ParentRef, Route, RouteRule
from xds_server.model.store import HTTP_ROUTE, KINDS, MeshStore, key_of
from xds_server.model.identity import VerifiedProxy
from xds_server.translate.controller import MeshController, proxy_resources
from xds_server.xds.node import proxy_claim
from xds_server.translate.scope import TENANT_LABEL
from xds_server.xds.cache import ResourceCache

NAMESPACES = ("a", "b", "c")
SOURCE = "test"


def verified(node: base_pb2.Node) -> VerifiedProxy:
    """The proxy a node claims to be, as the server hands it to the view provider."""
    return VerifiedProxy.unverified(proxy_claim(node))



def node(namespace: str, pod: str) -> base_pb2.Node:
    n = base_pb2.Node(id=f"{pod}.{namespace}")
    n.metadata.update({"namespace": namespace, "pod": pod, "pod_ip": f"10.9.{NAMESPACES.index(namespace)}.1"})
    return n


class World:
    """A random mesh kept in a store, with proxies connected to an incremental controller."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.store = MeshStore()
        self.cache = ResourceCache()
        self.controller = MeshController(self.store, self.cache)
        self.nodes = [node(ns, f"client-{ns}") for ns in NAMESPACES]
        for n in self.nodes:
            self.controller.view_for(verified(n))
        for ns in NAMESPACES:
            self.store.put(SOURCE, Namespace(ns))
        for i in range(12):
            self.add_service(i)

    def service_keys(self) -> list[ServiceKey]:
        return sorted(ServiceKey(ns, name) for ns, name in self.store.all("Service"))

    def add_service(self, i: int) -> None:
        ns = self.rng.choice(NAMESPACES)
        ports = [ServicePort(80, "http", 8080, AppProtocol.HTTP)]
        if self.rng.random() < 0.3:
            ports.append(ServicePort(9090, "grpc", 9090, AppProtocol.GRPC))
        export = self.rng.choice([None, None, ("*",), (".",), ("b",)])
        service = Service(ns, f"svc-{i}", tuple(ports), cluster_ip=f"10.0.0.{i}", export_to=export)
        self.store.put(SOURCE, service)
        pods = [
            Workload(ns, f"svc-{i}-{j}", ip=f"10.1.{i}.{j}", meshed=True,
                     container_ports=(("http", 8080), ("grpc", 9090)))
            for j in range(2)
        ]
        for pod in pods:
            self.store.put(SOURCE, pod)
        self.store.put(SOURCE, EndpointSlice(
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
        service = self.store.get("Service", key.namespace, key.name)
        if action == "remove":
            self.store.remove(SOURCE, key_of(service))
        elif action == "export":
            self.store.put(SOURCE, dataclasses.replace(
                service, export_to=rng.choice([None, ("*",), (".",), ("a", "c")])))
        elif action == "ports":
            ports = list(service.ports)
            if len(ports) > 1:
                ports.pop()
            else:
                ports.append(ServicePort(9090, "grpc", 9090, AppProtocol.GRPC))
            self.store.put(SOURCE, dataclasses.replace(service, ports=tuple(ports)))
        elif action == "tenant":
            ns = rng.choice(NAMESPACES)
            labels = rng.choice([(), ((TENANT_LABEL, "t1"),), ((TENANT_LABEL, "t2"),)])
            self.store.put(SOURCE, Namespace(ns, labels))
        elif action == "route":
            same_ns = [k for k in keys if k.namespace == key.namespace]
            other = rng.choice(same_ns + [ServiceKey(key.namespace, "missing")])
            rule = RouteRule(
                backends=(BackendRef(key, 80, rng.randint(1, 9)), BackendRef(other, 80, 1)),
                mirrors=(Mirror(BackendRef(rng.choice(same_ns), 80)),) if rng.random() < 0.3 else (),
            )
            self.store.put(SOURCE, Route(HTTP_ROUTE, key.namespace, f"route-{rng.randint(0, 5)}",
                                         parents=(ParentRef(key, None),), rules=(rule,)))
        elif action == "unroute":
            routes = list(self.store.all(HTTP_ROUTE))
            if routes:
                ns, name = rng.choice(routes)
                self.store.remove(SOURCE, (HTTP_ROUTE, ns, name))
        elif action == "policy":
            spec = TrafficPolicySpec.model_validate({
                "targetRef": {"name": key.name},
                "loadBalancer": {"simple": rng.choice(["ROUND_ROBIN", "RANDOM"])},
                "timeout": f"{rng.randint(1, 5)}s",
            })
            # Up to two policies per service: the older one applies.
            self.store.put(SOURCE, TrafficPolicy(
                namespace=key.namespace, name=f"p{rng.randint(0, 1)}-{key.name}", spec=spec,
                created=f"2026-01-0{rng.randint(1, 9)}T00:00:00Z",
            ))
        elif action == "unpolicy":
            policies = list(self.store.all("TrafficPolicy"))
            if policies:
                ns, name = rng.choice(policies)
                self.store.remove(SOURCE, ("TrafficPolicy", ns, name))
        elif action == "endpoint":
            for (ns, name), s in self.store.all("EndpointSlice").items():
                if s.service == key.name and ns == key.namespace:
                    eps = tuple(dataclasses.replace(e, ready=not e.ready) if k == 0 else e
                                for k, e in enumerate(s.endpoints))
                    self.store.put(SOURCE, dataclasses.replace(s, endpoints=eps))
        return action


def snapshot(controller: MeshController, cache: ResourceCache, nodes: list[base_pb2.Node]) -> tuple:
    everything = {
        (t, name): r.body for t in cache.type_urls() for name, r in cache.resources(t).items()
    }
    views = {}
    for n in nodes:
        view = controller.view_for(verified(n))
        views[n.id] = {t: [r.name for r in rs] for t, rs in proxy_resources(view).items()}
        controller.release(verified(n))
    return everything, views


@pytest.mark.parametrize("seed", range(6))
def test_incremental_updates_equal_a_fresh_build(seed: int) -> None:
    world = World(seed)
    for i in range(60):
        action = world.step(i)
        fresh_store, fresh_cache = MeshStore(), ResourceCache()
        fresh_store.sync(SOURCE, [obj for kind in KINDS for obj in world.store.all(kind).values()])
        fresh = MeshController(fresh_store, fresh_cache)
        for n in world.nodes:
            fresh.view_for(verified(n))
        got = snapshot(world.controller, world.cache, world.nodes)
        want = snapshot(fresh, fresh_cache, world.nodes)
        assert got[1] == want[1], f"seed {seed}, step {i} ({action}): views differ"
        assert sorted(got[0]) == sorted(want[0]), f"seed {seed}, step {i} ({action}): names differ"
        diff = [k for k in got[0] if got[0][k] != want[0][k]]
        assert not diff, f"seed {seed}, step {i} ({action}): content differs for {diff[:5]}"
