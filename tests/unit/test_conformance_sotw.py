"""CONFORMANCE.md rules 1-12, state-of-the-world variant, driven by a scripted raw gRPC client.

Every test runs a fresh server on 127.0.0.1:0 with debouncing off, sends exact
DiscoveryRequest sequences and asserts on every response (names, versions, nonces) and on
the server's per-stream state where the rule is about what the server records. "No response"
is asserted by listening for a short window (SILENCE, 0.3 s).

Rules 1-8 apply to both variants; their delta counterparts are in test_conformance_delta.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from tests.support.xds_client import (
    XdsClient,
    cluster,
    endpoints,
    eventually,
    listener,
    method,
    route,
    secret,
    sotw_names,
    sotw_resources,
)
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from tests.support.hooks import OnPush
from xds_server.xds.server import Connection, ServerSettings, XdsServer

CDS, EDS, LDS, RDS, SDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE, types.SECRET


# Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def cache() -> ResourceCache:
    return ResourceCache()


async def start_server(cache: ResourceCache, **settings) -> XdsServer:
    server = XdsServer(
        cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0, **settings)
    )
    await server.start()
    return server


@pytest.fixture
async def server(cache):
    server = await start_server(cache)
    try:
        yield server
    finally:
        await server.stop(0)


@pytest.fixture
async def client(server):
    async with XdsClient(server.address) as c:
        yield c


def connection(server: XdsServer, node_id: str = "test-proxy") -> Connection:
    found = [c for c in server.connections if c.state.node is not None and c.state.node.id == node_id]
    assert len(found) == 1, f"expected one stream of {node_id}, found {len(found)}"
    return found[0]


# Rule 1: the node ----------------------------------------------------------------------------------


async def test_rule_01_node_from_first_request_is_kept(server, cache, client):
    """The node of the first request is the stream's node; later requests may omit it, and a
    different node in a later request does not replace it."""
    cache.set_type(CDS, [cluster("a")])
    node = base_pb2.Node(id="proxy-1", cluster="web")
    node.metadata.fields["NAMESPACE"].string_value = "shop"
    ads = client.ads(node=node)

    await ads.request(CDS)  # carries the node
    cds = await ads.recv()
    assert sotw_names(cds) == ["a"]

    await ads.ack(cds)
    await ads.request(LDS, node=False)  # no node: still served
    lds = await ads.recv()
    assert lds.type_url == LDS

    await ads.request(LDS, version=lds.version_info, nonce=lds.nonce,
                      node=base_pb2.Node(id="impostor"))
    conn = connection(server, "proxy-1")
    await eventually(lambda: conn.state.types[LDS].acked_version == lds.version_info)
    assert conn.state.node.id == "proxy-1"
    assert conn.state.node.cluster == "web"
    assert conn.state.node.metadata.fields["NAMESPACE"].string_value == "shop"
    assert conn.proxy_id == "proxy-1"


async def test_rule_01_first_request_without_node_is_rejected(server, cache, client):
    """Without a node on its first request a stream has no identity: INVALID_ARGUMENT."""
    cache.set_type(CDS, [cluster("a")])
    ads = client.ads()
    await ads.request(CDS, node=False)
    code, details = await ads.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "node" in details


async def test_rule_01_each_stream_keeps_its_own_node(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    one = client.ads(node=base_pb2.Node(id="one"))
    two = client.ads(node=base_pb2.Node(id="two"))
    await one.request(CDS)
    await two.request(CDS)
    await one.recv()
    await two.recv()
    assert connection(server, "one") is not connection(server, "two")


# Rule 2: type_url ----------------------------------------------------------------------------------


async def test_rule_02_ads_request_without_type_url_is_invalid_argument(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    bad = client.ads()
    await bad.request("")
    code, details = await bad.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "type_url" in details

    # Also later in a stream that started well.
    later = client.ads(node=base_pb2.Node(id="later"))
    await later.request(CDS)
    cds = await later.recv()
    await later.request("", version=cds.version_info, nonce=cds.nonce)
    code, _ = await later.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    # The server goes on serving.
    good = client.ads(node=base_pb2.Node(id="good"))
    await good.request(CDS)
    assert sotw_names(await good.recv()) == ["a"]
    assert server.stats.protocol_errors >= 2


@pytest.mark.parametrize(
    "type_url, names",
    [(CDS, []), (EDS, ["a"]), (LDS, []), (RDS, ["r"]), (SDS, ["default"])],
    ids=["CDS", "EDS", "LDS", "RDS", "SDS"],
)
async def test_rule_02_per_type_service_fills_in_type_url(server, cache, client, type_url, names):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(EDS, [endpoints("a", 8080)])
    cache.set_type(LDS, [listener("l", 15001)])
    cache.set_type(RDS, [route("r", "a")])
    cache.set_type(SDS, [secret("default")])
    stream = client.sotw(type_url)
    await stream.request("", names)  # no type_url: the service implies it
    response = await stream.recv()
    assert response.type_url == type_url
    assert len(response.resources) == 1
    assert response.resources[0].type_url == type_url
    # ACK without type_url too.
    await stream.request("", names, version=response.version_info, nonce=response.nonce)
    conn = connection(server)
    await eventually(lambda: conn.state.types[type_url].acked_version == response.version_info)
    assert list(conn.state.types) == [type_url]


async def test_rule_02_per_type_service_rejects_another_type(server, cache, client):
    stream = client.sotw(CDS)
    await stream.request(LDS)
    code, details = await stream.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert LDS in details


# Rule 3: nonces --------------------------------------------------------------------------------------


async def test_rule_03_nonces_are_unique_per_stream_and_tracked_per_type(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(LDS, [listener("l", 15001)])
    ads = client.ads()
    await ads.request(CDS)
    await ads.request(LDS)
    first = {r.type_url: r for r in [await ads.recv(), await ads.recv()]}
    c1, l1 = first[CDS], first[LDS]
    assert c1.nonce and l1.nonce and c1.nonce != l1.nonce

    conn = connection(server)
    # An LDS request carrying the CDS nonce answers nothing of LDS (nor of CDS).
    await ads.request(LDS, version=c1.version_info, nonce=c1.nonce)
    await ads.expect_silence()
    assert conn.state.types[LDS].pending_nonce == l1.nonce
    assert conn.state.types[CDS].pending_nonce == c1.nonce
    assert conn.state.types[LDS].acked_version == ""

    await ads.ack(c1)
    await ads.ack(l1)
    await eventually(lambda: conn.state.types[LDS].acked_version == l1.version_info)
    assert conn.state.types[CDS].acked_version == c1.version_info

    nonces = [c1.nonce, l1.nonce]
    for timeout in range(2000, 2005):
        cache.set_type(CDS, [cluster("a", connect_timeout_ms=timeout)])
        response = await ads.recv()
        nonces.append(response.nonce)
        await ads.ack(response)
    assert len(set(nonces)) == len(nonces)


# Rule 4: NACK ----------------------------------------------------------------------------------------


async def test_rule_04_nack_is_recorded_and_not_resent(server, cache, client, caplog):
    """go-control-plane#962: a NACKed snapshot is re-sent forever. Here the NACK is recorded
    (version, nonce, message; stats; status; log) and nothing is sent until the config
    changes."""
    cache.set_type(CDS, [cluster("a")])
    ads = client.ads()
    await ads.request(CDS)
    good = await ads.recv()
    await ads.ack(good)

    cache.set_type(CDS, [cluster("a", connect_timeout_ms=5)])  # "bad" for this client
    bad = await ads.recv()
    assert bad.version_info != good.version_info
    await ads.nack(bad, "cluster a: connect_timeout too small", accepted_version=good.version_info)

    conn = connection(server)
    state = conn.state.types[CDS]
    nack = await eventually(lambda: state.nack)
    assert nack.version == bad.version_info
    assert nack.nonce == bad.nonce
    assert nack.message == "cluster a: connect_timeout too small"
    assert state.acked_version == good.version_info
    assert state.status() == "NACKED"
    assert server.stats.nacks == 1
    logged = [r for r in caplog.records if "connect_timeout too small" in r.getMessage()]
    assert logged and logged[0].levelname == "WARNING"
    assert logged[0].proxy == "test-proxy" and logged[0].version == bad.version_info

    await ads.expect_silence()  # the rejected version is not sent again
    # Repeating the NACK (same nonce) does not provoke a resend either.
    await ads.nack(bad, "cluster a: connect_timeout too small", accepted_version=good.version_info)
    await ads.expect_silence()
    assert server.stats.nacks == 1

    cache.set_type(CDS, [cluster("a", connect_timeout_ms=250)])  # the config is fixed
    fixed = await ads.recv()
    assert fixed.version_info not in (good.version_info, bad.version_info)
    assert sotw_resources(fixed)["a"].connect_timeout.ToMilliseconds() == 250
    await ads.ack(fixed)
    await eventually(lambda: state.acked_version == fixed.version_info)
    assert state.nack is None
    assert state.status() == "SYNCED"


async def test_rule_04_nack_of_named_resources_is_not_resent(server, cache, client):
    """The same for a non-full-state type (RDS), on a per-type service."""
    cache.set_type(RDS, [route("r1", "a"), route("r2", "a")])
    rds = client.sotw(RDS)
    await rds.request(RDS, ["r1", "r2"])
    first = await rds.recv()
    await rds.ack(first)
    cache.update(RDS, [route("r1", "a", prefix="/bad")])
    bad = await rds.recv()
    assert sotw_names(bad) == ["r1"]
    await rds.nack(bad, "r1 rejected", accepted_version=first.version_info)
    await rds.expect_silence()
    state = connection(server).state.types[RDS]
    assert state.nack is not None and state.nack.message == "r1 rejected"

    cache.update(RDS, [route("r2", "b")])  # another change: r2 only, r1 not re-sent
    change = await rds.recv()
    assert sotw_names(change) == ["r2"]
    await rds.ack(change)
    await rds.expect_silence()


# Rule 5: one outstanding response per type -----------------------------------------------------------


async def test_rule_05_one_response_per_type_outstanding_and_changes_coalesced(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    ads = client.ads()
    await ads.request(CDS)
    first = await ads.recv()  # not ACKed yet

    for timeout in (2000, 3000, 4000):
        cache.set_type(CDS, [cluster("a", connect_timeout_ms=timeout), cluster("b")])
        await asyncio.sleep(0.02)  # separate flushes
    await ads.expect_silence()
    state = connection(server).state.types[CDS]
    assert state.pending_nonce == first.nonce

    await ads.ack(first)
    latest = await ads.recv()  # one push, with the newest content
    resources = sotw_resources(latest)
    assert sorted(resources) == ["a", "b"]
    assert resources["a"].connect_timeout.ToMilliseconds() == 4000
    await ads.ack(latest)
    await ads.expect_silence()


async def test_rule_05_outstanding_response_of_one_type_does_not_hold_another(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(LDS, [listener("l", 15001)])
    ads = client.ads()
    await ads.request(CDS)
    cds = await ads.recv()  # CDS stays un-ACKed
    await ads.request(LDS)
    lds = await ads.recv()
    await ads.ack(lds)
    cache.set_type(LDS, [listener("l", 15002)])
    lds2 = await ads.recv()
    assert lds2.type_url == LDS
    assert sotw_resources(lds2)["l"].address.socket_address.port_value == 15002
    assert connection(server).state.types[CDS].pending_nonce == cds.nonce


# Rule 6: make-before-break -----------------------------------------------------------------------------


async def subscribe_all(ads) -> dict:
    """CDS and LDS wildcard, EDS [a], RDS [r]; ACKs the initial responses, returns them."""
    last = {}
    for type_url, names in ((CDS, []), (EDS, ["a"]), (LDS, []), (RDS, ["r"])):
        await ads.request(type_url, names)
        last[type_url] = await ads.recv()
        assert last[type_url].type_url == type_url
        await ads.ack(last[type_url])
    return last


async def test_rule_06_ads_pushes_cds_then_eds_then_lds_then_rds(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(EDS, [endpoints("a", 8080)])
    cache.set_type(LDS, [listener("l", 15001, "r")])
    cache.set_type(RDS, [route("r", "a")])
    ads = client.ads()
    await subscribe_all(ads)

    # One change touching every type, written in the reverse of the order it must arrive in.
    cache.set_type(RDS, [route("r", "a", prefix="/v2")])
    cache.set_type(LDS, [listener("l", 15002, "r")])
    cache.set_type(EDS, [endpoints("a", 8081)])
    cache.set_type(CDS, [cluster("a", connect_timeout_ms=2000)])
    got = [await ads.recv() for _ in range(4)]
    assert [r.type_url for r in got] == [CDS, EDS, LDS, RDS]


async def test_rule_06_make_before_break_removes_cluster_after_route_update_is_acked(
    server, cache, client
):
    """Add cluster b, switch route r from a to b, remove a: CDS [a, b], then RDS r->b, and
    only after both are ACKed CDS [b]."""
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(EDS, [endpoints("a", 8080)])
    cache.set_type(LDS, [listener("l", 15001, "r")])
    cache.set_type(RDS, [route("r", "a")])
    ads = client.ads()
    initial = await subscribe_all(ads)

    cache.set_type(CDS, [cluster("b")])
    cache.set_type(EDS, [endpoints("b", 9090)])
    cache.set_type(RDS, [route("r", "b")])

    cds = await ads.recv()
    assert cds.type_url == CDS
    assert sotw_names(cds) == ["a", "b"]  # a stays while something may still use it
    rds = await ads.recv()
    assert rds.type_url == RDS
    assert sotw_resources(rds)["r"].virtual_hosts[0].routes[0].route.cluster == "b"
    await ads.expect_silence()

    # Envoy's reaction to CDS [a, b]: ACK it and ask for b's endpoints.
    await ads.ack(cds)
    eds0 = initial[EDS]
    await ads.request(EDS, ["a", "b"], version=eds0.version_info, nonce=eds0.nonce)
    eds = await ads.recv()
    assert eds.type_url == EDS and sotw_names(eds) == ["b"]
    await ads.ack(eds)
    await ads.expect_silence()  # the route update is not ACKed yet: a stays
    assert connection(server).state.types[CDS].removal_pending

    await ads.ack(rds)
    final = await ads.recv()
    assert final.type_url == CDS
    assert sotw_names(final) == ["b"]
    await ads.ack(final)
    await ads.expect_silence()


async def test_rule_06_removal_waits_while_the_referring_update_is_nacked(server, cache, client):
    """If the route update that stops using cluster a is rejected, the client still routes
    to a: removing a then would break traffic. a goes once a route update is accepted."""
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(EDS, [endpoints("a", 8080)])
    cache.set_type(LDS, [listener("l", 15001, "r")])
    cache.set_type(RDS, [route("r", "a")])
    ads = client.ads()
    await subscribe_all(ads)

    cache.set_type(CDS, [cluster("b")])
    cache.set_type(RDS, [route("r", "b", prefix="/bad")])
    cds = await ads.recv()
    rds = await ads.recv()
    assert (cds.type_url, rds.type_url) == (CDS, RDS)
    assert sotw_names(cds) == ["a", "b"]
    await ads.ack(cds)
    await ads.nack(rds, "route r rejected")
    await ads.expect_silence()  # r still points at a on the client

    cache.set_type(RDS, [route("r", "b")])
    rds2 = await ads.recv()
    assert rds2.type_url == RDS
    await ads.ack(rds2)
    final = await ads.recv()
    assert final.type_url == CDS and sotw_names(final) == ["b"]


async def test_rule_06_cluster_removal_is_not_stalled_by_other_changes(server, cache, client):
    """Removing cluster a and its endpoints in one change: in SotW the EDS change sends
    nothing (a CLA's removal is not signalled), and the deferred CDS removal must still go
    out once nothing else is in flight, not wait for some unrelated later event."""
    cache.set_type(CDS, [cluster("a"), cluster("keep")])
    cache.set_type(EDS, [endpoints("a", 8080), endpoints("keep", 8081)])
    ads = client.ads()
    await ads.request(CDS)
    cds = await ads.recv()
    await ads.ack(cds)
    await ads.request(EDS, ["a", "keep"])
    eds = await ads.recv()
    await ads.ack(eds)

    cache.set_type(CDS, [cluster("keep")])
    cache.set_type(EDS, [endpoints("keep", 8081)])
    final = await ads.recv()
    assert final.type_url == CDS and sotw_names(final) == ["keep"]
    await ads.ack(final)
    await ads.expect_silence()


async def test_rule_06_listener_removed_before_cluster(server, cache, client):
    cache.set_type(CDS, [cluster("a"), cluster("keep")])
    cache.set_type(LDS, [listener("l", 15001), listener("keep", 15002)])
    ads = client.ads()
    await ads.request(CDS)
    await ads.ack(await ads.recv())
    await ads.request(LDS)
    await ads.ack(await ads.recv())

    cache.set_type(CDS, [cluster("keep")])
    cache.set_type(LDS, [listener("keep", 15002)])
    lds = await ads.recv()
    assert lds.type_url == LDS and sotw_names(lds) == ["keep"]
    await ads.expect_silence()
    await ads.ack(lds)
    cds = await ads.recv()
    assert cds.type_url == CDS and sotw_names(cds) == ["keep"]


# Rule 7: names that do not exist yet ---------------------------------------------------------------------


async def test_rule_07_missing_name_causes_no_reply_loop_and_is_delivered_later(server, cache, client):
    """go-control-plane#1318 / #1319: a non-wildcard request naming a resource not in the
    cache made the server answer every request with the same response, forever."""
    cache.set_type(EDS, [endpoints("a", 8080)])
    ads = client.ads()
    await ads.request(EDS, ["missing"])
    await ads.expect_silence()
    await ads.request(EDS, ["missing"])  # asking again changes nothing
    await ads.expect_silence()

    await ads.request(EDS, ["a", "missing"])
    got = await ads.recv()
    assert sotw_names(got) == ["a"]
    await ads.ack(got)  # the ACK repeats the subscription with the missing name
    await ads.expect_silence()

    cache.update(EDS, [endpoints("missing", 9090)])
    late = await ads.recv()
    assert sotw_names(late) == ["missing"]
    await ads.ack(late)
    await ads.expect_silence()


async def test_rule_07_missing_named_cluster_answers_once_then_waits(server, cache, client):
    """For full-state types an answer without the name means "does not exist"; one such
    answer is fine, a loop is not."""
    cache.set_type(CDS, [cluster("a")])
    cds = client.sotw(CDS)
    await cds.request(CDS, ["ondemand"])
    first = await cds.recv()
    assert sotw_names(first) == []
    await cds.ack(first)
    await cds.expect_silence()
    cache.update(CDS, [cluster("ondemand")])
    got = await cds.recv()
    assert sotw_names(got) == ["ondemand"]
    await cds.ack(got)
    await cds.expect_silence()


# Rule 8: slow and stuck clients ---------------------------------------------------------------------------


async def test_rule_08_client_that_never_acks_does_not_delay_others_and_gets_only_latest(
    server, cache
):
    cache.set_type(CDS, [cluster("a")])
    async with XdsClient(server.address, node_id="lazy") as lazy_client, \
            XdsClient(server.address, node_id="busy") as busy_client:
        lazy = lazy_client.ads()
        busy = busy_client.ads()
        await lazy.request(CDS)
        first = await lazy.recv()  # never ACKed until the end
        await busy.request(CDS)
        await busy.ack(await busy.recv())

        for i in range(30):
            cache.set_type(CDS, [cluster("a", connect_timeout_ms=1000 + i), cluster(f"c{i}")])
            got = await busy.recv()
            assert sotw_resources(got)["a"].connect_timeout.ToMilliseconds() == 1000 + i
            await busy.ack(got)

        lazy_state = connection(server, "lazy").state
        assert lazy_state.types[CDS].pending_nonce == first.nonce
        await lazy.expect_silence()
        await lazy.ack(first)
        latest = await lazy.recv()
        assert sotw_names(latest) == ["a", "c29"]
        assert sotw_resources(latest)["a"].connect_timeout.ToMilliseconds() == 1029
        await lazy.ack(latest)
        await lazy.expect_silence()


async def test_rule_08_closed_streams_are_forgotten(server, cache):
    """Per-stream state goes with the stream: many clients coming and going leave nothing."""
    cache.set_type(CDS, [cluster("a")])
    for i in range(3):
        async with XdsClient(server.address, node_id=f"p{i}") as c:
            streams = [c.ads(node=base_pb2.Node(id=f"p{i}-{j}")) for j in range(10)]
            for stream in streams:
                await stream.request(CDS)
            for stream in streams:
                await stream.recv()
            assert len(server.connections) == 10
        await eventually(lambda: not server.connections, what="streams forgotten")
    assert server.stats.streams_opened == 30
    cache.set_type(CDS, [cluster("b")])  # nobody left to wake


def big_clusters(count: int, tag: str) -> list:
    return [cluster(f"big-{i}", stat_name=tag + "x" * 1_000_000) for i in range(count)]


@pytest.mark.parametrize("settings", [{}, {"max_concurrent_pushes": 1, "slow_write_seconds": 0.2}],
                         ids=["defaults", "one-push-slot"])
async def test_rule_08_client_that_stops_reading_does_not_delay_others(cache, settings):
    """A client that stops reading fills its connection's flow-control window; the server's
    write to it blocks. Others keep getting pushes (even when the push concurrency cap is 1,
    a blocked write gives its slot back), and the stuck stream holds only the latest state:
    when it reads again it gets the blocked response, then one push with the newest content."""
    server = await start_server(cache, **settings)
    try:
        cache.set_type(CDS, big_clusters(32, "v0"))  # ~32 MB: more than any window
        cache.set_type(LDS, [listener("l", 15000)])
        completed: list[tuple[str, str]] = []
        server.hooks.add(OnPush(lambda conn, push: completed.append((conn.proxy_id, push.type_url))))
        async with XdsClient(server.address, node_id="stuck") as stuck_client, \
                XdsClient(server.address, node_id="live") as live_client:
            stuck = stuck_client.ads(read=False)
            await stuck.request(LDS)  # small: fits in the buffers although nobody reads
            await eventually(lambda: ("stuck", LDS) in completed)
            await stuck.request(CDS)  # large: its write blocks
            stuck_types = connection(server, "stuck").state.types
            await eventually(lambda: CDS in stuck_types and stuck_types[CDS].pending_nonce)
            live = live_client.ads()
            await live.request(LDS)
            await live.ack(await live.recv())

            for port in range(15001, 15021):
                cache.set_type(LDS, [listener("l", port)])
                got = await live.recv()
                assert sotw_resources(got)["l"].address.socket_address.port_value == port
                await live.ack(got)
            assert ("stuck", CDS) not in completed, "the big write should still be blocked"
            for tag in ("v1", "v2", "v3"):
                cache.set_type(CDS, big_clusters(2, tag))
                await asyncio.sleep(0.01)

            stuck_state = connection(server, "stuck").state
            assert stuck_state.types[LDS].pending_nonce is not None  # no queue: one outstanding

            stuck.start_reading()
            lds = await stuck.recv()
            assert lds.type_url == LDS
            cds = await stuck.recv(timeout=20)
            assert cds.type_url == CDS and len(cds.resources) == 32
            # Now it catches up: one push per type with the newest state (plus, for CDS, the
            # deferred removal of the clusters that went away, rule 6), then nothing.
            await stuck.ack(lds)
            await stuck.ack(cds)
            latest = {}
            count = 0
            while (response := await stuck.maybe_recv()) is not None:
                count += 1
                latest[response.type_url] = response
                await stuck.ack(response)
            assert count <= 3
            assert sotw_resources(latest[LDS])["l"].address.socket_address.port_value == 15020
            newest = sotw_resources(latest[CDS])
            assert sorted(newest) == ["big-0", "big-1"]
            assert newest["big-0"].alt_stat_name.startswith("v3")
    finally:
        await server.stop(0)


async def test_garbage_request_closes_only_that_stream(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    ads = client.ads()
    await ads.request(CDS)
    first = await ads.recv()
    await ads.ack(first)

    junk = client.raw(method(None, delta=False))
    await junk.send(b"\xff\xff\xff\xff this is not a DiscoveryRequest")
    code, _ = await junk.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    per_type = client.raw(method(CDS, delta=False))
    await per_type.send(b"\x0a\xff\x01")  # a truncated field
    code, _ = await per_type.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    cache.set_type(CDS, [cluster("a"), cluster("b")])  # the healthy stream goes on
    assert sotw_names(await ads.recv()) == ["a", "b"]
    fresh = client.ads(node=base_pb2.Node(id="fresh"))
    await fresh.request(CDS)
    assert sotw_names(await fresh.recv()) == ["a", "b"]


# Rule 9: stale nonces ----------------------------------------------------------------------------------------


async def test_rule_09_request_with_stale_nonce_is_ignored(server, cache, client):
    cache.set_type(RDS, [route("r1", "a"), route("r2", "a")])
    ads = client.ads()
    await ads.request(RDS, ["r1"])
    first = await ads.recv()
    await ads.ack(first)
    cache.update(RDS, [route("r1", "b")])
    second = await ads.recv()
    conn = connection(server)
    state = conn.state.types[RDS]

    # Answers to an older response, or to one never sent: ignored, subscription unchanged.
    await ads.request(RDS, ["r1", "r2"], version=first.version_info, nonce=first.nonce)
    await ads.request(RDS, ["r1", "r2"], version=first.version_info, nonce="no-such-nonce")
    await ads.request(RDS, ["r1", "r2"], nonce=first.nonce, error="stale NACK")
    await ads.expect_silence()
    assert state.names == {"r1"}
    assert state.pending_nonce == second.nonce
    assert state.nack is None

    await ads.ack(second, ["r1", "r2"])  # the current nonce: honoured
    third = await ads.recv()
    assert sotw_names(third) == ["r2"]
    assert state.acked_version == second.version_info


# Rule 10: what a response carries -------------------------------------------------------------------------


@pytest.mark.parametrize("type_url", [CDS, LDS], ids=["CDS", "LDS"])
async def test_rule_10_listener_and_cluster_responses_carry_the_complete_set(
    server, cache, client, type_url
):
    def make(name, n):
        return cluster(name, connect_timeout_ms=n) if type_url == CDS else listener(name, n)

    cache.set_type(type_url, [make("a", 1000), make("b", 1000), make("c", 1000)])
    stream = client.sotw(type_url)
    await stream.request(type_url)
    first = await stream.recv()
    assert sotw_names(first) == ["a", "b", "c"]
    await stream.ack(first)

    cache.update(type_url, [make("b", 2000)])
    changed = await stream.recv()
    assert sotw_names(changed) == ["a", "b", "c"]  # unchanged a and c are repeated
    assert changed.version_info != first.version_info
    await stream.ack(changed)

    cache.update(type_url, remove=["c"])
    removed = await stream.recv()
    assert sotw_names(removed) == ["a", "b"]  # absence means deletion
    await stream.ack(removed)

    cache.set_type(type_url, [])
    empty = await stream.recv()
    assert sotw_names(empty) == []


@pytest.mark.parametrize("type_url", [RDS, EDS, SDS], ids=["RDS", "EDS", "SDS"])
async def test_rule_10_route_endpoint_secret_responses_carry_requested_names(
    server, cache, client, type_url
):
    """Only subscribed names are sent; as in the incremental variants, a change sends the
    changed subscribed resources (the client keeps the others)."""

    def make(name, n):
        if type_url == RDS:
            return route(name, f"c{n}")
        if type_url == EDS:
            return endpoints(name, n)
        return secret(name, f"v{n}")

    cache.set_type(type_url, [make("x", 1), make("y", 1), make("z", 1)])
    stream = client.sotw(type_url)
    await stream.request(type_url, ["x", "y"])
    first = await stream.recv()
    assert sotw_names(first) == ["x", "y"]
    await stream.ack(first)

    cache.update(type_url, [make("z", 2)])  # not subscribed
    await stream.expect_silence()
    cache.update(type_url, [make("x", 2)])
    changed = await stream.recv()
    assert sotw_names(changed) == ["x"]
    await stream.ack(changed)

    await stream.request(type_url, ["x", "y", "z"], version=changed.version_info, nonce=changed.nonce)
    added = await stream.recv()
    assert sotw_names(added) == ["z"]


# Rule 11: same version, same subscription --------------------------------------------------------------------


async def test_rule_11_same_version_and_subscription_gets_no_response(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(RDS, [route("r", "a")])
    ads = client.ads()
    await ads.request(CDS)
    cds = await ads.recv()
    await ads.request(RDS, ["r"])
    rds = await ads.recv()
    await ads.ack(cds)
    await ads.ack(rds)
    await ads.expect_silence()
    # The same ACKs again (Envoy re-sends requests, e.g. after resuming a paused type).
    await ads.ack(cds)
    await ads.ack(rds)
    await ads.expect_silence()
    # Setting identical content is not a change.
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(RDS, [route("r", "a")])
    await ads.expect_silence()


async def test_rule_11_unsubscribe_then_resubscribe_same_version_resends(server, cache, client):
    """go-control-plane#431: after unsubscribing and subscribing again to an unchanged
    resource the server sent nothing (the version matched), so the client never got it back."""
    cache.set_type(EDS, [endpoints("a", 8080), endpoints("b", 8081)])
    ads = client.ads()
    await ads.request(EDS, ["a", "b"])
    first = await ads.recv()
    assert sotw_names(first) == ["a", "b"]
    await ads.ack(first)

    await ads.request(EDS, ["b"], version=first.version_info, nonce=first.nonce)
    await ads.expect_silence()
    await ads.request(EDS, ["a", "b"], version=first.version_info, nonce=first.nonce)
    again = await ads.recv()
    assert sotw_names(again) == ["a"]
    assert sotw_resources(again)["a"] == sotw_resources(first)["a"]

    # Unsubscribing from everything (an empty list after names) and back.
    await ads.ack(again)
    await ads.request(EDS, [], version=again.version_info, nonce=again.nonce)
    await ads.expect_silence()
    await ads.request(EDS, ["a", "b"], version=again.version_info, nonce=again.nonce)
    both = await ads.recv()
    assert sotw_names(both) == ["a", "b"]


# Rule 12: wildcard ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first_names", [[], ["*"]], ids=["empty", "star"])
async def test_rule_12_empty_first_request_and_star_mean_wildcard(server, cache, client, first_names):
    cache.set_type(CDS, [cluster("a"), cluster("b")])
    ads = client.ads()
    await ads.request(CDS, first_names)
    first = await ads.recv()
    assert sotw_names(first) == ["a", "b"]
    await ads.ack(first)
    cache.update(CDS, [cluster("c")])
    assert sotw_names(await ads.recv()) == ["a", "b", "c"]
    state = connection(server).state.types[CDS]
    assert state.wildcard


async def test_rule_12_names_plus_star_mean_both(server, cache, client):
    cache.set_type(EDS, [endpoints("a", 1), endpoints("b", 2), endpoints("c", 3)])
    ads = client.ads()
    await ads.request(EDS, ["*", "a"])
    first = await ads.recv()
    assert sotw_names(first) == ["a", "b", "c"]
    await ads.ack(first)

    # Dropping "*" keeps the explicit name.
    await ads.request(EDS, ["a"], version=first.version_info, nonce=first.nonce)
    await ads.expect_silence()
    cache.update(EDS, [endpoints("b", 20)])
    await ads.expect_silence()
    cache.update(EDS, [endpoints("a", 10)])
    changed = await ads.recv()
    assert sotw_names(changed) == ["a"]
    await ads.ack(changed)

    # Adding "*" back brings the rest again (the client dropped them with the wildcard).
    await ads.request(EDS, ["a", "*"], version=changed.version_info, nonce=changed.nonce)
    rest = await ads.recv()
    assert sotw_names(rest) == ["b", "c"]


@pytest.mark.parametrize("type_url", [CDS, LDS, RDS, EDS], ids=["CDS", "LDS", "RDS", "EDS"])
@pytest.mark.parametrize("first_names", [[], ["*"]], ids=["empty", "star"])
async def test_rule_12_first_wildcard_request_is_answered_even_when_empty(
    server, cache, client, type_url, first_names
):
    ads = client.ads()
    await ads.request(type_url, first_names)
    response = await ads.recv()
    assert response.type_url == type_url
    assert list(response.resources) == []
    assert response.nonce
    await ads.ack(response)
    await ads.expect_silence()
    # And the first resource to appear is delivered.
    make = {CDS: lambda: cluster("n"), LDS: lambda: listener("n", 1), RDS: lambda: route("n", "a"),
            EDS: lambda: endpoints("n", 1)}[type_url]
    cache.update(type_url, [make()])
    assert sotw_names(await ads.recv()) == ["n"]


async def test_rule_12_a_reconnect_holding_the_current_set_is_not_sent_it_again(server, cache, client):
    """Issue 15 (a reconnect costs what changed), SotW: a new stream whose first wildcard CDS
    request carries the version of the complete set it already holds is not sent that set
    again (the xDS protocol allows it for wildcard LDS/CDS; the client has its config, so no
    initial fetch waits); the next change is sent as usual, and a client holding an older set
    gets the whole current one."""
    cache.set_type(CDS, [cluster(n) for n in ("a", "b", "c")])
    first = client.ads()
    await first.request(CDS)
    held = await first.recv()
    await first.ack(held)
    await first.cancel()

    resumed = client.ads()
    await resumed.request(CDS, version=held.version_info)
    await resumed.expect_silence()
    cache.update(CDS, [cluster("d")])
    changed = await resumed.recv()
    assert sotw_names(changed) == ["a", "b", "c", "d"]
    await resumed.ack(changed)
    await resumed.expect_silence()

    stale = client.ads()
    await stale.request(CDS, version=held.version_info)
    got = await stale.recv()
    assert sotw_names(got) == ["a", "b", "c", "d"] and got.version_info == changed.version_info


async def test_rule_12_per_type_service_wildcard_answered_when_empty(server, cache, client):
    stream = client.sotw(LDS)
    await stream.request("")
    response = await stream.recv()
    assert response.type_url == LDS and list(response.resources) == []


# Bounds: a REST-style Fetch keeps the same per-request name limit as a stream ------------------


@pytest.mark.parametrize("names, status", [(5, grpc.StatusCode.OK), (6, grpc.StatusCode.INVALID_ARGUMENT)])
async def test_fetch_keeps_the_per_request_name_limit(cache, names, status):
    server = await start_server(cache, max_names_per_request=5)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            fetch = channel.unary_unary(
                "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters",
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
            request = discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id="fetcher"), resource_names=[f"c{i}" for i in range(names)]
            )
            try:
                await fetch(request, timeout=10)
                got = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as err:
                got = err.code()
                assert "limit 5" in (err.details() or "")
            assert got == status
    finally:
        await server.stop(0)
