"""Capture mode end to end: pods as network namespaces, the capture rules applied by
`xds-server iptables`, real Envoy sidecars running as the proxy UID, and unmodified apps that
dial service names (their pod's hosts file gives the ClusterIP) with no proxy settings.

What an app observes: `http://api/` and `db:5432` work by name; the address dialled picks the
service, whatever Host says; a pod IP reaches that pod; a server outside the mesh is reached
under ALLOW_ANY and refused under REGISTRY_ONLY; mTLS and authorization hold per port; the
sidecar's own connections and the app's loopback traffic are not captured (no loops).

As root with iproute2/iptables/setpriv (make setup installs them); elsewhere these tests fail
saying what is missing (tests/support/podnet.py), never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.podnet import CaptureMesh, NetPod, PodEnvoy, PodNetError
from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap
from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.svid import SvidIssuer
from xds_server.ca.workloads import WorkloadCertificates
from xds_server.model.security import MtlsMode, SecuritySettings
from xds_server.sds import SdsSecrets
from xds_server.translate.capture import OutboundTrafficPolicy
from xds_server.translate.scope import ScopeSettings
from xds_server.xds.auth import Authenticator, AuthMode, StreamGuard
from xds_server.xds.cache import ResourceCache

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

NS = "shop"


@pytest.fixture
async def mesh(tmp_path: Path):
    async with CaptureMesh(tmp_path / "mesh") as made:
        yield made


def secure_mesh(directory: Path, ca_dir: Path, settings: SecuritySettings) -> CaptureMesh:
    """A CaptureMesh whose server has the CA: sidecars get their certificates over SDS (the
    node's claim is trusted: its stream comes over the server's Unix socket, local only)."""
    cache = ResourceCache()
    secrets = SdsSecrets(cache, WorkloadCertificates(SvidIssuer(CertificateAuthority(ca_dir))))
    guard = StreamGuard(Authenticator(AuthMode.INSECURE_NODE_METADATA, listen_address="127.0.0.1:0"))
    return CaptureMesh(directory, security=settings, hooks=[guard, secrets], cache=cache)


GRPC_WHO = """
import sys, grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    who = channel.unary_unary("/xds_server.test.Echo/Who")
    print(who(b"", timeout=5).decode())
"""


def grpc_who(pod: NetPod, target: str) -> str:
    """An unmodified gRPC app in `pod` calls `target` (a service name and port)."""
    done = pod.run([sys.executable, "-c", GRPC_WHO, target], env={"GRPC_DNS_RESOLVER": "native"})
    if done.returncode != 0:
        raise AssertionError(done.stderr[-2000:])
    return done.stdout.strip()


TCP_EXCHANGE = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as sock:
    payload = sys.argv[3].encode().decode("unicode_escape").encode("latin1")
    sock.sendall(payload)
    reply = b""
    while len(reply) < len(payload):
        reply += sock.recv(4096)
    sys.stdout.write(reply.decode("latin1"))
"""


def tcp_exchange(pod: NetPod, host: str, port: int, payload: str) -> str:
    """An unmodified TCP app in `pod`: send `payload` (Python escapes allowed), read the
    echo, keeping the connection open meanwhile (no half-close)."""
    done = pod.run([sys.executable, "-c", TCP_EXCHANGE, host, str(port), payload])
    if done.returncode != 0:
        raise AssertionError(done.stderr[-2000:])
    return done.stdout


def header_setter(name: str, parent: str, port: int, value: str = "set") -> dict[str, Any]:
    """An HTTPRoute on (parent, port) whose responses carry `x-header-set: value`."""
    return {
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": port}],
            "rules": [{
                "filters": [{"type": "ResponseHeaderModifier",
                             "responseHeaderModifier": {"set": [{"name": "x-header-set", "value": value}]}}],
                "backendRefs": [{"name": parent, "port": port}],
            }],
        },
    }


async def test_an_unmodified_app_calls_services_by_name_over_http_and_tcp(mesh: CaptureMesh) -> None:
    client = mesh.pod(NS, "client", app=None)
    api = mesh.pod(NS, "api-1", labels={"app": "api"})
    db = mesh.pod(NS, "db-0", app="tcp", app_port=5432, labels={"app": "db"})
    mesh.service(NS, "api", 80, pods=[api])
    mesh.service(NS, "db", 5432, app_protocol="tcp", pods=[db])
    for pod in (client, api, db):
        await mesh.sidecar(pod)

    reply = await mesh.until(lambda: client.http("http://api/hello"), message="api by name")
    assert reply.status == 200
    assert reply.json["name"] == "api-1"
    assert reply.json["path"] == "/hello"
    assert reply.json["headers"]["host"] == "api"  # what the app sent, untouched
    assert reply.headers.get("server") == "envoy"  # through the sidecars, not around them
    # Every name form works; TCP too, with no annotation and no port binding.
    for url in ("http://api.shop/", "http://api.shop.svc.cluster.local:80/"):
        assert client.http(url).json["name"] == "api-1", url
    assert client.tcp("db", 5432, b"select 1") == b"db-0:select 1"
    # The stock client agrees.
    curled = client.curl("http://api/", "-s", "-o", "/dev/null", "-w", "%{http_code}")
    assert curled.stdout == "200", curled.stderr


