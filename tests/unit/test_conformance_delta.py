"""CONFORMANCE.md rules 1-8 and 13-17, incremental (delta) variant, driven by a scripted raw
gRPC client.

Every test runs a fresh server on 127.0.0.1:0 with debouncing off, sends exact
DeltaDiscoveryRequest sequences and asserts on every response (resources with their
versions, removed_resources, nonces) and on the server's per-stream state where the rule is
about what the server records. "No response" is asserted by listening for a short window
(0.3 s). The state-of-the-world counterparts are in test_conformance_sotw.py.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from envoy.config.core.v3 import base_pb2

from tests.support.xds_client import (
    XdsClient,
    cluster,
    delta_resources,
    endpoints,
    eventually,
    listener,
    method,
    route,
    secret,
)
from xds_server.xds import types
from xds_server.xds.cache import FilteredView, ResourceCache
from xds_server.xds.resource import Resource
from xds_server.xds.server import Connection, ServerSettings, XdsServer

CDS, EDS, LDS, RDS, SDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE, types.SECRET


# Fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def cache() -> ResourceCache:
    return ResourceCache()


async def start_server(cache: ResourceCache, *, view_for=None, **settings) -> XdsServer:
    server = XdsServer(
        cache,
        ServerSettings(address="127.0.0.1:0", debounce_quiet=0, **settings),
        view_for=view_for,
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


def names(response) -> list[str]:
    return sorted(r.name for r in response.resources)


def versions(response) -> dict[str, str]:
    return {r.name: r.version for r in response.resources}


def removed(response) -> list[str]:
    return sorted(response.removed_resources)


def version_of(message) -> str:
    return Resource.from_message(message).version


# Rule 1: the node ----------------------------------------------------------------------------------


async def test_rule_01_delta_node_from_first_request_is_kept(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(LDS, [listener("l", 15001)])
    ads = client.ads_delta(node=base_pb2.Node(id="proxy-1", cluster="web"))
    await ads.request(CDS)
    cds = await ads.recv()
    await ads.ack(cds)  # no node
    await ads.request(LDS, node=base_pb2.Node(id="impostor"))
    lds = await ads.recv()
    assert names(lds) == ["l"]
    conn = connection(server, "proxy-1")
    assert conn.state.node.id == "proxy-1" and conn.state.node.cluster == "web"


async def test_rule_01_delta_first_request_without_node_is_rejected(server, client):
    ads = client.ads_delta()
    await ads.request(CDS, node=False)
    code, details = await ads.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "node" in details


# Rule 2: type_url ----------------------------------------------------------------------------------


async def test_rule_02_delta_ads_request_without_type_url_is_invalid_argument(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    bad = client.ads_delta()
    await bad.request("", ["a"])
    code, details = await bad.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "type_url" in details

    good = client.ads_delta(node=base_pb2.Node(id="good"))
    await good.request(CDS)
    assert names(await good.recv()) == ["a"]


@pytest.mark.parametrize(
    "type_url, subscribe",
    [(CDS, []), (EDS, ["a"]), (LDS, []), (RDS, ["r"]), (SDS, ["default"])],
    ids=["CDS", "EDS", "LDS", "RDS", "SDS"],
)
async def test_rule_02_delta_per_type_service_fills_in_type_url(
    server, cache, client, type_url, subscribe
):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(EDS, [endpoints("a", 8080)])
    cache.set_type(LDS, [listener("l", 15001)])
    cache.set_type(RDS, [route("r", "a")])
    cache.set_type(SDS, [secret("default")])
    stream = client.delta(type_url)
    await stream.request("", subscribe)
    response = await stream.recv()
    assert response.type_url == type_url
    assert len(response.resources) == 1
    assert response.resources[0].resource.type_url == type_url
    await stream.request("", nonce=response.nonce)  # ACK without type_url
    conn = connection(server)
    await eventually(lambda: conn.state.types[type_url].acked_version == response.system_version_info)


async def test_rule_02_delta_per_type_service_rejects_another_type(server, client):
    stream = client.delta(RDS)
    await stream.request(CDS)
    code, _ = await stream.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# Rule 3: nonces --------------------------------------------------------------------------------------


async def test_rule_03_delta_nonces_are_unique_per_stream_and_tracked_per_type(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(LDS, [listener("l", 15001)])
    ads = client.ads_delta()
    await ads.request(CDS)
    await ads.request(LDS)
    first = {r.type_url: r for r in [await ads.recv(), await ads.recv()]}
    c1, l1 = first[CDS], first[LDS]
    assert c1.nonce and l1.nonce and c1.nonce != l1.nonce

    conn = connection(server)
    await ads.request(LDS, nonce=c1.nonce)  # the CDS nonce acknowledges nothing of LDS
    await ads.expect_silence()
    assert conn.state.types[LDS].pending_nonce == l1.nonce
    assert conn.state.types[CDS].pending_nonce == c1.nonce

    await ads.ack(c1)
    await ads.ack(l1)
    await eventually(lambda: conn.state.types[LDS].pending_nonce is None)
    nonces = [c1.nonce, l1.nonce]
    for timeout in range(2000, 2005):
        cache.set_type(CDS, [cluster("a", connect_timeout_ms=timeout)])
        response = await ads.recv()
        nonces.append(response.nonce)
        await ads.ack(response)
    assert len(set(nonces)) == len(nonces)


# Rule 4: NACK ----------------------------------------------------------------------------------------


async def test_rule_04_delta_nack_is_recorded_and_not_resent(server, cache, client):
    """go-control-plane#962: the NACKed resource is not re-sent; a later change sends what
    changed, and the rejected content only if it changes again."""
    cache.set_type(CDS, [cluster("a"), cluster("b")])
    ads = client.ads_delta()
    await ads.request(CDS)
    first = await ads.recv()
    assert names(first) == ["a", "b"]
    await ads.ack(first)

    cache.update(CDS, [cluster("a", connect_timeout_ms=5)])
    bad = await ads.recv()
    assert names(bad) == ["a"]
    await ads.nack(bad, "cluster a rejected")
    conn = connection(server)
    state = conn.state.types[CDS]
    nack = await eventually(lambda: state.nack)
    assert nack.message == "cluster a rejected"
    assert nack.nonce == bad.nonce
    assert nack.version == bad.system_version_info
    assert state.status() == "NACKED"
    assert server.stats.nacks == 1
    await ads.expect_silence()
    await ads.nack(bad, "cluster a rejected")  # a repeated NACK changes nothing
    await ads.expect_silence()

    cache.update(CDS, [cluster("b", connect_timeout_ms=300)])
    other = await ads.recv()
    assert names(other) == ["b"]  # the rejected a is not part of it
    await ads.ack(other)
    await eventually(lambda: state.nack is None)

    cache.update(CDS, [cluster("a", connect_timeout_ms=250)])
    fixed = await ads.recv()
    assert names(fixed) == ["a"]
    assert delta_resources(fixed)["a"].connect_timeout.ToMilliseconds() == 250


# Rule 5: one outstanding response per type -----------------------------------------------------------


async def test_rule_05_delta_one_response_per_type_outstanding_and_changes_coalesced(
    server, cache, client
):
    cache.set_type(CDS, [cluster("a"), cluster("gone")])
    ads = client.ads_delta()
    await ads.request(CDS)
    first = await ads.recv()
    for timeout in (2000, 3000, 4000):
        cache.set_type(CDS, [cluster("a", connect_timeout_ms=timeout), cluster(f"t{timeout}")])
        await asyncio.sleep(0.02)
    await ads.expect_silence()
    assert connection(server).state.types[CDS].pending_nonce == first.nonce

    await ads.ack(first)
    latest = await ads.recv()
    # Only the newest state: t2000 and t3000 came and went meanwhile and are never mentioned.
    assert names(latest) == ["a", "t4000"]
    assert delta_resources(latest)["a"].connect_timeout.ToMilliseconds() == 4000
    assert removed(latest) == ["gone"]
    await ads.ack(latest)
    await ads.expect_silence()


# Rule 6: make-before-break -----------------------------------------------------------------------------


async def subscribe_all(ads) -> dict:
    """CDS and LDS wildcard, EDS [a], RDS [r]; ACKs the initial responses, returns them."""
    last = {}
    for type_url, subscribe in ((CDS, []), (EDS, ["a"]), (LDS, []), (RDS, ["r"])):
        await ads.request(type_url, subscribe)
        last[type_url] = await ads.recv()
        assert last[type_url].type_url == type_url
        await ads.ack(last[type_url])
    return last


def mesh(cache: ResourceCache) -> None:
    cache.set_type(CDS, [cluster("a")])
    cache.set_type(EDS, [endpoints("a", 8080)])
    cache.set_type(LDS, [listener("l", 15001, "r")])
    cache.set_type(RDS, [route("r", "a")])


async def test_rule_06_delta_ads_pushes_cds_then_eds_then_lds_then_rds(server, cache, client):
    mesh(cache)
    ads = client.ads_delta()
    await subscribe_all(ads)
    cache.set_type(RDS, [route("r", "a", prefix="/v2")])
    cache.set_type(LDS, [listener("l", 15002, "r")])
    cache.set_type(EDS, [endpoints("a", 8081)])
    cache.set_type(CDS, [cluster("a", connect_timeout_ms=2000)])
    got = [await ads.recv() for _ in range(4)]
    assert [r.type_url for r in got] == [CDS, EDS, LDS, RDS]


async def test_rule_06_delta_make_before_break_removes_cluster_after_route_update_is_acked(
    server, cache, client
):
    """Add cluster b, switch route r from a to b, remove a: b is added first, the route
    follows, and a appears in removed_resources only after the route update is ACKed."""
    mesh(cache)
    ads = client.ads_delta()
    await subscribe_all(ads)

    cache.set_type(CDS, [cluster("b")])
    cache.set_type(EDS, [endpoints("b", 9090)])
    cache.set_type(RDS, [route("r", "b")])

    cds = await ads.recv()
    assert cds.type_url == CDS and names(cds) == ["b"] and removed(cds) == []
    rds = await ads.recv()
    assert rds.type_url == RDS
    assert delta_resources(rds)["r"].virtual_hosts[0].routes[0].route.cluster == "b"
    await ads.expect_silence()

    await ads.ack(cds)
    await ads.request(EDS, ["b"])  # Envoy asks for the new cluster's endpoints
    eds = await ads.recv()
    assert eds.type_url == EDS and names(eds) == ["b"] and removed(eds) == []
    await ads.ack(eds)
    await ads.expect_silence()  # the route update is not ACKed yet

    await ads.ack(rds)
    gone = await ads.recv()
    assert gone.type_url == CDS and names(gone) == [] and removed(gone) == ["a"]
    await ads.ack(gone)
    eds_gone = await ads.recv()  # a's endpoints go after a itself
    assert eds_gone.type_url == EDS and removed(eds_gone) == ["a"]
    await ads.ack(eds_gone)
    await ads.expect_silence()


async def test_rule_06_delta_removals_go_referrers_first(server, cache, client):
    """Listener l uses route r, r uses cluster a, a uses endpoints a: removing all four
    removes l, then r, then a, then a's endpoints, each after the previous is ACKed."""
    mesh(cache)
    ads = client.ads_delta()
    await subscribe_all(ads)
    for type_url in (CDS, EDS, LDS, RDS):
        cache.set_type(type_url, [])
    order = []
    for _ in range(4):
        response = await ads.recv()
        assert names(response) == []
        order.append((response.type_url, removed(response)))
        await ads.expect_silence()  # one removal at a time
        await ads.ack(response)
    assert order == [(LDS, ["l"]), (RDS, ["r"]), (CDS, ["a"]), (EDS, ["a"])]
    await ads.expect_silence()


