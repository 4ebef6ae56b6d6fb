"""Proves the Envoy test harness itself works, independently of the project's xDS server.

If these fail, integration failures elsewhere say nothing about the server. The ADS tests
use a deliberately naive SotW responder defined here (send the whole type whenever its
version changes, ignore ACK/NACK) only to exercise bootstrap modes, config_dump parsing and
the scenario end to end with a real Envoy.
"""

from __future__ import annotations

import copy
import http.client
import itertools
import queue
import re
import socket
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any, ClassVar

import grpc
import psutil
import pytest
from google.protobuf.message import Message

from envoy.service.discovery.v3 import discovery_pb2
from tests.support import scenario
from tests.support.envoy import (
    EnvoyError,
    EnvoyProcess,
    ads_bootstrap,
    envoy_binary,
    static_bootstrap,
    validate_bootstrap,
    validate_static,
)
from tests.support.net import free_port, free_ports, next_loopback_ip, wait_for_port
from tests.support.upstreams import (
    UPSTREAM_NAME_HEADER,
    HttpUpstream,
    TcpEchoUpstream,
    http_request,
    tcp_roundtrip,
)

pytestmark = pytest.mark.envoy


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def http_upstreams() -> Iterator[list[HttpUpstream]]:
    """Four HTTP fake pods, each on its own loopback IP, named upstream-k."""
    ups = [HttpUpstream(scenario.upstream_name(k), host=next_loopback_ip()) for k in range(4)]
    for u in ups:
        u.start()
    yield ups
    for u in ups:
        u.stop()


@pytest.fixture
def listen_ports() -> tuple[str, list[int], list[int]]:
    """A fresh loopback IP for Envoy's listeners plus 2 HTTP and 2 TCP ports free on it."""
    ip = next_loopback_ip()
    return ip, free_ports(2, ip), free_ports(2, ip)


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


# ------------------------------------------------------------------------------- net.py


def test_loopback_ips_unique_and_local() -> None:
    ips = [next_loopback_ip() for _ in range(300)]
    assert len(set(ips)) == 300
    assert all(re.fullmatch(r"127\.\d+\.\d+\.\d+", ip) for ip in ips)
    assert "127.0.0.1" not in ips
    # Every one of them is bindable without any interface setup.
    for ip in ips[:5] + ips[-5:]:
        with socket.socket() as s:
            s.bind((ip, 0))


def test_free_port_and_wait_for_port() -> None:
    ip = next_loopback_ip()
    port = free_port(ip)
    with pytest.raises(TimeoutError):
        wait_for_port(ip, port, timeout=0.2)
    with socket.socket() as s:
        s.bind((ip, port))
        s.listen()
        wait_for_port(ip, port, timeout=2)


# ------------------------------------------------------------------------- upstreams.py


def test_http_upstream_echoes_and_survives_concurrency() -> None:
    before = _threads()
    with HttpUpstream("pod-a", host=next_loopback_ip()) as up:
        resp = http_request(*up.address, "/some/path?q=1", method="POST", headers={"x-test": "yes"}, body=b"hi")
        assert resp.status == 200
        assert resp.headers[UPSTREAM_NAME_HEADER] == "pod-a"
        assert resp.json["name"] == "pod-a"
        assert resp.json["method"] == "POST"
        assert resp.json["path"] == "/some/path?q=1"
        assert resp.json["headers"]["x-test"] == "yes"
        assert resp.json["body"] == "hi"

        with futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: http_request(*up.address, f"/{i}").json["path"], range(200)))
        assert results == [f"/{i}" for i in range(200)]
        assert up.requests_total == 201

        # A kept-alive connection (as Envoy holds) must not keep a thread after stop().
        idle = http.client.HTTPConnection(*up.address, timeout=5)
        idle.request("GET", "/keep")
        assert idle.getresponse().read()
        assert idle.sock is not None  # still open: HTTP/1.1 keep-alive
    assert idle.sock.recv(1) == b""  # server closed it
    idle.close()
    assert _threads() - before == set()


