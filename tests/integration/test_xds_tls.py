"""xDS over TLS (issue 11 items 1 and 2), over real TLS handshakes with stock grpcio, openssl
and a real Envoy.

What a user relies on: a proxy holding an X.509-SVID of the mesh gets its config (and its own
`default` secret) over mutual TLS, as the identity in its certificate; a certificate of another
CA, an expired one or none at all never gets a byte; a proxy with only a token gets served over
server-authenticated TLS; the server's certificate names what clients dial and chains to the
bundle, and is replaced for new handshakes without dropping open streams; and nothing secret
goes out in clear beyond the host: a plaintext `--auth tokens` server off loopback refuses to
start, and a plaintext stream from another host never receives a private key.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.support.envoy import EnvoyProcess, ads_bootstrap
from tests.support.net import free_port
from tests.support.xds_client import XdsClient, cluster, sotw_resources
from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.svid import IssuedCertificate, SvidIssuer
from xds_server.model.identity import Identity
from xds_server.security import Security, SecurityConfig
from xds_server.xds import types
from xds_server.xds.auth import AuthMode
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

from .test_sds_auth import WEB, bearer, node, spiffe

ROOT = Path(__file__).resolve().parents[2]


class TlsServer:
    """`serve --auth tokens` as it wires itself, with both TLS listeners on free ports."""

    def __init__(self, tmp_path: Path, *, address: str = "127.0.0.1:0",
                 frontend: str = "grpc") -> None:
        self.cache = ResourceCache()
        self.cache.set_type(types.CLUSTER, [cluster("shared")])
        config = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=tmp_path / "ca",
                                watch_ca_files=False, rotation_startup_grace=timedelta(0),
                                tls_sans=("xds.example.test",))
        self.security = Security.build(config, self.cache, address)
        self.server = XdsServer(self.cache, ServerSettings(
            address=address, tls_address="127.0.0.1:0", tls_token_address="127.0.0.1:0",
            tls_frontend=frontend, debounce_quiet=0.01, debounce_max=0.05))
        self.security.attach(self.server)
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self) -> TlsServer:
        await self.server.start()
        self.task = asyncio.create_task(self.security.run(self.stop))
        return self

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)
        await self.server.stop(0)

    @property
    def authority(self) -> CertificateAuthority:
        assert self.security.authority is not None
        return self.security.authority

    @property
    def bundle(self) -> bytes:
        return self.authority.trust_bundle_pem

    def svid(self, namespace: str = WEB[0], service_account: str = WEB[1],
             ttl: timedelta | None = None) -> IssuedCertificate:
        issuer = self.security.issuer
        assert issuer is not None
        return issuer.issue_for_identity(Identity(namespace, service_account), ttl=ttl)

    def client(self, address: str, cert: IssuedCertificate | None = None, *,
               metadata=None, roots: bytes | None = None) -> XdsClient:
        """An XdsClient over TLS (`cert`: a client certificate, for mutual TLS)."""
        client = XdsClient(address, metadata=metadata)
        keys = {}
        if cert is not None:
            keys = {"private_key": cert.key_pem, "certificate_chain": cert.chain_pem}
        credentials = grpc.ssl_channel_credentials(root_certificates=roots or self.bundle, **keys)
        insecure = client.channel
        client.channel = grpc.aio.secure_channel(
            address, credentials,
            options=[("grpc.ssl_target_name_override", "localhost"),
                     ("grpc.use_local_subchannel_pool", 1)])
        asyncio.get_running_loop().create_task(insecure.close())
        return client

    @property
    def mtls(self) -> str:
        return f"127.0.0.1:{self.server.tls_port}"

    @property
    def tokens_tls(self) -> str:
        return f"127.0.0.1:{self.server.tls_token_port}"

    def token(self, namespace: str = WEB[0], service_account: str = WEB[1]) -> str:
        assert self.security.tokens is not None
        return self.security.tokens.create(namespace, service_account, timedelta(hours=1))


@pytest.fixture(params=["grpc", "python"])
async def tls(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[TlsServer]:
    """The server with either handshake on the mutual-TLS port: grpc core's, or the TLS
    front's (--xds-tls-frontend python): what a client sees must be the same."""
    running = await TlsServer(tmp_path, frontend=request.param).start()
    yield running
    await running.close()


