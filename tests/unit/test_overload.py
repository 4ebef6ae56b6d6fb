"""Under churn and overload (issue 15), through the real server with a scripted raw client:
removals are delivered within a bound while other types keep changing (CONFORMANCE rule 6,
make-before-break still kept), and stream admission refuses what is beyond its limits promptly
with UNAVAILABLE, counted, while admitted streams get their full config first."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from tests.support.hooks import OnPush
from tests.support.xds_client import (
    XdsClient,
    cluster,
    endpoints,
    eventually,
    listener,
    route,
    sotw_names,
    sotw_resources,
    delta_resources,
)
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE

# The bound this suite holds the server to: with a client that answers promptly, a removal
# whose referrers were updated reaches the stream within REMOVAL_BOUND seconds of the change,
# however fast EDS keeps changing (a referrer round trip plus the outstanding response of the
# removed type; milliseconds on loopback, the rest is margin for a loaded CI machine).
REMOVAL_BOUND = 1.0
CHURN_INTERVAL = 0.002  # an EDS change every 2 ms
APPLY = 0.005  # the client takes 5 ms to apply (and ACK) an update of the churned type


async def start_server(cache: ResourceCache, **settings) -> XdsServer:
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0, **settings))
    await server.start()
    return server


@pytest.fixture
def cache() -> ResourceCache:
    return ResourceCache()


@pytest.fixture
async def server(cache):
    server = await start_server(cache)
    try:
        yield server
    finally:
        await server.stop(0)


class AutoAck:
    """Plays a client: ACKs every response, those of a type in `delay` after that long (the
    time a proxy takes to apply them; longer than the churn interval, so the churned type is
    never settled), noting when each response came and when each was ACKed (monotonic)."""

    def __init__(self, stream, delay: dict[str, float]) -> None:
        self.stream = stream
        self.delay = delay
        self.log: list[tuple[float, object]] = []  # (received at, response)
        self.acked: dict[str, float] = {}  # nonce -> ACK sent at
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            response = await self.stream.recv(timeout=30)
            self.log.append((time.monotonic(), response))
            if self.delay.get(response.type_url):
                await asyncio.sleep(self.delay[response.type_url])
            await self.stream.ack(response)
            self.acked[response.nonce] = time.monotonic()

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except (asyncio.CancelledError, Exception):
            pass


async def churn(cache: ResourceCache, type_url: str, stop: asyncio.Event,
                route_to: list[str]) -> int:
    """Change keep's endpoints (EDS) or route r's prefix (RDS, to cluster route_to[0])
    every CHURN_INTERVAL until `stop`."""
    changes = 0
    while not stop.is_set():
        changes += 1
        if type_url == EDS:
            cache.update(EDS, [endpoints("keep", 10_000 + changes % 50_000)])
        else:
            cache.update(RDS, [route("r", route_to[0], prefix=f"/{changes}")])
        await asyncio.sleep(CHURN_INTERVAL)
    return changes


def mesh(cache: ResourceCache) -> None:
    cache.set_type(CDS, [cluster("a"), cluster("keep")])
    cache.set_type(EDS, [endpoints("a", 8080), endpoints("keep", 9090)])
    cache.set_type(LDS, [listener("l", 15001, "r")])
    cache.set_type(RDS, [route("r", "a")])


@pytest.mark.parametrize("churned", [EDS, RDS], ids=["eds-churn", "rds-churn"])
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_cluster_removal_arrives_within_bound_under_constant_churn(
    server, cache, delta, churned
):
    """Route r moves from cluster a to keep and a is removed, while keep's endpoints (or r
    itself, a referrer of clusters) change every 2 ms, the client taking 5 ms to ACK each
    update of that type. a's removal must reach the stream within REMOVAL_BOUND, and only
    after a route update that stopped using it was ACKed (make-before-break). Before issue 15
    a removal waited for every other type to be settled, which this churn never allows; a
    churning referrer counts as updated once it ACKed a response computed after the removal
    was found."""
    mesh(cache)
    async with XdsClient(server.address) as client:
        ads = client.ads_delta() if delta else client.ads()
        for type_url, names in ((CDS, []), (EDS, ["a", "keep"]), (LDS, []), (RDS, ["r"])):
            await ads.request(type_url, names)
            await ads.ack(await ads.recv())
        acker = AutoAck(ads, {churned: APPLY})
        stop = asyncio.Event()
        route_to = ["a"]
        churner = asyncio.create_task(churn(cache, churned, stop, route_to))
        try:
            await asyncio.sleep(0.3)  # churn in full swing
            changed_at = time.monotonic()
            route_to[0] = "keep"
            cache.set_type(RDS, [route("r", "keep")])
            cache.set_type(CDS, [cluster("keep")])

            def removal_seen() -> tuple[float, object] | None:
                for at, response in acker.log:
                    if response.type_url != CDS or at < changed_at:
                        continue
                    gone = ("a" in response.removed_resources) if delta else (
                        "a" not in sotw_names(response))
                    if gone:
                        return at, response
                return None

            deadline = changed_at + 10
            while (seen := removal_seen()) is None and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            stop.set()
            changes = await churner
            await acker.stop()
        assert seen is not None, "cluster a was never removed under EDS churn"
        removed_at, _ = seen
        assert removed_at - changed_at < REMOVAL_BOUND, removed_at - changed_at
        churn_during = [r for at, r in acker.log
                        if r.type_url == churned and changed_at <= at <= removed_at]
        assert changes > 50
        # Make-before-break: the route update that stops using a was ACKed before a went.
        route_updates = [
            (at, r) for at, r in acker.log if r.type_url == RDS and at >= changed_at
            and (delta_resources(r) if delta else sotw_resources(r))["r"]
            .virtual_hosts[0].routes[0].route.cluster == "keep"
        ]
        assert route_updates, "the route update never came"
        assert acker.acked[route_updates[0][1].nonce] <= removed_at
        # ... and the churned type kept flowing meanwhile (nothing waited for the removal).
        assert churn_during or removed_at - changed_at < 0.05


# Admission ---------------------------------------------------------------------------------------


async def refused_at_open(stream, within: float = 0.5) -> tuple[grpc.StatusCode, str] | None:
    """The status a stream was ended with if the server refused it at open (before any
    request: the client sends none until it knows), else None once `within` has passed."""
    try:
        code = await asyncio.wait_for(asyncio.shield(stream.call.code()), within)
    except TimeoutError:
        return None
    return code, await stream.call.details()


async def test_stream_opens_beyond_the_rate_are_refused_promptly_with_unavailable(cache):
    """Twenty streams opened in a row against a rate of one per 10 s with a burst of 5: five
    are admitted and get their full config; the others are refused at once (each within
    0.5 s of opening, before sending anything: well before any client would give up) with
    UNAVAILABLE, which clients back off and retry on, and every refusal is counted in the
    metrics and the admin API's overload state."""
    from xds_server.metrics import Metrics, counter_value

    cache.set_type(CDS, [cluster("a"), cluster("b")])
    server = await start_server(cache, max_stream_opens_per_second=0.1, stream_open_burst=5)
    metrics = Metrics()
    metrics.attach_server(server)
    try:
        async with XdsClient(server.address) as client:
            admitted, refused = [], []
            for _ in range(20):
                stream = client.ads(read=False)
                status = await refused_at_open(stream)
                if status is None:
                    admitted.append(stream)
                    await stream.request(CDS)
                else:
                    refused.append(status)
            configs = [sorted(sotw_names(await s.recv(timeout=5))) for s in admitted]
        assert len(admitted) == 5
        assert configs == [["a", "b"]] * 5
        assert len(refused) == 15
        assert all(code == grpc.StatusCode.UNAVAILABLE and "retry" in details
                   for code, details in refused), refused
        assert server.stats.refused_open_rate == 15
        assert server.overload()["refused_open_rate"] == 15
        assert counter_value(metrics.registry, "xds_server_stream_admission_refusals_total",
                             {"reason": "rate"}) == 15
        assert counter_value(metrics.registry, "xds_server_first_config_seconds_count") == 0
    finally:
        metrics.close()
        await server.stop(0)


