"""The mesh's user-visible behaviours in capture mode, with unmodified apps.

The explicit-mode end-to-end tests (test_routing.py, test_resilience.py, test_mtls_authz.py,
test_mesh_basic.py) send to the sidecar with the destination in the Host header. Here the
same policies (the same CRDs and YAML) are checked the way a Kubernetes team runs them:
pods as network namespaces with the real `xds-server iptables` rules, real Envoy sidecars
as the proxy UID, and an app that dials `http://api/`, `db:5432` or `greeter:50051` with no
proxy settings and no annotations (tests/support/podnet.py).

What is asserted is what the app observes (statuses, bodies, which backend answered) and
what the backends saw (requests counted at the app, in flight at once); timings only as
lower bounds measured in the pod plus far-off upper bounds. Config is awaited in the client
(or, for rate limits, the destination) sidecar's config dump before traffic is judged.

As root with iproute2/iptables/setpriv (make setup installs them); elsewhere these tests fail
saying what is missing (tests/support/podnet.py), never skip.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_capture import grpc_who, secure_mesh, tcp_exchange
from tests.support.envoy import config_section
from tests.support.podnet import CaptureMesh, NetPod, PodHttpResponse, PodNetError
from tests.support.upstreams import HttpUpstream, TcpEchoUpstream
from xds_server.model.security import SecuritySettings

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

NS = "shop"
PORT = 80  # every Service's port here; the apps listen on 8080 (the pods' app port)
GENERATION = "x-route-generation"
POLICY_API = "mesh.xds-server.io/v1alpha1"
TIMER_SLACK = 0.025  # seconds: Envoy's timers run off a cached, millisecond clock

Result = PodHttpResponse | PodNetError


@pytest.fixture
async def mesh(tmp_path: Path):
    async with CaptureMesh(tmp_path / "mesh") as made:
        yield made


@pytest.fixture
async def secured(tmp_path: Path):
    """The server with the CA and SDS; the mesh default is PERMISSIVE."""
    async with secure_mesh(tmp_path / "mesh", tmp_path / "ca", SecuritySettings(mtls=True)) as made:
        yield made


# ------------------------------------------------------------------------------ helpers


def cluster_of(service: str, port: int = PORT) -> str:
    return f"outbound|{port}||{service}.{NS}.svc.cluster.local"


def status_of(result: Result) -> int:
    """The HTTP status the app got; 0 when its connection failed."""
    return result.status if isinstance(result, PodHttpResponse) else 0


def served_by(pod: NetPod) -> int:
    """Requests the pod's HTTP echo app has served so far."""
    assert isinstance(pod.backend, HttpUpstream), pod.backend
    return pod.backend.requests_total


def statuses(results: Sequence[Result]) -> Counter[int]:
    return Counter(status_of(r) for r in results)


def answered_by(results: Sequence[Result]) -> Counter[str]:
    """Which backend app answered each (200) request."""
    return Counter(r.json["name"] for r in results if isinstance(r, PodHttpResponse) and r.status == 200)


async def start_sidecars(mesh: CaptureMesh, *pods: NetPod) -> None:
    await asyncio.gather(*(mesh.sidecar(p) for p in pods))


async def many(pod: NetPod, url: str, count: int, **kwargs: Any) -> list[Result]:
    """`count` requests from `pod`'s app (see NetPod.http_many), off the event loop."""
    return await asyncio.to_thread(pod.http_many, url, count, **kwargs)


async def get(pod: NetPod, url: str, **kwargs: Any) -> PodHttpResponse:
    return await asyncio.to_thread(pod.http, url, **kwargs)


def try_status(pod: NetPod, url: str, method: str = "GET") -> int:
    try:
        return pod.http(url, method=method, timeout=3).status
    except PodNetError:
        return 0


async def until_status(mesh: CaptureMesh, pod: NetPod, url: str, expected: int, method: str = "GET") -> None:
    await mesh.until(lambda: try_status(pod, url, method) == expected, timeout=15,
                     message=f"{pod.name}: {method} {url} -> {expected}")


async def reachable(mesh: CaptureMesh, client: NetPod, url: str, name: str) -> None:
    """Wait until `client`'s app reaches the app `name` at `url`."""
    await mesh.until(lambda: (r := client.http(url, timeout=3)).status == 200 and r.json["name"] == name,
                     timeout=15, message=f"{url} -> {name} from {client.name}")