async def test_the_address_dialled_picks_the_service_not_the_host_header(mesh: CaptureMesh) -> None:
    """Upstream MeshFrontendHostname: a route on echo-v2 applies to echo-v2's ClusterIP,
    whatever Host says; echo-v1's ClusterIP with Host echo-v2 goes to echo-v1, unrouted."""
    client = mesh.pod(NS, "client", app=None)
    v1 = mesh.pod(NS, "echo-v1-0", labels={"app": "echo", "version": "v1"})
    v2 = mesh.pod(NS, "echo-v2-0", labels={"app": "echo", "version": "v2"})
    mesh.service(NS, "echo-v1", 8080, pods=[v1])
    mesh.service(NS, "echo-v2", 8080, pods=[v2])
    mesh.write("route.yaml", header_setter("v2-only", "echo-v2", 8080))
    for pod in (client, v1, v2):
        await mesh.sidecar(pod)

    routed = await mesh.until(
        lambda: (r := client.http("http://echo-v2:8080/", headers={"Host": "echo-v1"})).headers.get("x-header-set") and r,
        message="echo-v2's route applies by address",
    )
    assert routed.status == 200 and routed.json["name"] == "echo-v2-0"
    plain = client.http("http://echo-v1:8080/", headers={"Host": "echo-v2"})
    assert plain.status == 200 and plain.json["name"] == "echo-v1-0"
    assert "x-header-set" not in plain.headers


async def test_a_pod_ip_reaches_that_pod_without_the_services_routes(mesh: CaptureMesh) -> None:
    """Upstream MeshFrontend "Send to pod IP": 200 from that pod, the route not applied."""
    client = mesh.pod(NS, "client", app=None)
    v2 = mesh.pod(NS, "echo-v2-0", labels={"app": "echo"})
    mesh.service(NS, "echo-v2", 8080, pods=[v2])
    mesh.write("route.yaml", header_setter("v2-only", "echo-v2", 8080))
    await mesh.sidecar(client)
    await mesh.sidecar(v2)

    await mesh.until(lambda: client.http("http://echo-v2:8080/").headers.get("x-header-set"), message="route")
    reply = client.http(f"http://{v2.ip}:8080/")
    assert reply.status == 200 and reply.json["name"] == "echo-v2-0"
    assert "x-header-set" not in reply.headers