async def test_streams_beyond_the_initializing_cap_are_refused_until_one_holds_its_config(cache):
    """With at most two streams being brought to their first config, a third open is refused
    (UNAVAILABLE) while both still wait for their ACK; once one ACKs it holds its config, the
    time it took is recorded, and a new stream is admitted."""
    from xds_server.metrics import Metrics, counter_value

    cache.set_type(CDS, [cluster("a")])
    server = await start_server(cache, max_initializing_streams=2)
    metrics = Metrics()
    metrics.attach_server(server)
    try:
        async with XdsClient(server.address) as client:
            first, second = client.ads(), client.ads()
            for stream in (first, second):
                await stream.request(CDS)
            responses = [await first.recv(), await second.recv()]
            assert len(server.initializing) == 2
            assert counter_value(metrics.registry, "xds_server_initializing_streams") == 2

            third = client.ads(read=False)
            code, details = await refused_at_open(third, within=2) or (None, "")
            assert code == grpc.StatusCode.UNAVAILABLE and "first config" in details
            assert counter_value(metrics.registry, "xds_server_stream_admission_refusals_total",
                                 {"reason": "initializing"}) == 1

            await first.ack(responses[0])
            await eventually(lambda: len(server.initializing) == 1, what="first stream synced")
            assert server.stats.first_configs == 1
            assert counter_value(metrics.registry, "xds_server_first_config_seconds_count") == 1

            fourth = client.ads()
            await fourth.request(CDS)
            assert sotw_names(await fourth.recv()) == ["a"]
            assert server.overload()["refused_initializing"] == 1
    finally:
        metrics.close()
        await server.stop(0)