def traffic_policy(mesh: CaptureMesh, service: str, **spec: Any) -> None:
    """The TrafficPolicy of test_resilience.py, on `service`."""
    mesh.write(f"policy-{service}.yaml", {
        "apiVersion": POLICY_API, "kind": "TrafficPolicy",
        "metadata": {"name": f"{service}-resilience", "namespace": NS},
        "spec": {"targetRef": {"kind": "Service", "name": service}, **spec},
    })


def policy(mesh: CaptureMesh, kind: str, name: str, spec: dict[str, Any], namespace: str = NS) -> None:
    mesh.write(f"{kind}-{namespace}-{name}.yaml", {
        "apiVersion": POLICY_API, "kind": kind,
        "metadata": {"name": name, "namespace": namespace}, "spec": spec,
    })


def http_route(name: str, parent: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": PORT}], "rules": rules},
    }


def marker(generation: str) -> dict[str, Any]:
    return {"type": "ResponseHeaderModifier",
            "responseHeaderModifier": {"set": [{"name": GENERATION, "value": generation}]}}


def route_configs(pod: NetPod) -> dict[str, dict[str, Any]]:
    """{name: route configuration} accepted by `pod`'s sidecar."""
    assert pod.envoy is not None
    dump = pod.envoy.config_dump()
    return {entry["route_config"]["name"]: entry["route_config"]
            for entry in config_section(dump, "routes").get("dynamic_route_configs", ())}


def routes_to(pod: NetPod, service: str, port: int = PORT) -> list[dict[str, Any]]:
    """The routes `pod`'s sidecar applies to requests to `service`'s ClusterIP:port (capture
    mode: one route configuration per service port, named like its cluster)."""
    config = route_configs(pod).get(cluster_of(service, port), {})
    return [r for vhost in config.get("virtual_hosts", ()) for r in vhost.get("routes", ())]


def inbound_routes(pod: NetPod, app_port: int = 8080) -> list[dict[str, Any]]:
    """The routes of `pod`'s inbound side for one app port."""
    config = route_configs(pod).get(f"inbound|http|{app_port}|{pod.namespace}/{pod.name}", {})
    return [r for vhost in config.get("virtual_hosts", ()) for r in vhost.get("routes", ())]


def active_cluster(pod: NetPod, name: str) -> dict[str, Any]:
    assert pod.envoy is not None
    for entry in config_section(pod.envoy.config_dump(), "clusters").get("dynamic_active_clusters", ()):
        if entry["cluster"]["name"] == name:
            return dict(entry["cluster"])
    return {}


def counter(pod: NetPod, pattern: str) -> int:
    assert pod.envoy is not None
    return sum(int(v) for v in pod.envoy.stats(pattern).values() if isinstance(v, int))


async def until_config(mesh: CaptureMesh, probe: Callable[[], Any], message: str) -> Any:
    return await mesh.until(probe, timeout=15, message=message)


def endpoints_known(pod: NetPod, service: str, count: int) -> bool:
    assert pod.envoy is not None
    return len(pod.envoy.cluster_hosts().get(cluster_of(service), ())) == count


# ----------------------------------------------------------------------- traffic split


async def test_traffic_split_follows_backend_weights(mesh: CaptureMesh) -> None:
    """test_routing's canary: `api` (no pods of its own) split 90/10 over api-v1/api-v2,
    api-v3 weight 0; the app calls http://api/ and never names a version."""
    client = mesh.pod(NS, "client", app=None)
    versions = [mesh.pod(NS, f"api-{v}") for v in ("v1", "v2", "v3")]
    for pod in versions:
        mesh.service(NS, pod.name, PORT, pods=[pod])
    mesh.service(NS, "api", PORT)
    mesh.write("route-api.yaml", http_route("api-split", "api", [{
        "backendRefs": [{"name": "api-v1", "port": PORT, "weight": 90},
                        {"name": "api-v2", "port": PORT, "weight": 10},
                        {"name": "api-v3", "port": PORT, "weight": 0}],
        "filters": [marker("split")],
    }]))
    await start_sidecars(mesh, client, *versions)
    await mesh.until(lambda: client.http("http://api/").headers.get(GENERATION) == "split",
                     timeout=15, message="the split route on api")
    for pod in versions:  # every version's endpoints known to the client's sidecar
        await reachable(mesh, client, f"http://{pod.name}/", pod.name)

    before = {p.name: served_by(p) for p in versions}
    results = await many(client, "http://api/split", 300, concurrency=8)
    assert statuses(results) == {200: 300}, statuses(results)
    names = answered_by(results)
    # api-v2 expects 30 of 300 (sd 5.2): the bounds are more than 4 sd out.
    assert names["api-v3"] == 0, names
    assert 9 <= names["api-v2"] <= 55, names
    assert names["api-v1"] == 300 - names["api-v2"], names
    # Each answer is one request at that backend: nothing retried, nothing lost.
    served = {p.name: served_by(p) - before[p.name] for p in versions}
    assert served == {"api-v1": names["api-v1"], "api-v2": names["api-v2"], "api-v3": 0}, served


