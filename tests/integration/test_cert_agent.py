"""The cert agent against the real CSR signing service over gRPC: files written atomically,
renewed before expiry, and usable as-is for a mutual TLS handshake."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc import aio
from spiffe import X509Svid

from xds_server.ca.agent import CA_FILE, CERT_FILE, KEY_FILE, CertAgent, GrpcCsrSigner, SignError
from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.certdir import SDS_CA_FILE, SDS_CERT_FILE
from xds_server.ca.service import CertificateService
from xds_server.ca.svid import SvidIssuer
from xds_server.ca.tokens import TokenIssuer

ROOT = Path(__file__).resolve().parents[2]


class SigningServer:
    def __init__(self, ca_dir: Path) -> None:
        self.ca = CertificateAuthority(ca_dir)
        self.issuer = SvidIssuer(self.ca, max_ttl=timedelta(days=1))
        self.tokens = TokenIssuer(ca_dir)
        self.service = CertificateService(self.issuer, self.tokens.verify)
        self.server = aio.server()
        self.service.add_to(self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def token(self, namespace: str = "shop", service_account: str = "web") -> str:
        return self.tokens.create(namespace, service_account, timedelta(hours=1))


@pytest.fixture
async def server(tmp_path: Path):
    running = SigningServer(tmp_path / "ca")
    await running.server.start()
    yield running
    await running.server.stop(None)


# The stable paths (symlinks into the current generation) and Envoy's two SDS files.
EXPECTED_FILES = sorted([CA_FILE, CERT_FILE, KEY_FILE, SDS_CA_FILE, SDS_CERT_FILE])


def visible_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def leaf_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def spiffe_ids(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


async def obtain(server: SigningServer, out_dir: Path, *, token: str | None = None,
                 ttl: timedelta | None = None) -> CertAgent:
    signer = GrpcCsrSigner(server.address, token=token or server.token())
    try:
        agent = CertAgent(signer, out_dir, ttl=ttl)
        await agent.run(once=True)
    finally:
        await signer.close()
    return agent


async def test_agent_writes_cert_key_and_bundle(server: SigningServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    agent = await obtain(server, out)
    assert visible_files(out) == EXPECTED_FILES, "no temp files left"
    assert stat.S_IMODE(os.stat(out / KEY_FILE).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(out / CERT_FILE).st_mode) == 0o644
    svid = X509Svid.load(out / CERT_FILE, out / KEY_FILE, serialization.Encoding.PEM)
    assert str(svid.spiffe_id) == "spiffe://cluster.local/ns/shop/sa/web", "identity from the token"
    assert (out / CA_FILE).read_bytes() == server.ca.trust_bundle_pem
    result = subprocess.run(["openssl", "verify", "-CAfile", str(out / CA_FILE), str(out / CERT_FILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert agent.current.serial == format(leaf_of(out / CERT_FILE).serial_number, "x")
    record = server.issuer.registry.get(leaf_of(out / CERT_FILE).serial_number)
    assert record.kind == "csr" and "127.0.0.1" in record.proxy


async def test_unauthenticated_and_invalid_requests(server: SigningServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(SignError, match=r"UNAUTHENTICATED.*signature"):
        await obtain(server, out, token=TokenIssuer(tmp_path / "elsewhere").create("shop", "web", timedelta(hours=1)))
    revoked = server.tokens.issue("shop", "web", timedelta(hours=1))
    server.tokens.revoke(revoked.token_id)
    with pytest.raises(SignError, match=r"UNAUTHENTICATED.*revoked"):
        await obtain(server, out, token=revoked.token)
    with pytest.raises(SignError, match=r"INVALID_ARGUMENT.*maximum"):
        await obtain(server, out, ttl=timedelta(days=2))
    assert not out.exists() or not list(out.iterdir()), "nothing written on failure"

    channel = aio.insecure_channel(server.address)
    try:
        raw = channel.unary_unary("/xds_server.ca.v1.CertificateService/Sign")
        with pytest.raises(aio.AioRpcError) as missing:
            await raw(b"{}")
        assert missing.value.code().name == "UNAUTHENTICATED"
        metadata = (("authorization", f"Bearer {server.token()}"),)
        with pytest.raises(aio.AioRpcError) as garbage:
            await raw(b"not json", metadata=metadata)
        assert garbage.value.code().name == "INVALID_ARGUMENT"
        with pytest.raises(aio.AioRpcError) as bad_csr:
            await raw(b'{"csr": "-----BEGIN CERTIFICATE REQUEST-----"}', metadata=metadata)
        assert bad_csr.value.code().name == "INVALID_ARGUMENT"
        # Hostile TTLs: refused as the caller's mistake (no INTERNAL, no traceback in the log).
        for ttl in (b"1e20", b"-5", b"0", b"1e400", b"86401"):
            with pytest.raises(aio.AioRpcError) as bad_ttl:
                await raw(b'{"csr": "x", "ttl_seconds": ' + ttl + b"}", metadata=metadata)
            assert bad_ttl.value.code().name == "INVALID_ARGUMENT", ttl
            assert "ttl_seconds" in (bad_ttl.value.details() or ""), ttl
        # Every refusal is counted (the metrics read these: surface "ca").
        assert server.service.failures["unauthenticated"] >= 3
        assert server.service.failures["invalid-request"] >= 7
    finally:
        await channel.close()


@pytest.mark.slow
async def test_agent_renews_before_expiry_and_files_are_always_whole(server: SigningServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    signer = GrpcCsrSigner(server.address, token=server.token())
    agent = CertAgent(signer, out, ttl=timedelta(seconds=4))
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    seen: dict[int, tuple[datetime, datetime]] = {}  # serial -> (first seen, not_after)
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while len(seen) < 3:
            assert asyncio.get_running_loop().time() < deadline, f"only {len(seen)} certificates seen"
            if (out / CERT_FILE).exists():
                # A reader never finds a partial file: every read parses.
                cert = leaf_of(out / CERT_FILE)
                serialization.load_pem_private_key((out / KEY_FILE).read_bytes(), None)
                x509.load_pem_x509_certificates((out / CA_FILE).read_bytes())
                seen.setdefault(cert.serial_number, (datetime.now(UTC), cert.not_valid_after_utc))
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)
        await signer.close()
    timeline = sorted(seen.values())
    for (_, previous_expiry), (replaced_at, _) in itertools.pairwise(timeline):
        assert replaced_at < previous_expiry, "renewed before the old certificate expired"
    # The files left match each other and nothing temporary is left behind.
    key = serialization.load_pem_private_key((out / KEY_FILE).read_bytes(), None)
    assert key.public_key() == leaf_of(out / CERT_FILE).public_key()
    assert visible_files(out) == EXPECTED_FILES
    generations = [p for p in out.iterdir() if p.name.startswith("..gen-")]
    assert len(generations) <= 2, "old generations are removed"
    assert agent.renewals >= 3


def make_operator_intermediate(directory: Path) -> None:
    """An operator's root and an intermediate for the mesh, in the plug-in layout."""
    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    root_key, inter_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(name("Operator Root")).issuer_name(name("Operator Root"))
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384()))
    inter = (x509.CertificateBuilder().subject_name(name("Operator Mesh CA")).issuer_name(root.subject)
             .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=20))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(usage, critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
             .sign(root_key, hashes.SHA384()))
    directory.mkdir(parents=True)
    as_pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    (directory / "ca-cert.pem").write_bytes(as_pem(inter))
    (directory / "ca-key.pem").write_bytes(inter_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / "ca-key.pem").chmod(0o600)
    (directory / "root-cert.pem").write_bytes(as_pem(root))
    (directory / "cert-chain.pem").write_bytes(as_pem(inter) + as_pem(root))


