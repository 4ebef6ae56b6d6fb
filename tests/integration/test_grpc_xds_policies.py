"""TrafficPolicy and HTTPRoute settings as stock grpcio xDS clients apply them (CONFORMANCE 22).

The real server with the file source (tests/support/mesh.py), xDS-enabled gRPC servers and
`xds:///` clients in their own processes (tests/support/proxyless.py). What each test shows
is what a gRPC application sees: a status code, who answered, how long a call took; and that
no client rejected its configuration (no NACK).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mesh import MeshHarness
from tests.support.net import free_port, next_loopback_ip
from tests.support.proxyless import ProxylessProcess
from tests.support.proxyless import bootstrap as proxyless_bootstrap
from xds_server.translate import names
from xds_server.xds import types

pytestmark = [pytest.mark.slow]

NS = "shop"
TARGET = "xds:///greeter.shop:50051"
POLICY_API = "mesh.xds-server.io/v1alpha1"


class GrpcMesh(MeshHarness):
    """A mesh of proxyless gRPC servers behind Service `greeter` and proxyless clients."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.processes: list[ProxylessProcess] = []
        self.backends: list[tuple[str, str, int]] = []  # (pod, ip, port)

    async def stop(self) -> None:
        for process in self.processes:
            await process.stop()
        await super().stop()

    def policy(self, name: str, spec: dict[str, Any], kind: str = "TrafficPolicy") -> None:
        self.write(f"{kind}-{name}.yaml", {
            "apiVersion": POLICY_API, "kind": kind,
            "metadata": {"name": name, "namespace": NS}, "spec": {"targetRef": {"name": "greeter"}, **spec},
        })

    def _greeter_service(self) -> None:
        self.write(f"svc-{NS}-greeter.yaml", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "greeter", "namespace": NS},
            "spec": {"clusterIP": "10.96.50.1",
                     "ports": [{"name": "grpc", "port": 50051, "targetPort": self.backends[0][2],
                                "appProtocol": "grpc"}]},
        }, {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "greeter-1", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "greeter"}},
            "addressType": "IPv4",
            # One port number for every backend: each pod has its own loopback address.
            "ports": [{"name": "grpc", "port": self.backends[0][2], "appProtocol": "grpc"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "targetRef": {"kind": "Pod", "name": pod}} for pod, ip, _ in self.backends],
        })

    async def greeters(self, count: int, *, failing: frozenset[int] = frozenset()) -> None:
        """`count` xDS-enabled gRPC servers greeter-0.. (those in `failing` fail every call)."""
        port = 0
        for i in range(count):
            ip = next_loopback_ip()
            port = port or free_port(ip)
            pod = f"greeter-{i}"
            self.write(f"pod-{NS}-{pod}.yaml", {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": NS, "labels": {"app": "greeter"},
                             "annotations": {"xds-server.io/proxyless": "true"}},
                "spec": {"serviceAccountName": "greeter",
                         "containers": [{"name": "app", "ports": [{"containerPort": port}]}]},
                "status": {"podIP": ip},
            })
            self.backends.append((pod, ip, port))
        self._greeter_service()
        started = []
        for i, (pod, ip, port) in enumerate(self.backends):
            server = ProxylessProcess(
                "server", pod, ip, str(port),
                bootstrap=proxyless_bootstrap(self.server.address, namespace=NS, pod=pod,
                                              service_account="greeter", pod_ip=ip),
                env={"PROXYLESS_FAIL": "1"} if i in failing else {},
            )
            self.processes.append(await server.start())
            started.append(server)
        for server in started:
            await server.until(lambda e: e.get("serving"), 30, "a greeter serving")

    async def client(self, calls: str = "Who", interval: float = 0.1, name: str = "caller-1") -> ProxylessProcess:
        client = ProxylessProcess(
            "client", TARGET, "120", str(interval), calls,
            bootstrap=proxyless_bootstrap(self.server.address, namespace=NS, pod=name,
                                          service_account="caller", pod_ip=next_loopback_ip()),
        )
        self.processes.append(await client.start())
        return client

    def client_routes_synced(self, pod: str = "caller-1") -> bool:
        """The client ACKed the latest version of its route configuration."""
        conns = [c for c in self.server.connections if c.proxy_id == f"{pod}.{NS}"]
        return bool(conns) and types.ROUTE in conns[0].state.types and \
            conns[0].state.types[types.ROUTE].status() == "SYNCED"


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[GrpcMesh]:
    harness = GrpcMesh(tmp_path / "mesh")
    await harness.start()
    try:
        yield harness
    finally:
        await harness.stop()