# ------------------------------------------------------------------------- resilience


async def test_retries_hide_a_backend_that_fails_then_recovers(mesh: CaptureMesh) -> None:
    """TrafficPolicy retries (attempts 3, retryOn 5xx) on `api`; an HTTPRoute retry (GEP-1731:
    attempts 2, codes [503]) on `api-route`; both backed by one app that fails exactly the
    next N requests. The app's client sees the outcome; the backend counts the tries."""
    client = mesh.pod(NS, "client", app=None)
    api = mesh.pod(NS, "api-1", app=None, labels={"app": "api"})
    backend = api.programmable(8080, "api-1")
    mesh.service(NS, "api", PORT, pods=[api])
    mesh.service(NS, "api-route", PORT, pods=[api])
    traffic_policy(mesh, "api", retries={"attempts": 3, "retryOn": "5xx"})
    mesh.write("route-api-route.yaml", http_route("api-route", "api-route", [{
        "backendRefs": [{"name": "api-route", "port": PORT}],
        "retry": {"attempts": 2, "codes": [503]},
    }]))
    await start_sidecars(mesh, client, api)
    await until_config(mesh, lambda: any(r["route"].get("retry_policy", {}).get("num_retries") == 3
                                         for r in routes_to(client, "api")), "policy retries on api")
    await until_config(mesh, lambda: any(r["route"].get("retry_policy", {}).get("num_retries") == 2
                                         for r in routes_to(client, "api-route")), "route retry on api-route")
    await reachable(mesh, client, "http://api/", "api-1")
    await reachable(mesh, client, "http://api-route/", "api-1")

    # Control: with no retries configured for it, a failure reaches the app as it is.
    mesh.service(NS, "api-plain", PORT, pods=[api])
    await reachable(mesh, client, "http://api-plain/", "api-1")
    backend.fail_next = 1
    assert (await get(client, "http://api-plain/control")).status == 503
    assert backend.requests_for("/control") == 1

    cases = [
        # (url, failures in a row, status the app sees, tries the backend saw)
        ("http://api/recovers", 2, 200, 3),  # two failures, the third try answers
        ("http://api/exhausted", 10, 503, 4),  # 1 + 3 retries, then the last 503 is passed on
        ("http://api-route/route-recovers", 2, 200, 3),
        ("http://api-route/route-exhausted", 10, 503, 3),  # 1 + 2 retries
    ]
    for url, failures, expected, tries in cases:
        backend.fail_next = failures
        reply = await get(client, url)
        backend.fail_next = 0
        path = "/" + url.split("/", 3)[3]
        assert reply.status == expected, (url, reply.status, reply.body[:200])
        if expected == 200:
            assert reply.json["name"] == "api-1"
        assert backend.requests_for(path) == tries, (url, backend.requests_for(path))


