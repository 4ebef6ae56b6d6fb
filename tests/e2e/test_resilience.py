"""TrafficPolicy resilience, end to end: real sidecars, real traffic, programmable backends.

Each test writes Kubernetes-shaped YAML, waits until the client (or, for rate limits, the
destination) sidecar has *accepted* the resulting Envoy config, then sends real requests
through the client pod's outbound sidecar and asserts what the application would see.
Statistical claims are checked over hundreds of requests with margins of about five
standard deviations; timings only as lower bounds (or far-off upper bounds).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.envoy import config_section
from tests.support.mesh import MeshHarness, Pod
from tests.support.programmable import programmable_pod

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

NS = "shop"
PORT = 8080
TIMER_SLACK = 0.025  # seconds: Envoy's timers run off a cached, millisecond clock


def cluster_of(service: str) -> str:
    return f"outbound|{PORT}||{service}.{NS}.svc.cluster.local"


@pytest.fixture
async def mesh(tmp_path: Path):
    harness = await MeshHarness(tmp_path / "mesh").start()
    yield harness
    await harness.stop()


# ------------------------------------------------------------------------------ traffic


@dataclass
class Result:
    status: int  # 0: no HTTP answer (connection error / client timeout)
    elapsed: float
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    json: Any = None
    error: str = ""

    @property
    def name(self) -> str | None:
        """The backend pod that answered (None when it was not the app)."""
        return self.json.get("name") if isinstance(self.json, dict) else None


def _one(pod: Pod, host: str, path: str, headers: dict[str, str] | None, timeout: float) -> Result:
    start = time.monotonic()
    try:
        r = pod.request(host, path, headers=headers, timeout=timeout)
    except OSError as err:
        return Result(0, time.monotonic() - start, error=repr(err))
    return Result(r.status, time.monotonic() - start, r.headers, r.body, r.json)


async def send(
    pod: Pod, host: str, count: int, *, path: str = "/", headers: dict[str, str] | None = None,
    concurrency: int = 8, timeout: float = 10.0,
) -> list[Result]:
    """`count` requests from `pod`'s app to `host`, `concurrency` at a time, off the loop."""

    def run() -> list[Result]:
        with ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(lambda _: _one(pod, host, path, headers, timeout), range(count)))

    return await asyncio.to_thread(run)


async def burst(pod: Pod, host: str, count: int, *, path: str = "/", timeout: float = 10.0) -> list[Result]:
    """`count` requests released at the same moment (one thread each, behind a barrier)."""
    barrier = threading.Barrier(count)

    def one(_: int) -> Result:
        barrier.wait(5)
        return _one(pod, host, path, None, timeout)

    def run() -> list[Result]:
        with ThreadPoolExecutor(count) as pool:
            return list(pool.map(one, range(count)))

    return await asyncio.to_thread(run)


def statuses(results: list[Result]) -> Counter[int]:
    return Counter(r.status for r in results)


# --------------------------------------------------------------------------- mesh helpers


def traffic_policy(mesh: MeshHarness, service: str, **spec: Any) -> None:
    mesh.write(
        f"policy-{service}.yaml",
        {
            "apiVersion": "mesh.xds-server.io/v1alpha1",
            "kind": "TrafficPolicy",
            "metadata": {"name": f"{service}-resilience", "namespace": NS},
            "spec": {"targetRef": {"kind": "Service", "name": service}, **spec},
        },
    )


def _seconds(text: str) -> float:
    return float(text.rstrip("s"))


def route_config(pod: Pod, prefix: str) -> list[dict[str, Any]]:
    """Virtual hosts of the accepted route configurations whose name starts with `prefix`."""
    dump = pod.envoy.config_dump()
    return [
        vhost
        for entry in config_section(dump, "routes").get("dynamic_route_configs", ())
        if entry["route_config"]["name"].startswith(prefix)
        for vhost in entry["route_config"].get("virtual_hosts", ())
    ]


def outbound_routes(pod: Pod, domain: str) -> list[dict[str, Any]]:
    """The routes `pod`'s sidecar applies to requests with Host `domain`."""
    for vhost in route_config(pod, "outbound|"):
        if domain in vhost.get("domains", ()):
            return list(vhost.get("routes", ()))
    return []


def active_cluster(pod: Pod, name: str) -> dict[str, Any]:
    dump = pod.envoy.config_dump()
    for entry in config_section(dump, "clusters").get("dynamic_active_clusters", ()):
        if entry["cluster"]["name"] == name:
            return dict(entry["cluster"])
    return {}


