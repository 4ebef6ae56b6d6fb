"""Authentication before anything is sent, and SDS secrets only for the proven identity
(CONFORMANCE rules 18 and 19), driven by the scripted raw client over real gRPC.

What a user of the mesh relies on: a stream without a valid credential gets UNAUTHENTICATED
and not one byte of config; a proxy receives its own certificate and key (`default`) and the
trust bundle (`ROOTCA`) over ADS or the SDS service, SotW or delta, and never another
identity's; certificates are replaced before they expire under the same name; a root
rotation reaches every proxy before anything is signed with the new root.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, UTC
from pathlib import Path

import grpc
import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from tests.support.net import free_port
from tests.support.xds_client import (
    SILENCE,
    XdsClient,
    cluster,
    delta_resources,
    eventually,
    sotw_resources,
)
from xds_server.ca.agent import GrpcCsrSigner, SignError, build_csr
from xds_server.ca.authority import fingerprint
from xds_server.model.identity import Identity
from xds_server.ca.rotation import RotationPhase
from xds_server.ca.tokens import TokenIssuer
from xds_server.cli import main
from xds_server.config import ConfigError
from xds_server.sds import identity_key
from xds_server.security import Security, SecurityConfig
from xds_server.xds import types
from xds_server.xds.auth import Authenticator, AuthMode, GuardSettings
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer

TRUST_DOMAIN = "cluster.local"
WEB = ("shop", "web")
DB = ("shop", "db")


def spiffe(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def node(namespace: str, service_account: str, pod: str | None = None) -> base_pb2.Node:
    pod = pod or f"{service_account}-1"
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "service_account": service_account, "pod": pod})
    return base_pb2.Node(id=f"{pod}.{namespace}", cluster=f"{service_account}.{namespace}",
                         metadata=metadata)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


class Secured:
    """An xDS server with raw resources (every proxy may see them) plus authentication and
    SDS, as `serve --auth ...` wires them."""

    def __init__(self, tmp_path: Path, *, auth: AuthMode = AuthMode.TOKENS,
                 ttl: timedelta = timedelta(hours=1), reviewer=None,
                 limits: GuardSettings | None = None, clock_skew: timedelta = timedelta(0),
                 watch_files: bool = False, startup_grace: timedelta = timedelta(0)) -> None:
        self.ca_dir = tmp_path / "ca"
        self.cache = ResourceCache()
        self.cache.set_type(types.CLUSTER, [cluster("shared")])
        config = SecurityConfig(auth=auth, ca_dir=self.ca_dir, workload_ttl=ttl,
                                limits=limits or GuardSettings(), clock_skew=clock_skew,
                                watch_ca_files=watch_files, rotation_startup_grace=startup_grace)
        self.security = Security.build(config, self.cache, "127.0.0.1:0", reviewer=reviewer)
        self.server = XdsServer(self.cache, ServerSettings(address="127.0.0.1:0",
                                                           debounce_quiet=0.01, debounce_max=0.05))
        self.security.attach(self.server)
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def start(self) -> Secured:
        await self.server.start()
        self.task = asyncio.create_task(self.security.run(self.stop))
        return self

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)
        await self.server.stop(0)

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def sds(self):
        return self.security.sds

    @property
    def certificates(self):
        return self.security.certificates

    def token(self, namespace: str = "shop", service_account: str = "web",
              ttl: timedelta = timedelta(hours=1)) -> str:
        return self.security.tokens.create(namespace, service_account, ttl)

    def issued(self) -> int:
        return len(self.security.issuer.registry) if self.security.issuer is not None else 0

    def identity_secrets(self) -> list[str]:
        return sorted(n for n in self.cache.resources(types.SECRET) if n.startswith("default@"))


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    running = await Secured(tmp_path).start()
    yield running
    await running.close()


# Streams: ADS and the SDS service, SotW and delta -------------------------------------------

STREAMS = ["ads-sotw", "ads-delta", "sds-sotw", "sds-delta"]


def open_stream(client: XdsClient, kind: str, proxy: base_pb2.Node, metadata=None):
    if kind == "ads-sotw":
        return client.ads(node=proxy, metadata=metadata)
    if kind == "ads-delta":
        return client.ads_delta(node=proxy, metadata=metadata)
    if kind == "sds-sotw":
        return client.sotw(types.SECRET, node=proxy, metadata=metadata)
    return client.delta(types.SECRET, node=proxy, metadata=metadata)


async def ask_secrets(stream, kind: str, names=("default", "ROOTCA")) -> None:
    type_url = types.SECRET if kind.startswith("ads") else ""
    await stream.request(type_url, list(names))


def secrets_of(kind: str, response) -> dict:
    return delta_resources(response) if kind.endswith("delta") else sotw_resources(response)


async def receive_secrets(stream, kind: str, want=("default", "ROOTCA")) -> dict:
    """Secrets received until every wanted name arrived (ACKing each response)."""
    got: dict = {}
    while not set(want) <= set(got):
        response = await stream.recv()
        assert response.type_url == types.SECRET
        got.update(secrets_of(kind, response))
        await stream.ack(response)
    return got


def leaf_and_key(secret) -> tuple[x509.Certificate, list[x509.Certificate], bytes]:
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    return chain[0], chain, secret.tls_certificate.private_key.inline_bytes


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def bundle_of(secret) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)


# Authentication ------------------------------------------------------------------------------


def _credentials(secured: Secured, tmp_path: Path) -> dict[str, tuple[list | None, str]]:
    """Credential cases -> (metadata, the counter the failure is counted under)."""
    past = datetime.now(UTC) - timedelta(hours=3)
    expired = TokenIssuer(secured.ca_dir, clock=lambda: past).create(*WEB, timedelta(hours=1))
    revoked = secured.security.tokens.issue(*WEB, timedelta(hours=1))
    secured.security.tokens.revoke(revoked.token_id)
    foreign = TokenIssuer(tmp_path / "other-ca").create(*WEB, timedelta(hours=1))
    return {
        "missing": (None, "missing-token"),
        "not-bearer": ([("authorization", f"Basic {secured.token()}")], "missing-token"),
        "garbage": (bearer("not-a-token"), "malformed"),
        "another-server": (bearer(foreign), "bad-signature"),
        "expired": (bearer(expired), "expired"),
        "revoked": (bearer(revoked.token), "revoked"),
        "another-identity": (bearer(secured.token(*DB)), "identity-mismatch"),
    }


@pytest.mark.parametrize("kind", STREAMS)
async def test_a_stream_without_a_valid_credential_gets_nothing(
    secured: Secured, tmp_path: Path, kind: str
) -> None:
    cases = _credentials(secured, tmp_path)
    async with XdsClient(secured.address) as client:
        for case, (metadata, reason) in cases.items():
            before = secured.security.guard.stats.auth_failures[reason]
            stream = open_stream(client, kind, node(*WEB), metadata)
            if kind.startswith("ads"):
                await stream.request(types.CLUSTER)  # wildcard CDS: "shared" exists
            await ask_secrets(stream, kind)
            code, details = await stream.closed_with()
            assert code == grpc.StatusCode.UNAUTHENTICATED, (case, code, details)
            assert stream.received == [], f"{case}: a response was sent before authentication"
            assert secured.security.guard.stats.auth_failures[reason] == before + 1, case
            if case == "another-identity":
                assert "node claims shop/web" in details
            # The reason is returned, the credential never.
            for _, value in metadata or ():
                assert value.split(" ", 1)[-1] not in details
    assert secured.issued() == 0 and secured.identity_secrets() == []
    assert secured.security.guard.stats.authenticated == {}


async def test_the_fetch_service_authenticates_too(secured: Secured) -> None:
    async with XdsClient(secured.address) as client:
        fetch = client.channel.unary_unary(
            "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        request = discovery_pb2.DiscoveryRequest(node=node(*WEB), resource_names=["default"])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await fetch(request)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = await fetch(request, metadata=bearer(secured.token()))
        leaf, _, _ = leaf_and_key(sotw_resources(response)["default"])
        assert uri_sans(leaf) == [spiffe(*WEB)]
    # A fetch holds the secret only while it is answered.
    await eventually(lambda: secured.identity_secrets() == [], what="fetch released its secret")


# Delivery ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STREAMS)
async def test_default_and_rootca_reach_the_proven_identity(secured: Secured, kind: str) -> None:
    async with XdsClient(secured.address) as client:
        stream = open_stream(client, kind, node(*WEB), bearer(secured.token()))
        await ask_secrets(stream, kind)
        secrets = await receive_secrets(stream, kind)
    assert set(secrets) == {"default", "ROOTCA"}
    leaf, chain, key_pem = leaf_and_key(secrets["default"])
    assert uri_sans(leaf) == [spiffe(*WEB)]
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()
    roots = bundle_of(secrets["ROOTCA"])
    assert secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes == \
        secured.security.authority.trust_bundle_pem
    top = chain[-1]
    assert any(top.issuer == root.subject for root in roots)
    top.verify_directly_issued_by(next(r for r in roots if r.subject == top.issuer))
    assert secured.security.guard.stats.authenticated == {"workload-token": 1}


async def test_another_identitys_secret_is_refused_and_counted(secured: Secured) -> None:
    async with XdsClient(secured.address) as client:
        db = client.ads(node=node(*DB), metadata=bearer(secured.token(*DB)))
        await db.request(types.SECRET, ["default"])
        db_leaf, _, _ = leaf_and_key((await receive_secrets(db, "ads-sotw", ["default"]))["default"])
        assert uri_sans(db_leaf) == [spiffe(*DB)]

        web = client.ads(node=node(*WEB), metadata=bearer(secured.token()))
        stolen = [identity_key(spiffe(*DB)), spiffe(*DB), f"ROOTCA@spiffe://{TRUST_DOMAIN}"]
        await web.request(types.SECRET, stolen)
        await web.expect_silence(SILENCE * 2)
        assert secured.sds.stats.refused["other-identity"] == len(stolen)
        # Asking again is the same case, not a new one; the stream stays usable.
        await web.request(types.SECRET, [*stolen, "default"])
        got = await receive_secrets(web, "ads-sotw", ["default"])
        assert set(got) == {"default"}
        assert uri_sans(leaf_and_key(got["default"])[0]) == [spiffe(*WEB)]
        assert secured.sds.stats.refused["other-identity"] == len(stolen)

        # A wildcard SDS subscriber still sees only its own secret and the bundle.
        wild = client.delta(types.SECRET, node=node(*WEB, pod="web-2"),
                            metadata=bearer(secured.token()))
        await wild.request()
        response = await wild.recv()
        got = delta_resources(response)
        assert set(got) == {"default", "ROOTCA"}
        assert uri_sans(leaf_and_key(got["default"])[0]) == [spiffe(*WEB)]
        # Renewing db's certificate wakes nobody else.
        await wild.ack(response)
        secured.certificates.schedule.mark_due([spiffe(*DB)])
        secured.certificates.wake()
        renewed = await db.recv()
        assert uri_sans(leaf_and_key(sotw_resources(renewed)["default"])[0]) == [spiffe(*DB)]
        await wild.expect_silence()
        await web.expect_silence()


async def test_an_identitys_secret_goes_with_its_last_stream(secured: Secured) -> None:
    key = identity_key(spiffe(*WEB))
    async with XdsClient(secured.address, metadata=bearer(secured.token())) as client:
        first = client.ads(node=node(*WEB, pod="web-1"))
        second = client.sotw(types.SECRET, node=node(*WEB, pod="web-2"))
        for stream in (first, second):
            await stream.request(types.SECRET, ["default"])
        a = await receive_secrets(first, "ads-sotw", ["default"])
        b = await receive_secrets(second, "sds-sotw", ["default"])
        assert a["default"] == b["default"]  # one certificate per identity
        assert secured.certificates.stats.issued == 1
        await first.cancel()
        await asyncio.sleep(SILENCE)
        assert secured.identity_secrets() == [key]
        await second.cancel()
        await eventually(lambda: secured.identity_secrets() == [], what="secret released")
    assert secured.certificates.stats.released == 1


async def test_the_private_key_is_never_logged_nor_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secured = await Secured(tmp_path, ttl=timedelta(seconds=2)).start()
    keys: list[bytes] = []
    try:
        async with XdsClient(secured.address, metadata=bearer(secured.token())) as client:
            stream = client.ads_delta(node=node(*WEB))
            await ask_secrets(stream, "ads-delta")
            keys.append(leaf_and_key((await receive_secrets(stream, "ads-delta"))["default"])[2])
            renewed = await stream.recv(timeout=5)  # renewed at about half of 2 s
            keys.append(leaf_and_key(delta_resources(renewed)["default"])[2])
            await stream.ack(renewed)
            status = repr(secured.security.status()) + repr(secured.cache.resources(types.SECRET))
    finally:
        await secured.close()
    assert keys[0] != keys[1]
    needles = []
    for pem in keys:
        der = serialization.load_pem_private_key(pem, None).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        body = b"".join(pem.strip().splitlines()[1:-1]).decode()
        needles += [body, body[:40], base64.b64encode(der).decode()[:40]]
    records = " ".join(f"{r.getMessage()} {r.__dict__!r}" for r in caplog.records)
    for needle in needles:
        assert needle not in caplog.text and needle not in records and needle not in status
    assert any("certificate issued" in r.getMessage() for r in caplog.records)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for pem in keys:
                assert pem not in data and pem.strip().splitlines()[1] not in data, path


# Renewal and root rotation -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ads-sotw", "sds-delta"])
async def test_certificates_renew_at_half_life_under_the_same_name(tmp_path: Path, kind: str) -> None:
    secured = await Secured(tmp_path, ttl=timedelta(seconds=2)).start()
    try:
        async with XdsClient(secured.address, metadata=bearer(secured.token())) as client:
            stream = open_stream(client, kind, node(*WEB))
            await ask_secrets(stream, kind)
            first = leaf_and_key((await receive_secrets(stream, kind))["default"])[0]
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await stream.recv(timeout=5)
            waited = loop.time() - started
            renewed = secrets_of(kind, response)
            assert set(renewed) == {"default"}  # the bundle did not change: not resent
            if kind.endswith("delta"):
                assert list(response.removed_resources) == []
            second = leaf_and_key(renewed["default"])[0]
            assert second.serial_number != first.serial_number
            assert uri_sans(second) == [spiffe(*WEB)]
            assert waited < 2.0  # before the first one expired
            assert second.not_valid_after_utc >= first.not_valid_after_utc
    finally:
        await secured.close()
    assert secured.certificates.stats.renewed >= 1


async def test_root_rotation_reaches_every_proxy_before_signing_switches(tmp_path: Path) -> None:
    secured = await Secured(tmp_path, ttl=timedelta(seconds=3)).start()
    authority = secured.security.authority
    old_root = authority.state.root
    try:
        async with XdsClient(secured.address) as client:
            web = client.ads(node=node(*WEB), metadata=bearer(secured.token()))
            db = client.ads_delta(node=node(*DB), metadata=bearer(secured.token(*DB)))
            await ask_secrets(web, "ads-sotw")
            await ask_secrets(db, "ads-delta")
            await receive_secrets(web, "ads-sotw")
            await receive_secrets(db, "ads-delta")

            status = await secured.security.start_root_rotation()
            assert status["phase"] == "publishing"
            new_root_fp = status["new_root"]
            # Both get the bundle with both roots, still signed by the old one.
            for stream, kind in ((web, "ads-sotw"), (db, "ads-delta")):
                while True:
                    response = await stream.recv()
                    got = secrets_of(kind, response)
                    if "ROOTCA" in got:
                        break
                    await stream.ack(response)
                roots = {fingerprint(r) for r in bundle_of(got["ROOTCA"])}
                assert roots == {fingerprint(old_root), new_root_fp}
                if stream is web:
                    await stream.ack(response)  # db does not ACK yet
                else:
                    db_bundle = response
            await asyncio.sleep(SILENCE)
            rotation = secured.sds.rotation_status()
            assert rotation["phase"] == "publishing" and rotation["waiting_for"] == ["db-1.shop"]
            assert authority.state.root_fingerprint == fingerprint(old_root)

            await db.ack(db_bundle)
            await eventually(lambda: secured.security.rotation.phase is RotationPhase.RETIRING,
                             what="signing switched")
            assert authority.state.root_fingerprint == new_root_fp
            # Every identity's certificate is re-issued by the new root, under the same name.
            for stream, kind in ((web, "ads-sotw"), (db, "ads-delta")):
                while True:
                    got = secrets_of(kind, response := await stream.recv())
                    await stream.ack(response)
                    if "default" in got:
                        chain = leaf_and_key(got["default"])[1]
                        if chain[0].issuer != old_root.subject:
                            break
                assert fingerprint(authority.state.root) == new_root_fp
                assert chain[0].issuer == authority.state.root.subject

            # The old root leaves the bundle once its last certificate expired (3 s TTL).
            for stream, kind in ((web, "ads-sotw"), (db, "ads-delta")):
                while True:
                    got = secrets_of(kind, response := await stream.recv(timeout=10))
                    await stream.ack(response)
                    if "ROOTCA" in got:
                        break
                assert {fingerprint(r) for r in bundle_of(got["ROOTCA"])} == {new_root_fp}
            await eventually(lambda: secured.security.rotation.phase is RotationPhase.IDLE,
                             what="rotation finished")
    finally:
        await secured.close()


async def test_ca_rotate_root_command_reaches_a_running_server(tmp_path: Path) -> None:
    secured = await Secured(tmp_path, watch_files=True).start()
    try:
        async with XdsClient(secured.address, metadata=bearer(secured.token())) as client:
            stream = client.ads(node=node(*WEB))
            await ask_secrets(stream, "ads-sotw")
            await receive_secrets(stream, "ads-sotw")
            result = await asyncio.to_thread(
                CliRunner().invoke, main, ["ca", "rotate-root", "--ca-dir", str(secured.ca_dir)])
            assert result.exit_code == 0, result.output
            response = await stream.recv(timeout=10)  # the server noticed the files
            assert len(bundle_of(sotw_resources(response)["ROOTCA"])) == 2
            await stream.ack(response)
            await eventually(lambda: secured.security.rotation.phase is RotationPhase.RETIRING,
                             timeout=10, what="signing switched")
        status = await asyncio.to_thread(
            CliRunner().invoke, main, ["ca", "status", "--ca-dir", str(secured.ca_dir)])
        assert '"phase": "retiring"' in status.output
    finally:
        await secured.close()


async def test_a_rotation_started_on_the_rotation_object_is_carried_out(tmp_path: Path) -> None:
    """The admin API calls RootRotation directly: the provider follows through the CA's
    change notification (bundle pushed, switch after the ACK)."""
    secured = await Secured(tmp_path).start()
    try:
        async with XdsClient(secured.address, metadata=bearer(secured.token())) as client:
            stream = client.ads_delta(node=node(*WEB))
            await ask_secrets(stream, "ads-delta")
            await receive_secrets(stream, "ads-delta")
            secured.security.rotation.start_root_rotation()
            response = await stream.recv()
            assert len(bundle_of(delta_resources(response)["ROOTCA"])) == 2
            await asyncio.sleep(SILENCE)
            assert secured.security.rotation.phase is RotationPhase.PUBLISHING  # not ACKed
            await stream.ack(response)
            await eventually(lambda: secured.security.rotation.phase is RotationPhase.RETIRING,
                             what="signing switched")
    finally:
        await secured.close()


async def test_no_switch_during_the_start_up_grace(tmp_path: Path) -> None:
    """Right after a restart the proxies of before are still reconnecting: "all connected
    proxies have the bundle" is vacuous then, so signing waits out the grace."""
    secured = await Secured(tmp_path, startup_grace=timedelta(seconds=1)).start()
    try:
        new_root = (await secured.security.start_root_rotation())["new_root"]
        await asyncio.sleep(0.5)
        status = secured.sds.rotation_status()
        assert status["phase"] == "publishing" and status["startup_grace_remaining"] > 0
        authority = secured.security.authority
        await eventually(lambda: authority.state.root_fingerprint == new_root,
                         what="signing switched after the grace")
        # Nothing was signed by the old root: it leaves the bundle at once.
        await eventually(lambda: secured.security.rotation.phase is RotationPhase.IDLE,
                         what="rotation finished")
        assert [fingerprint(r) for r in authority.roots] == [new_root]
    finally:
        await secured.close()


