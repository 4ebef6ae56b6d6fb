"""SDS with a real Envoy: a token in its bootstrap, its own SPIFFE certificate over ADS, renewal
without draining, and a root rotation that never breaks a handshake.

The Envoy's listener terminates mutual TLS with the SDS secrets `default` (its certificate and
key) and `ROOTCA` (the trust bundle) and proxies to a TCP echo backend. A Python TLS client
plays the peer workload: it checks the certificate Envoy presents (a SPIFFE ID, chaining to the
bundle) and presents its own, which Envoy checks against `ROOTCA`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from google.protobuf import wrappers_pb2

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from tests.support.envoy import EnvoyProcess, config_section
from tests.support.net import free_port, next_loopback_ip
from tests.support.upstreams import TcpEchoUpstream
from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap
from xds_server.ca.authority import fingerprint
from xds_server.model.identity import Identity
from xds_server.ca.rotation import RotationPhase
from xds_server.security import Security, SecurityConfig
from xds_server.xds import types
from xds_server.xds.auth import AuthMode
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
REDACTED = base64.b64encode(b"[redacted]").decode()


def ads_source() -> config_source_pb2.ConfigSource:
    source = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    source.ads.SetInParent()
    return source


def mtls_listener(ip: str, port: int) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name="mtls")
    listener.address.socket_address.address = ip
    listener.address.socket_address.port_value = port
    chain = listener.filter_chains.add()
    context = tls_pb2.DownstreamTlsContext(require_client_certificate=wrappers_pb2.BoolValue(value=True))
    common = context.common_tls_context
    common.tls_certificate_sds_secret_configs.add(name="default", sds_config=ads_source())
    common.validation_context_sds_secret_config.name = "ROOTCA"
    common.validation_context_sds_secret_config.sds_config.CopyFrom(ads_source())
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    chain.transport_socket.typed_config.Pack(context)
    proxy = chain.filters.add(name="envoy.filters.network.tcp_proxy")
    proxy.typed_config.Pack(tcp_proxy_pb2.TcpProxy(stat_prefix="echo", cluster="echo"))
    return listener


def echo_cluster(ip: str, port: int) -> cluster_pb2.Cluster:
    cluster = cluster_pb2.Cluster(name="echo", type=cluster_pb2.Cluster.STATIC)
    cluster.connect_timeout.FromSeconds(1)
    cluster.load_assignment.cluster_name = "echo"
    address = cluster.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address
    address.socket_address.address = ip
    address.socket_address.port_value = port
    return cluster


@dataclass
class Peer:
    """What the TLS client saw of Envoy: the certificate chain it presented."""

    leaf: x509.Certificate
    sock: ssl.SSLSocket

    @property
    def spiffe_ids(self) -> list[str]:
        return spiffe_ids(self.leaf)


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


class SdsMesh:
    def __init__(self, tmp_path: Path, ttl: timedelta) -> None:
        self.tmp_path = tmp_path
        self.ip = next_loopback_ip()
        self.port = free_port(self.ip)
        self.echo = TcpEchoUpstream("echo", self.ip).start()
        self.cache = ResourceCache()
        self.cache.set_type(types.CLUSTER, [echo_cluster(*self.echo.address)])
        self.cache.set_type(types.LISTENER, [mtls_listener(self.ip, self.port)])
        config = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=tmp_path / "ca", workload_ttl=ttl,
                                clock_skew=timedelta(0), watch_ca_files=False,
                                rotation_startup_grace=timedelta(0))
        self.security = Security.build(config, self.cache, "127.0.0.1:0")
        self.server = XdsServer(self.cache, ServerSettings(address="127.0.0.1:0",
                                                           debounce_quiet=0.02, debounce_max=0.2))
        self.security.attach(self.server)
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.envoy: EnvoyProcess | None = None

    async def start(self, token: str | None = None) -> SdsMesh:
        await self.server.start()
        self.task = asyncio.create_task(self.security.run(self.stop_event))
        token = token or self.security.tokens.create("shop", "web", timedelta(hours=1))
        spec = SidecarSpec(namespace="shop", service_account="web", pod="web-1", pod_ip=self.ip,
                           xds_address=self.server.address,
                           admin_address=f"{self.ip}:{free_port(self.ip)}", token=token)
        self.envoy = EnvoyProcess(sidecar_bootstrap(spec), name="sds-web")
        await asyncio.to_thread(self.envoy.start)
        return self

    async def close(self) -> None:
        if self.envoy is not None:
            await asyncio.to_thread(self.envoy.stop)
        self.stop_event.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)
        await self.server.stop(0)
        self.echo.stop()

    # The peer workload ---------------------------------------------------------------------

    def client_svid(self, name: str = "db") -> tuple[Path, Path]:
        """An SVID for the peer workload (shop/<name>) from the CA's current signer."""
        issued = self.security.issuer.issue_for_identity(Identity("shop", name))
        directory = self.tmp_path / f"client-{issued.serial_hex}"
        directory.mkdir()
        (directory / "cert.pem").write_bytes(issued.chain_pem)
        (directory / "key.pem").write_bytes(issued.key_pem)
        return directory / "cert.pem", directory / "key.pem"

    def client_context(self, svid: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A TLS client presenting `svid` (a fresh one by default) and trusting the bundle
        as it is now (as a peer that received ROOTCA would)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # SPIFFE: the identity is the URI SAN, checked below
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.security.authority.trust_bundle_pem.decode())
        context.load_cert_chain(*(svid or self.client_svid()))
        return context

    def connect(self, context: ssl.SSLContext | None = None) -> Peer:
        raw = socket.create_connection((self.ip, self.port), timeout=5)
        sock = (context or self.client_context()).wrap_socket(raw)
        leaf = x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))
        return Peer(leaf, sock)

    def echo_roundtrip(self, peer: Peer, data: bytes) -> bytes:
        peer.sock.sendall(data)
        received = b""
        while not received.endswith(data):
            chunk = peer.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed")
            received += chunk
        return received

    # What Envoy holds ----------------------------------------------------------------------

    def secrets(self) -> dict[str, dict]:
        dump = self.envoy.config_dump()
        section = config_section(dump, "secrets")
        return {s["name"]: s["secret"] for s in section.get("dynamic_active_secrets", ())}

    def certs(self) -> dict:
        """Envoy's /certs: the certificate chain and CA certificates of its TLS context."""
        status, body = self.envoy.admin_get("/certs")
        assert status == 200, body
        return json.loads(body)["certificates"][0]


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[SdsMesh]:
    running = SdsMesh(tmp_path, timedelta(hours=1))
    yield running
    await running.close()


