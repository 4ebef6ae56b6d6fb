"""Real Envoy against the server: the scenario go-control-plane's own integration test runs.

4 EDS clusters, 2 HTTP listeners via RDS, 2 TCP listeners (tcp_proxy), real upstreams; then 3
update rounds in which every cluster and route changes. After each round, real HTTP and TCP
requests through every listener reach the round's upstream, and Envoy's /config_dump shows
versions the server sent. Run in SotW ADS, delta ADS and SotW per-type services.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from tests.support import scenario
from tests.support.envoy import EnvoyProcess, ads_bootstrap
from tests.support.net import free_port, next_loopback_ip
from tests.support.upstreams import HttpUpstream, http_request, tcp_roundtrip
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from tests.support.hooks import OnPush
from xds_server.xds.server import Connection, ServerSettings, XdsServer
from xds_server.xds.stream import Push

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

ROUNDS = 4  # the initial config, then 3 update rounds


def _listener_reaches(ip: str, port: int, round_: int, upstream: str) -> bool:
    response = http_request(ip, port, "/scenario", timeout=2)
    return (
        response.status == 200
        and response.headers.get("x-round") == str(round_)
        and response.json is not None
        and response.json["name"] == upstream
    )


def _tcp_reaches(ip: str, port: int, upstream: str) -> bool:
    raw = b"GET /tcp HTTP/1.1\r\nHost: scenario\r\nConnection: close\r\n\r\n"
    reply = tcp_roundtrip(ip, port, raw, timeout=2)
    return reply.startswith(b"HTTP/1.") and f'"name": "{upstream}"'.encode() in reply.replace(
        b'"name":"', b'"name": "'
    )


@pytest.mark.parametrize("mode", ["sotw-ads", "delta-ads", "sotw-per-type"])
async def test_go_control_plane_scenario(mode: str) -> None:
    listen_ip = next_loopback_ip()
    upstreams = [HttpUpstream(scenario.upstream_name(k), next_loopback_ip()).start() for k in range(4)]
    http_ports = [free_port(listen_ip) for _ in range(scenario.NUM_HTTP_LISTENERS)]
    tcp_ports = [free_port(listen_ip) for _ in range(scenario.NUM_TCP_LISTENERS)]
    cache = ResourceCache()
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0.02, debounce_max=0.2))
    node_id = f"scenario-{mode}"
    pushed: dict[str, set[str]] = defaultdict(set)  # type URL -> versions sent to our Envoy

    def record(conn: Connection, push: Push) -> None:
        if conn.proxy_id == node_id:
            pushed[push.type_url].add(push.version)

    server.hooks.add(OnPush(record))

    def apply(round_: int) -> None:
        snapshot = scenario.make_snapshot(
            round_, [u.address for u in upstreams], http_ports, tcp_ports, listen_ip,
            ads=mode != "sotw-per-type",
        )
        for type_url in types.PUSH_ORDER:
            if type_url in snapshot:
                cache.set_type(type_url, snapshot[type_url])

    await server.start()
    apply(0)
    envoy = EnvoyProcess(ads_bootstrap(node_id, "127.0.0.1", server.port, mode), name=mode)
    await asyncio.to_thread(envoy.start)
    try:
        for round_ in range(ROUNDS):
            if round_:
                pushed.clear()
                apply(round_)
            for i, port in enumerate(http_ports):
                upstream = scenario.upstream_name(scenario.target_cluster(round_, i))
                await asyncio.to_thread(
                    envoy.wait_until,
                    lambda p=port, u=upstream, r=round_: _listener_reaches(listen_ip, p, r, u),
                    10.0, 0.05, f"round {round_}: HTTP listener {i} -> {upstream}",
                )
            for i, port in enumerate(tcp_ports):
                index = scenario.NUM_HTTP_LISTENERS + i
                upstream = scenario.upstream_name(scenario.target_cluster(round_, index))
                await asyncio.to_thread(
                    envoy.wait_until,
                    lambda p=port, u=upstream: _tcp_reaches(listen_ip, p, u),
                    10.0, 0.05, f"round {round_}: TCP listener {i} -> {upstream}",
                )
            # Envoy's config_dump shows, for every resource, a version this round sent.
            dumped = await asyncio.to_thread(envoy.dynamic_versions)
            sections = {
                "clusters": types.CLUSTER,
                "listeners": types.LISTENER,
                "routes": types.ROUTE,
            }
            for section, type_url in sections.items():
                names = set(scenario.resource_names(_snapshot_names(round_))[type_url])
                assert set(dumped[section]) == names, (section, dumped[section])
                for name, version in dumped[section].items():
                    if mode == "delta-ads":
                        # Delta: each resource carries its own content version.
                        assert version == cache.get(type_url, name).version, (section, name)
                    else:
                        assert version in pushed[type_url], (section, name, version, pushed[type_url])
        assert server.stats.nacks == 0
        statuses = {
            t: s.status()
            for conn in server.connections if conn.proxy_id == node_id
            for t, s in conn.state.types.items()
        }
        assert statuses and set(statuses.values()) == {"SYNCED"}, statuses
    finally:
        await asyncio.to_thread(envoy.stop)
        await server.stop(0.5)
        for upstream in upstreams:
            upstream.stop()


def _snapshot_names(round_: int) -> dict:
    # Names do not depend on addresses; build a throwaway snapshot just to list them.
    return scenario.make_snapshot(
        round_, [("127.0.0.1", 1)] * 4, [1, 2], [3, 4], "127.0.0.1"
    )