# Kubernetes tokens -----------------------------------------------------------------------------


async def test_kubernetes_service_account_tokens_via_token_review(tmp_path: Path) -> None:
    from tests.support.fake_apiserver import FakeApiServer
    from xds_server.sources.kube_api import KubeApi, make_api_client
    from xds_server.sources.tokenreview import TokenReviewer

    with FakeApiServer() as fake:
        fake.register_token("sa-web", "system:serviceaccount:shop:web", audiences=("xds-server",),
                            extra={"authentication.kubernetes.io/pod-name": ["web-1"]})
        fake.register_token("sa-vault", "system:serviceaccount:shop:web", audiences=("vault",))
        fake.register_token("user", "alice", audiences=("xds-server",))
        api = KubeApi(make_api_client(fake.kubeconfig(tmp_path / "kubeconfig", user="xds")))
        reviewer = TokenReviewer(api, audiences=("xds-server",), negative_ttl=0)
        secured = await Secured(tmp_path, reviewer=reviewer).start()
        try:
            async with XdsClient(secured.address) as client:
                ok = client.ads(node=node(*WEB, pod="web-1"), metadata=bearer("sa-web"))
                await ask_secrets(ok, "ads-sotw")
                leaf = leaf_and_key((await receive_secrets(ok, "ads-sotw"))["default"])[0]
                assert uri_sans(leaf) == [spiffe(*WEB)]
                refused = {
                    "pod-mismatch": ("sa-web", node(*WEB, pod="web-2")),
                    "wrong-audience": ("sa-vault", node(*WEB)),
                    "not-a-service-account": ("user", node(*WEB)),
                    "identity-mismatch": ("sa-web", node(*DB, pod="web-1")),
                }
                for reason, (token, proxy) in refused.items():
                    stream = client.ads(node=proxy, metadata=bearer(token))
                    await ask_secrets(stream, "ads-sotw")
                    code, _ = await stream.closed_with()
                    assert code == grpc.StatusCode.UNAUTHENTICATED, reason
                    assert stream.received == []
                    assert secured.security.guard.stats.auth_failures[reason] == 1, reason
                with fake.down():
                    stream = client.ads(node=node(*WEB, pod="web-1"), metadata=bearer("sa-down"))
                    await ask_secrets(stream, "ads-sotw")
                    code, details = await stream.closed_with(timeout=15)
                assert code == grpc.StatusCode.UNAVAILABLE, details  # not the token's fault
                assert secured.security.guard.stats.auth_failures["review-unavailable"] == 1
            assert secured.security.guard.stats.authenticated == {"kubernetes-token": 1}
        finally:
            await secured.close()
            api.close()