async def test_request_timeouts_answer_504(mesh: CaptureMesh) -> None:
    """TrafficPolicy timeout 500ms on `slow-policy`, HTTPRoute timeouts.request 800ms on
    `slow-route`, one app that takes 6 s: the app's client gets 504 after the timeout."""
    client = mesh.pod(NS, "client", app=None)
    slow = mesh.pod(NS, "slow-1", app=None, labels={"app": "slow"})
    backend = slow.programmable(8080, "slow-1")
    mesh.service(NS, "slow-policy", PORT, pods=[slow])
    mesh.service(NS, "slow-route", PORT, pods=[slow])
    traffic_policy(mesh, "slow-policy", timeout="500ms")
    mesh.write("route-slow.yaml", http_route("slow-route", "slow-route", [{
        "backendRefs": [{"name": "slow-route", "port": PORT}], "timeouts": {"request": "800ms"},
    }]))
    await start_sidecars(mesh, client, slow)

    def timeout_of(service: str) -> float | None:
        routes = routes_to(client, service)
        return float(routes[0]["route"]["timeout"].rstrip("s")) if routes and "route" in routes[0] else None

    await until_config(mesh, lambda: timeout_of("slow-policy") == 0.5, "policy timeout on slow-policy")
    await until_config(mesh, lambda: timeout_of("slow-route") == 0.8, "route timeout on slow-route")
    await reachable(mesh, client, "http://slow-policy/", "slow-1")
    await reachable(mesh, client, "http://slow-route/", "slow-1")

    backend.delay = 6.0
    for url, limit in (("http://slow-policy/slow", 0.5), ("http://slow-route/slow", 0.8)):
        reply = await get(client, url, timeout=10)
        assert reply.status == 504, (url, reply.status, reply.body)
        assert reply.body == b"upstream request timeout"
        assert limit - TIMER_SLACK <= reply.elapsed < 4.0, f"{url}: 504 after {reply.elapsed:.3f}s"
    # The requests did reach the app: the sidecar gave up waiting, nobody refused them.
    assert backend.requests_for("/slow") == 2


async def test_fault_injection_aborts_and_delays(mesh: CaptureMesh) -> None:
    """TrafficPolicy fault: abort 50 % with 418 on `api`; delay 100 % by 400ms on
    `api-delayed` (same app). Aborted requests never leave the client's pod."""
    client = mesh.pod(NS, "client", app=None)
    api = mesh.pod(NS, "api-1", app=None, labels={"app": "api"})
    backend = api.programmable(8080, "api-1")
    mesh.service(NS, "api", PORT, pods=[api])
    mesh.service(NS, "api-delayed", PORT, pods=[api])
    traffic_policy(mesh, "api", fault={"abort": {"percentage": 50, "httpStatus": 418}})
    traffic_policy(mesh, "api-delayed", fault={"delay": {"percentage": 100, "fixedDelay": "400ms"}})
    await start_sidecars(mesh, client, api)

    def has_fault(service: str) -> bool:
        return any("envoy.filters.http.fault" in r.get("typed_per_filter_config", {})
                   for r in routes_to(client, service))

    await until_config(mesh, lambda: has_fault("api") and has_fault("api-delayed"), "faults on the routes")

    results = await many(client, "http://api/fault", 200, concurrency=8)
    aborted = [r for r in results if status_of(r) == 418]
    assert statuses(results) == {418: len(aborted), 200: 200 - len(aborted)}, statuses(results)
    assert all(isinstance(r, PodHttpResponse) and r.body == b"fault filter abort" for r in aborted)
    assert 60 <= len(aborted) <= 140, statuses(results)  # expected 100, sd 7
    assert backend.requests_for("/fault") == 200 - len(aborted)

    delayed = await many(client, "http://api-delayed/delay", 4, concurrency=4)
    assert statuses(delayed) == {200: 4}, statuses(delayed)
    for reply in delayed:
        assert isinstance(reply, PodHttpResponse)
        assert 0.4 - TIMER_SLACK <= reply.elapsed < 4.0, reply.elapsed
    assert backend.requests_for("/delay") == 4  # delayed, then delivered