async def until(probe, timeout: float = 15.0, message: str = "condition"):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while True:
        try:
            last = await asyncio.to_thread(probe)
            if last:
                return last
        except Exception as err:
            last = err
        if loop.time() > deadline:
            raise AssertionError(f"{message} not reached in {timeout}s (last: {last!r})")
        await asyncio.sleep(0.05)


async def test_envoy_with_a_token_gets_its_own_certificate_over_sds(mesh: SdsMesh) -> None:
    await mesh.start()
    await asyncio.to_thread(mesh.envoy.wait_ready, 20)
    secrets = await until(lambda: (s := mesh.secrets()) and set(s) == {"default", "ROOTCA"} and s,
                          message="both secrets active")
    # The key is in Envoy, never shown: Envoy redacts it; the chain is ours.
    assert secrets["default"]["tls_certificate"]["private_key"]["inline_bytes"] == REDACTED
    chain = base64.b64decode(secrets["default"]["tls_certificate"]["certificate_chain"]["inline_bytes"])
    assert spiffe_ids(x509.load_pem_x509_certificates(chain)[0]) == [WEB_ID]
    bundle = base64.b64decode(secrets["ROOTCA"]["validation_context"]["trusted_ca"]["inline_bytes"])
    assert bundle == mesh.security.authority.trust_bundle_pem
    certs = mesh.certs()
    assert [san["uri"] for san in certs["cert_chain"][0]["subject_alt_names"]] == [WEB_ID]

    # Mutual TLS through the listener: Envoy shows its SPIFFE ID and accepts our SVID.
    peer = await until(mesh.connect, message="mTLS handshake")
    assert peer.spiffe_ids == [WEB_ID]
    assert await asyncio.to_thread(mesh.echo_roundtrip, peer, b"hello") == b"echo:hello"
    peer.sock.close()
    stats = mesh.security.status()
    assert stats["guard"]["authenticated"] == {"workload-token": 1}
    assert stats["sds"]["issued"] == 1


async def test_envoy_with_a_bad_token_gets_nothing(mesh: SdsMesh) -> None:
    other = Security.build(SecurityConfig(auth=AuthMode.TOKENS, ca_dir=mesh.tmp_path / "other"),
                           ResourceCache(), "127.0.0.1:0")
    await mesh.start(token=other.tokens.create("shop", "web", timedelta(hours=1)))
    guard = mesh.security.guard
    await until(lambda: guard.stats.auth_failures["bad-signature"] >= 2,
                message="Envoy's streams refused")  # it keeps retrying
    assert mesh.envoy.server_state() != "LIVE"
    assert mesh.secrets() == {} and not mesh.envoy.listeners().get("listener_statuses")
    assert len(mesh.security.issuer.registry) == 0