# The insecure mode and no authentication -------------------------------------------------------


async def test_insecure_node_metadata_only_on_loopback_and_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="loopback"):
        Authenticator(AuthMode.INSECURE_NODE_METADATA, listen_address="0.0.0.0:15010")
    caplog.set_level(logging.WARNING)
    secured = await Secured(tmp_path, auth=AuthMode.INSECURE_NODE_METADATA).start()
    assert any("INSECURE" in r.getMessage() and "--auth insecure-node-metadata" in r.getMessage()
               for r in caplog.records), "no warning at start"
    try:
        async with XdsClient(secured.address) as client:
            trusting = client.ads(node=node(*DB))
            await ask_secrets(trusting, "ads-sotw")
            leaf = leaf_and_key((await receive_secrets(trusting, "ads-sotw"))["default"])[0]
            assert uri_sans(leaf) == [spiffe(*DB)]
            assert any("INSECURE: stream trusted" in r.getMessage() for r in caplog.records)
            # A token sent anyway is still checked.
            lying = client.ads(node=node(*DB), metadata=bearer(secured.token(*WEB)))
            await ask_secrets(lying, "ads-sotw")
            assert (await lying.closed_with())[0] == grpc.StatusCode.UNAUTHENTICATED
        assert secured.security.guard.stats.authenticated == {"node-metadata": 1}
    finally:
        await secured.close()