def test_tcp_echo_upstream_prefixes_name() -> None:
    before = _threads()
    with TcpEchoUpstream("echo-1", host=next_loopback_ip()) as up:
        assert tcp_roundtrip(*up.address, b"hello") == b"echo-1:hello"
        big = bytes(range(256)) * 4096  # 1 MiB, arrives in many chunks
        assert tcp_roundtrip(*up.address, big) == b"echo-1:" + big
        with futures.ThreadPoolExecutor(16) as pool:
            out = list(pool.map(lambda i: tcp_roundtrip(*up.address, str(i).encode()), range(100)))
        assert out == [b"echo-1:" + str(i).encode() for i in range(100)]
        idle = socket.create_connection(up.address)  # open, mid-conversation, at stop()
        idle.sendall(b"x")
        assert idle.recv(100) == b"echo-1:x"
    assert idle.recv(1) == b""
    idle.close()
    assert _threads() - before == set()


# ------------------------------------------------------------------ validate / scenario


def _snapshot(round_: int, ads: bool = True) -> dict[str, list[Message]]:
    ups = [(f"127.0.0.{10 + k}", 8000 + k) for k in range(4)]
    return scenario.make_snapshot(round_, ups, [9000, 9001], [9002, 9003], "127.0.0.5", ads=ads)


@pytest.mark.parametrize("round_", range(4))
def test_validate_static_accepts_every_round(round_: int) -> None:
    ok, output = validate_static(_snapshot(round_))
    assert ok, output
    assert "OK" in output


def test_scenario_rounds_change_every_resource() -> None:
    """Each round differs from the previous one in every resource, names stay stable."""
    snaps = [_snapshot(r) for r in range(4)]
    names = [scenario.resource_names(s) for s in snaps]
    assert all(n == names[0] for n in names)
    assert {len(v) for v in names[0].values()} == {2, 4}
    for prev, cur in itertools.pairwise(snaps):
        for url in cur:
            for a, b in zip(prev[url], cur[url], strict=True):
                assert a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True), url
    # Round r sends listener j to cluster (j + r) % 4: all clusters used, rotating.
    for r, snap in enumerate(snaps):
        routes = [rc.virtual_hosts[0].routes[0].route.cluster for rc in snap[scenario.ROUTE_TYPE]]
        assert routes == [scenario.cluster_name((i + r) % 4) for i in range(2)]


def test_validate_static_rejects_broken_resources() -> None:
    snap = _snapshot(0)
    bad_ip = copy.deepcopy(snap)
    bad_ip[scenario.CLA_TYPE][0].endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address = "not-an-ip"
    ok, output = validate_static(bad_ip)
    assert not ok and "malformed IP address" in output

    bad_timeout = copy.deepcopy(snap)
    bad_timeout[scenario.CLUSTER_TYPE][1].connect_timeout.FromMilliseconds(-5)
    ok, output = validate_static(bad_timeout)
    assert not ok and "positive duration" in output

    dangling = copy.deepcopy(snap)
    dangling[scenario.ROUTE_TYPE][0].virtual_hosts[0].routes[0].route.cluster = "nope"
    ok, output = validate_static(dangling)
    assert not ok and "unknown cluster 'nope'" in output


@pytest.mark.parametrize("mode", ["sotw-ads", "delta-ads", "sotw-per-type"])
def test_ads_bootstraps_validate(mode: str) -> None:
    ok, output = validate_bootstrap(ads_bootstrap("node-1", "127.0.0.1", 1234, mode, 0, metadata={"k": "v"}))  # type: ignore[arg-type]
    assert ok, output


# ------------------------------------------------------------------------ EnvoyProcess


def test_envoy_binary_is_real_binary() -> None:
    path = envoy_binary()
    with open(path, "rb") as f:
        assert f.read(4) == b"\x7fELF"  # the binary itself, not the Python wrapper