async def test_rule_06_delta_removal_waits_while_the_referring_update_is_nacked(server, cache, client):
    mesh(cache)
    ads = client.ads_delta()
    await subscribe_all(ads)
    cache.set_type(CDS, [cluster("b")])
    cache.set_type(RDS, [route("r", "b", prefix="/bad")])
    cds = await ads.recv()
    rds = await ads.recv()
    assert (cds.type_url, rds.type_url) == (CDS, RDS)
    await ads.ack(cds)
    await ads.nack(rds, "route r rejected")
    await ads.expect_silence()

    cache.set_type(RDS, [route("r", "b")])
    rds2 = await ads.recv()
    assert rds2.type_url == RDS
    await ads.ack(rds2)
    gone = await ads.recv()
    assert gone.type_url == CDS and removed(gone) == ["a"]


# Rule 7: names that do not exist yet ---------------------------------------------------------------------


async def test_rule_07_delta_missing_name_causes_no_reply_loop_and_is_delivered_later(
    server, cache, client
):
    """go-control-plane#1318 / #1319: a request naming a resource not in the cache must not
    start a request/response loop; the resource comes when it exists."""
    cache.set_type(EDS, [endpoints("a", 8080)])
    ads = client.ads_delta()
    await ads.request(EDS, ["missing"])
    await ads.expect_silence()
    await ads.request(EDS, ["a"])
    got = await ads.recv()
    assert names(got) == ["a"] and removed(got) == []
    await ads.ack(got)
    await ads.expect_silence()

    cache.update(EDS, [endpoints("missing", 9090)])
    late = await ads.recv()
    assert names(late) == ["missing"]
    await ads.ack(late)
    await ads.expect_silence()


