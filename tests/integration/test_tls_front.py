"""The TLS front of the mutual-TLS xDS port (xds/tls_front.py), over real TLS handshakes.

What an operator relies on: a client certificate of another CA, an expired one, none, a
client speaking garbage or never finishing its handshake is refused AND counted by reason in
/metrics of a running `xds-server serve`; a valid certificate is still the stream's identity
(tests/integration/test_xds_tls.py runs its mutual-TLS tests, Envoy included, through the
front); and the internal listener the front relays to gives no identity to anyone else.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import sys
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest

from tests.support.net import free_port
from tests.support.xds_client import XdsClient
from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.svid import IssuedCertificate, SvidIssuer
from xds_server.model.identity import Identity
from xds_server.xds import types

from .test_sds_auth import WEB, node
from .test_xds_tls import ROOT, TlsServer, config_and_secret

pytestmark = pytest.mark.xdist_group("tls-front")


def _client_context(cert: IssuedCertificate | None, roots: bytes, tmp: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=roots.decode())
    context.check_hostname = False  # the names are test_xds_tls's business
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        assert cert.key_pem is not None
        (tmp / "c.pem").write_bytes(cert.chain_pem)
        (tmp / "k.pem").write_bytes(cert.key_pem)
        context.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
    return context


async def _handshake(port: int, context: ssl.SSLContext) -> str | None:
    """Connect and read: the ALPN protocol when the server kept the connection, None when
    it refused (at the handshake, or right after it under TLS 1.3)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=context), 20)
    except (ssl.SSLError, OSError):
        return None
    try:
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000"))
        data = await asyncio.wait_for(reader.read(9), 20)  # the server's SETTINGS frame
        return writer.get_extra_info("ssl_object").selected_alpn_protocol() if data else None
    except (ssl.SSLError, OSError):
        return None
    finally:
        writer.transport.abort()


def _counted(text: str) -> dict[str, float]:
    prefix = 'xds_server_tls_handshake_refusals_total{port="mtls",reason="'
    counts = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            reason, _, value = line[len(prefix):].partition('"} ')
            counts[reason] = float(value)
    return counts


async def test_refusals_are_counted_in_the_metrics_of_a_running_server(tmp_path: Path) -> None:
    mtls, admin = free_port(), free_port()
    ca_dir = tmp_path / "ca"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.cli", "--log-format", "text", "serve", "--auth", "tokens",
        "--admin-address", f"127.0.0.1:{admin}", "--ca-dir", str(ca_dir),
        "--xds-address", f"127.0.0.1:{free_port()}", "--xds-tls-address", f"127.0.0.1:{mtls}",
        "--xds-tls-token-address", "off", "--xds-tls-frontend", "python",
        "--xds-tls-handshake-timeout", "1s",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    try:
        async def until_serving() -> None:
            assert proc.stdout is not None
            async for line in proc.stdout:
                if b"serving" in line:
                    return
        await asyncio.wait_for(until_serving(), 60)
        drain = asyncio.create_task(proc.stdout.read())  # keep the pipe from filling
        authority = CertificateAuthority(ca_dir)
        roots = authority.trust_bundle_pem
        issuer = SvidIssuer(authority)
        other = SvidIssuer(CertificateAuthority(tmp_path / "other-ca"))

        good = _client_context(issuer.issue_for_identity(Identity(*WEB)), roots, tmp_path)
        assert await _handshake(mtls, good) == "h2"
        stranger = _client_context(other.issue_for_identity(Identity(*WEB)), roots, tmp_path)
        assert await _handshake(mtls, stranger) is None
        expired_cert = issuer.issue_for_identity(Identity(*WEB), ttl=timedelta(seconds=1))
        await asyncio.sleep(1.5)
        assert await _handshake(mtls, _client_context(expired_cert, roots, tmp_path)) is None
        assert await _handshake(mtls, _client_context(None, roots, tmp_path)) is None
        with socket.create_connection(("127.0.0.1", mtls), timeout=20) as garbage:
            garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert garbage.recv(100) in (b"",)  # closed, nothing said
        silent = socket.create_connection(("127.0.0.1", mtls), timeout=20)  # never says hello

        want = {"unknown_ca": 1.0, "expired": 1.0, "no_certificate": 1.0, "protocol": 1.0,
                "timeout": 1.0}
        counts: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin}") as http:
            for _ in range(300):
                counts = _counted((await http.get("/metrics")).text)
                if counts == want:
                    break
                await asyncio.sleep(0.1)
        silent.close()
        assert counts == want
        assert proc.returncode is None  # hostile input crashed nothing
        proc.terminate()
        output = await asyncio.wait_for(drain, 30)
        assert b"Traceback" not in output, output.decode()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


