"""Metrics: counted through the server's, store's, cache's and CA's hooks; gauges read live;
the exposition parses with Prometheus's own text parser; convergence is timed from a change
to the last ACK of it."""

from __future__ import annotations

import asyncio
import types as pytypes
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.xds_client import XdsClient, cluster
from xds_server.metrics import CONVERGENCE_GIVE_UP, ConvergenceTracker, Metrics
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer
from xds_server.xds.hooks import HookChain
from xds_server.xds.stream import TypeState


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def families(metrics: Metrics) -> dict[str, object]:
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


# The convergence tracker on its own ------------------------------------------------------------


class FakeConn:
    def __init__(self) -> None:
        self.state = pytypes.SimpleNamespace(types={types.CLUSTER: TypeState(types.CLUSTER, True)})

    def busy(self) -> None:
        self.state.types[types.CLUSTER].dirty = True

    def settle(self) -> None:
        t = self.state.types[types.CLUSTER]
        t.dirty = False
        t.pending_nonce = None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tracker(clock: Clock) -> tuple[ConvergenceTracker, list[float], list[int]]:
    observed: list[float] = []
    abandoned: list[int] = []
    return ConvergenceTracker(observed.append, lambda: abandoned.append(1), clock), observed, abandoned


def test_convergence_is_first_change_to_last_ack_across_streams() -> None:
    clock = Clock()
    t, observed, _ = tracker(clock)
    a, b = FakeConn(), FakeConn()
    a.busy(), b.busy()
    t.started(0.25, [a, b], lambda: [a, b])  # the burst began 0.25 s before the flush
    clock.now = 100.5
    a.settle()
    t.answered(a)
    assert observed == []  # b has not acknowledged yet
    clock.now = 101.0
    b.settle()
    t.answered(b)
    assert observed == [pytest.approx(1.25)]
    assert t.open_changes == 0


def test_a_stream_still_busy_is_not_settled_by_an_ack() -> None:
    clock = Clock()
    t, observed, _ = tracker(clock)
    a = FakeConn()
    a.busy()
    t.started(0.0, [a], lambda: [a])
    clock.now = 100.2
    a.state.types[types.CLUSTER].pending_nonce = "7"  # acked one response, another in flight
    a.state.types[types.CLUSTER].dirty = False
    t.answered(a)
    assert observed == []
    clock.now = 100.4
    a.settle()
    t.answered(a)
    assert observed == [pytest.approx(0.4)]


def test_closed_streams_and_streams_with_nothing_to_send_do_not_hold_a_change_up() -> None:
    clock = Clock()
    t, observed, _ = tracker(clock)
    gone, idle, acking = FakeConn(), FakeConn(), FakeConn()
    for c in (gone, idle, acking):
        c.busy()
    live = {idle, acking}
    t.started(0.0, [gone, idle, acking], lambda: live)
    idle.settle()  # its view had nothing new for it: no push, no ACK
    clock.now = 100.3
    acking.settle()
    t.answered(acking)
    assert observed == []  # `gone` is not known to be gone until the sweep
    t.sweep()
    assert observed == [pytest.approx(0.3)]


def test_a_change_never_acknowledged_is_given_up_not_kept_forever() -> None:
    clock = Clock()
    t, observed, abandoned = tracker(clock)
    stuck = FakeConn()
    stuck.busy()
    t.started(0.0, [stuck], lambda: [stuck])
    clock.now += CONVERGENCE_GIVE_UP + 1
    t.sweep()
    assert observed == [] and abandoned == [1] and t.open_changes == 0


def test_a_change_concerning_no_stream_is_not_timed() -> None:
    clock = Clock()
    t, observed, _ = tracker(clock)
    t.started(0.1, [], lambda: [])
    assert t.open_changes == 0 and observed == []


# With a real server and a scripted gRPC client -------------------------------------------------


async def _eventually(probe, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := probe()):
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
    return value


async def test_pushes_acks_nacks_convergence_and_live_gauges() -> None:
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [cluster("a")])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0.02))
    metrics = Metrics()
    metrics.attach_server(server)
    metrics.attach_cache(cache)
    await server.start()
    try:
        async with XdsClient(server.address, node_id="metrics-proxy") as client:
            ads = client.ads()
            await ads.request(types.CLUSTER)
            first = await ads.recv()
            await ads.ack(first)
            await _eventually(lambda: sample(metrics, "xds_server_acks_total", type="CDS") == 1)
            assert sample(metrics, "xds_server_pushes_total", type="CDS") == 1
            assert sample(metrics, "xds_server_push_duration_seconds_count", type="CDS") == 1
            assert sample(metrics, "xds_server_config_size_bytes_sum", type="CDS") == len(
                first.SerializeToString())
            assert sample(metrics, "xds_server_connected_proxies", type="CDS", variant="sotw") == 1
            assert sample(metrics, "xds_server_streams", variant="sotw") == 1
            assert sample(metrics, "xds_server_convergence_seconds_count") == 0  # no change yet

            # A change: debounced, pushed, acknowledged -> one convergence observation.
            cache.update(types.CLUSTER, upsert=[cluster("a", connect_timeout_ms=2000)])
            second = await ads.recv()
            await ads.ack(second)
            await _eventually(lambda: sample(metrics, "xds_server_convergence_seconds_count") == 1)
            converged = sample(metrics, "xds_server_convergence_seconds_sum")
            assert converged > 0
            assert sample(metrics, "xds_server_debounce_seconds_count") == 1
            assert sample(metrics, "xds_server_resource_changes_total", type="CDS") == 1  # since attached

            # A rejected change: the NACK is counted by type and also ends the convergence.
            cache.update(types.CLUSTER, upsert=[cluster("a", connect_timeout_ms=3000)])
            third = await ads.recv()
            await ads.nack(third, "bad cluster", accepted_version=second.version_info)
            await _eventually(lambda: sample(metrics, "xds_server_nacks_total", type="CDS") == 1)
            await _eventually(lambda: sample(metrics, "xds_server_convergence_seconds_count") == 2)

            parsed = families(metrics)
            assert parsed["xds_server_nacks"].type == "counter"
            assert parsed["xds_server_convergence_seconds"].type == "histogram"
            assert parsed["xds_server_connected_proxies"].type == "gauge"
            assert parsed["xds_server_push_queue_depth"].samples[0].value == 0
        await _eventually(lambda: sample(metrics, "xds_server_streams", variant="sotw") == 0)
    finally:
        metrics.close()
        await server.stop(0.1)


