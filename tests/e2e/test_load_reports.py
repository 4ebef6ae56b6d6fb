"""Load reports (LRS) from real Envoy sidecars: what the server aggregates per destination
Service matches the traffic an app sent through its sidecar, errors show in the error
ratio, and the Prometheus exposition parses with Prometheus' own parser."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.mesh import MeshHarness, until
from tests.support.programmable import programmable_pod
from xds_server.metrics import Metrics
from xds_server.model.mesh import ServiceKey
from xds_server.xds.lrs import LrsSettings

pytestmark = pytest.mark.xdist_group("envoy")

API = ServiceKey("shop", "api")
INTERVAL = 1.0


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, parsed as Prometheus parses it."""
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _api(name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, (("namespace", "shop"), ("service", "api")))


async def _mesh(tmp_path):
    mesh = MeshHarness(tmp_path / "mesh", load_reports=LrsSettings(interval=INTERVAL))
    await mesh.start()
    frontend = mesh.pod("shop", "frontend", service_account="frontend")
    api_pods = [programmable_pod(mesh, "shop", f"api-{i}", service_account="api") for i in range(2)]
    mesh.service("shop", "api", 80, pods=[p for p, _ in api_pods])
    mesh.service("shop", "frontend", 80, pods=[frontend])
    await asyncio.gather(*(mesh.sidecar(p) for p in [frontend] + [p for p, _ in api_pods]))
    return mesh, frontend, [b for _, b in api_pods]


def _send(frontend, count: int) -> list[int]:
    return [frontend.request("api").status for _ in range(count)]


async def test_reported_counts_match_traffic_and_errors_show(tmp_path):
    mesh, frontend, backends = await _mesh(tmp_path)
    metrics = Metrics()
    metrics.attach_load(mesh.load)
    try:
        # Routes are in place once a request gets through.
        await until(lambda: frontend.request("api").status == 200, 20, "api reachable")
        await until(lambda: mesh.load.totals.get(API, [0])[0] >= 1, 20, "first report")
        before = _samples(metrics)[_api("xds_server_service_requests_total")]
        sent = 400
        statuses = await asyncio.to_thread(_send, frontend, sent)
        assert statuses == [200] * sent
        # Every request shows up in a report within a few intervals; no request is counted
        # twice (the count stays at what was sent once later reports arrive).
        await until(lambda: mesh.load.totals[API][0] - before >= sent * 0.95, 20,
                    "reports covering the traffic")
        await asyncio.sleep(3 * INTERVAL)
        samples = _samples(metrics)
        counted = samples[_api("xds_server_service_requests_total")] - before
        assert abs(counted - sent) <= sent * 0.05, (counted, sent)
        assert samples[_api("xds_server_service_request_errors_total")] == 0
        assert samples[_api("xds_server_service_ready_endpoints")] == 2
        assert samples[("xds_server_load_reports_total", (("result", "accepted"),))] > 0
        assert samples[("xds_server_load_reports_total", (("result", "unknown_cluster"),))] == 0

        # While traffic flows the rate is positive; an error burst shows in the ratio.
        for backend in backends:
            backend.status = 503
        stop = threading.Event()

        def keep_sending() -> None:
            while not stop.is_set():
                frontend.request("api")

        sender = threading.Thread(target=keep_sending, daemon=True)
        sender.start()
        try:
            loads = await until(
                lambda: (lambda s: s if s.get(API) and s[API].error_ratio > 0.9 else None)(
                    mesh.load.services()), 20, "the error burst in the error ratio")
            assert loads[API].requests_per_second > 0
            samples = _samples(metrics)
            assert samples[_api("xds_server_service_error_ratio")] > 0.5
            assert samples[_api("xds_server_service_request_errors_total")] > 0
        finally:
            stop.set()
            await asyncio.to_thread(sender.join, 10)
    finally:
        metrics.close()
        await mesh.stop()


async def test_sidecars_with_tokens_report_under_their_proven_identity(tmp_path):
    """With `--auth tokens` the sidecar's LRS stream carries its bootstrap's token, proves the
    identity its xDS stream proved, and its reports count; nothing is refused."""
    from datetime import timedelta

    from xds_server.ca.tokens import TokenIssuer
    from xds_server.xds.auth import Authenticator, AuthMode, GuardSettings, StreamGuard

    issuer = TokenIssuer(tmp_path / "ca")
    guard = StreamGuard(Authenticator(AuthMode.TOKENS, tokens=issuer), GuardSettings())
    mesh = MeshHarness(tmp_path / "mesh", load_reports=LrsSettings(interval=INTERVAL), hooks=[guard])
    await mesh.start()
    try:
        frontend = mesh.pod("shop", "frontend", service_account="frontend")
        api, _backend = programmable_pod(mesh, "shop", "api-0", service_account="api")
        mesh.service("shop", "api", 80, pods=[api])
        await asyncio.gather(*(
            mesh.sidecar(p, token=issuer.create("shop", p.service_account, timedelta(hours=1)))
            for p in (frontend, api)))
        await until(lambda: frontend.request("api").status == 200, 20, "api reachable")
        statuses = await asyncio.to_thread(_send, frontend, 50)
        assert statuses == [200] * 50
        await until(lambda: mesh.load.totals.get(API, [0])[0] >= 50, 20, "reports of the traffic")
        service = mesh.load.lrs_stats
        assert service is not None and service.refused == {} and service.ignored == {}
    finally:
        await mesh.stop()