# Rule 8: slow clients --------------------------------------------------------------------------------------


async def test_rule_08_delta_client_that_never_acks_does_not_delay_others_and_gets_only_latest(
    server, cache
):
    cache.set_type(CDS, [cluster("a")])
    async with XdsClient(server.address, node_id="lazy") as lazy_client, \
            XdsClient(server.address, node_id="busy") as busy_client:
        lazy = lazy_client.ads_delta()
        busy = busy_client.ads_delta()
        await lazy.request(CDS)
        first = await lazy.recv()
        await busy.request(CDS)
        await busy.ack(await busy.recv())
        for i in range(30):
            cache.set_type(CDS, [cluster("a", connect_timeout_ms=2000 + i), cluster(f"c{i}")])
            got = await busy.recv()
            assert names(got) == ["a", f"c{i}"]
            assert removed(got) == ([f"c{i - 1}"] if i else [])
            await busy.ack(got)
        await lazy.expect_silence()
        await lazy.ack(first)
        latest = await lazy.recv()
        assert names(latest) == ["a", "c29"]
        assert removed(latest) == []  # c0..c28 were never sent to it
        assert delta_resources(latest)["a"].connect_timeout.ToMilliseconds() == 2029
        await lazy.ack(latest)
        await lazy.expect_silence()