def cluster_stat(pod: Pod, cluster: str, stat: str) -> int:
    name = f"cluster.{cluster}.{stat}"
    stats = pod.envoy.stats(filter=stat.replace(".", r"\.") + "$")
    return int(stats.get(name, 0))


async def until_config(mesh: MeshHarness, probe: Callable[[], Any], message: str) -> Any:
    return await mesh.until(probe, timeout=15, message=message)


async def reachable(mesh: MeshHarness, client: Pod, host: str, backend_name: str) -> None:
    """Wait until `client` reaches `host` and the app `backend_name` answers (any status)."""
    await mesh.until(
        lambda: client.request(host, "/ready-probe").json.get("name") == backend_name,
        timeout=15, message=f"{host} reachable from {client.name}",
    )


async def start_sidecars(mesh: MeshHarness, *pods: Pod) -> None:
    await asyncio.gather(*(mesh.sidecar(p) for p in pods))


# ---------------------------------------------------------------------------------- tests


async def test_retries_turn_a_flaky_backend_into_success(mesh: MeshHarness) -> None:
    api, backend = programmable_pod(mesh, NS, "api-1", fail_fraction=0.5)
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "api", PORT, pods=[api])
    await start_sidecars(mesh, api, web)
    await reachable(mesh, web, "api", "api-1")

    # Without a policy the client sees the backend as it is: about half the answers fail
    # (n = 400, sd = 10; the bounds are 7 sd out).
    before = await send(web, "api", 400, path="/work", concurrency=16)
    assert set(statuses(before)) <= {200, 503}, statuses(before)
    failed = statuses(before)[503]
    assert 130 <= failed <= 270, f"expected ~200 of 400 to fail without retries: {statuses(before)}"

    # attempts 10: a request fails only if all 11 tries do, p = 0.5**11 ~ 0.05 % (5 retries
    # would still leave 0.5**6 = 1/64 ~ 1.6 % failing: not enough to promise 99 %).
    traffic_policy(mesh, "api", retries={"attempts": 10, "retryOn": "5xx"})
    await until_config(
        mesh,
        lambda: any(
            r["route"].get("retry_policy", {}).get("num_retries") == 10
            for r in outbound_routes(web, "api")
        ),
        "retry policy on web's route to api",
    )
    backend.reset_counters()
    after = await send(web, "api", 400, path="/work", concurrency=16)
    ok = statuses(after)[200]
    assert ok >= 396, f"retries should hide the failures: {statuses(after)}"
    # ...and the backend really did keep failing: the retries absorbed its 503s.
    assert backend.statuses().get(503, 0) >= 130, backend.statuses()
    assert cluster_stat(web, cluster_of("api"), "upstream_rq_retry") >= 130


async def test_policy_timeout_and_route_timeout_answer_504(mesh: MeshHarness) -> None:
    slow, backend = programmable_pod(mesh, NS, "slow-1")
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "slow-policy", PORT, pods=[slow])
    mesh.service(NS, "slow-route", PORT, pods=[slow])
    await start_sidecars(mesh, slow, web)
    await reachable(mesh, web, "slow-policy", "slow-1")
    await reachable(mesh, web, "slow-route", "slow-1")

    traffic_policy(mesh, "slow-policy", timeout="500ms")
    mesh.write(
        "route-slow.yaml",
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "slow-route", "namespace": NS},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "slow-route", "port": PORT}],
                "rules": [
                    {
                        "backendRefs": [{"name": "slow-route", "port": PORT}],
                        "timeouts": {"request": "800ms"},
                    }
                ],
            },
        },
    )

    def timeout_of(host: str) -> float | None:
        routes = outbound_routes(web, host)
        return _seconds(routes[0]["route"]["timeout"]) if routes and "route" in routes[0] else None

    await until_config(mesh, lambda: timeout_of("slow-policy") == 0.5, "policy timeout applied")
    await until_config(mesh, lambda: timeout_of("slow-route") == 0.8, "route timeout applied")

    backend.delay = 6.0  # far longer than either timeout
    backend.reset_counters()
    policy_result, route_result = await asyncio.gather(
        asyncio.to_thread(_one, web, "slow-policy", "/slow", None, 10.0),
        asyncio.to_thread(_one, web, "slow-route", "/slow", None, 10.0),
    )
    for result, limit in ((policy_result, 0.5), (route_result, 0.8)):
        assert result.status == 504, result
        assert result.body == b"upstream request timeout", result.body
        # Envoy arms the timer from its event loop's cached clock, so it may fire a few ms
        # "early" as seen from here: allow timer granularity, nothing more.
        assert limit - TIMER_SLACK <= result.elapsed < 4.0, f"504 after {result.elapsed:.3f}s, timeout {limit}s"
    # The requests did reach the app: the sidecar gave up waiting, the app did not refuse.
    assert backend.requests_for("/slow") == 2


