"""Real Envoy rejects an invalid resource: the server records Envoy's own error text, does not
re-send the rejected version, keeps Envoy serving the last good config, and a corrected
resource is then accepted (CONFORMANCE rule 4, go-control-plane#962)."""

from __future__ import annotations

import asyncio

import pytest
from envoy.config.core.v3 import health_check_pb2

from tests.support import scenario
from tests.support.envoy import EnvoyProcess, ads_bootstrap
from tests.support.net import free_port, next_loopback_ip
from tests.support.upstreams import HttpUpstream, http_request
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from tests.support.hooks import OnPush
from xds_server.xds.server import Connection, ServerSettings, XdsServer
from xds_server.xds.stream import Push

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


def _cds_state(server: XdsServer, node_id: str):
    for conn in server.connections:
        if conn.proxy_id == node_id and types.CLUSTER in conn.state.types:
            return conn.state.types[types.CLUSTER]
    return None


@pytest.mark.parametrize("mode", ["sotw-ads", "delta-ads"])
async def test_envoy_nack_is_recorded_not_resent_and_fix_accepted(mode: str) -> None:
    listen_ip = next_loopback_ip()
    upstreams = [HttpUpstream(scenario.upstream_name(k), next_loopback_ip()).start() for k in range(4)]
    http_ports = [free_port(listen_ip) for _ in range(2)]
    tcp_ports = [free_port(listen_ip) for _ in range(2)]
    snapshot = scenario.make_snapshot(0, [u.address for u in upstreams], http_ports, tcp_ports, listen_ip)
    cache = ResourceCache()
    for type_url in types.PUSH_ORDER:
        if type_url in snapshot:
            cache.set_type(type_url, snapshot[type_url])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0))
    node_id = f"nack-{mode}"
    cds_pushes: list[str] = []

    def record(conn: Connection, push: Push) -> None:
        if conn.proxy_id == node_id and push.type_url == types.CLUSTER:
            cds_pushes.append(push.version)

    server.hooks.add(OnPush(record))
    await server.start()
    envoy = EnvoyProcess(ads_bootstrap(node_id, "127.0.0.1", server.port, mode), name=node_id)
    await asyncio.to_thread(envoy.start)
    target = scenario.upstream_name(scenario.target_cluster(0, 0))
    try:
        await asyncio.to_thread(
            envoy.wait_until,
            lambda: http_request(listen_ip, http_ports[0], "/").json["name"] == target,
            10.0, 0.05, "initial config applied",
        )
        # A health check without interval/timeout/thresholds violates Envoy's API rules.
        broken = scenario.make_cluster(0, 0)
        broken.health_checks.append(health_check_pb2.HealthCheck())
        cache.update(types.CLUSTER, upsert=[broken])
        state = await _eventually(lambda: (s := _cds_state(server, node_id)) and s.nack and s)
        assert "HealthCheck" in state.nack.message or "interval" in state.nack.message, state.nack.message
        assert state.status() == "NACKED"
        rejected_pushes = len(cds_pushes)

        # Envoy keeps serving the last good config, and the server does not re-send.
        response = await asyncio.to_thread(http_request, listen_ip, http_ports[0], "/")
        assert response.status == 200 and response.json["name"] == target
        await asyncio.sleep(1.0)
        assert len(cds_pushes) == rejected_pushes, "the rejected version was sent again"
        assert server.stats.nacks == 1

        # An unrelated change elsewhere does not re-send the rejected cluster either.
        cache.update(types.ENDPOINT, upsert=[scenario.make_cla(1, 7, [upstreams[1].address])])
        await asyncio.sleep(0.3)
        assert len(cds_pushes) == rejected_pushes

        # The corrected resource is sent, accepted, and the NACK clears.
        fixed = scenario.make_cluster(0, 1)
        cache.update(types.CLUSTER, upsert=[fixed])
        state = await _eventually(
            lambda: (s := _cds_state(server, node_id)) and s.status() == "SYNCED" and s
        )
        assert state.nack is None
        assert len(cds_pushes) == rejected_pushes + 1
        assert server.stats.nacks == 1
        dump = await asyncio.to_thread(envoy.config_dump, False, "dynamic_active_clusters")
        timeouts = {
            c["cluster"]["name"]: c["cluster"]["connect_timeout"] for c in dump["configs"]
        }
        assert timeouts[scenario.cluster_name(0)] == "1.001s"  # round 1's connect timeout
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(0.5)
        for upstream in upstreams:
            upstream.stop()


async def _eventually(probe, timeout: float = 10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