async def test_rotation_replaces_the_certificate_without_draining(tmp_path: Path) -> None:
    mesh = SdsMesh(tmp_path, timedelta(seconds=6))
    try:
        await mesh.start()
        await asyncio.to_thread(mesh.envoy.wait_ready, 20)
        first = await until(mesh.connect, message="mTLS handshake")
        assert await asyncio.to_thread(mesh.echo_roundtrip, first, b"one") == b"echo:one"
        serials = [first.leaf.serial_number]
        draining: list[int] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                try:
                    stats = mesh.envoy.stats("listener_manager")
                    draining.append(int(stats.get("listener_manager.total_listeners_draining", 0)))
                except Exception:
                    pass
                sampling.wait(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # Renewed at about half of 6 s: twice in a little over 6 s, each time under the
            # same secret name, seen by new handshakes.
            for _ in range(2):
                peer = await until(
                    lambda: (p := mesh.connect()).leaf.serial_number != serials[-1] and p,
                    timeout=8, message="a renewed certificate")
                assert peer.spiffe_ids == [WEB_ID]
                serials.append(peer.leaf.serial_number)
                peer.sock.close()
        finally:
            sampling.set()
            sampler.join()
        # The connection made before both renewals still works: nothing drained it.
        assert await asyncio.to_thread(mesh.echo_roundtrip, first, b"two") == b"two"
        first.sock.close()
        stats = mesh.envoy.stats("listener_manager|sds")
        assert draining and max(draining) == 0
        assert stats["listener_manager.total_listeners_draining"] == 0
        assert stats["listener_manager.listener_modified"] == 0
        assert stats["listener_manager.listener_removed"] == 0
        assert stats["sds.default.update_success"] >= 3  # first delivery + two renewals
        assert set(mesh.secrets()) == {"default", "ROOTCA"}
    finally:
        await mesh.close()


async def test_root_rotation_new_bundle_first_then_new_certificates(tmp_path: Path) -> None:
    mesh = SdsMesh(tmp_path, timedelta(seconds=6))
    try:
        await mesh.start()
        await asyncio.to_thread(mesh.envoy.wait_ready, 20)
        old_root = mesh.security.authority.state.root
        old_svid = mesh.client_svid()  # a peer's SVID from the old root
        before = await until(lambda: mesh.connect(mesh.client_context(old_svid)),
                             message="mTLS handshake")
        assert before.leaf.issuer == old_root.subject
        before.sock.close()

        status = await mesh.security.start_root_rotation()
        new_fp = status["new_root"]

        def ca_serials() -> set[str]:
            """The roots in the ROOTCA secret Envoy has accepted (its config_dump)."""
            bundle = mesh.secrets()["ROOTCA"]["validation_context"]["trusted_ca"]["inline_bytes"]
            return {format(c.serial_number, "x")
                    for c in x509.load_pem_x509_certificates(base64.b64decode(bundle))}

        old_serial = format(old_root.serial_number, "x")
        # 1. Envoy gets the bundle with both roots; that ACK lets signing switch.
        await until(lambda: len(ca_serials()) == 2, message="bundle with both roots in Envoy")
        await until(lambda: mesh.security.rotation.phase is RotationPhase.RETIRING,
                    message="signing switched after the bundle was delivered")
        new_root = mesh.security.authority.state.root
        assert fingerprint(new_root) == new_fp
        # 2. Envoy's certificate is re-issued by the new root; a peer still holding an SVID
        # from the old root keeps working meanwhile (both roots are trusted).
        old_client = mesh.client_context(old_svid)  # with the bundle holding both roots
        peer = await until(lambda: (p := mesh.connect(old_client)).leaf.issuer == new_root.subject
                           and p, message="a certificate from the new root")
        assert peer.spiffe_ids == [WEB_ID]
        peer.sock.close()
        # 3. The old root leaves the bundle once everything it signed expired (6 s TTL).
        await until(lambda: mesh.security.rotation.phase is RotationPhase.IDLE, timeout=20,
                    message="old root retired")
        await until(lambda: ca_serials() == {format(new_root.serial_number, "x")}, timeout=10,
                    message="Envoy trusts only the new root")
        assert old_serial not in ca_serials()
        after = await until(lambda: mesh.connect(), message="mTLS after the rotation")
        assert after.leaf.issuer == new_root.subject and after.spiffe_ids == [WEB_ID]
        assert await asyncio.to_thread(mesh.echo_roundtrip, after, b"new") == b"echo:new"
        after.sock.close()
        stats = mesh.envoy.stats("listener_manager")
        assert stats["listener_manager.listener_modified"] == 0
        assert stats["listener_manager.total_listeners_draining"] == 0
    finally:
        await mesh.close()