async def _grpc_route(mesh: GrpcMesh, want: str) -> str:
    """The namespace's gRPC route configuration (JSON) once it contains `want` (it exists
    while a proxyless proxy is connected)."""
    from envoy.config.route.v3 import route_pb2
    from google.protobuf import json_format

    def text() -> str | None:
        resource = mesh.cache.get(types.ROUTE, names.proxyless_route_name(NS))
        if resource is None:
            return None
        found = json_format.MessageToJson(resource.unpack(route_pb2.RouteConfiguration))
        return found if want in found else None

    return await mesh.until(text, 20, f"a gRPC route configuration with {want}")


async def _ok_run(client: ProxylessProcess, count: int, timeout: float, what: str) -> list[dict]:
    """Wait for `count` successful calls in a row; return them."""
    run: list[dict] = []

    def counts(event: dict) -> bool:
        if event.get("ok"):
            run.append(event)
        else:
            run.clear()
        return len(run) >= count

    await client.until(counts, timeout, what)
    return run


async def test_policy_timeout_gives_deadline_exceeded(mesh: GrpcMesh) -> None:
    """TrafficPolicy timeout reaches gRPC as max_stream_duration (gRFC A31): a call slower
    than it fails with DEADLINE_EXCEEDED, fast calls go through."""
    await mesh.greeters(1)
    mesh.policy("greeter", {"timeout": "3s"})
    await _grpc_route(mesh, "maxStreamDuration")
    client = await mesh.client("Who,Slow:8")
    await client.until(lambda e: e.get("ok") and e["method"] == "Who", 40, "a fast call")
    late = await client.until(lambda e: e["method"] == "Slow", 30, "a slow call")
    assert not late["ok"] and late["code"] == "DEADLINE_EXCEEDED", late
    # Cut by the route's 3 s, not by the 8 s the backend takes. grpcio 1.85 cuts such calls
    # early, by a constant per client process (1.3-1.8 s of 3 s here, the same with and
    # without grpc_timeout_header_max): so only the upper bound is asserted.
    assert late["elapsed"] < 4, late
    fast = await client.until(lambda e: e["method"] == "Who", 20, "a fast call after it")
    assert fast["ok"], fast
    assert mesh.server.stats.nacks == 0


async def test_backend_timeout_without_retry_and_zero_retries_leave_clients_working(mesh: GrpcMesh) -> None:
    """The issue's bug: an HTTPRoute rule with timeouts.backendRequest and no retry made
    `num_retries: 0`, and gRPC rejected the whole route configuration of the namespace. So
    could a TrafficPolicy `retries: {attempts: 0}`. Both now leave gRPC clients working."""
    await mesh.greeters(1)
    client = await mesh.client(interval=0.05)
    await _ok_run(client, 5, 40, "calls before any route")
    mesh.write(f"route-{NS}-greeter.yaml", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "greeter", "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "greeter", "port": 50051}],
            "rules": [{"backendRefs": [{"name": "greeter", "port": 50051}],
                       "timeouts": {"backendRequest": "10s"}}],
        },
    })
    routes = await _grpc_route(mesh, "httproute/shop/greeter")
    assert "numRetries" not in routes
    await mesh.until(mesh.client_routes_synced, 20, "the client ACKs the route with a backend timeout")
    await _ok_run(client, 20, 20, "calls with the HTTPRoute in place")
    mesh.policy("greeter", {"retries": {"attempts": 0, "perTryTimeout": "5s"}})
    await mesh.until(mesh.client_routes_synced, 20, "the client ACKs the route with attempts 0")
    await _ok_run(client, 20, 20, "calls with retries attempts 0")
    # The Envoy form of the same namespace says nothing of num_retries 0 either.
    envoy_routes = mesh.cache.get(types.ROUTE, names.outbound_route_name(NS))
    assert envoy_routes is not None
    assert mesh.server.stats.nacks == 0