async def test_first_config_is_served_before_incremental_pushes(cache):
    """One push slot, held by a write to a client that stopped reading (it gives the slot
    back after slow_write_seconds). Meanwhile ten synced streams wait to be sent a change
    and then a new stream asks for its first config: when the slot frees, the new stream
    is served first, ahead of all ten incremental pushes that were queued before it."""
    cache.set_type(CDS, [cluster(f"big-{i}", stat_name="x" * 1_000_000) for i in range(32)])
    cache.set_type(LDS, [listener("l", 15000)])
    server = await start_server(cache, max_concurrent_pushes=1, slow_write_seconds=2.0)
    order: list[tuple[str, str]] = []
    server.hooks.add(OnPush(lambda conn, push: order.append((conn.proxy_id, push.type_url))))
    try:
        clients = [XdsClient(server.address, node_id=f"synced-{i}") for i in range(10)]
        stuck_client = XdsClient(server.address, node_id="stuck")
        new_client = XdsClient(server.address, node_id="new")
        try:
            synced = [c.ads() for c in clients]
            for stream in synced:
                await stream.request(LDS)
                await stream.ack(await stream.recv())
            stuck = stuck_client.ads(read=False)
            await stuck.request(CDS)  # ~32 MB: its write blocks, holding the only slot
            await eventually(lambda: server.writes_in_flight == 1, what="stuck write")
            cache.set_type(LDS, [listener("l", 15001)])
            await eventually(lambda: server.overload()["pushes_waiting_incremental"] == 10,
                             what="incremental pushes queued")
            new = new_client.ads()
            await new.request(LDS)
            await eventually(lambda: server.overload()["pushes_waiting_first_config"] == 1,
                             what="first config queued")
            assert server.writes_in_flight == 1  # the slot is still held by the stuck write
            assert sotw_names(await new.recv(timeout=5)) == ["l"]
            for stream in synced:
                got = await stream.recv(timeout=5)
                assert sotw_resources(got)["l"].address.socket_address.port_value == 15001
            # `pushed` is reported once the server's write returns, which may be just after
            # the client has the message.
            await eventually(lambda: sum(t == LDS for _, t in order) == 21, what="all pushes")
        finally:
            for c in (*clients, stuck_client, new_client):
                await c.close()
        after = [proxy for proxy, type_url in order if type_url == LDS][10:]  # initial ten
        assert after[0] == "new", after
        assert sorted(after[1:]) == sorted(f"synced-{i}" for i in range(10))
        assert server._push_slots.granted_first >= 1
    finally:
        await server.stop(0)


# Reconnects cost what changed (issue 15 item 3) --------------------------------------------------