async def test_circuit_breaker_overflows_with_503(mesh: CaptureMesh) -> None:
    """TrafficPolicy connectionPool, both shapes of test_resilience: one connection plus one
    pending request (`slow`), one request at a time (`slow-h2`); ten simultaneous callers
    against an app that takes 2 s: the rest fail fast with 503 x-envoy-overloaded."""
    client = mesh.pod(NS, "client", app=None)
    slow = mesh.pod(NS, "slow-1", app=None, labels={"app": "slow"})
    backend = slow.programmable(8080, "slow-1")
    mesh.service(NS, "slow", PORT, pods=[slow])
    mesh.service(NS, "slow-h2", PORT, pods=[slow])
    traffic_policy(mesh, "slow", connectionPool={"tcp": {"maxConnections": 1},
                                                 "http": {"http1MaxPendingRequests": 1}})
    traffic_policy(mesh, "slow-h2", connectionPool={"http": {"http2MaxRequests": 1}})
    await start_sidecars(mesh, client, slow)

    def thresholds(service: str) -> dict[str, Any]:
        breakers = active_cluster(client, cluster_of(service)).get("circuit_breakers", {})
        return dict(breakers.get("thresholds", [{}])[0])

    await until_config(mesh, lambda: thresholds("slow").get("max_connections") == 1, "limits on slow")
    await until_config(mesh, lambda: thresholds("slow-h2").get("max_requests") == 1, "limits on slow-h2")
    await reachable(mesh, client, "http://slow/", "slow-1")
    await reachable(mesh, client, "http://slow-h2/", "slow-1")

    backend.delay = 2.0  # all ten arrive while the first is still in flight, even on a busy machine
    for service, overflow in (("slow", "upstream_rq_pending_overflow"), ("slow-h2", "upstream_rq_active_overflow")):
        backend.reset_counters()
        path = f"/cb-{service}"
        results = await many(client, f"http://{service}{path}", 10, concurrency=10, together=True, timeout=10)
        ok = [r for r in results if status_of(r) == 200]
        overloaded = [r for r in results if isinstance(r, PodHttpResponse) and r.status == 503
                      and r.headers.get("x-envoy-overloaded") == "true"]
        assert len(ok) + len(overloaded) == 10, (service, statuses(results))
        assert 1 <= len(ok) <= 2, (service, statuses(results))  # one in flight (+ one pending)
        assert backend.max_in_flight == 1, service
        assert backend.requests_for(path) == len(ok), service
        assert counter(client, rf"cluster\.{cluster_of(service)}\.{overflow}$".replace("|", r"\|")) == len(overloaded)


async def test_outlier_detection_ejects_the_failing_endpoint(mesh: CaptureMesh) -> None:
    client = mesh.pod(NS, "client", app=None)
    good = mesh.pod(NS, "api-good", app=None, labels={"app": "api"})
    bad = mesh.pod(NS, "api-bad", app=None, labels={"app": "api"})
    good_app = good.programmable(8080, "api-good")
    bad_app = bad.programmable(8080, "api-bad", status=503)
    mesh.service(NS, "api", PORT, pods=[good, bad])
    traffic_policy(mesh, "api", outlierDetection={
        "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s", "maxEjectionPercent": 50,
    })
    await start_sidecars(mesh, client, good, bad)
    await until_config(
        mesh, lambda: active_cluster(client, cluster_of("api")).get("outlier_detection", {}).get("consecutive_5xx") == 2,
        "outlier detection on the client's cluster",
    )
    await mesh.until(lambda: endpoints_known(client, "api", 2), timeout=15, message="both api endpoints known")

    stat = rf"cluster\.{cluster_of('api')}\.outlier_detection\.ejections_enforced_total$".replace("|", r"\|")
    seen: Counter[int] = Counter()
    for _ in range(100):  # until the bad endpoint has failed twice in a row and is ejected
        seen[try_status(client, "http://api/warmup")] += 1
        if counter(client, stat):
            break
    assert counter(client, stat) >= 1, f"no ejection after {sum(seen.values())} requests: {seen}"
    assert seen[503] >= 2 and set(seen) <= {200, 503}, seen

    results = await many(client, "http://api/work", 60, concurrency=4)
    assert statuses(results) == {200: 60}, statuses(results)
    assert answered_by(results) == {"api-good": 60}
    assert bad_app.requests_for("/work") == 0
    assert good_app.requests_for("/work") == 60


async def test_local_rate_limit_answers_429_beyond_the_bucket(mesh: CaptureMesh) -> None:
    """TrafficPolicy rateLimit on `api`: the bucket is in api's own sidecar (inbound,
    reached by destination port). 5 per minute, burst 5: of 20 simultaneous callers exactly
    5 get through, however slowly a busy machine lets them arrive (no refill in the test)."""
    client = mesh.pod(NS, "client", app=None)
    api = mesh.pod(NS, "api-1", app=None, labels={"app": "api"})
    backend = api.programmable(8080, "api-1")
    mesh.service(NS, "api", PORT, pods=[api])
    await start_sidecars(mesh, client, api)
    await reachable(mesh, client, "http://api/", "api-1")
    control = await many(client, "http://api/control", 20, concurrency=20, together=True)
    assert statuses(control) == {200: 20}, statuses(control)

    traffic_policy(mesh, "api", rateLimit={"requests": 5, "per": "60s", "burst": 5})
    await until_config(
        mesh, lambda: any("envoy.filters.http.local_ratelimit" in r.get("typed_per_filter_config", {})
                          for r in inbound_routes(api)),
        "rate limit on api's inbound routes",
    )
    results = await many(client, "http://api/limited", 20, concurrency=20, together=True)
    counts = statuses(results)
    assert counts == {200: 5, 429: 15}, counts
    assert all("x-ratelimit-limit" in r.headers for r in results if isinstance(r, PodHttpResponse) and r.status == 429)
    assert backend.requests_for("/limited") == counts[200]  # refused before the app


