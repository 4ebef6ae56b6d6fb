"""CSDS on the xDS port: a stock CSDS client (grpcio's generated stub) reads each proxy's
config status. With a real Envoy (SotW ADS, delta ADS, SotW per-type streams) the versions match Envoy's own
config_dump, a NACK shows up as ERROR with Envoy's error text, and node matchers select
proxies; scripted clients cover in-flight, missing and secret resources."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2

from tests.support.pem import fake_private_key_pem
from tests.support import scenario
from tests.support.envoy import EnvoyProcess, ads_bootstrap
from tests.support.net import free_port, next_loopback_ip
from tests.support.upstreams import HttpUpstream, http_request
from tests.support.xds_client import XdsClient, cluster, default_node, endpoints, eventually, secret
from xds_server.xds import csds as csds_module
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

ConfigStatus = csds_pb2.ConfigStatus
ClientStatus = config_dump_shared_pb2.ClientResourceStatus
GenericXdsConfig = csds_pb2.ClientConfig.GenericXdsConfig

# Envoy's config_dump section -> our type URL.
DUMP_TYPES = {
    "clusters": types.CLUSTER,
    "listeners": types.LISTENER,
    "routes": types.ROUTE,
    "endpoints": types.ENDPOINT,
}


# The stock client: grpcio's generated stub on a plain (synchronous) channel ----------------


def fetch(address: str, request: csds_pb2.ClientStatusRequest | None = None) -> csds_pb2.ClientStatusResponse:
    with grpc.insecure_channel(address) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        return stub.FetchClientStatus(request or csds_pb2.ClientStatusRequest(), timeout=10)


def stream(address: str, requests: Iterable[csds_pb2.ClientStatusRequest]) -> list[csds_pb2.ClientStatusResponse]:
    with grpc.insecure_channel(address) as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        return list(stub.StreamClientStatus(iter(list(requests)), timeout=10))


async def csds(address: str, request: csds_pb2.ClientStatusRequest | None = None) -> csds_pb2.ClientStatusResponse:
    return await asyncio.to_thread(fetch, address, request)


def by_id(node_id: str) -> csds_pb2.ClientStatusRequest:
    return csds_pb2.ClientStatusRequest(node_matchers=[node_pb2.NodeMatcher(node_id={"exact": node_id})])


def entries(response: csds_pb2.ClientStatusResponse, node_id: str) -> dict[tuple[str, str], GenericXdsConfig]:
    configs = [c for c in response.config if c.node.id == node_id]
    assert len(configs) == 1, [c.node.id for c in response.config]
    return {(g.type_url, g.name): g for g in configs[0].generic_xds_configs}


# A real Envoy ----------------------------------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sotw-ads", "delta-ads", "sotw-per-type"])
async def test_csds_reports_real_envoy_status_versions_and_nack(mode: str) -> None:
    listen_ip = next_loopback_ip()
    upstreams = [HttpUpstream(scenario.upstream_name(k), next_loopback_ip()).start() for k in range(4)]
    http_ports = [free_port(listen_ip) for _ in range(2)]
    tcp_ports = [free_port(listen_ip) for _ in range(2)]
    ads = mode != "sotw-per-type"  # per-type: a stream per service (and per EDS cluster)
    snapshot = scenario.make_snapshot(0, [u.address for u in upstreams], http_ports, tcp_ports, listen_ip, ads=ads)
    cache = ResourceCache()
    for type_url in types.PUSH_ORDER:
        if type_url in snapshot:
            cache.set_type(type_url, snapshot[type_url])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0))
    await server.start()
    node_id = f"csds-{mode}"
    envoy = EnvoyProcess(
        ads_bootstrap(node_id, "127.0.0.1", server.port, mode, metadata={"role": "gateway"}),
        name=node_id,
    )
    await asyncio.to_thread(envoy.start)
    target = scenario.upstream_name(scenario.target_cluster(0, 0))
    names = scenario.resource_names(snapshot)
    expected = {(t, n) for t, ns in names.items() for n in ns}
    try:
        await asyncio.to_thread(
            envoy.wait_until,
            lambda: http_request(listen_ip, http_ports[0], "/").json["name"] == target,
            10.0, 0.05, "initial config applied",
        )

        def all_synced(response: csds_pb2.ClientStatusResponse):
            got = entries(response, node_id)
            ok = set(got) == expected and all(
                g.config_status == ConfigStatus.SYNCED for g in got.values()
            )
            return got if ok else None

        got = await eventually_csds(server.address, by_id(node_id), all_synced)
        streams = [c for c in server.connections if c.proxy_id == node_id]
        assert len(streams) > 1 if mode == "sotw-per-type" else len(streams) == 1
        config = (await csds(server.address, by_id(node_id))).config[0]
        assert config.node.id == node_id and config.node.cluster == "test"
        assert config.node.metadata.fields["role"].string_value == "gateway"
        for entry in got.values():
            assert entry.client_status == ClientStatus.ACKED
            assert entry.version_info
            assert entry.xds_config.type_url == entry.type_url  # the resource itself
        cds = cluster_pb2.Cluster.FromString(got[(types.CLUSTER, scenario.cluster_name(0))].xds_config.value)
        assert cds.name == scenario.cluster_name(0)

        # Per resource, the version Envoy's own config_dump shows.
        versions = await asyncio.to_thread(envoy.dynamic_versions)
        compared = 0
        for section, type_url in DUMP_TYPES.items():
            assert versions[section], section
            for name, version in versions[section].items():
                if mode == "delta-ads" and type_url == types.ENDPOINT:
                    # Envoy 1.40 dumps EDS without version_info; the stat dynamic_versions
                    # falls back on is the delta response's system version, not the
                    # resource's. Delta reports each resource's own version.
                    version = cache.get(type_url, name).version
                assert got[(type_url, name)].version_info == version, (section, name)
                compared += 1
        assert compared == len(expected)

        # Envoy rejects a cluster: that cluster is ERROR with Envoy's own error text, the
        # others stay SYNCED.
        broken = scenario.make_cluster(0, 0, ads)
        broken.health_checks.append(health_check_pb2.HealthCheck())
        cache.update(types.CLUSTER, upsert=[broken])

        def rejected(response: csds_pb2.ClientStatusResponse):
            entry = entries(response, node_id).get((types.CLUSTER, scenario.cluster_name(0)))
            return entry if entry is not None and entry.config_status == ConfigStatus.ERROR else None

        entry = await eventually_csds(server.address, by_id(node_id), rejected)
        nack = next(
            t.nack for c in server.connections if c.proxy_id == node_id
            for u, t in c.state.types.items() if u == types.CLUSTER
        )
        assert nack is not None
        assert entry.client_status == ClientStatus.NACKED
        assert entry.error_state.details == nack.message  # Envoy's text, as Envoy sent it
        assert "HealthCheck" in nack.message or "interval" in nack.message, nack.message
        assert entry.error_state.version_info == entry.version_info != ""
        assert entry.error_state.HasField("last_update_attempt")
        failed = cluster_pb2.Cluster.FromString(entry.error_state.failed_configuration.value)
        assert failed.name == scenario.cluster_name(0) and len(failed.health_checks) == 1
        others = entries(await csds(server.address, by_id(node_id)), node_id)
        for k in range(1, scenario.NUM_CLUSTERS):
            assert others[(types.CLUSTER, scenario.cluster_name(k))].config_status == ConfigStatus.SYNCED
        assert others[(types.LISTENER, scenario.http_listener_name(0))].config_status == ConfigStatus.SYNCED

        # The fix is accepted: SYNCED again, at the version Envoy's config_dump shows.
        cache.update(types.CLUSTER, upsert=[scenario.make_cluster(0, 1, ads)])

        def fixed(response: csds_pb2.ClientStatusResponse):
            entry = entries(response, node_id).get((types.CLUSTER, scenario.cluster_name(0)))
            return entry if entry is not None and entry.config_status == ConfigStatus.SYNCED else None

        entry = await eventually_csds(server.address, by_id(node_id), fixed)
        assert not entry.HasField("error_state")
        # Envoy ACKs a changed EDS cluster at once but shows it as active only once it has
        # warmed (its endpoints arrived): under load that can come a moment later.
        await asyncio.to_thread(
            envoy.wait_until,
            lambda: envoy.dynamic_versions()["clusters"][scenario.cluster_name(0)] == entry.version_info,
            10.0, 0.05, "the accepted cluster active in Envoy's config_dump at the version CSDS reports",
        )

        # Node matchers pick the proxy out of others (a scripted one here).
        async with XdsClient(server.address, node_id="other-proxy") as other:
            ads = other.ads()
            await ads.request(types.CLUSTER)
            await ads.ack(await ads.recv())
            everyone = await csds(server.address)
            assert {c.node.id for c in everyone.config} == {node_id, "other-proxy"}
            assert [c.node.id for c in (await csds(server.address, by_id(node_id))).config] == [node_id]
            by_prefix = csds_pb2.ClientStatusRequest(
                node_matchers=[node_pb2.NodeMatcher(node_id={"prefix": "csds-"})]
            )
            assert [c.node.id for c in (await csds(server.address, by_prefix)).config] == [node_id]
            by_metadata = csds_pb2.ClientStatusRequest(node_matchers=[node_pb2.NodeMatcher(
                node_metadatas=[{"path": [{"key": "role"}], "value": {"string_match": {"exact": "gateway"}}}]
            )])
            assert [c.node.id for c in (await csds(server.address, by_metadata)).config] == [node_id]
            nobody = csds_pb2.ClientStatusRequest(
                node_matchers=[node_pb2.NodeMatcher(node_id={"exact": "no-such-proxy"})]
            )
            assert list((await csds(server.address, nobody)).config) == []

            # StreamClientStatus: one answer per request, on one stream.
            answers = await asyncio.to_thread(
                stream, server.address, [by_id(node_id), by_id("other-proxy"), nobody]
            )
            assert [[c.node.id for c in a.config] for a in answers] == [[node_id], ["other-proxy"], []]
            assert entries(answers[0], node_id).keys() == expected
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(0.5)
        for upstream in upstreams:
            upstream.stop()


async def eventually_csds(address: str, request, probe, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while True:
        last = await csds(address, request)
        try:
            value = probe(last)
        except AssertionError:
            value = None
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"CSDS never reached the expected state; last answer:\n{last}")
        await asyncio.sleep(0.05)


# Scripted clients --------------------------------------------------------------------------------


async def _server(cache: ResourceCache) -> XdsServer:
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0))
    await server.start()
    return server


async def test_csds_missing_in_flight_nacked_and_secret_resources() -> None:
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [cluster("a"), cluster("b")])
    cache.set_type(types.ENDPOINT, [endpoints("a", 8080)])
    cache.set_type(types.SECRET, [secret("cert", "top-secret-key-material")])
    server = await _server(cache)
    try:
        async with XdsClient(server.address, node_id="sotw-proxy") as sotw_client, \
                XdsClient(server.address, node_id="delta-proxy") as delta_client:
            ads = sotw_client.ads()
            await ads.request(types.ENDPOINT, ["a", "missing"])
            eds = await ads.recv()
            # Not answered yet: in flight.
            got = entries(await csds(server.address, by_id("sotw-proxy")), "sotw-proxy")
            assert got[(types.ENDPOINT, "a")].config_status == ConfigStatus.STALE
            assert got[(types.ENDPOINT, "a")].version_info == eds.version_info
            missing = got[(types.ENDPOINT, "missing")]
            assert missing.config_status == ConfigStatus.NOT_SENT
            assert missing.client_status == ClientStatus.DOES_NOT_EXIST
            assert not missing.version_info and not missing.HasField("xds_config")
            await ads.ack(eds)
            await eventually(
                lambda: server.stats.acks >= 1, what="ACK recorded"
            )
            got = entries(await csds(server.address, by_id("sotw-proxy")), "sotw-proxy")
            assert got[(types.ENDPOINT, "a")].config_status == ConfigStatus.SYNCED
            assert got[(types.ENDPOINT, "a")].version_info == eds.version_info
            assert got[(types.ENDPOINT, "missing")].client_status == \
                ClientStatus.DOES_NOT_EXIST

            # A missing name that appears later is sent and reported.
            cache.update(types.ENDPOINT, upsert=[endpoints("missing", 9090)])
            eds2 = await ads.recv()
            await ads.ack(eds2)
            await eventually(lambda: server.stats.acks >= 2, what="second ACK")
            got = entries(await csds(server.address, by_id("sotw-proxy")), "sotw-proxy")
            assert got[(types.ENDPOINT, "missing")].config_status == ConfigStatus.SYNCED

            # Secrets: name, version and status, never the key material.
            await ads.request(types.SECRET, ["cert"])
            sds = await ads.recv()
            await ads.ack(sds)
            await eventually(lambda: server.stats.acks >= 3, what="SDS ACK")
            response = await csds(server.address)
            assert b"top-secret-key-material" not in response.SerializeToString()
            got = entries(response, "sotw-proxy")
            assert got[(types.SECRET, "cert")].config_status == ConfigStatus.SYNCED
            assert got[(types.SECRET, "cert")].version_info == sds.version_info
            assert not got[(types.SECRET, "cert")].HasField("xds_config")

            # A rejected secret: ERROR, but Envoy's text (which quotes the resource) is withheld.
            cache.update(types.SECRET, upsert=[secret("cert", "rotated-key-material")])
            sds2 = await ads.recv()
            await ads.nack(sds2, 'name: "cert" generic_secret { inline_string: "rotated-key-material" }: bad',
                           accepted_version=sds.version_info)
            await eventually(lambda: server.stats.nacks >= 1, what="SDS NACK")
            response = await csds(server.address, by_id("sotw-proxy"))
            assert b"key-material" not in response.SerializeToString()
            cert = entries(response, "sotw-proxy")[(types.SECRET, "cert")]
            assert cert.config_status == ConfigStatus.ERROR
            assert cert.version_info == cert.error_state.version_info == sds2.version_info
            assert cert.error_state.details == csds_module.WITHHELD
            assert not cert.error_state.HasField("failed_configuration")

            # Delta: per-resource versions; a NACK naming one resource marks only that one.
            delta = delta_client.ads_delta()
            await delta.request(types.CLUSTER, ["a", "b", "nope"])
            cds = await delta.recv()
            sent = {r.name: r.version for r in cds.resources}
            await delta.nack(cds, "Error adding/updating cluster(s) b: bad")
            await eventually(lambda: server.stats.nacks >= 2, what="NACK recorded")
            got = entries(await csds(server.address, by_id("delta-proxy")), "delta-proxy")
            a, b = got[(types.CLUSTER, "a")], got[(types.CLUSTER, "b")]
            assert a.config_status == ConfigStatus.SYNCED and a.version_info == sent["a"]
            assert b.config_status == ConfigStatus.ERROR and b.version_info == sent["b"]
            assert b.error_state.details == "Error adding/updating cluster(s) b: bad"
            assert b.error_state.version_info == sent["b"]
            assert got[(types.CLUSTER, "nope")].client_status == \
                ClientStatus.DOES_NOT_EXIST

            # exclude_resource_contents leaves every resource out.
            bare = await csds(server.address, csds_pb2.ClientStatusRequest(exclude_resource_contents=True))
            assert len(bare.config) == 2
            for config in bare.config:
                for g in config.generic_xds_configs:
                    assert not g.HasField("xds_config") and not g.error_state.HasField("failed_configuration")
    finally:
        await server.stop(0)


async def test_csds_redacts_sensitive_fields_and_matches_metadata() -> None:
    key = fake_private_key_pem("inline-key", newline="")
    tls = tls_pb2.UpstreamTlsContext()
    tls.common_tls_context.tls_certificates.add().private_key.inline_string = key
    tls.common_tls_context.tls_certificates[0].certificate_chain.inline_string = "CHAIN"
    secure = cluster("secure")
    secure.transport_socket.name = "envoy.transport_sockets.tls"
    secure.transport_socket.typed_config.Pack(tls)
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [secure])
    server = await _server(cache)
    try:
        node = default_node("meta-proxy")
        node.metadata.update({"labels": {"app": "web"}, "replicas": 3})
        async with XdsClient(server.address) as client:
            ads = client.ads(node=node)
            await ads.request(types.CLUSTER)
            await ads.ack(await ads.recv())
            await eventually(lambda: server.stats.acks >= 1, what="ACK")
            response = await csds(server.address)
            assert key.encode() not in response.SerializeToString()
            entry = entries(response, "meta-proxy")[(types.CLUSTER, "secure")]
            shown = cluster_pb2.Cluster.FromString(entry.xds_config.value)
            context = tls_pb2.UpstreamTlsContext()
            shown.transport_socket.typed_config.Unpack(context)
            certificate = context.common_tls_context.tls_certificates[0]
            assert certificate.private_key.inline_string == "[redacted]"
            assert certificate.certificate_chain.inline_string == "CHAIN"  # not sensitive

            def ids(*matchers: node_pb2.NodeMatcher) -> list[str]:
                request = csds_pb2.ClientStatusRequest(node_matchers=list(matchers))
                return [c.node.id for c in fetch(server.address, request).config]

            def meta(path: list[str], value: dict) -> node_pb2.NodeMatcher:
                return node_pb2.NodeMatcher(node_metadatas=[{"path": [{"key": k} for k in path], "value": value}])

            assert await asyncio.to_thread(ids, meta(["labels", "app"], {"string_match": {"exact": "web"}})) == ["meta-proxy"]
            assert await asyncio.to_thread(ids, meta(["labels", "app"], {"string_match": {"exact": "db"}})) == []
            assert await asyncio.to_thread(ids, meta(["replicas"], {"double_match": {"range": {"start": 1, "end": 5}}})) == ["meta-proxy"]
            assert await asyncio.to_thread(ids, meta(["missing"], {"present_match": False})) == ["meta-proxy"]
            regex = node_pb2.NodeMatcher(node_id={"safe_regex": {"regex": "meta-.*"}})
            assert await asyncio.to_thread(ids, regex) == ["meta-proxy"]
            upper = node_pb2.NodeMatcher(node_id={"exact": "META-PROXY", "ignore_case": True})
            assert await asyncio.to_thread(ids, upper) == ["meta-proxy"]
            # OR semantics across matchers.
            nobody = node_pb2.NodeMatcher(node_id={"exact": "x"})
            assert await asyncio.to_thread(ids, nobody, regex) == ["meta-proxy"]

            # A NACK of a resource holding sensitive fields: Envoy's text is withheld.
            updated = cluster_pb2.Cluster()
            updated.CopyFrom(secure)
            updated.connect_timeout.FromMilliseconds(2000)
            cache.update(types.CLUSTER, upsert=[updated])
            cds = await ads.recv()
            await ads.nack(cds, f"{key}: invalid")
            await eventually(lambda: server.stats.nacks >= 1, what="NACK")
            response = await csds(server.address)
            assert key.encode() not in response.SerializeToString()
            entry = entries(response, "meta-proxy")[(types.CLUSTER, "secure")]
            assert entry.config_status == ConfigStatus.ERROR
            assert entry.error_state.details == csds_module.WITHHELD
            failed = cluster_pb2.Cluster.FromString(entry.error_state.failed_configuration.value)
            assert failed.connect_timeout.ToMilliseconds() == 2000  # shown, redacted

            bad = node_pb2.NodeMatcher(node_id={"safe_regex": {"regex": "("}})
            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(ids, bad)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # RE2, as Envoy (linear time, no backtracking): no backreferences, which Python's
            # engine would accept.
            backref = node_pb2.NodeMatcher(node_id={"safe_regex": {"regex": "(a)\\1"}})
            with pytest.raises(grpc.RpcError) as err:
                await asyncio.to_thread(ids, backref)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(0)


async def test_csds_is_listed_by_reflection() -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    server = await _server(ResourceCache())
    try:
        def services() -> list[str]:
            with grpc.insecure_channel(server.address) as channel:
                return list(ProtoReflectionDescriptorDatabase(channel).get_services())

        assert "envoy.service.status.v3.ClientStatusDiscoveryService" in await asyncio.to_thread(services)
    finally:
        await server.stop(0)


async def test_csds_authorize_hook_can_refuse() -> None:
    async def deny(context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "operators only")

    server = grpc.aio.server()
    csds_module.add_to_server(server, lambda: [], authorize=deny)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        address = f"127.0.0.1:{port}"
        with pytest.raises(grpc.RpcError) as err:
            await csds(address)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            await asyncio.to_thread(stream, address, [csds_pb2.ClientStatusRequest()])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(0)
