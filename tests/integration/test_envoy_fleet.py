"""20 real Envoys at once all converge after an EDS change."""

from __future__ import annotations

import asyncio

import pytest

from tests.support import scenario
from tests.support.envoy import EnvoyProcess, ads_bootstrap
from tests.support.net import next_loopback_ip
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

FLEET = 20


async def test_twenty_envoys_converge_after_eds_change() -> None:
    cache = ResourceCache()
    clusters = [scenario.make_cluster(k, 0) for k in range(4)]
    old = (next_loopback_ip(), 8080)
    new = (next_loopback_ip(), 9090)
    cache.set_type(types.CLUSTER, clusters)
    cache.set_type(types.ENDPOINT, [scenario.make_cla(k, 0, [old]) for k in range(4)])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0"))  # default debounce
    await server.start()
    modes = ["sotw-ads", "delta-ads"]
    envoys = [
        EnvoyProcess(
            ads_bootstrap(f"fleet-{i}", "127.0.0.1", server.port, modes[i % 2]), name=f"fleet-{i}"
        )
        for i in range(FLEET)
    ]
    try:
        await asyncio.gather(*(asyncio.to_thread(e.start) for e in envoys))

        def hosts_are(envoy: EnvoyProcess, address: tuple[str, int]) -> bool:
            want = f"{address[0]}:{address[1]}"
            hosts = envoy.cluster_hosts()
            return all(hosts.get(scenario.cluster_name(k)) == [want] for k in range(4))

        await asyncio.gather(
            *(asyncio.to_thread(e.wait_until, lambda e=e: hosts_are(e, old), 30.0, 0.1) for e in envoys)
        )
        cache.update(types.ENDPOINT, upsert=[scenario.make_cla(k, 1, [new]) for k in range(4)])
        await asyncio.gather(
            *(asyncio.to_thread(e.wait_until, lambda e=e: hosts_are(e, new), 30.0, 0.1) for e in envoys)
        )
        # Every stream ACKed the change: all EDS states SYNCED, none NACKed.
        eds = [
            c.state.types[types.ENDPOINT]
            for c in server.connections
            if c.proxy_id.startswith("fleet-") and types.ENDPOINT in c.state.types
        ]
        assert len(eds) == FLEET
        await _until(lambda: all(s.status() == "SYNCED" for s in eds))
        assert server.stats.nacks == 0
    finally:
        await asyncio.gather(*(asyncio.to_thread(e.stop) for e in envoys))
        await server.stop(0.5)


async def _until(probe, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)