async def test_ring_hash_keeps_each_key_on_one_backend(mesh: CaptureMesh) -> None:
    client = mesh.pod(NS, "client", app=None)
    pods = [mesh.pod(NS, f"api-{i}", labels={"app": "api"}) for i in (1, 2, 3)]
    mesh.service(NS, "api", PORT, pods=pods)
    await start_sidecars(mesh, client, *pods)
    await mesh.until(lambda: endpoints_known(client, "api", 3), timeout=15, message="three api endpoints known")

    spread = await many(client, "http://api/", 60, concurrency=4, headers={"x-user": "alice"})
    assert statuses(spread) == {200: 60}
    assert len(answered_by(spread)) >= 2, answered_by(spread)  # control: no stickiness yet

    traffic_policy(mesh, "api", loadBalancer={"consistentHash": {"httpHeaderName": "x-user"}})
    await until_config(mesh, lambda: active_cluster(client, cluster_of("api")).get("lb_policy") == "RING_HASH",
                       "ring hash on the client's cluster")
    await until_config(mesh, lambda: all(r["route"].get("hash_policy") for r in routes_to(client, "api")),
                       "hash policy on the client's route")
    await mesh.until(lambda: endpoints_known(client, "api", 3), timeout=15, message="three endpoints, new cluster")

    owners: dict[str, Counter[str]] = {}
    for key in [f"user-{i}" for i in range(12)]:
        results = await many(client, "http://api/", 15, concurrency=3, headers={"x-user": key})
        assert statuses(results) == {200: 15}
        owners[key] = answered_by(results)
    assert all(len(names) == 1 for names in owners.values()), owners
    # Spread over the ring: 12 keys on one of 3 pods would happen with probability ~3**-11.
    assert len({name for names in owners.values() for name in names}) >= 2, owners


# ----------------------------------------------------------------------- TCP and gRPC


async def test_tcp_and_grpc_services_by_name_without_annotations(mesh: CaptureMesh) -> None:
    """`db:5432` (appProtocol tcp, two pods), `cache:6400` (no appProtocol: the sidecar
    sniffs or passes TCP), `greeter:50051` (gRPC): plain sockets and a stock gRPC client."""
    client = mesh.pod(NS, "client", app=None)
    dbs = [mesh.pod(NS, f"db-{i}", app="tcp", app_port=5432, labels={"app": "db"}) for i in (0, 1)]
    cache = mesh.pod(NS, "cache-0", app="tcp", app_port=6400, labels={"app": "cache"})
    greeter = mesh.pod(NS, "greeter-0", app="grpc", app_port=50051, labels={"app": "greeter"})
    mesh.service(NS, "db", 5432, app_protocol="tcp", pods=dbs)
    mesh.service(NS, "cache", 6400, app_protocol=None, pods=[cache])
    mesh.service(NS, "greeter", 50051, pods=[greeter], ports=[
        {"name": "grpc", "port": 50051, "targetPort": 50051, "appProtocol": "grpc"},
    ])
    assert "xds-server.io/tcp-upstreams" not in client.manifest()["metadata"]["annotations"]
    await start_sidecars(mesh, client, *dbs, cache, greeter)

    first = await mesh.until(lambda: client.tcp("db", 5432, b"select 1", timeout=3), timeout=15, message="db")
    assert first in (b"db-0:select 1", b"db-1:select 1"), first
    replies = Counter([await asyncio.to_thread(client.tcp, "db", 5432, b"q") for _ in range(20)])
    assert set(replies) == {b"db-0:q", b"db-1:q"}, replies  # the Service's endpoints share connections
    assert await asyncio.to_thread(client.tcp, "db.shop.svc.cluster.local", 5432, b"x") in (b"db-0:x", b"db-1:x")
    # Undeclared: sniffed (translate/capture.py); the client keeps its connection open while
    # it waits for the answer, as a cache client does (a half-close before the inspector has
    # decided is closed by Envoy).
    reply = await mesh.until(lambda: tcp_exchange(client, "cache", 6400, "get k"), timeout=15, message="cache")
    assert reply == "cache-0:get k"
    # Through the sidecars: the client's cluster for db made the connections.
    assert counter(client, rf"cluster\.{cluster_of('db', 5432)}\.upstream_cx_total$".replace("|", r"\|")) >= 21

    assert await mesh.until(lambda: grpc_who(client, "greeter:50051"), timeout=15, message="grpc") == "greeter-0"
    assert await asyncio.to_thread(grpc_who, client, "greeter.shop:50051") == "greeter-0"
    assert counter(client, rf"cluster\.{cluster_of('greeter', 50051)}\.upstream_rq_total$".replace("|", r"\|")) >= 2