async def test_fault_injection_aborts_and_delays_the_configured_share(mesh: MeshHarness) -> None:
    api, backend = programmable_pod(mesh, NS, "api-1")
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "api", PORT, pods=[api])
    await start_sidecars(mesh, api, web)
    await reachable(mesh, web, "api", "api-1")

    delay = 0.5
    traffic_policy(
        mesh, "api",
        fault={
            "abort": {"percentage": 50, "httpStatus": 503},
            "delay": {"percentage": 50, "fixedDelay": "500ms"},
        },
    )
    await until_config(
        mesh,
        lambda: any("envoy.filters.http.fault" in r.get("typed_per_filter_config", {})
                    for r in outbound_routes(web, "api")),
        "fault config on web's route to api",
    )
    backend.reset_counters()
    results = await send(web, "api", 400, path="/fault", concurrency=40)

    # Abort: ~50 % answered 503 by the client sidecar itself (n = 400, sd = 10).
    aborted = [r for r in results if r.status == 503]
    assert all(r.body == b"fault filter abort" for r in aborted), {r.body for r in aborted}
    assert 150 <= len(aborted) <= 250, statuses(results)
    assert statuses(results)[200] == 400 - len(aborted), statuses(results)
    # Aborted requests never left the client: the app saw exactly the others.
    assert backend.requests_for("/fault") == 400 - len(aborted)

    # Delay: ~50 % held back by `delay` before going on (or being aborted).
    slow = [r for r in results if r.elapsed >= delay - TIMER_SLACK]
    assert 150 <= len(slow) <= 250, f"{len(slow)} of 400 took >= {delay}s"
    injected = int(web.envoy.stats(filter=r"fault\.delays_injected$").get("http.outbound.fault.delays_injected", 0))
    assert 150 <= injected <= 250
    assert len(slow) >= injected, "every injected delay should make its request take >= the delay"


@pytest.mark.parametrize(
    ("pool", "overflow_stat"),
    [
        pytest.param({"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}},
                     "upstream_rq_pending_overflow", id="max-connections-and-pending"),
        pytest.param({"http": {"http2MaxRequests": 1}}, "upstream_rq_active_overflow", id="max-requests"),
    ],
)
async def test_circuit_breaker_overflows_with_503_overloaded(
    mesh: MeshHarness, pool: dict, overflow_stat: str
) -> None:
    slow, backend = programmable_pod(mesh, NS, "slow-1")
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "slow", PORT, pods=[slow])
    await start_sidecars(mesh, slow, web)
    await reachable(mesh, web, "slow", "slow-1")

    traffic_policy(mesh, "slow", connectionPool=pool)
    expect_connections = pool.get("tcp", {}).get("maxConnections")
    expect_requests = pool.get("http", {}).get("http2MaxRequests")

    def limits_applied() -> bool:
        thresholds = active_cluster(web, cluster_of("slow")).get("circuit_breakers", {}).get("thresholds", [{}])[0]
        return (
            (expect_connections is None or thresholds.get("max_connections") == expect_connections)
            and (expect_requests is None or thresholds.get("max_requests") == expect_requests)
        )

    await until_config(mesh, limits_applied, "circuit breaker limits on web's cluster")
    backend.delay = 1.0
    backend.reset_counters()
    results = await burst(web, "slow", 10, path="/cb")

    overloaded = [r for r in results if r.status == 503 and r.headers.get("x-envoy-overloaded") == "true"]
    ok = [r for r in results if r.status == 200]
    assert len(ok) + len(overloaded) == 10, [(r.status, r.headers, r.body) for r in results]
    # One request in flight (plus one pending, for the pending limit); the rest overflow.
    assert 1 <= len(ok) <= 2, statuses(results)
    assert len(overloaded) >= 8, statuses(results)
    assert backend.max_in_flight == 1
    assert backend.requests_for("/cb") == len(ok)
    assert cluster_stat(web, cluster_of("slow"), overflow_stat) == len(overloaded)