async def config_and_secret(client: XdsClient, who=WEB) -> tuple[set[str], x509.Certificate]:
    """Open ADS, ask clusters and `default`; return the cluster names and the leaf received."""
    stream = client.ads(node=node(*who))
    await stream.request(types.CLUSTER)
    clusters = set(sotw_resources(await stream.recv()))
    await stream.request(types.SECRET, ["default"])
    secret = sotw_resources(await stream.recv())["default"]
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    return clusters, x509.load_pem_x509_certificates(chain)[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)


# Mutual TLS ---------------------------------------------------------------------------------


async def test_a_client_certificate_is_the_identity_on_the_mtls_port(tls: TlsServer) -> None:
    async with tls.client(tls.mtls, tls.svid()) as client:
        clusters, leaf = await config_and_secret(client)
    assert clusters == {"shared"}
    assert uri_sans(leaf) == [spiffe(*WEB)]
    assert tls.security.guard.stats.authenticated["client-certificate"] == 1


async def test_the_node_must_claim_the_certificates_identity(tls: TlsServer) -> None:
    async with tls.client(tls.mtls, tls.svid()) as client:
        stream = client.ads(node=node("shop", "db"))
        await stream.request(types.CLUSTER)
        code, details = await stream.closed_with()
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert "client certificate proves shop/web" in details
    assert tls.security.guard.stats.auth_failures["identity-mismatch"] == 1


async def refused_at_handshake(client: XdsClient) -> grpc.StatusCode:
    async with client:
        stream = client.ads(node=node(*WEB))
        try:
            await stream.request(types.CLUSTER)
        except grpc.aio.AioRpcError as err:
            return err.code()
        code, _ = await stream.closed_with()
    return code


async def test_a_certificate_of_another_ca_is_refused_at_the_handshake(
        tls: TlsServer, tmp_path: Path) -> None:
    other = SvidIssuer(CertificateAuthority(tmp_path / "other-ca"))
    stranger = other.issue_for_identity(Identity(*WEB))
    assert await refused_at_handshake(tls.client(tls.mtls, stranger)) is grpc.StatusCode.UNAVAILABLE
    assert tls.security.guard.stats.authenticated.total() == 0


async def test_an_expired_certificate_is_refused_at_the_handshake(tls: TlsServer) -> None:
    expired = tls.svid(ttl=timedelta(seconds=1))
    await asyncio.sleep(1.5)
    assert await refused_at_handshake(tls.client(tls.mtls, expired)) is grpc.StatusCode.UNAVAILABLE
    assert tls.security.guard.stats.authenticated.total() == 0


async def test_no_certificate_no_mtls(tls: TlsServer) -> None:
    client = tls.client(tls.mtls, metadata=bearer(tls.token()))
    assert await refused_at_handshake(client) is grpc.StatusCode.UNAVAILABLE


# Tokens over server-authenticated TLS -------------------------------------------------------


async def test_a_token_over_server_authenticated_tls(tls: TlsServer) -> None:
    async with tls.client(tls.tokens_tls, metadata=bearer(tls.token())) as client:
        clusters, leaf = await config_and_secret(client)
    assert clusters == {"shared"} and uri_sans(leaf) == [spiffe(*WEB)]
    assert tls.security.guard.stats.authenticated["workload-token"] == 1
    async with tls.client(tls.tokens_tls) as client:  # no token: nothing
        stream = client.ads(node=node(*WEB))
        await stream.request(types.CLUSTER)
        code, _ = await stream.closed_with()
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert tls.security.guard.stats.auth_failures["missing-token"] == 1


async def test_a_client_that_does_not_trust_the_mesh_ca_does_not_connect(
        tls: TlsServer, tmp_path: Path) -> None:
    other = CertificateAuthority(tmp_path / "other-ca")
    client = tls.client(tls.tokens_tls, metadata=bearer(tls.token()),
                        roots=other.trust_bundle_pem)
    assert await refused_at_handshake(client) is grpc.StatusCode.UNAVAILABLE


# The server certificate ---------------------------------------------------------------------