async def test_fault_abort_with_grpc_status(mesh: GrpcMesh) -> None:
    """fault.abort.grpcStatus: gRPC clients see that status (gRFC A33)."""
    await mesh.greeters(1)
    client = await mesh.client()
    await _ok_run(client, 3, 40, "calls before the fault")
    mesh.policy("greeter", {"fault": {"abort": {"percentage": 100, "grpcStatus": "RESOURCE_EXHAUSTED"}}})
    failed = await client.until(lambda e: not e["ok"], 20, "an aborted call")
    assert failed["code"] == "RESOURCE_EXHAUSTED", failed
    assert mesh.server.stats.nacks == 0


async def test_failure_percentage_ejects_failing_backend(mesh: GrpcMesh) -> None:
    """Failure-percentage outlier detection (Envoy's fields, gRFC A50): of three backends,
    the one failing every call is ejected and calls then reach only the other two."""
    mesh.policy("greeter", {"outlierDetection": {
        "consecutive5xxErrors": 0, "interval": "1s", "baseEjectionTime": "60s",
        "maxEjectionPercent": 50, "failurePercentageThreshold": 50,
        "failurePercentageMinimumHosts": 3, "failurePercentageRequestVolume": 10,
    }})
    await mesh.greeters(3, failing=frozenset({0}))
    client = await mesh.client(interval=0.02)
    run = await _ok_run(client, 60, 40, "a run of calls with the failing backend ejected")
    answered = {e["answer"]["name"] for e in run}
    assert answered == {"greeter-1", "greeter-2"}, answered
    # Ejected by outlier detection, not gone: it answered (failed) at least the request volume
    # of calls first, and it is still serving.
    failures = [e for e in client.lines if not e["ok"]]
    assert len(failures) >= 10 and {e["code"] for e in failures} == {"UNAVAILABLE"}, failures[-3:]
    failing = next(p for p in mesh.processes if p.args[1] == "greeter-0")
    assert failing.proc is not None and failing.proc.returncode is None
    assert mesh.server.stats.nacks == 0



async def test_a_missing_backend_fails_with_the_status_gateway_api_intends(mesh: GrpcMesh) -> None:
    """A backendRef to a Service that does not exist: its share of an HTTPRoute's calls gets
    the 500 Gateway API requires, which gRPC reads as UNKNOWN (not retried); a GRPCRoute's
    gets UNAVAILABLE, as the GRPCRoute spec requires. The valid share keeps working, and no
    client waits for a cluster that does not exist."""
    await mesh.greeters(1)
    client = await mesh.client(interval=0.05)
    await _ok_run(client, 3, 40, "calls before any route")
    parent = [{"group": "", "kind": "Service", "name": "greeter", "port": 50051}]
    mesh.write(f"route-{NS}-greeter.yaml", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "greeter", "namespace": NS},
        "spec": {"parentRefs": parent, "rules": [{"backendRefs": [
            {"name": "greeter", "port": 50051, "weight": 1}, {"name": "nowhere", "port": 50051, "weight": 1}]}]},
    })
    await _grpc_route(mesh, "httproute/shop/greeter")
    await mesh.until(mesh.client_routes_synced, 20, "the client ACKs the split with a missing backend")
    failed = await client.until(lambda e: not e["ok"], 20, "a call to the missing backend")
    assert failed["code"] == "UNKNOWN" and "Fault injected" in failed["details"], failed
    await client.until(lambda e: e["ok"], 20, "a call to the valid backend after it")
    mesh.write(f"grpcroute-{NS}-greeter.yaml", {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "greeter", "namespace": NS},
        "spec": {"parentRefs": parent, "rules": [{"backendRefs": [{"name": "nowhere", "port": 50051}]}]},
    })
    await _grpc_route(mesh, "grpcroute/shop/greeter")
    await mesh.until(mesh.client_routes_synced, 20, "the client ACKs the GRPCRoute")
    run = await client.until(lambda e: not e["ok"] and e["code"] == "UNAVAILABLE", 20, "an UNAVAILABLE call")
    assert "Fault injected" in run["details"], run
    assert mesh.server.stats.nacks == 0
