"""The Kubernetes source against the fake API server, through the real `kubernetes` client.

What a user of a cluster sees: objects applied to the cluster reach the mesh, changes follow,
outages and compactions lose nothing, invalid policies are reported on the object itself,
only the elected replica writes status, and TokenReview answers are cached and fail closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.support.fake_apiserver import FakeApiServer
from xds_server.model.mesh import AppProtocol, Endpoint, Namespace, ServicePort
from xds_server.model.store import KINDS, MeshStore
from xds_server.sources.mesh_files import MeshDirectory
from xds_server.sources.kube_api import KubeApi, make_api_client
from xds_server.sources.kube_status import CONTROLLER_NAME
from xds_server.sources.kubernetes import KubernetesSource, KubeSettings
from xds_server.sources.leader import LeaderSettings
from xds_server.sources.tokenreview import TokenReviewer

pytestmark = pytest.mark.timeout(90)

LEASE_NAMESPACE = "xds-system"


def fast_settings(identity: str = "replica-a", **overrides: Any) -> KubeSettings:
    """Short timeouts so outages, expiries and elections play out in a test's time."""
    leader = LeaderSettings(namespace=LEASE_NAMESPACE, name="xds-server", identity=identity,
                            lease_duration=4.0, renew_deadline=3.0, retry_period=0.25)
    values: dict[str, Any] = dict(watch_timeout=5, backoff_initial=0.05, backoff_max=0.4,
                                  absent_recheck=0.3, leader=leader, status_retry=0.2)
    values.update(overrides)
    return KubeSettings(**values)


@pytest.fixture
def fake() -> FakeApiServer:
    with FakeApiServer(bookmark_interval=0.2) as server:
        server.create(namespace(LEASE_NAMESPACE))
        yield server


@pytest.fixture
def kubeconfig(fake: FakeApiServer, tmp_path: Path) -> Path:
    return fake.kubeconfig(tmp_path / "kubeconfig", user="replica-a")


@contextlib.asynccontextmanager
async def running(
    source: KubernetesSource, *, synced: bool = True
) -> AsyncIterator[KubernetesSource]:
    stop = asyncio.Event()
    task = asyncio.create_task(source.run(stop))
    try:
        if synced:
            await asyncio.wait_for(source.wait_synced(), 10)
        yield source
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        source.close()


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0,
                     message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate) if getattr(predicate, "_blocking", False) \
            else predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {message}")
        await asyncio.sleep(0.02)