async def test_outlier_detection_ejects_the_failing_endpoint(mesh: MeshHarness) -> None:
    good, good_app = programmable_pod(mesh, NS, "api-good", labels={"app": "api"})
    bad, bad_app = programmable_pod(mesh, NS, "api-bad", labels={"app": "api"}, status=503)
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "api", PORT, pods=[good, bad])
    traffic_policy(
        mesh, "api",
        outlierDetection={
            "consecutive5xxErrors": 2, "interval": "1s", "baseEjectionTime": "30s",
            "maxEjectionPercent": 50,
        },
    )
    await start_sidecars(mesh, good, bad, web)
    await until_config(
        mesh,
        lambda: active_cluster(web, cluster_of("api")).get("outlier_detection", {}).get("consecutive_5xx") == 2,
        "outlier detection on web's cluster",
    )
    await mesh.until(lambda: len(web.envoy.cluster_hosts().get(cluster_of("api"), ())) == 2,
                     message="both api endpoints known")

    # Send requests until the bad endpoint has failed twice in a row and is ejected.
    def ejected() -> int:
        return cluster_stat(web, cluster_of("api"), "outlier_detection.ejections_enforced_total")

    seen: Counter[int] = Counter()
    for _ in range(100):
        seen[(await asyncio.to_thread(_one, web, "api", "/warmup", None, 10.0)).status] += 1
        if await asyncio.to_thread(ejected):
            break
    assert await asyncio.to_thread(ejected) >= 1, f"no ejection after {sum(seen.values())} requests: {seen}"
    assert seen[503] >= 2, seen

    bad_before = bad_app.requests_for("/work")
    results = await send(web, "api", 60, path="/work")
    assert statuses(results) == {200: 60}, statuses(results)
    assert {r.name for r in results} == {"api-good"}
    assert bad_app.requests_for("/work") == bad_before == 0
    assert good_app.requests_for("/work") == 60


async def test_local_rate_limit_answers_429_beyond_the_rate(mesh: MeshHarness) -> None:
    api, backend = programmable_pod(mesh, NS, "api-1")
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "api", PORT, pods=[api])
    await start_sidecars(mesh, api, web)
    await reachable(mesh, web, "api", "api-1")

    control = await burst(web, "api", 20, path="/control")
    assert statuses(control) == {200: 20}, statuses(control)

    traffic_policy(mesh, "api", rateLimit={"requests": 5, "per": "1s", "burst": 5})
    # The bucket lives in the destination's inbound sidecar: wait for *its* config.
    await until_config(
        mesh,
        lambda: any(
            "envoy.filters.http.local_ratelimit" in r.get("typed_per_filter_config", {})
            for vhost in route_config(api, "inbound|")
            for r in vhost.get("routes", ())
        ),
        "rate limit on api's inbound routes",
    )
    backend.reset_counters()
    results = await burst(web, "api", 20, path="/limited")
    counts = statuses(results)
    assert set(counts) <= {200, 429}, counts
    # 5 tokens at the start; a burst that straddled a refill may get up to 5 more.
    assert 5 <= counts[200] <= 10, counts
    assert counts[429] >= 10, counts
    limited = [r for r in results if r.status == 429]
    assert all("x-ratelimit-limit" in r.headers for r in limited), limited[0].headers
    # Refused at the destination's sidecar: the app saw only the admitted requests.
    assert backend.requests_for("/limited") == counts[200]


async def test_two_services_on_one_app_port_each_keep_their_own_rate_limit(mesh: MeshHarness) -> None:
    """A pod behind two Services whose ports target the same app port: each is reachable by
    its own name, and a rate limit on one does not touch the other."""
    api, backend = programmable_pod(mesh, NS, "api-1")
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "api", PORT, pods=[api])
    mesh.service(NS, "api-admin", 9090, pods=[api], target_port=PORT)
    await start_sidecars(mesh, api, web)
    await reachable(mesh, web, "api", "api-1")
    await reachable(mesh, web, "api-admin", "api-1")

    traffic_policy(mesh, "api-admin", rateLimit={"requests": 5, "per": "1s", "burst": 5})
    await until_config(
        mesh,
        lambda: any(
            "api-admin" in vhost.get("domains", ())
            and any("envoy.filters.http.local_ratelimit" in r.get("typed_per_filter_config", {})
                    for r in vhost.get("routes", ()))
            for vhost in route_config(api, "inbound|")
        ),
        "api-admin's own limited virtual host on api's inbound routes",
    )
    limited = statuses(await burst(web, "api-admin", 20, path="/admin"))
    assert set(limited) <= {200, 429} and 5 <= limited[200] <= 10, limited
    unlimited = statuses(await burst(web, "api", 20, path="/main"))
    assert unlimited == {200: 20}, unlimited  # the other Service on the same app port
    assert backend.requests_for("/main") == 20