def test_openssl_sees_the_names_and_the_chain_to_the_bundle(tmp_path: Path) -> None:
    async def run() -> tuple[str, str]:
        running = await TlsServer(tmp_path).start()
        try:
            bundle = tmp_path / "bundle.pem"
            bundle.write_bytes(running.bundle)
            cert = running.svid()
            (tmp_path / "cert.pem").write_bytes(cert.chain_pem)
            (tmp_path / "key.pem").write_bytes(cert.key_pem or b"")
            proc = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", running.mtls, "-servername", "localhost",
                "-CAfile", str(bundle), "-verify_return_error", "-verify_hostname", "localhost",
                "-cert", str(tmp_path / "cert.pem"), "-key", str(tmp_path / "key.pem"),
                "-showcerts", stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
            leaf = running.security.tls.certificate.cert_pem.decode()  # type: ignore[union-attr]
            return out.decode(), leaf
        finally:
            await running.close()

    output, leaf_pem = asyncio.run(run())
    assert "Verify return code: 0 (ok)" in output, output
    served = output.split("-----BEGIN CERTIFICATE-----")[1].split("-----END CERTIFICATE-----")[0]
    assert served.split() == leaf_pem.split("-----BEGIN CERTIFICATE-----")[1].split(
        "-----END CERTIFICATE-----")[0].split()
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"],
                          input=leaf_pem, capture_output=True, text=True, check=True).stdout
    for name in ("DNS:xds.example.test", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in text, text


async def test_a_new_server_certificate_keeps_open_streams(tls: TlsServer) -> None:
    keeper = tls.security.tls
    assert keeper is not None
    before = keeper.certificate.serial
    async with tls.client(tls.mtls, tls.svid()) as client:
        stream = client.ads(node=node(*WEB))
        await stream.request(types.CLUSTER)
        first = await stream.recv()
        await stream.ack(first)
        assert await keeper.check(force=True)  # as at half-life, or when the CA changed
        assert keeper.certificate.serial != before
        # a new handshake gets the new certificate ...
        async with tls.client(tls.mtls, tls.svid()) as fresh:
            _, _ = await config_and_secret(fresh)
        # ... and the stream opened before the swap is still served
        tls.cache.set_type(types.CLUSTER, [cluster("shared"), cluster("added")])
        pushed = await stream.recv()
        assert set(sotw_resources(pushed)) == {"shared", "added"}
    assert keeper.credentials.swaps >= 1


async def test_the_certificate_follows_the_bundle_during_a_root_rotation(tls: TlsServer) -> None:
    """A rotation first publishes the new root: client certificates from it are accepted at
    once (both roots), and the server certificate is re-issued when signing switches."""
    keeper = tls.security.tls
    assert keeper is not None
    tls.authority.prepare_next_root()
    await keeper.check()
    assert keeper.credentials.roots_pem == tls.bundle and tls.bundle.count(b"BEGIN") == 2
    old_serial = keeper.certificate.serial
    tls.authority.activate_next_root()
    assert await keeper.check()
    assert keeper.certificate.serial != old_serial
    new_root_svid = tls.svid()  # signed by the new root now
    async with tls.client(tls.mtls, new_root_svid) as client:
        clusters, _ = await config_and_secret(client)
    assert clusters == {"shared"}


# No secret in clear off the host ------------------------------------------------------------


def _off_host_ip() -> str | None:
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((ip for ip in out if ":" not in ip and not ip.startswith("127.")), None)


async def test_no_private_key_on_a_plaintext_stream_from_another_host(tmp_path: Path) -> None:
    ip = _off_host_ip()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address on this machine")
    running = await TlsServer(tmp_path, address="0.0.0.0:0").start()
    try:
        async with XdsClient(f"{ip}:{running.server.port}",
                             metadata=bearer(running.token())) as client:
            stream = client.ads(node=node(*WEB))
            await stream.request(types.CLUSTER)
            assert set(sotw_resources(await stream.recv())) == {"shared"}
            await stream.request(types.SECRET, ["default", "ROOTCA"])
            got = sotw_resources(await stream.recv())
        assert set(got) == {"ROOTCA"}  # the bundle is public; the key is not sent
        assert running.security.sds.stats.refused["plaintext-off-host"] == 1
        # the same from this host (loopback) is served: the rule is about leaving the host
        async with XdsClient(f"127.0.0.1:{running.server.port}",
                             metadata=bearer(running.token())) as client:
            _, leaf = await config_and_secret(client)
        assert uri_sans(leaf) == [spiffe(*WEB)]
    finally:
        await running.close()


async def _serve(tmp_path: Path, *args: str, wait: float = 30) -> tuple[int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.cli", "--log-format", "text", "serve", "--auth", "tokens",
        "--admin-address", "off", "--ca-dir", str(tmp_path / "ca"),
        "--xds-tls-address", f"127.0.0.1:{free_port()}",
        "--xds-tls-token-address", f"127.0.0.1:{free_port()}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    lines: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            lines.append(line.decode())
            if "serving" in lines[-1]:
                return

    try:
        await asyncio.wait_for(read(), wait)
    except TimeoutError:
        pass
    if proc.returncode is None and any("serving" in line for line in lines):
        proc.terminate()
        await proc.wait()
        return None, "".join(lines)
    await proc.wait()
    return proc.returncode, "".join(lines)


async def test_plaintext_tokens_beyond_loopback_refuse_to_start(tmp_path: Path) -> None:
    code, output = await _serve(tmp_path, "--xds-address", f"0.0.0.0:{free_port()}")
    assert code == 1, output
    assert "--xds-address" in output and "--xds-tls-address" in output
    assert "--allow-plaintext-tokens-off-host" in output


async def test_the_loud_opt_out_starts_with_a_warning(tmp_path: Path) -> None:
    code, output = await _serve(tmp_path, "--xds-address", f"0.0.0.0:{free_port()}",
                                "--allow-plaintext-tokens-off-host")
    assert code is None, output  # started (then stopped by the test)
    assert "INSECURE: --allow-plaintext-tokens-off-host" in output


# A real Envoy over mutual TLS ---------------------------------------------------------------


def tls_bootstrap(address: str, cert_dir: Path, who=WEB) -> dict:
    """An ADS bootstrap whose xDS cluster is mutual TLS from files (what an agent writes)."""
    host, port = address.rsplit(":", 1)
    namespace, service_account = who
    bootstrap = ads_bootstrap(f"{service_account}-1.{namespace}", host, int(port), "delta-ads",
                              metadata={"namespace": namespace,
                                        "service_account": service_account,
                                        "pod": f"{service_account}-1"})
    xds_cluster = bootstrap["static_resources"]["clusters"][0]
    xds_cluster["transport_socket"] = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                     "UpstreamTlsContext",
            "sni": "localhost",
            "common_tls_context": {
                "tls_certificates": [{
                    "certificate_chain": {"filename": str(cert_dir / "cert-chain.pem")},
                    "private_key": {"filename": str(cert_dir / "key.pem")},
                }],
                "validation_context": {
                    "trusted_ca": {"filename": str(cert_dir / "root-cert.pem")},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": "localhost"}}],
                },
            },
        },
    }
    return bootstrap