# ------------------------------------------------------------------------------- mTLS


async def test_strict_permissive_and_disable_mtls(secured: CaptureMesh) -> None:
    """One workload per mode (MTLSPolicy by selector). A meshed client reaches all three (mTLS
    to STRICT and PERMISSIVE, plaintext to DISABLE); an app in a pod without a sidecar,
    dialling each pod's IP, is refused by STRICT and served by PERMISSIVE and DISABLE."""
    mesh = secured
    client = mesh.pod(NS, "client", app=None, service_account="client")
    plain = mesh.pod(NS, "plain", app=None, sidecar=False)
    apis = {mode: mesh.pod(NS, f"api-{mode.lower()}", service_account="api", labels={"app": f"api-{mode.lower()}"})
            for mode in ("STRICT", "PERMISSIVE", "DISABLE")}
    for mode, pod in apis.items():
        mesh.service(NS, pod.name, PORT, pods=[pod])
        policy(mesh, "MTLSPolicy", pod.name, {"selector": {"matchLabels": {"app": pod.name}}, "mode": mode})
    await start_sidecars(mesh, client, *apis.values())

    for pod in apis.values():
        await reachable(mesh, client, f"http://{pod.name}/", pod.name)
    await mesh.until(lambda: try_status(plain, f"http://{apis['PERMISSIVE'].ip}:8080/") == 200, timeout=15,
                     message="plaintext to PERMISSIVE")

    for mode, pod in apis.items():
        served = served_by(pod)
        meshed = await get(client, f"http://{pod.name}/")
        assert meshed.status == 200 and meshed.json["name"] == pod.name, mode
        handshakes = counter(client, rf"cluster\.{cluster_of(pod.name)}\.ssl\.handshake$".replace("|", r"\|"))
        connections = counter(client, rf"cluster\.{cluster_of(pod.name)}\.upstream_cx_total$".replace("|", r"\|"))
        assert connections >= 1, mode
        if mode == "DISABLE":
            assert handshakes == 0, "DISABLE: the client's sidecar sends plaintext"
        else:
            assert handshakes >= 1, f"{mode}: the client's sidecar originates mTLS"
            assert counter(pod, r"listener\.inbound\.ssl\.handshake$") >= 1, mode
        outside = try_status(plain, f"http://{pod.ip}:8080/")
        if mode == "STRICT":
            assert outside == 0, "STRICT refuses a client without a sidecar"
            assert served_by(pod) == served + 1  # only the meshed request
        else:
            assert outside == 200, f"{mode} accepts plaintext"
            assert served_by(pod) == served + 2


# ---------------------------------------------------------------------- authorization


