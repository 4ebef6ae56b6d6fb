"""The stock grpcio xDS client (proxyless gRPC, `xds:///` targets) against the server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, wrappers_pb2

from tests.support.grpc_backend import GrpcBackend
from tests.support.net import next_loopback_ip
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

ROOT = Path(__file__).resolve().parents[2]


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def api_listener(name: str, cluster: str) -> listener_pb2.Listener:
    manager = hcm_pb2.HttpConnectionManager(
        route_config=route_pb2.RouteConfiguration(
            name=f"{name}-routes",
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name=name,
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix=""),
                            route=route_components_pb2.RouteAction(cluster=cluster),
                        )
                    ],
                )
            ],
        ),
        http_filters=[hcm_pb2.HttpFilter(name="router", typed_config=_pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(manager))
    )


def eds_cluster(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            )
        ),
    )


def assignment(cluster: str, host: str, port: int) -> endpoint_pb2.ClusterLoadAssignment:
    # gRPC NACKs a locality-less LocalityLbEndpoints (FIELD-NOTES): always set both.
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone="zone-a"),
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        health_status=health_check_pb2.HEALTHY,
                        endpoint=endpoint_components_pb2.Endpoint(
                            address=address_pb2.Address(
                                socket_address=address_pb2.SocketAddress(
                                    address=host, port_value=port
                                )
                            )
                        ),
                    )
                ],
            )
        ],
    )


async def _read_until(proc: asyncio.subprocess.Process, want: str, timeout: float) -> list[dict]:
    seen: list[dict] = []

    async def scan() -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"client exited early; saw {seen[-5:]}")
            event = json.loads(line)
            seen.append(event)
            if event.get("backend") == want:
                return

    await asyncio.wait_for(scan(), timeout)
    return seen


@pytest.mark.slow
async def test_stock_grpc_xds_client_follows_eds_change(tmp_path: Path) -> None:
    first = GrpcBackend("backend-1", next_loopback_ip()).start()
    second = GrpcBackend("backend-2", next_loopback_ip()).start()
    cache = ResourceCache()
    cache.set_type(types.LISTENER, [api_listener("echo", "echo-cluster")])
    cache.set_type(types.CLUSTER, [eds_cluster("echo-cluster")])
    cache.set_type(types.ENDPOINT, [assignment("echo-cluster", first.host, first.port)])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0.05))
    await server.start()
    bootstrap = {
        "xds_servers": [
            {
                "server_uri": server.address,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }
        ],
        "node": {"id": "proxyless-caller", "cluster": "test", "locality": {"zone": "zone-a"}},
    }
    env = {**os.environ, "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(bootstrap), "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.support.grpc_xds_caller", "xds:///echo", "60", "0.05",
        stdout=asyncio.subprocess.PIPE, env=env, cwd=ROOT,
    )
    try:
        seen = await _read_until(proc, "backend-1", timeout=30)
        assert all(e["ok"] for e in seen), seen
        # The client asked for each type by name, in gRPC's order, and ACKed all of them.
        (conn,) = [c for c in server.connections if c.proxy_id == "proxyless-caller"]
        for type_url in (types.LISTENER, types.ROUTE, types.CLUSTER, types.ENDPOINT):
            if type_url in conn.state.types:
                assert conn.state.types[type_url].status() == "SYNCED", type_url
        assert conn.state.types[types.LISTENER].names == {"echo"}

        cache.update(types.ENDPOINT, upsert=[assignment("echo-cluster", second.host, second.port)])
        seen = await _read_until(proc, "backend-2", timeout=30)
        calls_before = first.calls
        seen = await _read_until(proc, "backend-2", timeout=10)
        assert first.calls == calls_before, "calls still reach the old backend after the EDS change"
        assert server.stats.nacks == 0
    finally:
        proc.terminate()
        await proc.wait()
        await server.stop(0.5)
        first.stop()
        second.stop()