def mtls_handshake(server_dir: Path, client_dir: Path) -> tuple[str, str]:
    """A real TLS 1.3 handshake over loopback using the agent's files as they are, with
    client certificates required. Returns the SPIFFE IDs each side saw for its peer."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    server_ctx.load_cert_chain(server_dir / CERT_FILE, server_dir / KEY_FILE)
    server_ctx.load_verify_locations(server_dir / CA_FILE)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False  # SPIFFE peers are named by URI SAN, checked below
    client_ctx.load_cert_chain(client_dir / CERT_FILE, client_dir / KEY_FILE)
    client_ctx.load_verify_locations(client_dir / CA_FILE)

    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                seen["server_peer"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"hello " + tls.recv(64))
        except Exception as err:
            seen["server_error"] = err

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, \
                client_ctx.wrap_socket(raw) as tls:
            tls.sendall(b"mesh")
            assert tls.recv(64) == b"hello mesh"
            client_peer = tls.getpeercert(binary_form=True)
    finally:
        thread.join(timeout=10)
        listener.close()
    assert "server_error" not in seen, seen.get("server_error")
    return (spiffe_ids(x509.load_der_x509_certificate(seen["server_peer"]))[0],
            spiffe_ids(x509.load_der_x509_certificate(client_peer))[0])


@pytest.mark.parametrize("plugged_in", [False, True], ids=["self-signed", "operator-intermediate"])
async def test_mutual_tls_with_the_agents_files(tmp_path: Path, plugged_in: bool) -> None:
    ca_dir = tmp_path / "ca"
    if plugged_in:
        make_operator_intermediate(ca_dir)
    running = SigningServer(ca_dir)
    await running.server.start()
    try:
        await obtain(running, tmp_path / "api", token=running.token("shop", "api"))
        await obtain(running, tmp_path / "web", token=running.token("shop", "web"))
    finally:
        await running.server.stop(None)
    if plugged_in:
        assert len(x509.load_pem_x509_certificates((tmp_path / "web" / CERT_FILE).read_bytes())) == 2
    seen_by_server, seen_by_client = await asyncio.to_thread(mtls_handshake, tmp_path / "api", tmp_path / "web")
    assert seen_by_server == "spiffe://cluster.local/ns/shop/sa/web"
    assert seen_by_client == "spiffe://cluster.local/ns/shop/sa/api"


async def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    first, second = SigningServer(tmp_path / "ca-1"), SigningServer(tmp_path / "ca-2")
    for running in (first, second):
        await running.server.start()
    try:
        await obtain(first, tmp_path / "api", token=first.token("shop", "api"))
        await obtain(second, tmp_path / "intruder", token=second.token("shop", "web"))
    finally:
        for running in (first, second):
            await running.server.stop(None)
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        await asyncio.to_thread(mtls_handshake, tmp_path / "api", tmp_path / "intruder")


async def test_cli_cert_agent_once_with_a_token_file(server: SigningServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(server.token("billing", "worker") + "\n")
    out = tmp_path / "out"
    code = "from xds_server.cli import main; main()"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "cert-agent", "--out-dir", str(out), "--server", server.address,
        "--token-file", str(token_file), "--ttl", "1h", "--once", "--plaintext",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, stderr.decode()
    cert = leaf_of(out / CERT_FILE)
    assert spiffe_ids(cert) == ["spiffe://cluster.local/ns/billing/sa/worker"]
    assert cert.not_valid_after_utc - datetime.now(UTC) < timedelta(hours=1)
    token_file.write_text("not-a-token")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "agent", "--cert-dir", str(out), "--server", server.address,
        "--token-file", str(token_file), "--once", "--plaintext",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 1 and b"UNAUTHENTICATED" in stderr