async def test_a_change_the_client_does_not_subscribe_to_is_not_timed() -> None:
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [cluster("a")])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0))
    metrics = Metrics()
    metrics.attach_server(server)
    await server.start()
    try:
        async with XdsClient(server.address, node_id="metrics-proxy") as client:
            ads = client.ads()
            await ads.request(types.CLUSTER)
            await ads.ack(await ads.recv())
            from tests.support.xds_client import endpoints

            cache.update(types.ENDPOINT, upsert=[endpoints("elsewhere", 8080)])
            await ads.expect_silence(0.2)
            assert sample(metrics, "xds_server_debounce_seconds_count") == 1
            assert sample(metrics, "xds_server_convergence_seconds_count") == 0
    finally:
        metrics.close()
        await server.stop(0.1)


def test_sources_ca_and_auth_metrics(tmp_path: Path) -> None:
    from xds_server.ca.authority import CertificateAuthority
    from xds_server.model.identity import Identity
    from xds_server.ca.svid import SvidIssuer
    from xds_server.model.mesh import Service, ServicePort
    from xds_server.model.store import MeshStore

    metrics = Metrics()
    store = MeshStore()
    metrics.attach_store(store)
    store.sync("files", [Service("shop", "api", (ServicePort(80),))])
    store.sync("files", [Service("shop", "api", (ServicePort(8080),))])
    store.sync("files", [])
    assert sample(metrics, "xds_server_source_events_total", kind="Service", op="added") == 1
    assert sample(metrics, "xds_server_source_events_total", kind="Service", op="updated") == 1
    assert sample(metrics, "xds_server_source_events_total", kind="Service", op="deleted") == 1

    broken = pytypes.SimpleNamespace(errors=["a.yaml:3: Service shop/x: spec.ports: bad"], synced=True)
    waiting = pytypes.SimpleNamespace(errors=[], synced=False)
    metrics.attach_sources({"files": broken, "kubernetes": waiting})
    assert sample(metrics, "xds_server_source_errors", source="files") == 1
    assert sample(metrics, "xds_server_source_synced", source="kubernetes") == 0

    authority = CertificateAuthority(tmp_path / "ca")
    issuer = SvidIssuer(authority)
    metrics.attach_ca(authority, issuer.registry)
    issued = issuer.issue_for_identity(Identity("shop", "api"), proxy="api-0.shop")
    assert sample(metrics, "xds_server_certificates_issued_total", kind="sds") == 1
    assert sample(metrics, "xds_server_certificates_valid") == 1
    assert sample(metrics, "xds_server_certificate_earliest_expiry_timestamp_seconds") == \
        issued.not_after.timestamp()
    assert sample(metrics, "xds_server_ca_expiry_timestamp_seconds") == authority.state.not_after.timestamp()

    metrics.auth_failure("admin", "missing")
    assert sample(metrics, "xds_server_auth_failures_total", surface="admin", reason="missing") == 1
    # Everything above is valid Prometheus text.
    assert "xds_server_auth_failures" in families(metrics)


def test_xds_stream_auth_failures_are_read_from_the_stream_guard() -> None:
    import collections

    metrics = Metrics()
    guard = pytypes.SimpleNamespace(stats=pytypes.SimpleNamespace(
        auth_failures=collections.Counter({"bad-token": 2, "identity-mismatch": 1})))
    server = pytypes.SimpleNamespace(connections=set(), hooks=HookChain(), pending_changes=0,
                                     writes_in_flight=0)
    metrics.attach_server(server)
    metrics.attach_guard(guard)
    metrics.auth_failure("admin", "unknown_token")
    assert sample(metrics, "xds_server_auth_failures_total", surface="xds", reason="bad-token") == 2
    assert sample(metrics, "xds_server_auth_failures_total", surface="xds",
                  reason="identity-mismatch") == 1
    assert sample(metrics, "xds_server_auth_failures_total", surface="admin",
                  reason="unknown_token") == 1
    metrics.close()
    assert len(server.hooks) == 0


def test_sds_and_csr_refusals_are_counted_by_surface_and_reason() -> None:
    import collections

    metrics = Metrics()
    sds_refused = collections.Counter({"other-identity": 3})
    csr_failures = collections.Counter({"unauthenticated": 2, "invalid-request": 1})
    metrics.attach_refusals("sds", sds_refused)
    metrics.attach_refusals("ca", csr_failures)
    assert sample(metrics, "xds_server_auth_failures_total", surface="sds", reason="other-identity") == 3
    assert sample(metrics, "xds_server_auth_failures_total", surface="ca", reason="unauthenticated") == 2
    csr_failures["unauthenticated"] += 1  # read live at every scrape
    assert sample(metrics, "xds_server_auth_failures_total", surface="ca", reason="unauthenticated") == 3
    metrics.close()
