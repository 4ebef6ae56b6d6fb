"""The built-in CA: roots (self-signed and plugged in), X.509-SVIDs, renewal schedule and root
rotation. Certificates are checked the way peers check them: py-spiffe parses them as
X509-SVIDs, `openssl verify` and cryptography's verifier build the chain to the root."""

from __future__ import annotations

from tests.support.pem import fake_private_key_pem
import asyncio
import base64
import logging
import os
import random
import stat
import subprocess
from datetime import datetime, timedelta, UTC
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from spiffe import X509Svid

from xds_server.ca.authority import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    NEXT_KEY,
    ROOT_CERT,
    CAError,
    CertificateAuthority,
    fingerprint,
)
from xds_server.model.identity import Identity
from xds_server.ca.rotation import (
    RenewalSchedule,
    RootRotation,
    RotationError,
    RotationPhase,
    renewal_time,
)
from xds_server.ca.svid import CertificateRegistry, IssueError, SvidIssuer
from xds_server.logs import JsonFormatter

WEB = Identity("shop", "web")


class Clock:
    """A settable clock starting now (real time, so openssl sees valid certificates)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def openssl_verify(tmp: Path, roots: bytes, chain: bytes, *extra: str) -> subprocess.CompletedProcess:
    """`openssl verify` of the leaf in `chain`, with the rest of `chain` as untrusted
    intermediates, against `roots` only."""
    certs = x509.load_pem_x509_certificates(chain)
    (tmp / "v-roots.pem").write_bytes(roots)
    (tmp / "v-leaf.pem").write_bytes(pem(certs[0]))
    args = ["openssl", "verify", "-x509_strict", "-CAfile", str(tmp / "v-roots.pem"), *extra]
    if len(certs) > 1:
        (tmp / "v-untrusted.pem").write_bytes(pem(*certs[1:]))
        args += ["-untrusted", str(tmp / "v-untrusted.pem")]
    return subprocess.run([*args, str(tmp / "v-leaf.pem")], capture_output=True, text=True)


def crypto_verify(roots: bytes, chain: bytes) -> list[x509.GeneralName]:
    certs = x509.load_pem_x509_certificates(chain)
    verifier = PolicyBuilder().store(Store(x509.load_pem_x509_certificates(roots))).build_client_verifier()
    return verifier.verify(certs[0], certs[1:]).subjects


def make_operator_ca(directory: Path, *, with_chain_file: bool = True, name: str = "Example Corp"):
    """An operator's offline root (RSA, like many corporate roots) and an ECDSA intermediate
    for the mesh, written in the plug-in layout."""
    now = datetime.now(UTC)
    root_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                           x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Root")])
    root = (
        x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
        .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    inter_key = ec.generate_private_key(ec.SECP256R1())
    inter_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} Mesh Intermediate")])
    inter = (
        x509.CertificateBuilder().subject_name(inter_name).issuer_name(root_name)
        .public_key(inter_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(inter_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CA_CERT).write_bytes(pem(inter))
    key_path = directory / CA_KEY
    key_path.write_bytes(inter_key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                                 serialization.NoEncryption()))
    key_path.chmod(0o600)
    (directory / ROOT_CERT).write_bytes(pem(root))
    if with_chain_file:
        (directory / CERT_CHAIN).write_bytes(pem(inter, root))
    return root, inter


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ca(tmp_path: Path, clock: Clock) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "certs", clock=clock)


@pytest.fixture
def issuer(ca: CertificateAuthority, clock: Clock) -> SvidIssuer:
    return SvidIssuer(ca, clock=clock)


# -- the self-signed root -------------------------------------------------------------------


def test_self_signed_root_is_created_once_with_private_key_files(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    ca = CertificateAuthority(directory)
    root = ca.state.root
    assert ca.self_signed
    assert mode(directory) == 0o700
    assert mode(directory / CA_KEY) == 0o600
    assert mode(directory / ROOT_CERT) == 0o644
    assert not [p for p in directory.iterdir() if p.name.startswith(".")], "temporary files left"
    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    lifetime = root.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=3649) < lifetime <= timedelta(days=3650)
    # A restart signs with the same root: every proxy keeps trusting it.
    again = CertificateAuthority(directory)
    assert fingerprint(again.state.root) == fingerprint(root)
    assert again.trust_bundle_pem == ca.trust_bundle_pem


def test_rsa_root_option(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "certs", key_algorithm="rsa-2048")
    assert isinstance(ca.state.signing_key, rsa.RSAPrivateKey)
    assert ca.state.signing_key.key_size == 2048
    issued = SvidIssuer(ca).issue_for_identity(WEB)
    assert openssl_verify(tmp_path, ca.trust_bundle_pem, issued.chain_pem).returncode == 0


def test_no_ca_files_and_create_false_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="no CA"):
        CertificateAuthority(tmp_path / "empty", create=False)


# -- X.509-SVIDs ----------------------------------------------------------------------------


def assert_x509_svid(issued, spiffe_id: str, *, rsa_key: bool = False) -> x509.Certificate:
    """Every rule of the SPIFFE X509-SVID standard this project promises, asserted."""
    svid = X509Svid.parse(issued.chain_pem, issued.key_pem) if issued.key_pem else None
    if svid is not None:
        assert str(svid.spiffe_id) == spiffe_id
    leaf = x509.load_pem_x509_certificates(issued.chain_pem)[0]
    assert leaf == issued.leaf
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
    assert len(list(san.value)) == 1, "exactly one SAN: the SPIFFE ID"
    assert san.critical, "empty subject: the SAN must be critical (RFC 5280)"
    assert leaf.subject == x509.Name([])
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert usage.value.key_encipherment is rsa_key
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.serial_number == issued.serial
    assert leaf.not_valid_before_utc == issued.not_before
    assert leaf.not_valid_after_utc == issued.not_after
    return leaf


def test_issue_for_identity_is_a_valid_x509_svid(tmp_path: Path, ca, issuer, clock) -> None:
    issued = issuer.issue_for_identity(WEB, proxy="web-1.shop")
    assert issued.spiffe_id == "spiffe://cluster.local/ns/shop/sa/web"
    leaf = assert_x509_svid(issued, issued.spiffe_id)
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert issued.key_pem.startswith(b"-----BEGIN " + b"PRIVATE KEY-----")  # PKCS#8
    # Backdated for clock skew; 24 h by default; never past the issuer.
    assert clock.now - issued.not_before >= timedelta(minutes=4)
    assert abs((issued.not_after - clock.now) - timedelta(hours=24)) <= timedelta(seconds=1)
    assert issued.not_after <= ca.state.root.not_valid_after_utc
    # Peers accept it: openssl (as TLS client and server cert) and cryptography's verifier.
    for purpose in ("sslclient", "sslserver"):
        result = openssl_verify(tmp_path, ca.trust_bundle_pem, issued.chain_pem, "-purpose", purpose)
        assert result.returncode == 0, result.stderr + result.stdout
    subjects = crypto_verify(ca.trust_bundle_pem, issued.chain_pem)
    assert subjects == [x509.UniformResourceIdentifier(issued.spiffe_id)]
    # Nothing leaks the key by accident.
    assert b"PRIVATE" not in repr(issued).encode()
    # Nothing was written for it: the key lives in memory only.
    assert sorted(p.name for p in ca.directory.iterdir()) == sorted([CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT])


def test_trust_domain_ttl_and_rsa_workload_keys(tmp_path: Path, ca, clock) -> None:
    issuer = SvidIssuer(ca, trust_domain="prod.example.org", default_ttl=timedelta(hours=1),
                        key_algorithm="rsa-2048", clock=clock)
    issued = issuer.issue_for_identity(Identity("payments", "api"))
    assert issued.spiffe_id == "spiffe://prod.example.org/ns/payments/sa/api"
    leaf = assert_x509_svid(issued, issued.spiffe_id, rsa_key=True)
    assert leaf.public_key().key_size == 2048
    assert abs((issued.not_after - clock.now) - timedelta(hours=1)) <= timedelta(seconds=1)
    assert openssl_verify(tmp_path, ca.trust_bundle_pem, issued.chain_pem).returncode == 0


def test_ttl_maximum_is_enforced(ca, clock) -> None:
    issuer = SvidIssuer(ca, max_ttl=timedelta(hours=48), clock=clock)
    assert issuer.issue_for_identity(WEB, ttl=timedelta(hours=48)).lifetime == timedelta(hours=48)
    with pytest.raises(IssueError, match="exceeds the maximum"):
        issuer.issue_for_identity(WEB, ttl=timedelta(hours=49))
    key = ec.generate_private_key(ec.SECP256R1())
    csr = csr_pem(key)
    with pytest.raises(IssueError, match="exceeds the maximum"):
        issuer.sign_csr(csr, WEB, ttl=timedelta(days=30))
    with pytest.raises(IssueError, match="positive"):
        issuer.issue_for_identity(WEB, ttl=timedelta(0))
    with pytest.raises(ValueError):
        SvidIssuer(ca, default_ttl=timedelta(days=2), max_ttl=timedelta(days=1))


def test_not_after_never_passes_the_issuer(tmp_path: Path, clock) -> None:
    ca = CertificateAuthority(tmp_path / "certs", root_ttl=timedelta(hours=2), clock=clock)
    issued = SvidIssuer(ca, clock=clock).issue_for_identity(WEB)  # 24 h asked
    assert issued.not_after == ca.state.root.not_valid_after_utc
    clock.advance(timedelta(hours=3))
    with pytest.raises(IssueError, match="expired"):
        SvidIssuer(ca, clock=clock).issue_for_identity(WEB)


def test_bad_identities_are_refused(issuer) -> None:
    for namespace, account in [("Shop", "web"), ("shop", "web/../../admin"), ("", "web"),
                               ("shop", ""), ("a" * 64, "web")]:
        with pytest.raises((IssueError, ValueError)):
            issuer.issue_for_identity(_raw(namespace, account))


def _raw(namespace: str, account: str):
    class Raw:  # bypasses Identity's own validation: the issuer must check too
        pass

    raw = Raw()
    raw.namespace, raw.service_account = namespace, account
    return raw


# -- the CSR path ---------------------------------------------------------------------------


def csr_pem(key, *, subject: str = "", sans: list[x509.GeneralName] | None = None,
            ca_extension: bool = False) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]) if subject else x509.Name([])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca_extension:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def test_csr_path_takes_only_the_public_key(tmp_path: Path, ca, issuer) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = csr_pem(
        key, subject="admin",
        sans=[x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
              x509.UniformResourceIdentifier("spiffe://evil.example/ns/x/sa/y"),
              x509.DNSName("api.kube-system.svc")],
        ca_extension=True,
    )
    issued = issuer.sign_csr(csr, WEB, proxy="agent@10.0.0.7")
    assert issued.key_pem is None
    leaf = assert_x509_svid(issued, "spiffe://cluster.local/ns/shop/sa/web")
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    assert str(X509Svid.parse(issued.chain_pem, key_pem).spiffe_id) == issued.spiffe_id
    assert openssl_verify(tmp_path, ca.trust_bundle_pem, issued.chain_pem).returncode == 0
    record = issuer.registry.get(issued.serial)
    assert (record.kind, record.proxy, record.spiffe_id) == ("csr", "agent@10.0.0.7", issued.spiffe_id)


def test_csr_with_rsa_key_gets_key_encipherment(issuer) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issued = issuer.sign_csr(csr_pem(key), WEB)
    assert_x509_svid(issued, issued.spiffe_id, rsa_key=True)


def test_csr_with_a_bad_signature_is_refused(issuer) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(x509.load_pem_x509_csr(csr_pem(key)).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s value
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IssueError, match="signature"):
        issuer.sign_csr(tampered, WEB)


def test_csr_garbage_and_unsupported_keys_are_refused(issuer) -> None:
    with pytest.raises(IssueError, match="not a PEM"):
        issuer.sign_csr(b"hello", WEB)
    with pytest.raises(IssueError, match="larger"):
        issuer.sign_csr(b"x" * 100_000, WEB)
    with pytest.raises(IssueError, match="curve"):
        issuer.sign_csr(csr_pem(ec.generate_private_key(ec.SECP521R1())), WEB)
    with pytest.raises(IssueError, match="key type"):
        issuer.sign_csr(csr_pem(ed25519.Ed25519PrivateKey.generate()), WEB)


# -- the plugged-in CA ----------------------------------------------------------------------


@pytest.mark.parametrize("with_chain_file", [True, False])
def test_plugged_in_intermediate_chains_to_the_operators_root(tmp_path: Path, with_chain_file: bool) -> None:
    directory = tmp_path / "cacerts"
    root, inter = make_operator_ca(directory, with_chain_file=with_chain_file)
    ca = CertificateAuthority(directory)
    assert not ca.self_signed
    assert ca.state.signing_cert == inter and ca.state.root == root
    assert x509.load_pem_x509_certificates(ca.trust_bundle_pem) == [root], "the bundle is the root only"
    issued = SvidIssuer(ca).issue_for_identity(WEB)
    chain = x509.load_pem_x509_certificates(issued.chain_pem)
    assert chain[1:] == [inter], "leaf + intermediate; the root is not served"
    assert_x509_svid(issued, issued.spiffe_id)
    result = openssl_verify(tmp_path, pem(root), issued.chain_pem)
    assert result.returncode == 0, result.stderr + result.stdout
    assert crypto_verify(pem(root), issued.chain_pem) == [x509.UniformResourceIdentifier(issued.spiffe_id)]
    # Without the intermediate the leaf does not verify: the chain really is needed.
    assert openssl_verify(tmp_path, pem(root), pem(chain[0])).returncode != 0
    # The operator's files are never rewritten.
    assert (directory / CA_CERT).read_bytes() == pem(inter)


def test_plugged_in_files_that_do_not_fit_are_rejected(tmp_path: Path) -> None:
    directory = tmp_path / "cacerts"
    make_operator_ca(directory)
    other = tmp_path / "other"
    make_operator_ca(other, name="Other Corp")
    (directory / CA_KEY).write_bytes((other / CA_KEY).read_bytes())
    with pytest.raises(CAError, match="private key"):
        CertificateAuthority(directory)
    make_operator_ca(directory)
    (directory / ROOT_CERT).write_bytes((other / ROOT_CERT).read_bytes())
    (directory / CERT_CHAIN).unlink()
    with pytest.raises(CAError, match="does not lead to any root"):
        CertificateAuthority(directory)
    (directory / CA_CERT).unlink()
    (directory / CA_KEY).write_bytes(fake_private_key_pem("garbage").encode())
    with pytest.raises(CAError):
        CertificateAuthority(directory)


def test_reload_swaps_valid_files_and_keeps_the_last_good_ones(tmp_path: Path, caplog) -> None:
    directory = tmp_path / "cacerts"
    first_root, _ = make_operator_ca(directory)
    calls: list[str] = []
    ca = CertificateAuthority(directory, changed=lambda authority: calls.append(authority.state.root_fingerprint))
    assert ca.reload() is False and calls == [], "nothing changed"

    # A half-finished copy (new certificate, old key) is refused and the old CA keeps signing.
    staging = tmp_path / "staging"
    second_root, second_inter = make_operator_ca(staging, name="Second Corp")
    (directory / CA_CERT).write_bytes((staging / CA_CERT).read_bytes())
    with caplog.at_level(logging.ERROR, logger="xds_server.ca"):
        assert ca.reload() is False
    assert "previous CA" in caplog.text
    assert ca.state.root == first_root and calls == []
    issued = SvidIssuer(ca).issue_for_identity(WEB)
    assert openssl_verify(tmp_path, pem(first_root), issued.chain_pem).returncode == 0

    # The copy completes: the new CA is used and the listener hears about it once.
    for name in (CA_KEY, ROOT_CERT, CERT_CHAIN):
        (directory / name).write_bytes((staging / name).read_bytes())
    assert ca.reload() is True
    assert calls == [fingerprint(second_root)]
    issued = SvidIssuer(ca).issue_for_identity(WEB)
    assert openssl_verify(tmp_path, pem(second_root), issued.chain_pem).returncode == 0
    assert x509.load_pem_x509_certificates(issued.chain_pem)[1] == second_inter


async def test_watch_reloads_when_the_operator_replaces_files(tmp_path: Path) -> None:
    directory = tmp_path / "cacerts"
    make_operator_ca(directory)
    changed = asyncio.Event()
    ca = CertificateAuthority(directory, changed=lambda _: changed.set())
    stop = asyncio.Event()
    task = asyncio.create_task(ca.watch(stop, debounce_ms=100))
    try:
        await asyncio.sleep(0.3)  # the watcher is armed
        staging = tmp_path / "staging"
        new_root, _ = make_operator_ca(staging, name="Rotated Corp")
        for name in (CA_KEY, CA_CERT, ROOT_CERT, CERT_CHAIN):  # each replaced atomically
            os.replace(staging / name, directory / name)
        await asyncio.wait_for(changed.wait(), timeout=10)
        assert ca.state.root == new_root
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=5)


# -- logs -----------------------------------------------------------------------------------


def test_no_private_key_material_in_logs(tmp_path: Path, caplog) -> None:
    from xds_server.ca.tokens import TokenIssuer

    clock = Clock()
    formatter = JsonFormatter()
    with caplog.at_level(logging.DEBUG):
        ca = CertificateAuthority(tmp_path / "certs", clock=clock)
        issuer = SvidIssuer(ca, clock=clock)
        issued = [issuer.issue_for_identity(WEB, proxy="web-1"),
                  issuer.issue_for_identity(WEB, key_algorithm="rsa-2048")]
        rotation = RootRotation(ca, issuer.registry, clock=clock)
        rotation.start_root_rotation()
        rotation.bundle_delivered_to_all()
        tokens = TokenIssuer(tmp_path / "certs", clock=clock)
        tokens.verify(tokens.create("shop", "web", timedelta(hours=1)))
        (tmp_path / "certs" / CA_KEY).write_bytes(fake_private_key_pem("AAAA").encode())
        ca.reload()  # rejected: the error must not quote the file
    assert caplog.records, "the CA logs what it does"
    rendered = "\n".join(formatter.format(record) for record in caplog.records)
    secrets_ = [i.key_pem for i in issued]
    secrets_ += [(tmp_path / "certs" / name).read_bytes()
                 for name in ("token-signing-key.pem",)]
    secrets_.append(ca.state.signing_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    assert "PRIVATE KEY" not in rendered
    for secret in secrets_:
        body = b"".join(secret.splitlines()[1:-1]).decode()
        for chunk in (body[i:i + 24] for i in range(0, len(body) - 24, 24)):
            assert chunk not in rendered
    raw = base64.b64encode(ca.state.signing_key.private_numbers().private_value.to_bytes(32, "big")).decode()
    assert raw not in rendered


# -- registry and renewal schedule ----------------------------------------------------------


def test_registry_lists_what_was_issued_and_drops_expired(ca, clock) -> None:
    registry = CertificateRegistry(clock)
    issuer = SvidIssuer(ca, registry=registry, clock=clock)
    short = issuer.issue_for_identity(WEB, ttl=timedelta(hours=1), proxy="web-1.shop")
    long = issuer.issue_for_identity(Identity("shop", "db"), proxy="db-0.shop")
    records = registry.records()
    assert [r.serial for r in records] == [short.serial, long.serial]
    assert records[0].to_dict()["serial"] == short.serial_hex
    assert records[0].to_dict()["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/web"
    assert [r.serial for r in registry.records(proxy="db-0.shop")] == [long.serial]
    assert registry.latest_not_after(ca.state.root_fingerprint) == long.not_after
    clock.advance(timedelta(hours=2))
    assert [r.serial for r in registry.records()] == [long.serial]
    assert registry.prune() == 1 and len(registry) == 1


def test_renewal_time_is_half_life_with_jitter() -> None:
    issued = datetime(2030, 1, 1, tzinfo=UTC)
    lifetime = timedelta(hours=24)
    rng = random.Random(7)
    fractions = [
        (renewal_time(issued, issued + lifetime, rng=rng) - issued) / lifetime for _ in range(2000)
    ]
    assert all(0.4 <= f <= 0.6 for f in fractions)
    assert min(fractions) < 0.42 and max(fractions) > 0.58, "the jitter spreads a fleet out"
    assert abs(sum(fractions) / len(fractions) - 0.5) < 0.01
    assert renewal_time(issued, issued + lifetime, jitter=0) == issued + lifetime / 2
    with pytest.raises(ValueError):
        renewal_time(issued, issued + lifetime, jitter=0.5)


def test_renewal_schedule_bookkeeping(issuer, clock) -> None:
    schedule = RenewalSchedule(jitter=0.1, rng=random.Random(1), clock=clock)
    certs = {f"web-{i}.shop": issuer.issue_for_identity(WEB, proxy=f"web-{i}.shop") for i in range(50)}
    for proxy, cert in certs.items():
        due = schedule.track(proxy, cert)
        assert cert.issued_at + timedelta(hours=9.6) <= due <= cert.issued_at + timedelta(hours=14.4)
    assert len(schedule) == 50
    first = schedule.next_due()
    assert first == min(schedule.due_at(p) for p in certs)
    assert schedule.pop_due() == [], "nothing due at issuance"
    schedule.forget("web-0.shop")
    assert "web-0.shop" not in schedule
    clock.advance(timedelta(hours=12))
    due_now = schedule.pop_due()
    assert due_now and all(schedule.due_at(p) is None for p in due_now)
    assert "web-0.shop" not in due_now
    assert due_now == sorted(due_now, key=lambda p: certs[p].issued_at)  # earliest first
    clock.advance(timedelta(hours=3))
    rest = schedule.pop_due()
    assert set(due_now) | set(rest) == set(certs) - {"web-0.shop"}
    assert schedule.next_due() is None and len(schedule) == 0
    # Re-issued certificates go back on the schedule; mark_due forces them all now.
    for proxy in rest:
        schedule.track(proxy, issuer.issue_for_identity(WEB, proxy=proxy))
    schedule.mark_due()
    assert sorted(schedule.pop_due()) == sorted(rest)


# -- root rotation --------------------------------------------------------------------------


def bundle_roots(ca: CertificateAuthority) -> list[str]:
    return [fingerprint(c) for c in x509.load_pem_x509_certificates(ca.trust_bundle_pem)]


def test_root_rotation_publishes_then_switches_then_retires(tmp_path: Path, ca, issuer, clock) -> None:
    notified: list[list[str]] = []
    ca.changed = lambda authority: notified.append(bundle_roots(authority))
    old_root = fingerprint(ca.state.root)
    old_leaf = issuer.issue_for_identity(WEB, ttl=timedelta(hours=6), proxy="web-1")
    last_old_leaf = issuer.issue_for_identity(WEB, ttl=timedelta(hours=10), proxy="web-2")
    rotation = RootRotation(ca, issuer.registry, clock=clock)
    assert rotation.phase is RotationPhase.IDLE
    with pytest.raises(RotationError, match="start_root_rotation"):
        rotation.bundle_delivered_to_all()

    # (1) The new root joins the bundle first; the old root still signs.
    new_root = fingerprint(rotation.start_root_rotation())
    assert rotation.phase is RotationPhase.PUBLISHING
    assert bundle_roots(ca) == [old_root, new_root]
    assert notified[-1] == [old_root, new_root], "the server hears the bundle changed"
    assert mode(ca.directory / NEXT_KEY) == 0o600
    during = issuer.issue_for_identity(WEB)
    assert during.root_fingerprint == old_root
    assert openssl_verify(tmp_path, ca.trust_bundle_pem, during.chain_pem).returncode == 0
    with pytest.raises(RotationError, match="in progress"):
        rotation.start_root_rotation()

    # (2) Every proxy has the new bundle: signing switches. Old leaves still verify.
    assert fingerprint(rotation.bundle_delivered_to_all()) == old_root
    assert rotation.phase is RotationPhase.RETIRING
    after = issuer.issue_for_identity(WEB)
    assert after.root_fingerprint == new_root
    new_root_pem = pem(ca.state.root)
    assert openssl_verify(tmp_path, new_root_pem, after.chain_pem).returncode == 0
    assert openssl_verify(tmp_path, new_root_pem, old_leaf.chain_pem).returncode != 0
    for leaf in (old_leaf, during, after):
        assert openssl_verify(tmp_path, ca.trust_bundle_pem, leaf.chain_pem).returncode == 0
    assert bundle_roots(ca) == [old_root, new_root]

    # (3) The old root leaves only after the last certificate it signed expired.
    assert rotation.retire_after() >= max(last_old_leaf.not_after, during.not_after)
    clock.advance(timedelta(hours=9))
    assert rotation.tick() is False and bundle_roots(ca) != [new_root]
    clock.advance(during.not_after - clock.now + timedelta(minutes=6))
    assert rotation.tick() is True
    assert rotation.phase is RotationPhase.IDLE
    assert bundle_roots(ca) == [new_root]
    assert notified[-1] == [new_root]
    assert rotation.tick() is False
    # And a second rotation can follow.
    rotation.start_root_rotation()
    assert len(bundle_roots(ca)) == 2


def test_root_rotation_prepared_in_a_thread_then_recorded(ca, issuer, clock) -> None:
    """The admin API generates the next root in a worker thread (`prepare_next_root`) and
    records the phase on the loop (`start_root_rotation`), which generates nothing more, also
    when the SDS provider already reconciled the CA change into PUBLISHING."""
    old_root = fingerprint(ca.state.root)
    rotation = RootRotation(ca, issuer.registry, clock=clock)
    # The provider's reaction to the CA change: reconcile the phase against the files.
    ca.changed = lambda authority: rotation.reconcile()
    prepared = fingerprint(rotation.prepare_next_root())
    assert bundle_roots(ca) == [old_root, prepared]
    assert rotation.phase is RotationPhase.PUBLISHING  # reconciled before the recording
    assert fingerprint(rotation.start_root_rotation()) == prepared
    assert rotation.phase is RotationPhase.PUBLISHING and rotation.state.new_root == prepared
    assert bundle_roots(ca) == [old_root, prepared]
    with pytest.raises(RotationError, match="in progress"):
        rotation.prepare_next_root()
    with pytest.raises(RotationError, match="in progress"):
        rotation.start_root_rotation()
    rotation.cancel()
    assert bundle_roots(ca) == [old_root]

    # Without a reconciling listener (a bare CA): the phase is recorded by the start alone.
    ca.changed = None
    prepared = fingerprint(rotation.prepare_next_root())
    assert rotation.phase is RotationPhase.IDLE
    assert fingerprint(rotation.start_root_rotation()) == prepared
    assert rotation.phase is RotationPhase.PUBLISHING
    assert bundle_roots(ca) == [old_root, prepared]


def test_root_rotation_survives_a_restart(tmp_path: Path, clock) -> None:
    directory = tmp_path / "certs"
    ca = CertificateAuthority(directory, clock=clock)
    issuer = SvidIssuer(ca, clock=clock, max_ttl=timedelta(days=2))
    issuer.issue_for_identity(WEB, ttl=timedelta(hours=1))
    rotation = RootRotation(ca, issuer.registry, clock=clock, max_ttl=issuer.max_ttl)
    new_root = fingerprint(rotation.start_root_rotation())

    # Restart during (1): still publishing; the next root is not signing.
    ca = CertificateAuthority(directory, clock=clock)
    registry = CertificateRegistry(clock)
    rotation = RootRotation(ca, registry, clock=clock, max_ttl=timedelta(days=2))
    assert rotation.phase is RotationPhase.PUBLISHING
    assert ca.state.root_fingerprint != new_root and new_root in bundle_roots(ca)
    rotation.bundle_delivered_to_all()
    switched = clock.now

    # Restart during (3): the new registry cannot know every old certificate, so the old
    # root waits for the worst case (switch + max TTL + skew) instead of the registry.
    ca = CertificateAuthority(directory, clock=clock)
    rotation = RootRotation(ca, CertificateRegistry(clock), clock=clock, max_ttl=timedelta(days=2))
    assert rotation.phase is RotationPhase.RETIRING
    assert ca.state.root_fingerprint == new_root
    assert rotation.retire_after() == switched + timedelta(days=2, minutes=5)
    clock.advance(timedelta(days=1))
    assert rotation.tick() is False
    clock.advance(timedelta(days=1, minutes=6))
    assert rotation.tick() is True and bundle_roots(ca) == [new_root]
    ca = CertificateAuthority(directory, clock=clock)
    assert RootRotation(ca, CertificateRegistry(clock), clock=clock).phase is RotationPhase.IDLE


def test_root_rotation_cancel_and_refusals(tmp_path: Path, ca, issuer, clock) -> None:
    rotation = RootRotation(ca, issuer.registry, clock=clock)
    old = bundle_roots(ca)
    rotation.start_root_rotation()
    rotation.cancel()
    assert rotation.phase is RotationPhase.IDLE and bundle_roots(ca) == old
    assert not (ca.directory / NEXT_KEY).exists()
    with pytest.raises(CAError):
        ca.remove_root(ca.state.root_fingerprint)
    # An operator's intermediate is rotated by replacing files, not by this state machine.
    directory = tmp_path / "cacerts"
    make_operator_ca(directory)
    plugged = CertificateAuthority(directory, clock=clock)
    with pytest.raises(RotationError, match="replacing"):
        RootRotation(plugged, CertificateRegistry(clock), clock=clock).start_root_rotation()