@pytest.fixture
async def front(tmp_path: Path):
    running = await TlsServer(tmp_path, frontend="python").start()
    yield running
    await running.close()


async def test_the_internal_listener_gives_no_identity_to_other_callers(front: TlsServer) -> None:
    """Plaintext straight to the relay's listener: no certificate proven, so no stream without
    a token (it is loopback plaintext, as --xds-address)."""
    server_front = front.server.tls_front
    assert server_front is not None
    internal = f"127.0.0.1:{server_front.internal[1]}"
    async with XdsClient(internal) as client:
        stream = client.ads(node=node(*WEB))
        await stream.request(types.CLUSTER)
        code, details = await stream.closed_with()
    assert code is grpc.StatusCode.UNAUTHENTICATED and "missing 'authorization" in details
    assert front.security.guard.stats.authenticated.total() == 0


async def test_a_relayed_certificate_is_the_identity_and_counts_nothing(front: TlsServer) -> None:
    async with front.client(front.mtls, front.svid()) as client:
        clusters, _ = await config_and_secret(client)
    assert clusters == {"shared"}
    assert front.security.guard.stats.authenticated["client-certificate"] == 1
    server_front = front.server.tls_front
    assert server_front is not None and not server_front.refusals
    assert server_front.accepted >= 1


# The relay itself, in front of a plain TCP server we control ------------------------------


async def test_the_relay_keeps_flow_control_and_passes_the_end_of_stream(tmp_path: Path) -> None:
    """A server that does not read stops the client's writes (nothing piles up in the
    front); once it reads, every byte arrives in order, then the client's end of stream; and
    the relay socket's certificate is registered only while the relay is open."""
    from xds_server.ca.serving import issue_serving_certificate
    from xds_server.xds.tls import RELAYED
    from xds_server.xds.tls import TlsCredentials
    from xds_server.xds.tls_front import TlsFront

    authority = CertificateAuthority(tmp_path / "ca")
    serving = issue_serving_certificate(authority, ["localhost"])
    assert serving.key_pem is not None
    credentials = TlsCredentials(serving.chain_pem, serving.key_pem, authority.trust_bundle_pem)
    accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put((reader, writer))

    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited
    listening.bind(("127.0.0.1", 0))
    backend = await asyncio.start_server(on_connect, sock=listening)
    front = TlsFront(credentials, ("127.0.0.1", backend.sockets[0].getsockname()[1]))
    port = await front.start("127.0.0.1", 0)
    cert = SvidIssuer(authority).issue_for_identity(Identity(*WEB))
    context = _client_context(cert, authority.trust_bundle_pem, tmp_path)
    client = await asyncio.to_thread(  # blocking: the front serves on this loop
        lambda: context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=60)))
    sent = [0]

    def send(payload: bytes) -> None:  # a blocking client: sendall waits when TCP says so
        view = memoryview(payload)
        for at in range(0, len(payload), 1 << 20):
            client.sendall(view[at:at + (1 << 20)])
            sent[0] += len(view[at:at + (1 << 20)])

    try:
        server_reader, server_writer = await asyncio.wait_for(accepted.get(), 20)
        peer = server_writer.get_extra_info("peername")
        assert RELAYED[(peer[0], peer[1])].spiffe_ids == (f"spiffe://cluster.local/ns/{WEB[0]}/sa/{WEB[1]}",)
        server_writer.transport.pause_reading()  # a server that does not read

        # More than the kernel's buffers on the way can hold (up to 32 MiB to receive, 4 MiB
        # to send per socket here): the rest must wait in the client, not in the front.
        payload = os.urandom(96 * 1024 * 1024)
        sending = asyncio.create_task(asyncio.to_thread(send, payload))
        await asyncio.sleep(3)
        assert not sending.done() and sent[0] < 64 * 1024 * 1024, "the client was never held back"

        server_writer.transport.resume_reading()
        received = await asyncio.wait_for(server_reader.readexactly(len(payload)), 120)
        assert received == payload
        await asyncio.wait_for(sending, 20)
        client.close()
        assert await asyncio.wait_for(server_reader.read(), 20) == b""  # the end passed on
        for _ in range(200):
            if (peer[0], peer[1]) not in RELAYED:
                break
            await asyncio.sleep(0.05)
        assert (peer[0], peer[1]) not in RELAYED
        server_writer.close()
    finally:
        client.close()
        await front.stop()
        backend.close()
    assert not front.refusals and front.accepted == 1