async def test_a_real_envoy_gets_its_config_over_mutual_tls(tls: TlsServer) -> None:
    with tempfile.TemporaryDirectory() as directory:
        cert_dir = Path(directory)
        svid = tls.svid()
        (cert_dir / "cert-chain.pem").write_bytes(svid.chain_pem)
        (cert_dir / "key.pem").write_bytes(svid.key_pem or b"")
        (cert_dir / "root-cert.pem").write_bytes(tls.bundle)
        bootstrap = tls_bootstrap(tls.mtls, cert_dir)
        with EnvoyProcess(bootstrap) as envoy:
            await asyncio.to_thread(
                envoy.wait_until, lambda: "shared" in json.dumps(envoy.config_dump()), 20)
            assert tls.security.guard.stats.authenticated["client-certificate"] >= 1
            assert tls.security.guard.stats.authenticated["workload-token"] == 0
            # The server certificate is replaced: Envoy's stream stays up and keeps being served.
            opened = tls.server.stats.streams_opened
            keeper = tls.security.tls
            assert keeper is not None and await keeper.check(force=True)
            tls.cache.set_type(types.CLUSTER, [cluster("shared"), cluster("after-swap")])
            await asyncio.to_thread(
                envoy.wait_until, lambda: "after-swap" in json.dumps(envoy.config_dump()), 20)
            assert tls.server.stats.streams_opened == opened  # no reconnect