async def test_delta_garbage_request_closes_only_that_stream(server, cache, client):
    cache.set_type(CDS, [cluster("a")])
    ads = client.ads_delta()
    await ads.request(CDS)
    await ads.ack(await ads.recv())
    junk = client.raw(method(None, delta=True))
    await junk.send(b"\xff\xff\xff\xff not a DeltaDiscoveryRequest")
    code, _ = await junk.closed_with()
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    cache.update(CDS, [cluster("b")])
    assert names(await ads.recv()) == ["b"]


# Rule 13: subscription changes with a stale nonce ------------------------------------------------------------


async def test_rule_13_subscription_changes_honoured_with_stale_nonce(server, cache, client):
    cache.set_type(RDS, [route("r1", "a"), route("r2", "a"), route("r3", "a")])
    ads = client.ads_delta()
    await ads.request(RDS, ["r1"])
    first = await ads.recv()
    await ads.ack(first)

    # Nothing outstanding: a subscription with a nonce the server never sent is served.
    await ads.request(RDS, ["r2"], nonce="stale")
    second = await ads.recv()
    assert names(second) == ["r2"]

    # While `second` is outstanding, a request with the older nonce subscribes r3 and drops
    # r1: both count; r3 comes once `second` is ACKed.
    await ads.request(RDS, ["r3"], ["r1"], nonce=first.nonce)
    await ads.expect_silence()
    state = connection(server).state.types[RDS]
    assert state.names == {"r2", "r3"}
    assert state.pending_nonce == second.nonce
    await ads.ack(second)
    third = await ads.recv()
    assert names(third) == ["r3"] and removed(third) == []
    await ads.ack(third)

    cache.update(RDS, [route("r1", "b")])  # unsubscribed (with a stale nonce) indeed
    await ads.expect_silence()


# Rule 14: initial_resource_versions ---------------------------------------------------------------------------


async def test_rule_14_unchanged_resources_are_not_sent_again(server, cache, client):
    cache.set_type(CDS, [cluster("a"), cluster("b"), cluster("c")])
    first_stream = client.ads_delta(node=base_pb2.Node(id="before"))
    await first_stream.request(CDS)
    first = await first_stream.recv()
    have = versions(first)
    await first_stream.cancel()

    cache.update(CDS, [cluster("b", connect_timeout_ms=2000)])
    resumed = client.ads_delta(node=base_pb2.Node(id="after"))
    await resumed.request(CDS, initial=have)
    got = await resumed.recv()
    assert names(got) == ["b"] and removed(got) == []
    assert versions(got)["b"] != have["b"]
    await resumed.ack(got)
    await resumed.expect_silence()

    named = client.ads_delta(node=base_pb2.Node(id="named"))
    await named.request(CDS, ["a", "c"], initial={"a": have["a"], "c": have["c"]})
    await named.expect_silence()