async def test_delta_resume_costs_what_changed_measured(server, cache):
    """A 100-cluster mesh (clusters and endpoints) synced over delta ADS; the stream drops,
    two endpoint sets and one cluster change and one cluster goes; the client resumes with
    initial_resource_versions. Measured: the resumed stream is sent exactly the three changed
    resources and the two removed names (cluster before endpoints), a few percent of the
    bytes of the full sync; resuming with nothing changed is sent no resource at all."""
    names_ = [f"svc-{i:03}" for i in range(100)]
    cache.set_type(CDS, [cluster(n) for n in names_])
    cache.set_type(EDS, [endpoints(n, *range(8000, 8010)) for n in names_])

    async def sync(ads, initial: dict[str, dict[str, str]]):
        """Subscribe CDS (wildcard) and EDS (all), ACK everything until quiet; returns the
        responses and the versions the client then holds."""
        have = {t: dict(initial.get(t, {})) for t in (CDS, EDS)}
        await ads.request(CDS, initial=have[CDS])
        await ads.request(EDS, names_, initial=have[EDS])
        responses = []
        while (response := await ads.maybe_recv(0.3)) is not None:
            responses.append(response)
            for entry in response.resources:
                have[response.type_url][entry.name] = entry.version
            for name in response.removed_resources:
                have[response.type_url].pop(name, None)
            await ads.ack(response)
        return responses, have

    def cost(responses) -> tuple[int, int, int]:
        return (sum(len(r.resources) for r in responses),
                sum(len(r.removed_resources) for r in responses),
                sum(r.ByteSize() for r in responses))

    async with XdsClient(server.address) as client:
        first = client.ads_delta()
        full, have = await sync(first, {})
        await first.cancel()
        full_resources, _, full_bytes = cost(full)
        assert full_resources == 200

        again = client.ads_delta()
        unchanged, _ = await sync(again, have)
        await again.cancel()
        resources, removed_count, unchanged_bytes = cost(unchanged)
        assert (resources, removed_count) == (0, 0)  # at most the empty wildcard answer
        assert unchanged_bytes < full_bytes / 100

        cache.update(EDS, [endpoints("svc-001", 9000), endpoints("svc-002", 9001)])
        cache.update(CDS, [cluster("svc-003", connect_timeout_ms=2500)])
        cache.set_type(CDS, [cluster(n, connect_timeout_ms=2500 if n == "svc-003" else 1000)
                             for n in names_ if n != "svc-099"])
        cache.set_type(EDS, [endpoints("svc-001", 9000), endpoints("svc-002", 9001)]
                       + [endpoints(n, *range(8000, 8010)) for n in names_
                          if n not in ("svc-001", "svc-002", "svc-099")])
        resumed_stream = client.ads_delta()
        resumed, _ = await sync(resumed_stream, have)
        resources, removed_count, resumed_bytes = cost(resumed)
        sent = sorted((r.type_url, e.name) for r in resumed for e in r.resources)
        assert sent == [(CDS, "svc-003"), (EDS, "svc-001"), (EDS, "svc-002")]
        gone = [(r.type_url, n) for r in resumed for n in r.removed_resources]
        assert gone == [(CDS, "svc-099"), (EDS, "svc-099")]  # make-before-break order
        assert resumed_bytes < full_bytes * 0.05, (resumed_bytes, full_bytes)


# The pieces -------------------------------------------------------------------------------------


async def test_push_slots_serve_first_config_waiters_before_incremental_ones():
    from xds_server.xds.push import PushSlots

    slots = PushSlots(1)
    await slots.acquire(first=False)  # held
    order: list[str] = []

    async def take(name: str, first: bool) -> None:
        await slots.acquire(first)
        order.append(name)
        slots.release()

    tasks = [asyncio.create_task(take("inc-1", False)), asyncio.create_task(take("inc-2", False))]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(take("first", True)))
    cancelled = asyncio.create_task(take("gone", True))
    await asyncio.sleep(0)
    assert (slots.waiting_first, slots.waiting_incremental) == (2, 2)
    cancelled.cancel()  # a stream that ends while waiting leaves the queue
    await asyncio.sleep(0)
    assert slots.waiting_first == 1
    slots.release()
    await asyncio.gather(*tasks)
    assert order == ["first", "inc-1", "inc-2"]
    # Every slot came back: the full capacity is free again.
    await asyncio.wait_for(slots.acquire(first=False), 0.1)