async def test_a_pod_backing_several_services_and_ports_gets_each_on_its_app_port(mesh: CaptureMesh) -> None:
    """The conformance setup that sent `curl echo` to the gRPC port: echo (80->8080, and an
    h2c gRPC port 7070) and echo-v1 (8080) over one pod; each port reaches its app port."""
    client = mesh.pod(NS, "client", app=None)
    echo = mesh.pod(NS, "echo-v1-0", labels={"app": "echo"})
    echo.grpc_backend(7070)
    mesh.service(NS, "echo", pods=[echo], ports=[
        {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
        {"name": "grpc", "port": 7070, "targetPort": 7070, "appProtocol": "kubernetes.io/h2c"},
    ])
    mesh.service(NS, "echo-v1", 8080, pods=[echo])
    await mesh.sidecar(client)
    await mesh.sidecar(echo)

    reply = await mesh.until(lambda: client.http("http://echo/"), message="echo by name")
    assert reply.status == 200 and reply.json["name"] == "echo-v1-0"
    assert client.http("http://echo-v1:8080/x").json["path"] == "/x"
    # The gRPC port is reached as gRPC (h2c) through both sidecars: a real call answers.
    assert await mesh.until(lambda: grpc_who(client, "echo:7070"), message="grpc") == "echo-v1-0"


async def test_allow_any_reaches_a_server_outside_the_mesh(mesh: CaptureMesh) -> None:
    client = mesh.pod(NS, "client", app=None)
    outside = mesh.pod("external", "legacy", sidecar=False)  # no sidecar, no Service
    await mesh.sidecar(client)
    reply = client.http(f"http://{outside.ip}:8080/")
    assert reply.status == 200 and reply.json["name"] == "legacy"


async def test_registry_only_refuses_a_server_outside_the_mesh(tmp_path: Path) -> None:
    scope = ScopeSettings(outbound_traffic_policy=OutboundTrafficPolicy.REGISTRY_ONLY)
    async with CaptureMesh(tmp_path / "mesh", scope=scope) as mesh:
        client = mesh.pod(NS, "client", app=None)
        api = mesh.pod(NS, "api-1")
        outside = mesh.pod("external", "legacy", sidecar=False)
        mesh.service(NS, "api", 80, pods=[api])
        await mesh.sidecar(client)
        await mesh.sidecar(api)
        assert (await mesh.until(lambda: client.http("http://api/"), message="api")).status == 200
        assert client.http(f"http://{api.ip}:8080/").status == 200  # a mesh pod IP is known
        with pytest.raises(PodNetError) as refused:
            client.http(f"http://{outside.ip}:8080/", timeout=3)
        assert refused.value.kind in ("reset", "closed")  # accepted by the sidecar, then closed
        assert outside.backend is not None and outside.backend.requests_total == 0


async def test_strict_mtls_holds_in_capture_mode(tmp_path: Path) -> None:
    """STRICT: a meshed client gets through (its sidecar originates mTLS to the pod's
    address); a client without a sidecar dialling the same pod is refused by the server's
    sidecar; the app only ever sees the meshed request."""
    settings = SecuritySettings(mtls=True, default_mode=MtlsMode.STRICT)
    async with secure_mesh(tmp_path / "mesh", tmp_path / "ca", settings) as mesh:
        client = mesh.pod(NS, "client", app=None)
        plain = mesh.pod(NS, "plain", app=None, sidecar=False)
        api = mesh.pod(NS, "api-1")
        mesh.service(NS, "api", 80, pods=[api])
        await mesh.sidecar(client)
        await mesh.sidecar(api)

        reply = await mesh.until(lambda: client.http("http://api/"), message="meshed client")
        assert reply.status == 200 and reply.json["name"] == "api-1"
        served = api.backend.requests_total if api.backend is not None else 0
        with pytest.raises(PodNetError):
            plain.http(f"http://{api.ip}:8080/", timeout=3)
        assert api.backend is not None and api.backend.requests_total == served


async def test_a_port_without_a_declared_protocol_is_sniffed(mesh: CaptureMesh) -> None:
    """Istio's rule: no appProtocol, no protocol in the port name: HTTP is detected (routes
    apply to it), anything else is proxied as TCP."""
    client = mesh.pod(NS, "client", app=None)
    web = mesh.pod(NS, "web-0", labels={"app": "web"})
    raw = mesh.pod(NS, "raw-0", app="tcp", app_port=7000, labels={"app": "raw"})
    mesh.service(NS, "web", 8080, app_protocol=None, pods=[web])  # port name "main"
    mesh.service(NS, "raw", 7000, app_protocol=None, pods=[raw])
    mesh.write("route.yaml", header_setter("web-route", "web", 8080))
    for pod in (client, web, raw):
        await mesh.sidecar(pod)

    reply = await mesh.until(lambda: (r := client.http("http://web:8080/")).headers.get("x-header-set") and r,
                             message="HTTP sniffed and routed")
    assert reply.status == 200 and reply.json["name"] == "web-0"
    # A client-first binary protocol that keeps its connection open, as database drivers do.
    # (A client that half-closes before the inspector has decided is closed by Envoy: the
    # price of sniffing, as in Istio; declare the port's protocol to avoid it.)
    assert tcp_exchange(client, "raw", 7000, "\\x00binary") == "raw-0:\x00binary"


class TcpToUnixRelay:
    """A TCP listener inside a pod, relaying each connection to the server's Unix socket: the
    pod's own "xDS server address" (as a Service address would be), reached over TCP."""

    def __init__(self, pod: NetPod, port: int, unix_path: str) -> None:
        self.unix_path = unix_path
        self.connections = 0
        self.listener = pod.in_pod(lambda: socket.create_server((pod.ip, port)))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.unix_path)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()


async def test_the_sidecars_own_tcp_connections_are_not_captured(mesh: CaptureMesh) -> None:
    """The capture rules exempt the proxy's UID: its xDS stream over TCP to a pod address
    (not loopback, so the rules see it) reaches the server, not the sidecar's own 15001;
    and its upstream connections reach the apps (a captured one would loop)."""
    client = mesh.pod(NS, "client", app=None)
    api = mesh.pod(NS, "api-1")
    mesh.service(NS, "api", 80, pods=[api])
    relay = TcpToUnixRelay(client, 15010, str(mesh.socket_path))
    try:
        spec = SidecarSpec(
            namespace=NS, service_account=client.service_account, pod=client.name, pod_ip=client.ip,
            xds_address=f"{client.ip}:15010", interception="capture", labels=client.labels,
        )
        client.envoy = PodEnvoy(client, sidecar_bootstrap(spec))
        await asyncio.to_thread(client.envoy.start)
        await asyncio.to_thread(client.envoy.wait_ready, 20)
        await mesh.sidecar(api)
        # LIVE over TCP: captured, the stream would have met the sidecar's own 15001, where
        # nothing listens before the first config (refused), and later its passthrough.
        assert relay.connections >= 1
        reply = await mesh.until(lambda: client.http("http://api/"), message="api through the sidecar")
        assert reply.status == 200 and reply.json["name"] == "api-1"
        passthrough = client.envoy.counters(r"^cluster\.PassthroughCluster\.upstream_cx_total$")
        assert sum(passthrough.values()) == 0
    finally:
        relay.close()