async def test_rule_14_known_names_that_are_gone_or_invisible_are_removed(cache):
    cache.set_type(CDS, [cluster("a"), cluster("hidden"), cluster("new")])
    hidden = {"hidden"}
    server = await start_server(
        cache, view_for=lambda node: FilteredView(cache, "scoped", lambda t, n: n not in hidden)
    )
    try:
        async with XdsClient(server.address) as client:
            ads = client.ads_delta()
            await ads.request(CDS, initial={
                "a": version_of(cluster("a")),
                "gone": "0123456789abcdef",
                "hidden": version_of(cluster("hidden")),
            })
            got = await ads.recv()
            assert names(got) == ["new"]
            assert removed(got) == ["gone", "hidden"]
            await ads.ack(got)
            await ads.expect_silence()

            eds = client.delta(EDS, node=base_pb2.Node(id="eds"))
            await eds.request(EDS, ["x", "y"], initial={"x": "1", "y": "2"})
            none_left = await eds.recv()
            assert names(none_left) == [] and removed(none_left) == ["x", "y"]
    finally:
        await server.stop(0)


async def test_rule_14_reconnect_to_another_replica_with_nothing_changed_sends_no_resources():
    """Versions are content hashes, so a replica with the same content agrees with what the
    client has, and a reconnect costs nothing."""
    replicas = []
    for _ in range(2):
        cache = ResourceCache()
        cache.set_type(CDS, [cluster("a"), cluster("b")])
        cache.set_type(RDS, [route("r", "a")])
        replicas.append(await start_server(cache))
    try:
        async with XdsClient(replicas[0].address) as one, XdsClient(replicas[1].address) as two:
            ads = one.ads_delta()
            await ads.request(CDS)
            cds = await ads.recv()
            await ads.request(RDS, ["r"])
            rds = await ads.recv()
            await ads.cancel()

            again = two.ads_delta()
            await again.request(CDS, initial=versions(cds))
            answer = await again.recv()  # a wildcard request is answered (rule 12/15) ...
            assert list(answer.resources) == [] and list(answer.removed_resources) == []
            await again.ack(answer)
            await again.request(RDS, ["r"], initial=versions(rds))
            await again.expect_silence()  # ... an explicit one with nothing new is not
    finally:
        for replica in replicas:
            await replica.stop(0)


# Rule 15: wildcard in delta -----------------------------------------------------------------------------------


async def test_rule_15_star_turns_wildcard_on_and_off(server, cache, client):
    cache.set_type(CDS, [cluster("a"), cluster("b"), cluster("c")])
    ads = client.ads_delta()
    await ads.request(CDS, ["a"])
    first = await ads.recv()
    assert names(first) == ["a"]
    await ads.ack(first)

    await ads.request(CDS, ["*"])
    rest = await ads.recv()
    assert names(rest) == ["b", "c"]
    await ads.ack(rest)
    cache.update(CDS, [cluster("d")])
    got = await ads.recv()
    assert names(got) == ["d"]
    await ads.ack(got)

    await ads.request(CDS, [], ["*"])
    await ads.expect_silence()  # the client drops what came by the wildcard itself
    state = connection(server).state.types[CDS]
    assert not state.wildcard and state.names == {"a"}
    cache.update(CDS, [cluster("e"), cluster("b", connect_timeout_ms=2000)])
    await ads.expect_silence()
    cache.update(CDS, [cluster("a", connect_timeout_ms=2000)])
    got = await ads.recv()
    assert names(got) == ["a"] and removed(got) == []


async def test_rule_15_legacy_wildcard_lasts_until_star_is_unsubscribed(server, cache, client):
    cache.set_type(CDS, [cluster("a"), cluster("b")])
    ads = client.ads_delta()
    await ads.request(CDS)  # no names: legacy wildcard
    first = await ads.recv()
    assert names(first) == ["a", "b"]
    await ads.ack(first)

    await ads.request(CDS, ["a"])  # explicit names do not end it
    await ads.expect_silence()
    cache.update(CDS, [cluster("c")])
    got = await ads.recv()
    assert names(got) == ["c"]
    await ads.ack(got)

    await ads.request(CDS, [], ["*"])
    await ads.expect_silence()
    cache.update(CDS, [cluster("d")])
    await ads.expect_silence()
    cache.update(CDS, [cluster("a", connect_timeout_ms=2000)])
    got = await ads.recv()
    assert names(got) == ["a"]


# Rule 16: per-resource versions -------------------------------------------------------------------------------