async def test_auth_none_serves_config_but_no_secret(tmp_path: Path) -> None:
    secured = await Secured(tmp_path, auth=AuthMode.NONE).start()
    try:
        assert secured.security.authority is None and not (tmp_path / "ca").exists()
        async with XdsClient(secured.address) as client:
            ads = client.ads(node=node(*WEB))
            await ads.request(types.CLUSTER)
            assert set(sotw_resources(await ads.recv())) == {"shared"}
            await ads.request(types.SECRET, ["default", "ROOTCA"])
            await ads.expect_silence()
    finally:
        await secured.close()


# Bounds (rule 19) ------------------------------------------------------------------------------


async def test_streams_per_identity_and_request_rate_are_bounded(tmp_path: Path) -> None:
    # A slow refill (one request per 2 s), so the test's own pace cannot refill the bucket.
    limits = GuardSettings(max_streams_per_identity=2, max_requests_per_second=0.5, request_burst=5)
    secured = await Secured(tmp_path, limits=limits).start()
    try:
        async with XdsClient(secured.address, metadata=bearer(secured.token())) as client:
            streams = [client.ads(node=node(*WEB, pod=f"web-{i}")) for i in range(3)]
            for stream in streams[:2]:
                await stream.request(types.CLUSTER)
                await stream.recv()
            await streams[2].request(types.CLUSTER)
            code, details = await streams[2].closed_with()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 2" in details
            # Another identity is not affected; a closed stream frees its slot.
            other = client.ads(node=node(*DB), metadata=bearer(secured.token(*DB)))
            await other.request(types.CLUSTER)
            await other.recv()
            await streams[0].cancel()
            await eventually(lambda: secured.security.guard.streams_of(Identity(*WEB)) == 1,
                             what="slot freed")
            again = client.ads(node=node(*WEB, pod="web-9"))
            await again.request(types.CLUSTER)
            await again.recv()

            # More requests than the rate allows: a clear status, not a crash.
            # Exactly one request more than the burst (a write after the server ended the
            # stream would fail on the client and hide the server's status).
            flood = client.ads(node=node(*DB, pod="db-2"), metadata=bearer(secured.token(*DB)))
            for _ in range(limits.request_burst + 1):
                await flood.request(types.ROUTE, ["r"])
            code, details = await flood.closed_with()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests per second" in details
        stats = secured.security.guard.stats
        assert stats.limited == {"streams-per-identity": 1, "request-rate": 1}
    finally:
        await secured.close()