async def test_push_slots_a_waiter_cancelled_just_before_a_release_ends_quietly():
    """Seen in the soak (a client dropping its stream while its push waited for a slot): the
    waiter's future is cancelled at once, its CancelledError arrives a loop turn later, and a
    release in between pops the cancelled future. The waiter must end with CancelledError
    (not a ValueError that gRPC logs as a servicer traceback) and the slot must go on."""
    from xds_server.xds.push import PushSlots

    slots = PushSlots(1)
    await slots.acquire(first=False)  # held
    gone = asyncio.create_task(slots.acquire(first=False))
    await asyncio.sleep(0)
    nxt = asyncio.create_task(slots.acquire(first=False))
    await asyncio.sleep(0)
    gone.cancel()
    slots.release()  # before `gone` runs its handler: skips it, grants `nxt`
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.wait_for(nxt, 1)
    assert (slots.waiting_first, slots.waiting_incremental) == (0, 0)
    slots.release()
    await asyncio.wait_for(slots.acquire(first=False), 0.1)  # the capacity is intact


def test_token_bucket_admits_the_burst_then_the_rate():
    from xds_server.xds.push import TokenBucket

    now = [0.0]
    bucket = TokenBucket(2.0, 3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token a half second
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100  # never more than the burst saved up
    assert sum(bucket.take() for _ in range(10)) == 3
    assert all(TokenBucket(0, 1).take() for _ in range(1000))  # 0: no limit


async def test_admin_api_shows_the_overload_state(cache):
    """/api/v1/server carries the admission and queue state next to the counters."""
    import httpx

    from xds_server.admin.app import AdminContext, create_app
    from xds_server.admin.auth import TokenStore

    server = await start_server(cache, max_initializing_streams=1)
    try:
        async with XdsClient(server.address) as client:
            held = client.ads()
            await held.request(CDS)
            await eventually(lambda: len(server.initializing) == 1, what="one initializing")
            refused = client.ads(read=False)
            assert (await refused_at_open(refused, within=2) or (None,))[0] == \
                grpc.StatusCode.UNAVAILABLE
            app = create_app(AdminContext(server=server, cache=cache, tokens=TokenStore.from_tokens(
                {"reader": ("t0k3n-reader", "read")})))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://admin") as http:
                body = (await http.get("/api/v1/server",
                                       headers={"Authorization": "Bearer t0k3n-reader"})).json()
        overload = body["overload"]
        assert overload["initializing_streams"] == 1
        assert overload["max_initializing_streams"] == 1
        assert overload["refused_initializing"] == 1
        assert overload["pushes_waiting_first_config"] == 0
        assert body["stats"]["refused_initializing"] == 1
    finally:
        await server.stop(0)


async def test_resumed_delta_streams_share_the_names_and_versions_they_resume_with(server, cache):
    """Memory under reconnect churn (issue 15 item 4): a delta stream resuming with
    initial_resource_versions must not keep private copies of every name and version it sent
    (the protobuf map hands out new strings each time). Found with tracemalloc in
    bench/soak.py: ~32 KB more per resumed stream than per freshly synced one, which a churn
    of reconnects turned into RSS that never came back. Two resumed streams and the cache
    must hold the very same string objects."""
    names_ = [f"svc-{i:03}" for i in range(20)]
    cache.set_type(CDS, [cluster(n) for n in names_])
    async with XdsClient(server.address) as client:
        first = client.ads_delta()
        await first.request(CDS)
        have = {e.name: e.version for e in (await first.recv()).resources}
        await first.cancel()
        resumed = [client.ads_delta() for _ in range(2)]
        for ads in resumed:
            await ads.request(CDS, initial=have)
            await ads.recv()  # the wildcard answer, nothing in it
        await eventually(lambda: len(server.connections) == 2)
        known = [conn.state.types[CDS].known for conn in server.connections]
    assert known[0] == known[1] == have
    by_name = {name: (name, version) for name, version in known[1].items()}
    for name, version in known[0].items():
        other_name, other_version = by_name[name]
        assert other_name is name and other_version is version
        assert cache.get(CDS, name).version is version