async def test_rule_16_each_resource_has_its_own_version_and_only_changes_are_sent(
    server, cache, client
):
    cache.set_type(CDS, [cluster("a"), cluster("b"), cluster("c")])
    ads = client.ads_delta()
    await ads.request(CDS)
    first = await ads.recv()
    assert versions(first) == {n: version_of(cluster(n)) for n in "abc"}
    assert len(set(versions(first).values())) == 3
    await ads.ack(first)

    cache.set_type(CDS, [cluster("a"), cluster("b", connect_timeout_ms=2000), cluster("c")])
    changed = await ads.recv()
    assert versions(changed) == {"b": version_of(cluster("b", connect_timeout_ms=2000))}
    assert removed(changed) == []
    await ads.ack(changed)

    cache.update(CDS, remove=["c"])
    deleted = await ads.recv()
    assert list(deleted.resources) == [] and removed(deleted) == ["c"]
    await ads.ack(deleted)

    cache.set_type(CDS, [cluster("a"), cluster("b", connect_timeout_ms=2000)])  # same content
    await ads.expect_silence()


# Rule 17: names that never existed ----------------------------------------------------------------------------


async def test_rule_17_names_that_never_existed_are_not_reported_removed(server, cache, client):
    cache.set_type(RDS, [route("r1", "a")])
    ads = client.ads_delta()
    await ads.request(RDS, ["r1", "ghost"])
    first = await ads.recv()
    assert names(first) == ["r1"] and removed(first) == []
    await ads.ack(first)

    await ads.request(RDS, [], ["ghost"])
    await ads.expect_silence()

    # Created and deleted while a response was outstanding: never sent, never "removed".
    await ads.request(RDS, ["flash"])
    await ads.expect_silence()
    cache.update(RDS, [route("r1", "b")])
    changed = await ads.recv()
    cache.update(RDS, [route("flash", "a")])
    await asyncio.sleep(0.02)
    cache.update(RDS, remove=["flash"])
    await ads.ack(changed)
    await ads.expect_silence()

    # A name that did exist is reported once.
    cache.update(RDS, remove=["r1"])
    gone = await ads.recv()
    assert removed(gone) == ["r1"]
    await ads.ack(gone)
    cache.update(RDS, [route("r2", "a")])
    await ads.expect_silence()


async def test_rule_17_wildcard_never_reports_unknown_names(server, cache, client):
    ads = client.ads_delta()
    await ads.request(CDS)
    first = await ads.recv()  # answered though empty (rule 15)
    assert list(first.resources) == [] and removed(first) == []
    await ads.ack(first)
    cache.update(CDS, [cluster("a")])
    cache.update(CDS, remove=["a"])  # same flush: a never existed for this client
    await ads.expect_silence()


# Bounds: the names one stream subscribes to, over all types ---------------------------------------


async def test_a_stream_cannot_subscribe_past_its_total_name_limit(cache):
    """Each request is under the per-request limit, but the stream keeps adding names: past
    --max-names-per-stream it ends with INVALID_ARGUMENT instead of growing without bound."""
    server = await start_server(cache, max_names_per_request=8, max_names_per_stream=10)
    try:
        async with XdsClient(server.address) as client:
            ads = client.ads_delta()
            await ads.request(CDS, [f"c{i}" for i in range(6)])
            await ads.request(EDS, [f"e{i}" for i in range(4)])  # 10: at the limit
            await ads.request(CDS, unsubscribe=["c0"], subscribe=["c6"])  # still 10
            await eventually(lambda: subscribed(server) == 10)
            await ads.request(EDS, ["e4"])  # 11
            code, details = await ads.closed_with()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit 10" in details
    finally:
        await server.stop(0)


def subscribed(server: XdsServer) -> int:
    """Names subscribed on the server's (one) stream so far; 0 before it is registered."""
    return sum(len(t.names) for c in server.connections for t in c.state.types.values())


async def test_a_stream_that_never_sends_a_request_is_ended(cache):
    """An unauthenticated peer cannot hold a stream open without saying who it is: no request
    within --first-request-timeout ends it with DEADLINE_EXCEEDED, and it is counted."""
    server = await start_server(cache, first_request_timeout=0.3)
    try:
        async with XdsClient(server.address) as client:
            silent = client.ads_delta()
            talking = client.ads_delta()
            await talking.request(CDS)
            await talking.recv()
            code, details = await silent.closed_with(timeout=10)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no request within" in details
            assert server.stats.first_request_timeouts == 1
            await asyncio.sleep(0.5)  # past the deadline: the stream that spoke stays open
            assert subscribed(server) == 0 and len(server.connections) == 1
    finally:
        await server.stop(0)