async def test_the_server_certificate_is_renewed_at_half_life(tmp_path: Path) -> None:
    from xds_server.tls_serving import ServingCertificateKeeper

    authority = CertificateAuthority(tmp_path / "ca")
    keeper = ServingCertificateKeeper(authority, ("localhost",), ttl=timedelta(seconds=2),
                                      check_interval=0.1)
    first = keeper.certificate.serial
    stop = asyncio.Event()
    task = asyncio.create_task(keeper.run(stop))
    try:
        for _ in range(50):
            if keeper.renewals:
                break
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert keeper.renewals >= 1 and keeper.certificate.serial != first
    assert keeper.credentials.chain_pem == keeper.certificate.chain_pem


# The CSR service over TLS -------------------------------------------------------------------


async def test_first_contact_with_a_token_then_renewal_with_the_certificate(tls: TlsServer) -> None:
    """An agent's life: a key of its own and a token over server-authenticated TLS for its
    first SVID; then that SVID alone (mutual TLS, no token) for the next one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from xds_server.ca.agent import GrpcCsrSigner, build_csr
    from xds_server.ca.service import SIGN_METHOD, decode_json, encode_json

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    options = [("grpc.ssl_target_name_override", "localhost")]
    signer = GrpcCsrSigner(tls.tokens_tls, token=tls.token(), options=options,
                           credentials=grpc.ssl_channel_credentials(tls.bundle))
    try:
        first = await signer.sign(build_csr(key), None)
    finally:
        await signer.close()
    assert first.spiffe_id == spiffe(*WEB)
    credentials = grpc.ssl_channel_credentials(tls.bundle, private_key=key_pem,
                                               certificate_chain=first.chain_pem)
    async with grpc.aio.secure_channel(tls.mtls, credentials, options=options) as channel:
        sign = channel.unary_unary(SIGN_METHOD, request_serializer=encode_json,
                                   response_deserializer=decode_json)
        renewed = await sign({"csr": build_csr(key).decode()}, timeout=10)  # no token
    assert renewed["spiffe_id"] == spiffe(*WEB)
    assert renewed["serial"] != first.serial


# A revoked identity -------------------------------------------------------------------------


async def test_a_revoked_identitys_certificates_are_refused_and_counted(tmp_path: Path) -> None:
    """`xds-server ca revoke-identity` voids every credential the identity holds: a client
    certificate issued before is refused (counted as identity-revoked, for the metrics), a
    stream it opened is closed, its old token is refused by the CSR service; a certificate
    issued afterwards is good."""
    running = TlsServer(tmp_path)
    running.security.guard.settings.revocation_check_seconds = 0.2
    await running.start()
    try:
        old = running.svid()
        old_token = running.token()
        async with running.client(running.mtls, old) as client:
            stream = client.ads(node=node(*WEB))
            await stream.request(types.CLUSTER)
            await stream.ack(await stream.recv())
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "xds_server.cli", "ca", "revoke-identity", "--namespace", WEB[0],
                "--service-account", WEB[1], "--ca-dir", str(tmp_path / "ca"),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, out
            assert b"revoked" in out
            code, details = await asyncio.wait_for(stream.closed_with(), 20)
        assert code is grpc.StatusCode.UNAUTHENTICATED and "revoked identity shop/web" in details
        assert running.security.guard.stats.revoked_streams == 1

        async with running.client(running.mtls, old) as client:
            stream = client.ads(node=node(*WEB))
            await stream.request(types.CLUSTER)
            code, details = await stream.closed_with()
        assert code is grpc.StatusCode.UNAUTHENTICATED and "revoked identity" in details
        assert running.security.guard.stats.auth_failures["identity-revoked"] == 1
        async with running.client(running.tokens_tls, metadata=bearer(old_token)) as client:
            stream = client.ads(node=node(*WEB))
            await stream.request(types.CLUSTER)
            code, _ = await stream.closed_with()
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert running.security.guard.stats.auth_failures["identity-revoked"] == 2

        await asyncio.sleep(1.1)  # revocation is to the second: the next second is "after"
        async with running.client(running.mtls, running.svid()) as client:
            clusters, _ = await config_and_secret(client)
        assert clusters == {"shared"}
        async with running.client(running.tokens_tls, metadata=bearer(running.token())) as client:
            clusters, _ = await config_and_secret(client)
        assert clusters == {"shared"}
    finally:
        await running.close()