async def test_revoking_a_token_closes_its_open_streams(tmp_path: Path) -> None:
    secured = await Secured(tmp_path, limits=GuardSettings(revocation_check_seconds=0.1)).start()
    try:
        issued = secured.security.tokens.issue(*WEB, timedelta(hours=1))
        async with XdsClient(secured.address, metadata=bearer(issued.token)) as client:
            stream = client.ads(node=node(*WEB))
            await ask_secrets(stream, "ads-sotw")
            await receive_secrets(stream, "ads-sotw")
            result = await asyncio.to_thread(CliRunner().invoke, main, [
                "token", "revoke", issued.token_id, "--ca-dir", str(secured.ca_dir)])
            assert result.exit_code == 0, result.output
            code, details = await stream.closed_with()
            assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
        await eventually(lambda: secured.identity_secrets() == [], what="secret released")
    finally:
        await secured.close()


# The CSR service on the xDS port ---------------------------------------------------------------


async def test_the_csr_service_shares_the_authenticator(secured: Secured) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    signer = GrpcCsrSigner(secured.address, token=secured.token(*DB))
    try:
        signed = await signer.sign(build_csr(key), timedelta(hours=1))
    finally:
        await signer.close()
    assert signed.spiffe_id == spiffe(*DB)
    bad = GrpcCsrSigner(secured.address, token="forged")
    try:
        with pytest.raises(SignError, match=r"(?i)unauthenticated|malformed"):
            await bad.sign(build_csr(key), None)
    finally:
        await bad.close()