def blocking(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Mark a predicate that calls the fake's control API (it blocks on the fake's thread)."""
    fn._blocking = True  # type: ignore[attr-defined]
    return fn


# Objects ----------------------------------------------------------------------------------------


def namespace(name: str, labels: dict[str, str] | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}}}


def service(ns: str, name: str, port: int = 80) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": ns},
            "spec": {"clusterIP": "10.96.0.10",
                     "ports": [{"name": "http", "port": port, "targetPort": 8080}]}}


def endpoint_slice(ns: str, name: str, svc: str, addresses: list[str], ready: bool = True) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addresses],
    }


def pod(ns: str, name: str, ip: str, account: str = "default") -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name},
                     "annotations": {"sidecar.xds-server.io/inject": "true"}},
        "spec": {"serviceAccountName": account,
                 "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip},
    }


def http_route(ns: str, name: str, parent: str, backends: list[str]) -> dict:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{"backendRefs": [{"name": b, "port": 80} for b in backends]}],
        },
    }


def traffic_policy(ns: str, name: str, target: str, **spec: Any) -> dict:
    return {
        "apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"targetRef": {"group": "", "kind": "Service", "name": target}, **spec},
    }


def accepted(obj: dict | None) -> dict | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Accepted":
            return cond
    return None


# The mesh follows the cluster -------------------------------------------------------------------


async def test_objects_created_in_the_api_reach_the_store(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop", {"tenant": "retail"}))
    fake.create(service("shop", "cart"))
    fake.create(endpoint_slice("shop", "cart-1", "cart", ["10.0.0.1"]))
    fake.create(pod("shop", "cart-0", "10.0.0.1", account="cart"))
    fake.create(http_route("shop", "cart-route", "cart", ["cart"]))
    fake.create(traffic_policy("shop", "cart-policy", "cart", timeout="2s"))
    store = MeshStore()
    source = KubernetesSource(store, kubeconfig, settings=fast_settings())
    assert not source.synced
    async with running(source):
        assert source.synced and store.synced("kubernetes")
        assert store.get("Namespace", "", "shop") == Namespace("shop", (("tenant", "retail"),))
        assert store.get("Service", "shop", "cart").ports == (
            ServicePort(80, "http", 8080, AppProtocol.HTTP),)
        assert store.get("EndpointSlice", "shop", "cart-1").endpoints == (Endpoint("10.0.0.1"),)
        assert store.get("Pod", "shop", "cart-0").service_account == "cart"
        assert store.get("HTTPRoute", "shop", "cart-route") is not None
        assert store.get("TrafficPolicy", "shop", "cart-policy").spec.timeout == 2.0

        # ... and objects created later arrive through the watch.
        fake.create(service("shop", "orders"))
        await eventually(lambda: store.get("Service", "shop", "orders"), message="new service")


async def test_nothing_reaches_the_store_until_every_kind_is_listed(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.fail(500, path="/trafficpolicies", method="GET")  # one kind cannot be listed yet
    store = MeshStore()
    changes: list = []
    store.add_listener(changes.extend)
    source = KubernetesSource(store, kubeconfig, settings=fast_settings())
    async with running(source, synced=False):
        await eventually(blocking(lambda: fake.requests(path="/trafficpolicies")),
                         message="a failed list")
        await asyncio.sleep(0.3)
        assert not source.synced and changes == [], "a partial state reached the store"
        fake.clear_faults()
        await asyncio.wait_for(source.wait_synced(), 10)
        assert store.get("Service", "shop", "cart") is not None


async def test_an_endpoint_slice_change_updates_the_store(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.create(endpoint_slice("shop", "cart-1", "cart", ["10.0.0.1"]))
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())):
        fake.update(endpoint_slice("shop", "cart-1", "cart", ["10.0.0.1", "10.0.0.2"]))
        await eventually(lambda: len(store.get("EndpointSlice", "shop", "cart-1").endpoints) == 2,
                         message="the second endpoint")
        fake.update(endpoint_slice("shop", "cart-1", "cart", ["10.0.0.2"], ready=False))
        await eventually(
            lambda: store.get("EndpointSlice", "shop", "cart-1").endpoints
            == (Endpoint("10.0.0.2", ready=False),), message="a not-ready endpoint")
        fake.delete("EndpointSlice", "shop", "cart-1")
        await eventually(lambda: store.get("EndpointSlice", "shop", "cart-1") is None,
                         message="the slice gone")


async def test_a_service_deleted_while_the_watch_is_down_is_gone_after_the_relist(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.create(service("shop", "legacy"))
    store = MeshStore()
    source = KubernetesSource(store, kubeconfig, settings=fast_settings())
    async with running(source):
        await asyncio.to_thread(fake.wait_for_watches, 1, "Service", user="replica-a")
        fake.go_down()
        fake.delete("Service", "shop", "legacy")  # deleted while we cannot see it...
        fake.create(service("shop", "orders"))
        fake.compact()  # ... and the history that would tell us is compacted away
        await asyncio.sleep(0.3)
        assert store.get("Service", "shop", "legacy") is not None  # last known state kept
        fake.come_up()
        await eventually(lambda: store.get("Service", "shop", "legacy") is None,
                         message="the deleted service removed")
        assert store.get("Service", "shop", "orders") is not None
        assert store.get("Service", "shop", "cart") is not None
        lists = [r for r in fake.requests(user="replica-a", method="GET", path="/api/v1/services")
                 if r.query.get("watch") != "true" and r.status == 200]
        assert len(lists) == 2, "the 410 did not lead to exactly one re-list"


async def test_an_unreachable_api_server_keeps_the_last_state_and_loses_nothing(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.create(endpoint_slice("shop", "cart-1", "cart", ["10.0.0.1"]))
    store = MeshStore()
    source = KubernetesSource(store, kubeconfig, settings=fast_settings())
    async with running(source):
        await asyncio.to_thread(fake.wait_for_watches, 1, "EndpointSlice", user="replica-a")
        before = dict(store.all("EndpointSlice"))
        with fake.down():
            fake.update(endpoint_slice("shop", "cart-1", "cart", ["10.0.0.1", "10.0.0.3"]))
            fake.create(service("shop", "orders"))
            await asyncio.sleep(1.0)  # several failed reconnects
            assert dict(store.all("EndpointSlice")) == before
            assert store.get("Service", "shop", "cart") is not None
            assert source.synced
        await eventually(lambda: len(store.get("EndpointSlice", "shop", "cart-1").endpoints) == 2,
                         message="the change made during the outage")
        await eventually(lambda: store.get("Service", "shop", "orders"), message="new service")
        # Resumed from the last resourceVersion, not re-listed: nothing was compacted.
        lists = [r for r in fake.requests(user="replica-a", path="/endpointslices")
                 if "watch" not in r.query and r.status == 200]
        assert len(lists) == 1


async def test_dropped_watch_connections_resume_without_losing_events(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())):
        for i in range(3):
            await asyncio.to_thread(fake.wait_for_watches, 1, "Service", user="replica-a")
            assert fake.drop_connections() > 0
            fake.create(service("shop", f"svc-{i}"))
        await eventually(lambda: len(store.all("Service")) == 3, message="three services")
    # Each broken watch resumed from where it broke: one list in all, no re-list.
    lists = [r for r in fake.requests(user="replica-a", path="/api/v1/services")
             if r.query.get("watch") != "true"]
    assert len(lists) == 1


def test_backoff_grows_with_jitter_up_to_its_cap_and_resets() -> None:
    from xds_server.sources.kubernetes import Backoff

    low, high = Backoff(1.0, 8.0, rand=lambda: 0.0), Backoff(1.0, 8.0, rand=lambda: 1.0)
    assert [low.next() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [high.next() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    high.reset()
    assert high.next() == 1.0


async def test_a_slow_api_server_still_syncs(fake: FakeApiServer, kubeconfig: Path) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.latency = 0.1
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())):
        fake.create(service("shop", "orders"))
        await eventually(lambda: store.get("Service", "shop", "orders"), message="new service")


async def test_the_namespace_selector_limits_the_mesh(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("meshed", {"mesh": "on"}))
    fake.create(namespace("other"))
    fake.create(service("meshed", "cart"))
    fake.create(service("other", "ledger"))
    store = MeshStore()
    source = KubernetesSource(store, kubeconfig, namespace_selector="mesh=on",
                              settings=fast_settings())
    async with running(source):
        assert set(store.all("Service")) == {("meshed", "cart")}
        assert set(store.all("Namespace")) == {("", "meshed")}
        # Labelling a namespace brings its objects in; unlabelling takes them out.
        fake.update(namespace("other", {"mesh": "on"}))
        await eventually(lambda: store.get("Service", "other", "ledger"), message="ledger in")
        fake.update(namespace("meshed", {"mesh": "off"}))
        await eventually(lambda: store.get("Service", "meshed", "cart") is None,
                         message="cart out")
        assert store.get("Namespace", "", "meshed") is None
    lists = fake.requests(user="replica-a", path="/api/v1/namespaces", method="GET")
    assert all(r.query.get("labelSelector") == "mesh=on" for r in lists
               if r.path == "/api/v1/namespaces")


async def test_a_missing_crd_counts_as_empty(fake: FakeApiServer, kubeconfig: Path) -> None:
    fake.uninstall("GRPCRoute")
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())) as source:
        assert source.synced and store.get("Service", "shop", "cart") is not None
        fake.install("GRPCRoute")  # installed later: picked up without a restart
        fake.create({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "rpc", "namespace": "shop"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "cart"}]},
        })
        await eventually(lambda: store.get("GRPCRoute", "shop", "rpc"), message="the GRPCRoute")


async def test_an_invalid_object_keeps_its_last_valid_version(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())) as source:
        broken = service("shop", "cart")
        broken["spec"]["ports"][0]["port"] = 70000
        fake.update(broken)
        await eventually(lambda: source.errors, message="the error")
        assert source.errors[0].field_path == "spec.ports[0].port"
        assert store.get("Service", "shop", "cart").ports[0].port == 80


# Status -----------------------------------------------------------------------------------------


async def test_an_invalid_traffic_policy_gets_an_invalid_condition_naming_the_field(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.create(service("shop", "orders"))
    fake.create(traffic_policy("shop", "good", "orders", timeout="3s"))
    fake.create(traffic_policy("shop", "bad", "cart",
                               retries={"attempts": 2, "retryOn": "sometimes"}))
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())):
        bad = await eventually(blocking(lambda: accepted(fake.get("TrafficPolicy", "shop", "bad"))),
                               message="a condition on the bad policy")
        assert bad["status"] == "False" and bad["reason"] == "Invalid"
        assert "spec.retries.retryOn" in bad["message"] and "sometimes" in bad["message"]
        assert bad["observedGeneration"] == 1
        # The rest is unaffected: the good policy is served and says so.
        good = await eventually(
            blocking(lambda: accepted(fake.get("TrafficPolicy", "shop", "good"))),
            message="a condition on the good policy")
        assert good["status"] == "True" and good["reason"] == "Accepted"
        assert store.get("TrafficPolicy", "shop", "good").spec.timeout == 3.0
        assert store.get("TrafficPolicy", "shop", "bad") is None
        assert store.get("Service", "shop", "cart") is not None

        # Fixing it flips the condition (a new generation), and it is served.
        fixed = traffic_policy("shop", "bad", "cart", retries={"attempts": 2, "retryOn": "5xx"})
        fake.update(fixed)
        cond = await eventually(blocking(lambda: (
            c := accepted(fake.get("TrafficPolicy", "shop", "bad"))) and c["status"] == "True"
            and c), message="Accepted after the fix")
        assert cond["observedGeneration"] == 2
        await eventually(lambda: store.get("TrafficPolicy", "shop", "bad"), message="served")

        # A policy whose target is missing says so.
        fake.create(traffic_policy("shop", "orphan", "nowhere"))
        orphan = await eventually(
            blocking(lambda: accepted(fake.get("TrafficPolicy", "shop", "orphan"))),
            message="a condition on the orphan")
        assert orphan["reason"] == "TargetNotFound" and "shop/nowhere" in orphan["message"]


async def test_security_policies_are_watched_and_get_accepted_conditions(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "MTLSPolicy",
                 "metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mode": "STRICT"}})
    fake.create({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "bad", "namespace": "shop"},
                 "spec": {"rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]}})
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())):
        await eventually(lambda: store.get("MTLSPolicy", "shop", "strict"), message="the MTLSPolicy")
        good = await eventually(blocking(lambda: accepted(fake.get("MTLSPolicy", "shop", "strict"))),
                                message="a condition on the MTLSPolicy")
        assert good["status"] == "True" and good["reason"] == "Accepted"
        bad = await eventually(blocking(lambda: accepted(fake.get("AuthorizationPolicy", "shop", "bad"))),
                               message="a condition on the bad AuthorizationPolicy")
        assert bad["status"] == "False" and bad["reason"] == "Invalid"
        assert "spec.rules[0].from[0].source.principals" in bad["message"]
        assert store.get("AuthorizationPolicy", "shop", "bad") is None


def network_policy(ns: str, name: str, spec: dict[str, Any]) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


async def test_network_policies_are_watched_and_an_invalid_one_keeps_its_last_good_version(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    """networking.k8s.io/v1 NetworkPolicy from the API: created, changed, made invalid (the
    error names the field, the last good version stays), deleted. No status is written: the
    kind has none."""
    fake.create(namespace("shop"))
    allow = {"podSelector": {"matchLabels": {"app": "api"}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
                          "ports": [{"port": 8080}]}]}
    fake.create(network_policy("shop", "api", allow))
    fake.create(network_policy("shop", "deny-all", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}))
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())) as source:
        policy = await eventually(lambda: store.get("NetworkPolicy", "shop", "api"), message="the policy")
        assert policy.policy_types == {"Ingress"}
        assert policy.ingress[0].ports[0].port == 8080
        assert str(policy.ingress[0].peers[0]) == "pods app=frontend in this namespace"
        deny = store.get("NetworkPolicy", "shop", "deny-all")
        assert deny.policy_types == {"Ingress", "Egress"} and deny.ingress == () and deny.egress == ()

        broken = network_policy("shop", "api", {**allow, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                                      "except": ["11.0.0.0/16"]}}]}]})
        fake.update(broken)
        await eventually(lambda: source.errors, message="the error")
        error = source.errors[0]
        assert (error.kind, error.namespace, error.name) == ("NetworkPolicy", "shop", "api")
        assert error.field_path == "spec.ingress[0].from[0].ipBlock.except[0]"
        assert "strict subset" in error.message
        assert store.get("NetworkPolicy", "shop", "api") == policy  # the last good version

        fake.delete("NetworkPolicy", "shop", "deny-all")
        await eventually(lambda: store.get("NetworkPolicy", "shop", "deny-all") is None, message="deleted")
        assert "status" not in (fake.get("NetworkPolicy", "shop", "api") or {})


async def test_status_is_not_rewritten_when_nothing_changed(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.create(traffic_policy("shop", "p", "cart"))
    store = MeshStore()
    source = KubernetesSource(store, kubeconfig, settings=fast_settings())
    async with running(source):
        await eventually(blocking(lambda: accepted(fake.get("TrafficPolicy", "shop", "p"))),
                         message="the condition")
        written = source.status_writer.writes
        fake.create(service("shop", "other"))  # every status is judged again ...
        await asyncio.sleep(0.5)
        assert source.status_writer.writes == written  # ... and nothing needed writing


async def test_httproute_status_parents_are_written(fake: FakeApiServer, kubeconfig: Path) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.create(service("shop", "cart-v2"))
    route = http_route("shop", "split", "cart", ["cart", "cart-v2"])
    route["spec"]["parentRefs"].append({"name": "public-gateway"})  # a Gateway: not ours
    created = fake.create(route)
    other = {"parentRef": {"name": "public-gateway"}, "controllerName": "example.com/gateway",
             "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted",
                             "message": "", "lastTransitionTime": "2024-01-01T00:00:00Z"}]}
    created["status"] = {"parents": [other]}
    fake.update_status(created)
    fake.create(http_route("shop", "dangling", "cart", ["gone"]))
    fake.create(http_route("shop", "no-parent", "missing", ["cart"]))
    store = MeshStore()
    async with running(KubernetesSource(store, kubeconfig, settings=fast_settings())):

        def ours(name: str) -> list[dict]:
            obj = fake.get("HTTPRoute", "shop", name) or {}
            return [p for p in (obj.get("status") or {}).get("parents") or []
                    if p.get("controllerName") == CONTROLLER_NAME]

        def conditions(name: str) -> dict[str, dict]:
            return {c["type"]: c for c in ours(name)[0]["conditions"]}

        await eventually(blocking(lambda: ours("split")), message="status.parents")
        parents = fake.get("HTTPRoute", "shop", "split")["status"]["parents"]
        assert other in parents, "another controller's entry was lost"
        [mine] = ours("split")
        assert mine["parentRef"] == {"group": "", "kind": "Service", "name": "cart", "port": 80}
        split = conditions("split")
        assert split["Accepted"]["status"] == "True"
        assert split["ResolvedRefs"]["status"] == "True"

        await eventually(blocking(lambda: ours("dangling")), message="dangling status")
        dangling = conditions("dangling")
        assert dangling["Accepted"]["status"] == "True"
        assert dangling["ResolvedRefs"]["reason"] == "BackendNotFound"
        assert "spec.rules[0].backendRefs[0]" in dangling["ResolvedRefs"]["message"]

        await eventually(blocking(lambda: ours("no-parent")), message="no-parent status")
        assert conditions("no-parent")["Accepted"]["reason"] == "NoMatchingParent"

        # The missing backend appears: the route's refs resolve.
        fake.create(service("shop", "gone"))
        await eventually(
            blocking(lambda: conditions("dangling")["ResolvedRefs"]["status"] == "True"),
            message="ResolvedRefs after the backend appeared")

        # An invalid route says which field, and keeps being served as it was.
        bad = fake.get("HTTPRoute", "shop", "split")
        bad["spec"]["rules"][0]["backendRefs"][1]["weight"] = -1
        fake.update(bad)
        await eventually(blocking(lambda: conditions("split")["Accepted"]["status"] == "False"),
                         message="Accepted=False")
        cond = conditions("split")["Accepted"]
        assert cond["reason"] == "UnsupportedValue"
        assert "spec.rules[0].backendRefs[1].weight" in cond["message"]
        assert len(store.get("HTTPRoute", "shop", "split").rules[0].backends) == 2


async def test_only_the_lease_holder_writes_status_and_the_other_takes_over(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    fake.create(traffic_policy("shop", "first", "cart"))
    config_a = fake.kubeconfig(tmp_path / "a", user="replica-a")
    config_b = fake.kubeconfig(tmp_path / "b", user="replica-b")
    a = KubernetesSource(MeshStore(), config_a, settings=fast_settings("replica-a"))
    b = KubernetesSource(MeshStore(), config_b, settings=fast_settings("replica-b"))
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a = asyncio.create_task(a.run(stop_a))
    task_b = asyncio.create_task(b.run(stop_b))
    try:
        await asyncio.wait_for(a.wait_synced(), 10)
        await asyncio.wait_for(b.wait_synced(), 10)
        await eventually(lambda: a.is_leader or b.is_leader, message="a leader")
        await eventually(blocking(lambda: accepted(fake.get("TrafficPolicy", "shop", "first"))),
                         message="status from the leader")
        leader, follower = (a, b) if a.is_leader else (b, a)
        leader_stop, leader_task = (stop_a, task_a) if leader is a else (stop_b, task_b)
        leader_user = "replica-a" if leader is a else "replica-b"
        follower_user = "replica-b" if leader is a else "replica-a"
        assert not follower.is_leader

        def status_writers() -> set[str]:
            return {r.user for r in fake.requests(method="PUT") if r.path.endswith("/status")}

        assert status_writers() == {leader_user}
        lease = fake.get("Lease", LEASE_NAMESPACE, "xds-server")
        assert lease["spec"]["holderIdentity"] == leader_user

        # The leader stops (releasing the lease): the follower takes over and writes.
        leader_stop.set()
        await asyncio.wait_for(leader_task, 15)
        leader.close()
        await eventually(lambda: follower.is_leader, timeout=10, message="the follower leads")
        fake.create(traffic_policy("shop", "second", "cart"))
        await eventually(blocking(lambda: accepted(fake.get("TrafficPolicy", "shop", "second"))),
                         message="status from the new leader")
        assert status_writers() == {leader_user, follower_user}
        writes = [r for r in fake.requests(method="PUT") if r.path.endswith("/second/status")]
        assert {r.user for r in writes} == {follower_user}
    finally:
        stop_a.set()
        stop_b.set()
        await asyncio.gather(task_a, task_b, return_exceptions=True)


async def test_a_replica_that_loses_the_lease_stops_writing(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    fake.create(namespace("shop"))
    fake.create(service("shop", "cart"))
    store = MeshStore()
    source = KubernetesSource(store, kubeconfig, settings=fast_settings())
    async with running(source):
        await eventually(lambda: source.is_leader, message="leadership")
        # Another replica (not running here) takes the lease over, as after a partition.
        lease = fake.get("Lease", LEASE_NAMESPACE, "xds-server")
        lease["spec"]["holderIdentity"] = "replica-elsewhere"
        lease["spec"]["leaseDurationSeconds"] = 60
        fake.update(lease)
        await eventually(lambda: not source.is_leader, message="leadership lost")
        fake.clear_requests()
        fake.create(traffic_policy("shop", "late", "cart", retries={"attempts": 1,
                                                                    "retryOn": "never"}))
        await eventually(lambda: any(e.name == "late" for e in source.errors),
                         message="the invalid policy seen")
        await asyncio.sleep(0.6)
        assert accepted(fake.get("TrafficPolicy", "shop", "late")) is None
        assert not [r for r in fake.requests(user="replica-a") if r.is_write
                    and "/leases/" not in r.path]


async def test_a_leader_that_cannot_renew_stops_before_its_lease_can_expire(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    """Cut off from the API server, the leader stops counting itself leader within the renew
    deadline, before any other replica may take the lease over (the lease duration)."""
    fake.create(namespace("shop"))
    settings = fast_settings(leader=LeaderSettings(
        namespace=LEASE_NAMESPACE, name="xds-server", identity="replica-a",
        lease_duration=6.0, renew_deadline=1.5, retry_period=0.25))
    source = KubernetesSource(MeshStore(), kubeconfig, settings=settings)
    async with running(source):
        await eventually(lambda: source.is_leader, message="leadership")
        fake.fail(503, path="/leases/")
        cut_off = time.monotonic()
        await eventually(lambda: not source.is_leader, timeout=10, message="leadership lost")
        assert time.monotonic() - cut_off < 6.0, "still leading when others may take over"
        fake.clear_faults()
        await eventually(lambda: source.is_leader, timeout=10, message="leadership regained")


# TokenReview ------------------------------------------------------------------------------------


async def test_token_review_authenticates_caches_and_fails_closed(
    fake: FakeApiServer, kubeconfig: Path
) -> None:
    audience = "xds-server"
    fake.register_token("good-token", "system:serviceaccount:shop:cart", audiences=(audience,),
                        extra={"authentication.kubernetes.io/pod-name": ["cart-0"]})
    fake.register_token("other-audience", "system:serviceaccount:shop:cart",
                        audiences=("vault",))
    api = KubeApi(make_api_client(kubeconfig))
    reviewer = TokenReviewer(api, audiences=(audience,), ttl=30, negative_ttl=30)
    try:
        result = await reviewer.review("good-token")
        assert result.authenticated and result.service_account == ("shop", "cart")
        assert result.audiences == (audience,) and result.pod_name == "cart-0"
        assert not (await reviewer.review("other-audience")).authenticated
        assert not (await reviewer.review("forged")).authenticated
        assert not (await reviewer.review("")).authenticated
        calls = len(fake.requests(path="/tokenreviews"))
        assert calls == 3

        # Cached: concurrent and repeated reviews ask the API server no more.
        results = await asyncio.gather(*(reviewer.review("good-token") for _ in range(20)))
        assert all(r.authenticated for r in results)
        assert len(fake.requests(path="/tokenreviews")) == calls

        # API errors and an unreachable server fail closed, and are not cached.
        fresh = TokenReviewer(api, audiences=(audience,), timeout=2.0)
        fake.fail(500, path="/tokenreviews", times=1)
        failed = await fresh.review("good-token")
        assert not failed.authenticated and failed.unavailable
        assert (await fresh.review("good-token")).authenticated  # asked again, not cached
        fresh.clear()
        fake.fail(403, path="/tokenreviews", times=1)
        assert not (await fresh.review("good-token")).authenticated
        fresh.clear()
        with fake.down():
            down = await fresh.review("good-token")
        assert not down.authenticated and down.unavailable

        # An API server that ignores audiences must not make the token ours.
        fake.register_token("any-audience", "system:serviceaccount:shop:cart")
        assert not (await fresh.review("any-audience")).authenticated
    finally:
        api.close()


async def test_token_review_cache_expires(fake: FakeApiServer, kubeconfig: Path) -> None:
    now = [0.0]
    fake.register_token("t", "system:serviceaccount:shop:cart")
    api = KubeApi(make_api_client(kubeconfig))
    reviewer = TokenReviewer(api, ttl=10, clock=lambda: now[0])
    try:
        assert (await reviewer.review("t")).authenticated
        fake.revoke_token("t")
        assert (await reviewer.review("t")).authenticated  # cached: at most ttl seconds
        now[0] = 11
        assert not (await reviewer.review("t")).authenticated
    finally:
        api.close()


# The same model from both sources ----------------------------------------------------------------
#
# Property: any set of objects, read from the API server by the Kubernetes source, gives the
# same model objects (and the same rejections, naming the same fields) as the very same objects
# written as YAML files (as `kubectl get -o yaml` prints them) read by the file source.

_names = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)
_label_values = st.from_regex(r"[a-z0-9]{0,6}", fullmatch=True)
_labels = st.dictionaries(st.sampled_from(["app", "tier", "tenant", "version"]), _label_values,
                          max_size=3)
_ports = st.one_of(st.integers(1, 65535), st.sampled_from([80, 8080, 0, 70000]))
_durations = st.sampled_from(["1s", "250ms", "1m30s", "2.5s", "soon", "0s"])


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


@st.composite
def _service(draw: st.DrawFn, ns: str, name: str) -> dict:
    ports = draw(st.lists(st.fixed_dictionaries({
        "name": st.one_of(st.none(), st.sampled_from(["http", "grpc", "tcp-db", "http-web"])),
        "port": _ports,
        "protocol": st.one_of(st.none(), st.sampled_from(["TCP", "UDP"])),
        "appProtocol": st.one_of(st.none(), st.sampled_from(["http", "kubernetes.io/h2c", "grpc"])),
        "targetPort": st.one_of(st.none(), st.integers(1, 65535), st.sampled_from(["web", "8080"])),
    }), max_size=3))
    annotations = draw(st.one_of(st.just({}), st.fixed_dictionaries(
        {"xds-server.io/export-to": st.sampled_from(["*", ".", "shop,billing", "Bad_NS"])})))
    return _without_none({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": draw(_labels),
                     "annotations": annotations},
        "spec": {"clusterIP": draw(st.sampled_from([None, "None", "10.96.1.2"])), "ports": ports},
    })


@st.composite
def _endpoint_slice(draw: st.DrawFn, ns: str, name: str, services: list[str]) -> dict:
    endpoints = draw(st.lists(st.fixed_dictionaries({
        "addresses": st.lists(st.ip_addresses(v=4).map(str), min_size=0, max_size=2),
        "conditions": st.fixed_dictionaries({}, optional={
            "ready": st.booleans(), "serving": st.booleans(), "terminating": st.booleans()}),
        "zone": st.one_of(st.none(), st.sampled_from(["a", "b"])),
        "nodeName": st.one_of(st.none(), st.just("node-1")),
        "targetRef": st.one_of(st.none(), st.fixed_dictionaries(
            {"kind": st.sampled_from(["Pod", "Node"]), "name": _names})),
    }), max_size=3))
    return _without_none({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {
            "kubernetes.io/service-name": draw(st.sampled_from(services + [None]))}},
        "addressType": draw(st.sampled_from(["IPv4", "IPv6", "bogus"])),
        "ports": draw(st.lists(st.fixed_dictionaries({
            "name": st.sampled_from(["http", "grpc"]), "port": _ports,
            "protocol": st.sampled_from(["TCP", "UDP"])}), max_size=2)),
        "endpoints": endpoints,
    })


@st.composite
def _pod(draw: st.DrawFn, ns: str, name: str) -> dict:
    containers = [{"name": "app", "ports": draw(st.lists(st.fixed_dictionaries(
        {"containerPort": _ports, "name": st.sampled_from(["web", "admin"])}), max_size=2))}]
    if draw(st.booleans()):
        containers.append({"name": "envoy", "ports": [{"containerPort": 15001}]})
    annotations = draw(st.dictionaries(
        st.sampled_from(["sidecar.xds-server.io/inject", "xds-server.io/inbound-port",
                         "xds-server.io/tcp-upstreams"]),
        st.sampled_from(["true", "false", "15006", "15001", "5432=db:5432", "x"]), max_size=2))
    return _without_none({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": draw(_labels),
                     "annotations": annotations},
        "spec": {"serviceAccountName": draw(st.one_of(st.none(), _names)),
                 "containers": containers},
        "status": {"phase": draw(st.sampled_from(["Running", "Pending", "Succeeded"])),
                   "podIP": draw(st.one_of(st.none(), st.ip_addresses(v=4).map(str)))},
    })


@st.composite
def _route(draw: st.DrawFn, ns: str, name: str, services: list[str], kind: str) -> dict:
    refs = draw(st.lists(st.fixed_dictionaries({
        "group": st.sampled_from(["", None]), "kind": st.sampled_from(["Service", "Gateway"]),
        "name": st.sampled_from(services + ["elsewhere"]),
        "port": st.one_of(st.none(), _ports)}), max_size=2))
    backends = st.lists(st.fixed_dictionaries({
        "name": st.sampled_from(services + ["missing"]),
        "port": st.one_of(st.none(), st.just(80)),
        "weight": st.one_of(st.none(), st.integers(-1, 1000))}), max_size=2)
    if kind == "HTTPRoute":
        matches = st.lists(st.fixed_dictionaries({}, optional={
            "path": st.fixed_dictionaries({
                "type": st.sampled_from(["PathPrefix", "Exact", "RegularExpression", "Glob"]),
                "value": st.sampled_from(["/", "/api", "api", "/v[0-9]+", "(("])}),
            "method": st.sampled_from(["GET", "POST", "FETCH"]),
            "headers": st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["x-user", "bad header"]), "value": st.just("a")}),
                max_size=1)}), max_size=2)
        extra = {"timeouts": st.one_of(st.none(), st.fixed_dictionaries({}, optional={
            "request": _durations, "backendRequest": _durations}))}
    else:
        matches = st.lists(st.fixed_dictionaries({"method": st.fixed_dictionaries({}, optional={
            "service": st.sampled_from(["shop.Cart", "bad service"]),
            "method": st.sampled_from(["Get", "List"])})}), max_size=2)
        extra = {}
    rules = draw(st.lists(st.fixed_dictionaries(
        {"matches": matches, "backendRefs": backends, **extra}), max_size=2))
    return _without_none({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": {"parentRefs": refs, "hostnames": draw(st.lists(_names, max_size=1)),
                 "rules": rules},
    })


@st.composite
def _policy(draw: st.DrawFn, ns: str, name: str, services: list[str]) -> dict:
    spec = draw(st.fixed_dictionaries(
        {"targetRef": st.fixed_dictionaries({"kind": st.just("Service"),
                                             "name": st.sampled_from(services + ["x"])})},
        optional={
            "timeout": _durations,
            "retries": st.fixed_dictionaries({"attempts": st.integers(-1, 5)}, optional={
                "retryOn": st.sampled_from(["5xx", "5xx,reset", "sometimes"]),
                "perTryTimeout": _durations}),
            "loadBalancer": st.fixed_dictionaries({"simple": st.sampled_from(
                ["ROUND_ROBIN", "LEAST_REQUEST", "FASTEST"])}),
            "unknownField": st.just(1),
        }))
    return {"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


@st.composite
def _mesh(draw: st.DrawFn, ns: str) -> list[dict]:
    services = draw(st.lists(_names, min_size=1, max_size=3, unique=True))
    objects = [{"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "labels": draw(_labels)}}]
    objects += [draw(_service(ns, s)) for s in services]
    for i in range(draw(st.integers(0, 2))):
        objects.append(draw(_endpoint_slice(ns, f"slice-{i}", services)))
    for i in range(draw(st.integers(0, 2))):
        objects.append(draw(_pod(ns, f"pod-{i}")))
    for i in range(draw(st.integers(0, 2))):
        objects.append(draw(_route(ns, f"http-{i}", services, "HTTPRoute")))
    for i in range(draw(st.integers(0, 1))):
        objects.append(draw(_route(ns, f"grpc-{i}", services, "GRPCRoute")))
    for i in range(draw(st.integers(0, 2))):
        objects.append(draw(_policy(ns, f"policy-{i}", services)))
    return objects


class _SourceThread:
    """A KubernetesSource running on its own event loop, so a synchronous (hypothesis) test
    can drive the fake and read the store between examples."""

    def __init__(self, source: KubernetesSource) -> None:
        import threading

        self.source = source
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self._stop = asyncio.Event()
            ready.set()
            self.loop.run_until_complete(source.run(self._stop))

        self.thread = threading.Thread(target=main, daemon=True)
        self.thread.start()
        ready.wait(5)

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(15)
        self.loop.close()
        self.source.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """One fake API server and one long-running source for every example."""
    with FakeApiServer(bookmark_interval=0.05) as server:
        config_path = server.kubeconfig(tmp_path_factory.mktemp("kube") / "config")
        store = MeshStore()
        runner = _SourceThread(KubernetesSource(
            store, config_path, settings=fast_settings(write_status=False)))
        deadline = time.monotonic() + 10
        while not runner.call(lambda: runner.source.synced):
            assert time.monotonic() < deadline, "the source never synced"
            time.sleep(0.02)
        yield server, runner, config_path
        runner.close()


_example = iter(range(10**6))


# No shrinking: every example costs a round trip through the API server and a fresh list, so
# shrinking a failure takes minutes; the failing example is printed as drawn instead.
@hypothesis_settings(max_examples=40, deadline=None,
                     phases=[Phase.explicit, Phase.reuse, Phase.generate],
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_an_object_from_the_api_is_the_same_model_as_from_a_file(
    cluster, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    fake, runner, config_path = cluster
    ns = f"prop-{next(_example)}"
    objects = data.draw(_mesh(ns))
    for obj in objects:
        fake.create(obj)
    # Wait until the source has seen everything up to now, on every kind (bookmarks move
    # quiet kinds along).
    target = fake.resource_version
    deadline = time.monotonic() + 10
    while True:
        versions = runner.call(lambda: runner.source.resource_versions)
        if len(versions) == len(KINDS) and all(int(v or 0) >= target for v in versions.values()):
            break
        assert time.monotonic() < deadline, f"the source did not catch up: {versions} < {target}"
        time.sleep(0.01)

    # The same objects, as the API server holds them, as YAML files.
    directory = tmp_path_factory.mktemp("mesh")
    for i, obj in enumerate(objects):
        kind, name = obj["kind"], obj["metadata"]["name"]
        stored = fake.get(kind, obj["metadata"].get("namespace"), name)
        (directory / f"{i:02}-{kind}-{name}.yaml").write_text(yaml.safe_dump(stored))
    file_store = MeshStore()
    file_errors = MeshDirectory(directory, file_store).load()

    def in_namespace(store: MeshStore) -> dict[str, dict]:
        return {kind: {key: value for key, value in store.all(kind).items()
                       if (key[1] if kind == "Namespace" else key[0]) == ns}
                for kind in KINDS}

    from_files = in_namespace(file_store)
    # Through watch events (the long-running source) ...
    assert runner.call(lambda: in_namespace(runner.source.store)) == from_files
    # ... and through a fresh list (items without kind/apiVersion, pages), the other path in.
    listed = MeshStore()

    async def list_once() -> None:
        async with running(KubernetesSource(listed, config_path,
                                            settings=fast_settings(write_status=False,
                                                                   page_size=7))):
            pass

    asyncio.run(list_once())
    assert in_namespace(listed) == from_files
    api_errors = runner.call(lambda: {
        (e.kind, e.name, path) for e in runner.source.errors for path, _ in e.problems
        if e.namespace == ns or (e.kind == "Namespace" and e.name == ns)
    })
    assert api_errors == {(e.kind, e.name, e.field) for e in file_errors
                          if e.severity == "error"}



# `xds-server serve --kubeconfig` ------------------------------------------------------------------


async def test_serve_follows_the_cluster_and_serves_it_over_xds(
    fake: FakeApiServer, tmp_path: Path
) -> None:
    import os
    import signal
    import sys

    from google.protobuf import struct_pb2
    from envoy.config.core.v3 import base_pb2

    from tests.support.net import free_port, wait_for_port
    from tests.support.xds_client import XdsClient, sotw_resources
    from xds_server.xds import types

    fake.create(namespace("shop", {"mesh": "on"}))
    fake.create(namespace("hidden"))
    fake.create(service("shop", "cart"))
    fake.create(service("hidden", "secret"))
    config_path = fake.kubeconfig(tmp_path / "kubeconfig", user="serve")
    port = free_port()
    fake.latency = 0.05  # readiness waits for the sync, however slow
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve",
        "--xds-address", f"127.0.0.1:{port}", "--auth", "none", "--kubeconfig", str(config_path),
        "--kube-namespace-selector", "mesh=on", "--debounce-quiet", "0.02",
        "--shutdown-grace", "1",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "POD_NAMESPACE": LEASE_NAMESPACE},
        cwd=Path(__file__).resolve().parents[2],
    )
    logs: list[bytes] = []

    async def read_logs() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            logs.append(line)

    reader = asyncio.create_task(read_logs())
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 20)
        assert any(b"synced" in line for line in logs), "served before the first sync"
        fake.latency = 0
        metadata = struct_pb2.Struct()
        metadata.update({"namespace": "shop", "service_account": "default", "pod": "cart-0"})
        node = base_pb2.Node(id="cart-0.shop", cluster="test", metadata=metadata)
        async with XdsClient(f"127.0.0.1:{port}", node_id="cart-0.shop") as client:
            ads = client.ads(node=node)
            await ads.request(types.CLUSTER)
            first = await ads.recv(timeout=10)
            names = set(sotw_resources(first))
            assert "outbound|80||cart.shop.svc.cluster.local" in names
            assert not any("secret" in n for n in names)  # outside the namespace selector
            await ads.ack(first)
            fake.create(service("shop", "orders"))
            update = await ads.recv(timeout=10)
            assert "outbound|80||orders.shop.svc.cluster.local" in set(sotw_resources(update))
        await eventually(blocking(lambda: (fake.get("Lease", LEASE_NAMESPACE, "xds-server") or {})
                                  .get("spec", {}).get("holderIdentity")),
                         message="the lease taken")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        # A clean stop hands the lease back at once.
        assert "holderIdentity" not in fake.get("Lease", LEASE_NAMESPACE, "xds-server")["spec"]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader


async def test_serve_reports_a_bad_kubeconfig(tmp_path: Path) -> None:
    import sys

    bad = tmp_path / "kubeconfig"
    bad.write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.cli", "serve", "--xds-address", "127.0.0.1:0",
        "--auth", "none", "--kubeconfig", str(bad), stderr=asyncio.subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"error: cannot load the kubeconfig" in err