async def test_authorization_by_identity_namespace_method_path_and_on_tcp(secured: CaptureMesh) -> None:
    """AuthorizationPolicy as in test_mtls_authz: ALLOW by principal and method (`orders`),
    ALLOW by namespace with a DENY by service account and path (`catalog`), ALLOW by
    service account on a TCP port (`db`). Callers: web (shop/web), intruder (shop/intruder),
    outsider (other/web), each an unmodified app behind its own sidecar."""
    mesh = secured
    web = mesh.pod(NS, "web-1", app=None, service_account="web", labels={"app": "web"})
    intruder = mesh.pod(NS, "intruder-1", app=None, service_account="intruder", labels={"app": "intruder"})
    outsider = mesh.pod("other", "outsider-1", app=None, service_account="web", labels={"app": "outsider"})
    orders = mesh.pod(NS, "orders-1", service_account="orders", labels={"app": "orders"})
    catalog = mesh.pod(NS, "catalog-1", service_account="catalog", labels={"app": "catalog"})
    db = mesh.pod(NS, "db-1", app="tcp", app_port=5432, service_account="db", labels={"app": "db"})
    mesh.service(NS, "orders", PORT, pods=[orders])
    mesh.service(NS, "catalog", PORT, pods=[catalog])
    mesh.service(NS, "db", 5432, app_protocol="tcp", pods=[db])
    policy(mesh, "AuthorizationPolicy", "orders-readers", {
        "selector": {"matchLabels": {"app": "orders"}},
        "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NS}/sa/web"]}}],
                   "to": [{"operation": {"methods": ["GET"]}}]}],
    })
    policy(mesh, "AuthorizationPolicy", "catalog-shop-only", {
        "selector": {"matchLabels": {"app": "catalog"}},
        "rules": [{"from": [{"source": {"namespaces": [NS]}}]}],
    })
    policy(mesh, "AuthorizationPolicy", "catalog-no-admin", {
        "selector": {"matchLabels": {"app": "catalog"}}, "action": "DENY",
        "rules": [{"from": [{"source": {"serviceAccounts": [f"{NS}/web"]}}],
                   "to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}],
    })
    policy(mesh, "AuthorizationPolicy", "db-clients", {
        "selector": {"matchLabels": {"app": "db"}},
        "rules": [{"from": [{"source": {"serviceAccounts": [f"{NS}/web"]}}]}],
    })
    await start_sidecars(mesh, web, intruder, outsider, orders, catalog, db)
    await until_status(mesh, web, "http://orders/", 200)
    await until_status(mesh, intruder, "http://orders/", 403)
    await until_status(mesh, outsider, "http://catalog.shop/", 403)

    # (caller, method, url, status the app sees)
    expected = [
        (web, "GET", "http://orders/", 200),
        (web, "POST", "http://orders/", 403),  # the ALLOW names GET only
        (intruder, "GET", "http://orders/", 403),  # another principal
        (outsider, "GET", "http://orders.shop/", 403),  # same account name, other namespace
        (web, "GET", "http://catalog/", 200),
        (web, "GET", "http://catalog/admin/users", 403),  # the DENY wins over the ALLOW
        (web, "GET", "http://catalog/admin", 403),
        (web, "GET", "http://catalog/administrator", 200),  # `/admin/*` is not a string prefix
        (intruder, "GET", "http://catalog/admin/users", 200),  # the DENY is web's only
        (outsider, "GET", "http://catalog.shop/", 403),  # ALLOW by namespace: not from `other`
    ]
    before = served_by(orders) + served_by(catalog)
    for caller, method, url, want in expected:
        reply = await get(caller, url, method=method)
        assert reply.status == want, (caller.name, method, url, reply.status, reply.body[:200])
        if want == 403:
            assert reply.body == b"RBAC: access denied", reply.body
        else:
            assert reply.json["name"] in ("orders-1", "catalog-1")
    # Denied requests never reached the apps.
    allowed = sum(1 for *_, want in expected if want == 200)
    assert served_by(orders) + served_by(catalog) == before + allowed

    # TCP: the network RBAC filter of db's sidecar lets only shop/web through.
    assert await mesh.until(lambda: web.tcp("db", 5432, b"ping", timeout=3), timeout=15,
                            message="web reaches db") == b"db-1:ping"
    assert isinstance(db.backend, TcpEchoUpstream)
    received = db.backend.bytes_received
    try:
        refused = await asyncio.to_thread(intruder.tcp, "db", 5432, b"ping", 3)
    except PodNetError:
        refused = b""
    assert refused == b"", refused
    assert counter(db, r"rbac.*denied$") >= 1
    # Not one byte of the intruder's reached the app. (Envoy's tcp_proxy does open the
    # connection to the app before the network RBAC filter decides on the first bytes:
    # envoyproxy/envoy#9023, in explicit mode too; the app sees it open and close, empty.)
    assert db.backend.bytes_received == received