# The command line ------------------------------------------------------------------------------


def test_bootstrap_puts_the_token_in_the_ads_metadata(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("abc.def.ghi\n")
    result = CliRunner().invoke(main, [
        "bootstrap", "--namespace", "shop", "--service-account", "web", "--pod", "web-1",
        "--pod-ip", "127.0.0.2", "--token-file", str(token_file)])
    assert result.exit_code == 0, result.output
    bootstrap = yaml.safe_load(result.output)
    service = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert service["initial_metadata"] == [{"key": "authorization", "value": "Bearer abc.def.ghi"}]
    plain = CliRunner().invoke(main, ["bootstrap", "--namespace", "shop", "--pod", "p",
                                      "--pod-ip", "127.0.0.2"])
    assert "initial_metadata" not in plain.output


def test_serve_requires_choosing_an_authentication_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDS_SERVER_AUTH", raising=False)
    result = CliRunner().invoke(main, ["serve", "--xds-address", "127.0.0.1:0"])
    assert result.exit_code == 2 and "--auth" in result.output


async def test_serve_refuses_insecure_mode_beyond_loopback(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.cli", "serve", "--auth", "insecure-node-metadata",
        "--xds-address", f"0.0.0.0:{free_port()}", "--admin-address", "off",
        "--ca-dir", str(tmp_path / "ca"), stderr=asyncio.subprocess.PIPE, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"only allowed on a loopback --xds-address" in err
