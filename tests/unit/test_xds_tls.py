"""xDS over TLS without a network: what a call's auth context proves, which identity a client
certificate is, which names the server certificate carries, when the plaintext port may carry
tokens, and that the TLS credentials hand grpc a new pair only when it changed. The real
handshakes are in tests/integration/test_xds_tls.py."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest
from cryptography import x509
from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2

from xds_server.app import AppConfig, check_plaintext
from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.serving import issue_serving_certificate
from xds_server.config import ConfigError
from xds_server.model.identity import AuthError
from xds_server.security import SecurityConfig
from xds_server.tls_serving import serving_names
from xds_server.xds.auth import Authenticator, AuthMode, failure_reason
from xds_server.xds.connection import Connection
from xds_server.xds.node import proxy_claim
from xds_server.xds.server import ServerSettings
from xds_server.xds.stream import Variant, new_stream
from xds_server.xds.tls import PeerCertificate, TlsCredentials, peer_certificate, transport_of

WEB = "spiffe://cluster.local/ns/shop/sa/web"


def _auth(*, tls: bool = True, pem: bool = True, sans: tuple[str, ...] = (WEB,)) -> dict:
    context: dict = {"transport_security_type": [b"ssl" if tls else b"insecure"]}
    if pem:
        context["x509_pem_cert"] = [b"-----BEGIN CERTIFICATE-----\n..."]
        context["x509_subject_alternative_name"] = [s.encode() for s in sans]
    return context


def test_the_auth_context_says_tls_and_the_verified_certificate() -> None:
    cert = peer_certificate(_auth(sans=("localhost", WEB)))
    assert cert is not None and cert.spiffe_ids == (WEB,)
    assert peer_certificate(_auth(pem=False)) is None  # TLS without a client certificate
    assert peer_certificate(_auth(tls=False)) is None
    assert peer_certificate({}) is None and peer_certificate(None) is None
    assert transport_of(_auth()) == "tls" and transport_of({}) == "plaintext"


class _Tokens:
    def recognizes(self, token: str) -> bool:
        return True

    def verify_claims(self, token: str):
        from xds_server.model.identity import Identity
        namespace, service_account = token.split("/")
        return Identity(namespace, service_account), {"jti": "t1"}

    def is_revoked(self, token_id: str) -> bool:
        return False

    def check_identity(self, identity, issued_at) -> None:
        return None


def _claim(namespace: str = "shop", service_account: str = "web"):
    struct = struct_pb2.Struct()
    struct.update({"namespace": namespace, "service_account": service_account, "pod": "p-1"})
    return proxy_claim(base_pb2.Node(id=f"p-1.{namespace}", metadata=struct))


async def test_a_client_certificate_proves_its_spiffe_id() -> None:
    auth = Authenticator(AuthMode.TOKENS, tokens=_Tokens())
    proof = await auth.authenticate((), _claim(), "ipv4:10.0.0.9:1", PeerCertificate((WEB,)))
    assert proof is not None and proof.method == "client-certificate"
    assert (proof.namespace, proof.service_account) == ("shop", "web")
    # a token sent as well must prove the same identity
    both = [("authorization", "Bearer shop/web")]
    assert await auth.authenticate(both, _claim(), "ipv4:10.0.0.9:1", PeerCertificate((WEB,)))
    with pytest.raises(AuthError, match="token proves shop/db"):
        await auth.authenticate([("authorization", "Bearer shop/db")], _claim(), "ipv4:1.2.3.4:1",
                                PeerCertificate((WEB,)))


@pytest.mark.parametrize("uris, why", [
    ((), "exactly one"),
    ((WEB, "spiffe://cluster.local/ns/shop/sa/db"), "exactly one"),
    (("spiffe://other.org/ns/shop/sa/web",), "trust domain cluster.local"),
    (("spiffe://cluster.local/something",), "not a workload identity"),
    (("spiffe://cluster.local/ns/shop/sa/web/extra",), "not a workload identity"),
])
async def test_certificates_that_prove_nothing_here(uris: tuple[str, ...], why: str) -> None:
    auth = Authenticator(AuthMode.TOKENS, tokens=_Tokens())
    with pytest.raises(AuthError, match=why) as err:
        await auth.authenticate((), _claim(), "ipv4:10.0.0.9:1", PeerCertificate(uris))
    assert failure_reason(err.value.reason) == "bad-client-certificate"


async def test_the_node_must_claim_the_certificates_identity() -> None:
    auth = Authenticator(AuthMode.TOKENS, tokens=_Tokens())
    with pytest.raises(AuthError, match="client certificate proves shop/web") as err:
        await auth.authenticate((), _claim("shop", "db"), "ipv4:10.0.0.9:1",
                                PeerCertificate((WEB,)))
    assert failure_reason(err.value.reason) == "identity-mismatch"


@pytest.mark.parametrize("transport, peer, in_clear", [
    ("plaintext", "ipv4:10.0.0.9:5", True), ("plaintext", "ipv4:127.0.0.1:5", False),
    ("plaintext", "unix:/run/xds.sock", False), ("tls", "ipv4:10.0.0.9:5", False),
])
def test_which_streams_are_in_clear_off_the_host(transport: str, peer: str, in_clear: bool) -> None:
    conn = Connection(new_stream(Variant.SOTW, 1), peer, "StreamAggregatedResources")
    conn.transport = transport
    assert conn.in_clear_off_host is in_clear


def test_the_certificate_names_what_clients_dial(tmp_path: Path) -> None:
    names = serving_names(["xds-server.xds-system.svc", " "],
                          ["0.0.0.0:15012", "10.1.2.3:15013", None, "[::1]:15012"])
    assert names == ("xds-server.xds-system.svc", "localhost", "10.1.2.3", "::1")
    issued = issue_serving_certificate(CertificateAuthority(tmp_path / "ca"), names)
    san = issued.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xds-server.xds-system.svc", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"),
                                                       ipaddress.ip_address("::1")]


def test_grpc_is_handed_a_new_pair_only_when_it_changed() -> None:
    credentials = TlsCredentials(b"chain-1", b"key-1", b"roots-1")
    fetch = credentials._fetcher(credentials.version)
    assert fetch() is None  # unchanged: grpc keeps what it has
    assert not credentials.update(roots_pem=b"roots-1")
    assert credentials.update(roots_pem=b"roots-2") and credentials.roots_pem == b"roots-2"
    # (the fetcher builds a grpc configuration: real PEM is needed for that, see the
    # integration tests; here only "changed or not" is checked)
    assert credentials.swaps == 1


def _config(address: str, auth: AuthMode, allow: bool = False) -> AppConfig:
    return AppConfig(server=ServerSettings(address=address, allow_plaintext_tokens_off_host=allow),
                     security=SecurityConfig(auth=auth))


def test_tokens_in_clear_beyond_loopback_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError) as err:
        check_plaintext(_config("0.0.0.0:15010", AuthMode.TOKENS), "0.0.0.0")
    message = str(err.value)
    assert "--xds-address" in message and "--xds-tls-address" in message
    assert "--allow-plaintext-tokens-off-host" in message
    check_plaintext(_config("127.0.0.1:15010", AuthMode.TOKENS), "127.0.0.1")  # loopback: fine
    check_plaintext(_config("0.0.0.0:15010", AuthMode.NONE), "0.0.0.0")  # no tokens: a warning
    with caplog.at_level(logging.WARNING, logger="xds_server"):
        check_plaintext(_config("0.0.0.0:15010", AuthMode.TOKENS, allow=True), "0.0.0.0")
    assert "INSECURE: --allow-plaintext-tokens-off-host" in caplog.text


def test_a_relayed_peer_carries_the_fronts_certificate_and_is_not_local() -> None:
    """Behind the TLS front (xds/tls_front.py) a call's gRPC peer is the relay socket: it
    proves the certificate the front verified while registered, and is never a local caller
    (CSDS, insecure-node-metadata); any other loopback peer proves nothing."""
    from xds_server.xds.connection import peer_is_loopback
    from xds_server.xds.tls import RELAYED, relayed

    cert = PeerCertificate(("spiffe://cluster.local/ns/shop/sa/web",))
    RELAYED[("127.0.0.1", 40001)] = cert
    try:
        peer = "ipv4:127.0.0.1:40001"
        assert relayed(peer) is cert and peer_certificate({}, peer) is cert
        assert transport_of({}, peer) == "tls" and not peer_is_loopback(peer)
        other = "ipv4:127.0.0.1:40002"
        assert peer_certificate({}, other) is None and transport_of({}, other) == "plaintext"
        assert peer_is_loopback(other)
        assert relayed("unix:/tmp/x") is None and relayed("ipv4:garbage") is None
    finally:
        del RELAYED[("127.0.0.1", 40001)]
    assert peer_certificate({}, "ipv4:127.0.0.1:40001") is None