async def test_ring_hash_keeps_each_key_on_one_backend(mesh: MeshHarness) -> None:
    pods = [mesh.pod(NS, f"api-{i}", labels={"app": "api"}) for i in (1, 2, 3)]
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "api", PORT, pods=pods)
    await start_sidecars(mesh, *pods, web)
    await mesh.until(lambda: len(web.envoy.cluster_hosts().get(cluster_of("api"), ())) == 3,
                     timeout=15, message="three api endpoints known")

    # Control: without the policy one key's requests spread over the pods.
    spread = await send(web, "api", 60, headers={"x-user": "alice"})
    assert statuses(spread) == {200: 60}
    assert len({r.json["name"] for r in spread}) >= 2, Counter(r.json["name"] for r in spread)

    traffic_policy(mesh, "api", loadBalancer={"consistentHash": {"httpHeaderName": "x-user"}})
    await until_config(
        mesh, lambda: active_cluster(web, cluster_of("api")).get("lb_policy") == "RING_HASH",
        "ring hash on web's cluster",
    )
    await until_config(
        mesh, lambda: all(r["route"].get("hash_policy") for r in outbound_routes(web, "api")),
        "hash policy on web's route",
    )
    await mesh.until(lambda: len(web.envoy.cluster_hosts().get(cluster_of("api"), ())) == 3,
                     timeout=15, message="three api endpoints in the new cluster")

    owners: dict[str, set[str]] = {}
    for key in [f"user-{i}" for i in range(12)]:
        results = await send(web, "api", 15, headers={"x-user": key})
        assert statuses(results) == {200: 15}
        owners[key] = {r.json["name"] for r in results}
    assert all(len(names) == 1 for names in owners.values()), owners
    # Not trivially sticky: the keys are spread over the ring (12 keys on one of 3 pods
    # would happen with probability ~3**-11).
    assert len(set().union(*owners.values())) >= 2, owners


async def test_active_health_check_takes_failing_endpoint_out(mesh: MeshHarness) -> None:
    good, _good_app = programmable_pod(mesh, NS, "api-good", labels={"app": "api"})
    sick, sick_app = programmable_pod(
        mesh, NS, "api-sick", labels={"app": "api"}, path_status={"/healthz": 503}
    )
    web = mesh.pod(NS, "web-1")
    mesh.service(NS, "api", PORT, pods=[good, sick])
    await start_sidecars(mesh, good, sick, web)
    await mesh.until(lambda: len(web.envoy.cluster_hosts().get(cluster_of("api"), ())) == 2,
                     timeout=15, message="both api endpoints known")

    # Control: the sick pod serves ordinary requests fine, so without checks it gets traffic.
    control = await send(web, "api", 40, path="/control")
    assert statuses(control) == {200: 40}
    assert {r.name for r in control} == {"api-good", "api-sick"}

    traffic_policy(
        mesh, "api", healthCheck={"path": "/healthz", "interval": "1s", "timeout": "1s"}
    )
    sick_host = f"{cluster_of('api')}::{sick.ip}:15006::health_flags::"
    good_host = f"{cluster_of('api')}::{good.ip}:15006::health_flags::"

    def flags() -> dict[str, str]:
        out = {}
        for line in web.envoy.admin_get("/clusters")[1].splitlines():
            for label, prefix in (("sick", sick_host), ("good", good_host)):
                if line.startswith(prefix):
                    out[label] = line[len(prefix):]
        return out

    state = await mesh.until(
        lambda: (f := flags()).get("sick") == "/failed_active_hc" and f.get("good") == "healthy" and f,
        timeout=20, message="sick endpoint failed active health check",
    )
    assert state == {"sick": "/failed_active_hc", "good": "healthy"}
    assert sick_app.requests_for("/healthz") >= 1

    sick_before = sick_app.requests_for("/work")
    results = await send(web, "api", 40, path="/work")
    assert statuses(results) == {200: 40}
    assert {r.name for r in results} == {"api-good"}
    assert sick_app.requests_for("/work") == sick_before == 0
