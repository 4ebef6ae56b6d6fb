"""The load reporting service (xds/lrs.py) driven by a scripted gRPC client, and the
aggregation (load_reports.py): which clusters a proxy is asked to report, what a report adds
up to per Service, and that bad reports are ignored, counted and change nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.load_stats.v3 import lrs_pb2
from google.protobuf import struct_pb2

from tests.support.xds_client import XdsClient, cluster
from xds_server.ca.tokens import TokenIssuer
from xds_server.load_reports import LoadAggregator
from xds_server.model.identity import ProxyClaim
from xds_server.model.mesh import ServiceKey
from xds_server.translate.names import cluster_name
from xds_server.xds import types
from xds_server.xds.auth import Authenticator, AuthMode, GuardSettings, StreamGuard
from xds_server.xds.cache import ResourceCache
from xds_server.xds.lrs import METHOD, ClusterLoad, LoadReportingService, LrsSettings
from xds_server.xds.server import ServerSettings, XdsServer

API = ServiceKey("shop", "api")
DB = ServiceKey("shop", "db")
API_CLUSTER = cluster_name(API, 80)
DB_CLUSTER = cluster_name(DB, 5432)
NODE_ID = "web-0.shop"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(node_id: str = NODE_ID, service_account: str = "web") -> base_pb2.Node:
    n = base_pb2.Node(id=node_id)
    meta = struct_pb2.Struct()
    meta.update({"namespace": "shop", "service_account": service_account, "pod": node_id.split(".")[0]})
    n.metadata.CopyFrom(meta)
    return n


def report(*clusters: tuple[str, int, int, int], seconds: float = 10.0,
           in_flight: int = 0) -> lrs_pb2.LoadStatsRequest:
    """(cluster, successful, errors, issued) per cluster, over `seconds`."""
    request = lrs_pb2.LoadStatsRequest()
    for name, ok, errors, issued in clusters:
        stats = request.cluster_stats.add(cluster_name=name)
        stats.load_report_interval.FromNanoseconds(int(seconds * 1e9))
        locality = stats.upstream_locality_stats.add()
        locality.locality.zone = "z1"
        locality.total_successful_requests = ok
        locality.total_error_requests = errors
        locality.total_issued_requests = issued
        locality.total_requests_in_progress = in_flight
    return request


class LrsStream:
    """One StreamLoadStats call with a queue of requests to send."""

    def __init__(self, channel: grpc.aio.Channel, metadata=None) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        call = channel.stream_stream(
            METHOD, request_serializer=lrs_pb2.LoadStatsRequest.SerializeToString,
            response_deserializer=lrs_pb2.LoadStatsResponse.FromString)
        self.call = call(self._requests(), metadata=metadata)

    async def _requests(self):
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def send(self, request: lrs_pb2.LoadStatsRequest) -> None:
        await self._queue.put(request)

    async def recv(self, timeout: float = 5.0) -> lrs_pb2.LoadStatsResponse:
        return await asyncio.wait_for(self.call.read(), timeout)


@pytest.fixture
async def world(request):
    """A server with the mesh's two outbound clusters and two that are not (inbound, a raw
    one), LRS attached; optional token authentication (`request.param`: an Authenticator)."""
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [cluster(API_CLUSTER), cluster(DB_CLUSTER),
                                   cluster("inbound|8080||shop/web-0"), cluster("raw")])
    authenticator = getattr(request, "param", None)
    hooks = [StreamGuard(authenticator, GuardSettings())] if authenticator is not None else []
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0), hooks=hooks)
    clock = Clock()
    aggregator = LoadAggregator(None, 10.0, clock=clock)
    service = LoadReportingService(
        lambda: server.connections, aggregator, LrsSettings(interval=10.0),
        authenticate=authenticator.authenticate if authenticator is not None else None,
        reportable=aggregator.reportable, clock=clock)
    aggregator.lrs_stats = service.stats
    server.extra_handlers.append(service.handler())
    await server.start()
    channel = grpc.aio.insecure_channel(server.address)
    try:
        yield server, service, aggregator, clock, channel
    finally:
        await channel.close()
        await server.stop(0)


async def ads_proxy(client: XdsClient, node_: base_pb2.Node | None = None):
    """An ADS stream of the proxy holding its (wildcard) clusters."""
    ads = client.ads(node=node_ or node())
    await ads.request(types.CLUSTER)
    await ads.ack(await ads.recv())
    return ads


async def until(probe, timeout: float = 5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not probe():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_asks_for_the_outbound_clusters_and_adds_up_reports(world):
    server, service, aggregator, clock, channel = world
    async with XdsClient(server.address) as client:
        await ads_proxy(client)
        lrs = LrsStream(channel)
        await lrs.send(lrs_pb2.LoadStatsRequest(node=node()))
        asked = await lrs.recv()
        # Only the mesh's outbound clusters: not the proxy's inbound one, not raw resources.
        assert list(asked.clusters) == sorted([API_CLUSTER, DB_CLUSTER])
        assert not asked.send_all_clusters
        assert asked.load_reporting_interval.ToNanoseconds() == 10 * 10**9

        await lrs.send(report((API_CLUSTER, 90, 10, 100), (DB_CLUSTER, 20, 0, 20), in_flight=4))
        await until(lambda: service.stats.reports == 1)
        loads = aggregator.services()
        assert loads[API].requests_per_second == pytest.approx(10.0)
        assert loads[API].error_ratio == pytest.approx(0.1)
        assert loads[API].in_flight == 4
        assert loads[DB].requests_per_second == pytest.approx(2.0)
        assert aggregator.totals[API] == [100, 10]

        # A later report replaces the proxy's window; counters keep adding.
        clock.now += 10
        await lrs.send(report((API_CLUSTER, 50, 0, 50)))
        await until(lambda: service.stats.reports == 2)
        assert aggregator.services()[API].requests_per_second == pytest.approx(5.0)
        assert aggregator.totals[API] == [150, 10]
        # A proxy that stops reporting drops out of the rate after three intervals.
        clock.now += 31
        assert API not in aggregator.services()

        # When the stream closes its windows go (memory follows connected proxies).
        await lrs.send(None)
        await until(lambda: aggregator.reporting_proxies() == 0)
        assert service.stats.streams == 0


@pytest.mark.parametrize("bad, reason", [
    (report(("outbound|80||other.shop.svc.cluster.local", 1, 0, 1)), "unknown_cluster"),
    (report(("inbound|8080||shop/web-0", 1, 0, 1)), "unknown_cluster"),
    (report((API_CLUSTER, 2**64 - 1, 0, 1)), "invalid_counts"),  # a negative number as uint64
    (report((API_CLUSTER, 1, 0, 1), in_flight=2**63), "invalid_counts"),
    (report((API_CLUSTER, 1, 0, 1), seconds=-5), "invalid_interval"),
    (report((API_CLUSTER, 1, 0, 1), seconds=3600), "invalid_interval"),
])
async def test_bad_reports_are_ignored_and_counted(world, bad, reason):
    server, service, aggregator, _clock, channel = world
    async with XdsClient(server.address) as client:
        await ads_proxy(client)
        lrs = LrsStream(channel)
        await lrs.send(lrs_pb2.LoadStatsRequest(node=node()))
        await lrs.recv()
        # A report mixing a good cluster with a bad one is ignored whole.
        bad.cluster_stats.add().CopyFrom(report((DB_CLUSTER, 5, 0, 5)).cluster_stats[0])
        await lrs.send(bad)
        await until(lambda: service.stats.ignored[reason] == 1)
        assert aggregator.services() == {} and aggregator.totals == {}
        # The stream stays usable: a good report afterwards counts.
        await lrs.send(report((API_CLUSTER, 10, 0, 10)))
        await until(lambda: service.stats.reports == 1)
        assert aggregator.totals == {API: [10, 0]}
        assert sum(service.stats.ignored.values()) == 1


async def test_reports_faster_than_the_interval_are_ignored_per_proxy(world):
    server, service, aggregator, clock, channel = world
    async with XdsClient(server.address) as client:
        await ads_proxy(client)
        first, second = LrsStream(channel), LrsStream(channel)
        for lrs in (first, second):
            await lrs.send(lrs_pb2.LoadStatsRequest(node=node()))
            await lrs.recv()
        await first.send(report((API_CLUSTER, 10, 0, 10)))
        await until(lambda: service.stats.reports == 1)
        clock.now += 2  # well inside the 10 s interval, on another stream of the same proxy
        await second.send(report((API_CLUSTER, 10, 0, 10)))
        await first.send(report((API_CLUSTER, 10, 0, 10)))
        await until(lambda: service.stats.ignored["too_frequent"] == 2)
        assert aggregator.totals == {API: [10, 0]}
        clock.now += 8
        await second.send(report((API_CLUSTER, 10, 0, 10)))
        await until(lambda: service.stats.reports == 2)


async def test_a_proxy_without_an_xds_stream_is_not_counted(world):
    _server, service, aggregator, _clock, channel = world
    lrs = LrsStream(channel)
    await lrs.send(lrs_pb2.LoadStatsRequest(node=node("ghost-0.shop")))
    assert list((await lrs.recv()).clusters) == []
    await lrs.send(report((API_CLUSTER, 10, 0, 10)))
    await until(lambda: service.stats.ignored["unknown_proxy"] == 1)
    assert aggregator.totals == {} and aggregator.reporting_proxies() == 0


async def test_first_request_needs_a_node(world):
    _server, _service, _aggregator, _clock, channel = world
    lrs = LrsStream(channel)
    await lrs.send(lrs_pb2.LoadStatsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await lrs.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_reports_need_the_proxys_own_credential(tmp_path: Path):
    """With tokens, a load report stream proves the identity its node claims, like the xDS
    stream; another identity cannot report for that node."""
    issuer = TokenIssuer(tmp_path / "certs")
    authenticator = Authenticator(AuthMode.TOKENS, tokens=issuer)
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [cluster(API_CLUSTER)])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0),
                       hooks=[StreamGuard(authenticator, GuardSettings())])
    aggregator = LoadAggregator(None, 10.0)
    service = LoadReportingService(lambda: server.connections, aggregator, LrsSettings(),
                                   authenticate=authenticator.authenticate,
                                   reportable=aggregator.reportable)
    server.extra_handlers.append(service.handler())
    await server.start()
    web = issuer.create("shop", "web", timedelta(hours=1))
    other = issuer.create("shop", "other", timedelta(hours=1))
    channel = grpc.aio.insecure_channel(server.address)
    try:
        async with XdsClient(server.address, metadata=[("authorization", f"Bearer {web}")]) as client:
            await ads_proxy(client)
            for metadata in (None, [("authorization", f"Bearer {other}")]):
                lrs = LrsStream(channel, metadata=metadata)
                await lrs.send(lrs_pb2.LoadStatsRequest(node=node()))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await lrs.recv()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert service.stats.refused["unauthenticated"] == 2
            lrs = LrsStream(channel, metadata=[("authorization", f"Bearer {web}")])
            await lrs.send(lrs_pb2.LoadStatsRequest(node=node()))
            assert list((await lrs.recv()).clusters) == [API_CLUSTER]
            await lrs.send(report((API_CLUSTER, 3, 0, 3)))
            await until(lambda: service.stats.reports == 1)
            await lrs.send(None)
    finally:
        await channel.close()
        await server.stop(0)


def test_aggregation_is_bounded_by_proxies_and_services():
    """What a proxy sends cannot grow the aggregation: one window per (proxy, service) and one
    counter pair per Service; Services that left the mesh are pruned."""
    clock = Clock()
    aggregator = LoadAggregator(None, 10.0, clock=clock)
    claim = ProxyClaim(node_id="web-0.shop", namespace="shop", service_account="web", pod="web-0")
    for _ in range(1000):
        clock.now += 10
        aggregator.report(claim, [ClusterLoad(API_CLUSTER, 10.0, 10, 0, 10, 1),
                                  ClusterLoad(cluster_name(API, 8080), 10.0, 5, 5, 10, 1)])
    assert aggregator.totals == {API: [20000, 5000]}
    load = aggregator.services()[API]  # both ports of one Service add up
    assert (load.requests_per_second, load.error_ratio, load.in_flight) == (2.0, 0.25, 2)
    assert aggregator.reporting_proxies() == 1
    aggregator.prune({})
    assert aggregator.totals == {}


def test_replicas_add_up_in_prometheus():
    """Two replicas, each with its own proxies: what Prometheus would scrape from both, summed
    by (namespace, service), is the mesh's total; the error ratio across replicas is summed
    errors over summed requests (as manifests/autoscaling's adapter rule computes it)."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client import CollectorRegistry, generate_latest

    replicas = [LoadAggregator(None, 10.0), LoadAggregator(None, 10.0)]
    traffic = [(0, "web-0", 100, 0, 3), (0, "web-1", 300, 30, 1), (1, "web-2", 600, 6, 2)]
    for replica, pod, ok, errors, in_flight in traffic:
        claim = ProxyClaim(node_id=f"{pod}.shop", namespace="shop", service_account="web", pod=pod)
        replicas[replica].report(claim, [ClusterLoad(API_CLUSTER, 10.0, ok, errors, ok + errors, in_flight)])
    sums: dict[str, float] = {}
    for aggregator in replicas:
        registry = CollectorRegistry()
        registry.register(type("C", (), {"collect": aggregator.collect})())
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                if sample.labels.get("service") == "api":
                    sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    assert sums["xds_server_service_requests_per_second"] == pytest.approx((100 + 330 + 606) / 10)
    assert sums["xds_server_service_errors_per_second"] == pytest.approx(3.6)
    assert sums["xds_server_service_requests_in_flight"] == 6
    assert sums["xds_server_service_requests_total"] == 1036
    ratio = sums["xds_server_service_errors_per_second"] / sums["xds_server_service_requests_per_second"]
    assert ratio == pytest.approx(36 / 1036)