@pytest.mark.parametrize("round_", range(4))
def test_static_envoy_proxies_http_and_tcp(
    round_: int, http_upstreams: list[HttpUpstream], listen_ports: tuple[str, list[int], list[int]]
) -> None:
    """A purely static Envoy built from the scenario proxies to real upstreams per round."""
    ip, http_ports, tcp_ports = listen_ports
    snap = scenario.make_snapshot(round_, [u.address for u in http_upstreams], http_ports, tcp_ports, ip)
    with EnvoyProcess(static_bootstrap(snap), name=f"static-{round_}") as envoy:
        envoy.wait_ready(timeout=10)
        assert envoy.server_state() == "LIVE"
        for i, port in enumerate(http_ports):
            resp = envoy.wait_until(lambda port=port, i=i: http_request(ip, port, f"/l{i}"),
                                    message=f"http listener {i}")
            k = scenario.target_cluster(round_, i)
            assert resp.status == 200
            assert resp.headers["x-round"] == str(round_)
            assert resp.headers["server"] == scenario.server_name(round_)
            assert resp.json["name"] == scenario.upstream_name(k)
            assert resp.json["headers"]["x-route"] == scenario.route_name(i)
        for i, port in enumerate(tcp_ports):
            raw = tcp_roundtrip(ip, port, b"GET /tcp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            k = scenario.target_cluster(round_, scenario.NUM_HTTP_LISTENERS + i)
            assert raw.startswith(b"HTTP/1.1 200")
            assert f'"name": "{scenario.upstream_name(k)}"'.encode() in raw
        assert set(envoy.cluster_hosts()) == {scenario.cluster_name(k) for k in range(4)}
        assert envoy.cluster_hosts()[scenario.cluster_name(0)] == ["{}:{:d}".format(*http_upstreams[0].address)]
        assert envoy.stats()["http.http_0.downstream_rq_2xx"] >= 1
        assert envoy.dynamic_versions() == {"clusters": {}, "listeners": {}, "routes": {}, "endpoints": {}}


def test_static_envoy_tcp_to_echo_server(listen_ports: tuple[str, list[int], list[int]]) -> None:
    ip, _, tcp_ports = listen_ports
    with TcpEchoUpstream("echo-pod", host=next_loopback_ip()) as echo, HttpUpstream("http-pod", host=next_loopback_ip()) as http_up:
        # round 0: TCP listener 0 -> cluster 2, TCP listener 1 -> cluster 3.
        ups = [http_up.address, http_up.address, echo.address, echo.address]
        snap = scenario.make_snapshot(0, ups, [free_port(ip), free_port(ip)], tcp_ports, ip)
        with EnvoyProcess(static_bootstrap(snap), name="static-echo") as envoy:
            envoy.wait_ready()
            for port in tcp_ports:
                assert tcp_roundtrip(ip, port, b"ping " * 1000) == b"echo-pod:" + b"ping " * 1000
            assert echo.connections_total == 2


def test_envoy_stop_kills_process_and_cleans_up() -> None:
    envoy = EnvoyProcess(static_bootstrap({}), name="lifecycle").start()
    pid, workdir = envoy.pid, envoy.workdir
    assert pid is not None and psutil.pid_exists(pid)
    assert psutil.Process(pid).exe().endswith("/envoy")
    assert "--base-id" in psutil.Process(pid).cmdline()
    assert envoy.stop() == 0  # SIGTERM is a clean shutdown
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not workdir.exists()
    assert envoy.stop() == 0  # idempotent


def test_many_envoys_in_parallel_get_distinct_ids_and_ports() -> None:
    envoys = [EnvoyProcess(static_bootstrap({}), name=f"par-{i}") for i in range(4)]
    try:
        for e in envoys:
            e.start()
        assert len({e.base_id for e in envoys}) == 4
        assert len({e.admin_port for e in envoys}) == 4
        assert all(e.server_state() == "LIVE" for e in envoys)
    finally:
        for e in envoys:
            e.stop()
    assert not any(e.running for e in envoys)


def test_bad_bootstrap_fails_fast_with_log() -> None:
    bootstrap = static_bootstrap({})
    bootstrap["static_resources"]["clusters"] = [{"name": "x", "type": "STATIC", "connect_timeout": "-1s"}]
    envoy = EnvoyProcess(bootstrap, name="broken")
    with pytest.raises(EnvoyError, match="exited") as info:
        envoy.start(timeout=10)
    assert "duration" in str(info.value).lower()
    assert not envoy.running


def test_wait_until_reports_death_and_timeout() -> None:
    # A bound socket that never listens: connects are refused, and no parallel test can take
    # the port for a server of its own while this test runs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as reserved:
        reserved.bind(("127.0.0.1", 0))
        dead_port = int(reserved.getsockname()[1])
        with EnvoyProcess(ads_bootstrap("lonely", "127.0.0.1", dead_port, "sotw-ads", 0), name="lonely") as envoy:
            _lonely_envoy_checks(envoy)


def _lonely_envoy_checks(envoy: EnvoyProcess) -> None:
    # No xDS server: Envoy stays initializing, not connected. Envoy sets connected_state to 1
    # when it opens the stream, before the connect is refused, so wait for it to settle.
    assert envoy.server_state() in ("PRE_INITIALIZING", "INITIALIZING")
    envoy.wait_until(
        lambda: envoy.stats("control_plane")["control_plane.connected_state"] == 0,
        timeout=10,
        message="Envoy never reported itself disconnected",
    )
    assert envoy.server_state() in ("PRE_INITIALIZING", "INITIALIZING")
    with pytest.raises(TimeoutError, match="never"):
        envoy.wait_until(lambda: False, timeout=0.2, message="never")
    assert envoy.pid is not None
    psutil.Process(envoy.pid).kill()
    with pytest.raises(EnvoyError, match="exited"):
        envoy.wait_until(lambda: False, timeout=10)


# ---------------------------------------------- naive ADS responder (harness check only)


class NaiveSotwServer:
    """Minimal SotW xDS responder: whole type on every version change, ADS or per-type."""

    SERVICES: ClassVar[dict[str, str]] = {
        "envoy.service.discovery.v3.AggregatedDiscoveryService": "StreamAggregatedResources",
        "envoy.service.cluster.v3.ClusterDiscoveryService": "StreamClusters",
        "envoy.service.listener.v3.ListenerDiscoveryService": "StreamListeners",
        "envoy.service.route.v3.RouteDiscoveryService": "StreamRoutes",
        "envoy.service.endpoint.v3.EndpointDiscoveryService": "StreamEndpoints",
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = ""
        self._resources: dict[str, list[Message]] = {}
        self._streams: set[queue.Queue[Any]] = set()
        self.requests: list[discovery_pb2.DiscoveryRequest] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        for service, method in self.SERVICES.items():
            handler = grpc.stream_stream_rpc_method_handler(
                self._stream,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=discovery_pb2.DiscoveryResponse.SerializeToString,
            )
            self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    def set_snapshot(self, version: str, resources: dict[str, list[Message]]) -> None:
        with self._lock:
            self._version, self._resources = version, resources
            streams = list(self._streams)
        for q in streams:
            q.put("push")

    def stop(self) -> None:
        self._server.stop(grace=0).wait(5)

    def _stream(self, requests: Iterator[discovery_pb2.DiscoveryRequest], context: grpc.ServicerContext) -> Iterator[discovery_pb2.DiscoveryResponse]:
        q: queue.Queue[Any] = queue.Queue()

        def read() -> None:
            try:
                for req in requests:
                    q.put(req)
            except grpc.RpcError:
                pass
            q.put(None)

        threading.Thread(target=read, daemon=True).start()
        with self._lock:
            self._streams.add(q)
        subscribed: set[str] = set()
        sent: dict[str, str] = {}
        nonce = 0
        try:
            while (item := q.get()) is not None:
                if isinstance(item, discovery_pb2.DiscoveryRequest):
                    self.requests.append(item)
                    subscribed.add(item.type_url)
                with self._lock:
                    version, resources = self._version, self._resources
                for url in sorted(subscribed):
                    if url in resources and sent.get(url) != version:
                        nonce += 1
                        resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=url, nonce=str(nonce))
                        for msg in resources[url]:
                            resp.resources.add().Pack(msg)
                        sent[url] = version
                        yield resp
        finally:
            with self._lock:
                self._streams.discard(q)


@pytest.fixture
def naive_server() -> Iterator[NaiveSotwServer]:
    server = NaiveSotwServer()
    yield server
    server.stop()


def _all_at(versions: dict[str, dict[str, str]], version: str) -> bool:
    expected = {"clusters": 4, "listeners": 4, "routes": 2, "endpoints": 4}
    return all(
        len(versions[kind]) == n and set(versions[kind].values()) == {version} for kind, n in expected.items()
    )


def _observed_round(ip: str, http_ports: Sequence[int], tcp_ports: Sequence[int]) -> list[tuple[str, str, str]]:
    out = []
    for port in http_ports:
        r = http_request(ip, port, "/")
        out.append((r.headers["x-round"], r.headers["server"], r.json["name"]))
    for port in tcp_ports:
        raw = tcp_roundtrip(ip, port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        name = re.search(rb'"name": "([^"]+)"', raw)
        out.append(("-", "-", name.group(1).decode() if name else raw[:80].decode(errors="replace")))
    return out


def _expected_round(r: int) -> list[tuple[str, str, str]]:
    http = [(str(r), scenario.server_name(r), scenario.upstream_name(scenario.target_cluster(r, i))) for i in range(2)]
    tcp = [("-", "-", scenario.upstream_name(scenario.target_cluster(r, 2 + i))) for i in range(2)]
    return http + tcp


@pytest.mark.parametrize("mode", ["sotw-ads", "sotw-per-type"])
def test_dynamic_envoy_applies_scenario_rounds(
    mode: str,
    naive_server: NaiveSotwServer,
    http_upstreams: list[HttpUpstream],
    listen_ports: tuple[str, list[int], list[int]],
) -> None:
    """Real Envoy on the naive responder: versions and traffic follow each pushed round."""
    ip, http_ports, tcp_ports = listen_ports
    ads = mode != "sotw-per-type"
    ups = [u.address for u in http_upstreams]
    naive_server.set_snapshot("v0", scenario.make_snapshot(0, ups, http_ports, tcp_ports, ip, ads=ads))
    bootstrap = ads_bootstrap("node-h", "127.0.0.1", naive_server.port, mode, 0, metadata={"test": "harness"})  # type: ignore[arg-type]
    with EnvoyProcess(bootstrap, name=f"dyn-{mode}") as envoy:
        envoy.wait_ready(timeout=15)
        envoy.wait_until(lambda: _all_at(envoy.dynamic_versions(), "v0"), timeout=15, message="all at v0")
        envoy.wait_until(lambda: _observed_round(ip, http_ports, tcp_ports) == _expected_round(0), message="round 0 traffic")
        for r in (1, 2):
            naive_server.set_snapshot(f"v{r}", scenario.make_snapshot(r, ups, http_ports, tcp_ports, ip, ads=ads))
            envoy.wait_until(lambda r=r: _all_at(envoy.dynamic_versions(), f"v{r}"), timeout=15, message=f"all at v{r}")
            envoy.wait_until(
                lambda r=r: _observed_round(ip, http_ports, tcp_ports) == _expected_round(r),
                message=f"round {r} traffic",
            )
        assert {req.node.id for req in naive_server.requests if req.HasField("node")} == {"node-h"}
        assert any(req.node.metadata.fields["test"].string_value == "harness" for req in naive_server.requests)
        assert not any(req.HasField("error_detail") for req in naive_server.requests)


def test_in_place_listener_update_keeps_old_version_in_config_dump(
    naive_server: NaiveSotwServer,
    http_upstreams: list[HttpUpstream],
    listen_ports: tuple[str, list[int], list[int]],
) -> None:
    """Pins an Envoy 1.40 quirk the harness works around (scenario listener_update="full"):
    a filter-chain-only listener update is applied, yet config_dump keeps the old version."""
    ip, http_ports, tcp_ports = listen_ports
    ups = [u.address for u in http_upstreams]

    def snap(r: int) -> dict[str, list[Message]]:
        return scenario.make_snapshot(r, ups, http_ports, tcp_ports, ip, listener_update="in_place")

    naive_server.set_snapshot("v0", snap(0))
    with EnvoyProcess(ads_bootstrap("node-q", "127.0.0.1", naive_server.port, "sotw-ads", 0), name="inplace") as envoy:
        envoy.wait_until(lambda: _all_at(envoy.dynamic_versions(), "v0"), timeout=15, message="all at v0")
        naive_server.set_snapshot("v1", snap(1))
        envoy.wait_until(
            lambda: _observed_round(ip, http_ports, tcp_ports) == _expected_round(1), message="round 1 traffic"
        )
        subs = envoy.subscription_versions()
        assert subs["cds"] == subs["lds"] == "v1"
        assert subs["rds"] == {"route-0": "v1", "route-1": "v1"}
        assert subs["eds"] == {scenario.cluster_name(k): "v1" for k in range(4)}
        versions = envoy.dynamic_versions()
        assert set(versions["listeners"].values()) == {"v0"}  # stale, though v1 is serving
        assert set(versions["clusters"].values()) == {"v1"}
        assert envoy.stats("listener_manager")["listener_manager.listener_in_place_updated"] == 4
