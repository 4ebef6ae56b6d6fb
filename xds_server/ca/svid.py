"""X.509-SVIDs: workload certificates per the SPIFFE X509-SVID standard.

Every leaf carries exactly one URI SAN, `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`, derived
from the *authenticated* identity the caller passes in, and nothing the requester wrote:

- basicConstraints CA:FALSE (critical)
- keyUsage digitalSignature (critical), plus keyEncipherment for RSA keys (RSA key transport)
- extendedKeyUsage serverAuth + clientAuth (a sidecar is both ends of mTLS)
- an empty subject, so the SAN is marked critical (RFC 5280 4.2.1.6); the SPIFFE ID is the
  only name a peer should look at
- NotBefore backdated (5 min) for peers whose clock is a little behind; NotAfter = now + TTL,
  clamped so it never passes any certificate above it (signing cert, intermediates, root)

Two paths:

- `issue_for_identity`: the server generates the key (for Envoy, which receives it over SDS).
  The key exists only in the returned object, in memory: never on disk, never in a log
  (`repr` leaves it out).
- `sign_csr`: a workload keeps its key and sends a CSR. The CSR's signature is checked (the
  requester holds the key) and then only its public key is used: subject, SANs and
  extensions in the CSR are ignored.

Every issued certificate is recorded (serial, SPIFFE ID, validity, proxy, which root it chains
to) in a `CertificateRegistry` for the admin API and for root rotation.

Cost: an ECDSA P-256 leaf (key + sign) is ~0.06 ms. RSA 2048 key generation is ~40 ms: a
caller on the event loop should run RSA issuance in a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from .authority import (
    CLOCK_SKEW,
    CertificateAuthority,
    Clock,
    KeyAlgorithm,
    certs_pem,
    generate_private_key,
    private_key_pem,
    signature_hash,
    utcnow,
)
from ..model.identity import DEFAULT_TRUST_DOMAIN, HasIdentity, spiffe_id, validate_trust_domain

log = logging.getLogger("xds_server.ca")

DEFAULT_TTL = timedelta(hours=24)
# Certificates renew at half-life, so a long TTL buys nothing but a longer window for a stolen
# key. A week still rides out a long control-plane outage.
MAX_TTL = timedelta(days=7)
MAX_CSR_BYTES = 64 * 1024
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1)
_RSA_SIZES = range(2048, 8193)


class IssueError(Exception):
    """The request cannot be honoured (bad CSR, TTL too long, CA expired). The message is safe
    to return to the requester."""


@dataclass(frozen=True)
class IssuedCertificate:
    """One X.509-SVID. `chain_pem` is leaf + intermediates (no root); `key_pem` is set only
    when the server generated the key, and only ever lives in memory."""

    chain_pem: bytes
    serial: int
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    root_fingerprint: str  # the root this leaf chains to (root rotation needs it)
    leaf: x509.Certificate = field(repr=False, compare=False)
    key_pem: bytes | None = field(default=None, repr=False)

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")

    @property
    def cert_pem(self) -> bytes:
        """The leaf alone."""
        return self.leaf.public_bytes(serialization.Encoding.PEM)

    @property
    def lifetime(self) -> timedelta:
        """From issuance (not the backdated NotBefore) to expiry: what renewal is based on."""
        return self.not_after - self.issued_at


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """What the registry keeps about an issued certificate: never the key, never the PEM."""

    serial: int
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    proxy: str
    root_fingerprint: str
    kind: str  # "sds" (server-generated key) or "csr"

    def to_dict(self) -> dict[str, str]:
        return {
            "serial": format(self.serial, "x"),
            "spiffe_id": self.spiffe_id,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "issued_at": self.issued_at.isoformat(),
            "proxy": self.proxy,
            "root_fingerprint": self.root_fingerprint,
            "kind": self.kind,
        }


class CertificateRegistry:
    """Issued certificates still valid, in memory, by serial. Thread-safe.

    Expired entries are pruned as new ones arrive. `started_at` tells root rotation whether
    the registry has seen everything a root signed (it has not, across a restart).
    """

    def __init__(self, clock: Clock = utcnow) -> None:
        self.clock = clock
        self.started_at = clock()
        self._records: dict[int, IssuedRecord] = {}
        self._lock = threading.Lock()
        self._next_prune = self.started_at
        # Called with each new record, outside the lock (metrics count issuance here).
        self.listeners: list[Callable[[IssuedRecord], None]] = []

    def add(self, record: IssuedRecord) -> None:
        now = self.clock()
        with self._lock:
            self._records[record.serial] = record
            if now >= self._next_prune:
                self._prune_locked(now)
                self._next_prune = now + timedelta(minutes=1)
        for listener in list(self.listeners):
            try:
                listener(record)
            except Exception:
                log.exception("certificate registry listener failed")

    def prune(self, now: datetime | None = None) -> int:
        with self._lock:
            return self._prune_locked(now or self.clock())

    def _prune_locked(self, now: datetime) -> int:
        expired = [serial for serial, r in self._records.items() if r.not_after <= now]
        for serial in expired:
            del self._records[serial]
        return len(expired)

    def get(self, serial: int) -> IssuedRecord | None:
        return self._records.get(serial)

    def records(self, *, proxy: str | None = None, spiffe_id: str | None = None) -> list[IssuedRecord]:
        """Unexpired certificates, soonest expiry first, optionally filtered."""
        now = self.clock()
        with self._lock:
            found = [
                r for r in self._records.values()
                if r.not_after > now
                and (proxy is None or r.proxy == proxy)
                and (spiffe_id is None or r.spiffe_id == spiffe_id)
            ]
        return sorted(found, key=lambda r: r.not_after)

    def latest_not_after(self, root_fingerprint: str) -> datetime | None:
        """When the last unexpired certificate chaining to this root expires (None: none left)."""
        now = self.clock()
        with self._lock:
            ends = [r.not_after for r in self._records.values()
                    if r.root_fingerprint == root_fingerprint and r.not_after > now]
        return max(ends, default=None)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[IssuedRecord]:
        return iter(self.records())


class SvidIssuer:
    """Issues X.509-SVIDs from a `CertificateAuthority`."""

    def __init__(
        self,
        authority: CertificateAuthority,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        key_algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
        backdate: timedelta = CLOCK_SKEW,
        registry: CertificateRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        if default_ttl <= timedelta(0) or max_ttl <= timedelta(0):
            raise ValueError("certificate TTLs must be positive")
        if default_ttl > max_ttl:
            raise ValueError(f"the default TTL {default_ttl} exceeds the maximum {max_ttl}")
        self.authority = authority
        self.trust_domain = validate_trust_domain(trust_domain)
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.key_algorithm = KeyAlgorithm(key_algorithm)
        self.backdate = backdate
        self.clock = clock or authority.clock
        self.registry = registry if registry is not None else CertificateRegistry(self.clock)

    def spiffe_id(self, identity: HasIdentity) -> str:
        return spiffe_id(identity, self.trust_domain)

    def issue_for_identity(
        self,
        identity: HasIdentity,
        *,
        ttl: timedelta | None = None,
        proxy: str = "",
        key_algorithm: KeyAlgorithm | str | None = None,
    ) -> IssuedCertificate:
        """Generate a key and a certificate for `identity` (for delivery over SDS)."""
        key = generate_private_key(key_algorithm or self.key_algorithm)
        issued = self._issue(key.public_key(), identity, ttl, proxy, "sds")
        return _with_key(issued, private_key_pem(key))

    def sign_csr(
        self,
        csr_pem: bytes | str,
        identity: HasIdentity,
        *,
        ttl: timedelta | None = None,
        proxy: str = "",
    ) -> IssuedCertificate:
        """Certify the public key of a CSR for `identity`, the identity the caller
        authenticated. Nothing else in the CSR is used."""
        if isinstance(csr_pem, str):
            csr_pem = csr_pem.encode()
        if len(csr_pem) > MAX_CSR_BYTES:
            raise IssueError(f"CSR larger than {MAX_CSR_BYTES} bytes")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise IssueError("not a PEM certificate signing request") from None
        try:
            valid = csr.is_signature_valid
        except Exception:
            valid = False
        if not valid:
            raise IssueError("the CSR signature does not verify: the requester must hold the key")
        public_key = csr.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, _EC_CURVES):
                raise IssueError(f"unsupported EC curve {public_key.curve.name}: use P-256 or P-384")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size not in _RSA_SIZES:
                raise IssueError(f"unsupported RSA key size {public_key.key_size}: use 2048 to 8192")
        else:
            raise IssueError(f"unsupported key type {type(public_key).__name__}: use ECDSA or RSA")
        return self._issue(public_key, identity, ttl, proxy, "csr")

    def _issue(self, public_key, identity: HasIdentity, ttl: timedelta | None, proxy: str,
               kind: str) -> IssuedCertificate:
        ttl = self.default_ttl if ttl is None else ttl
        if ttl <= timedelta(0):
            raise IssueError("the requested TTL must be positive")
        if ttl > self.max_ttl:
            raise IssueError(f"the requested TTL {ttl} exceeds the maximum {self.max_ttl}")
        try:
            spiffe = self.spiffe_id(identity)
        except ValueError as err:
            raise IssueError(str(err)) from None
        state = self.authority.state
        now = self.clock().replace(microsecond=0)  # X.509 times have whole seconds
        not_before = now - self.backdate
        not_after = min(now + ttl, state.not_after)
        if not_after <= now:
            raise IssueError("the CA certificate has expired: no certificate can be issued")
        not_before = max(not_before, state.not_before)

        usage_encipher = isinstance(public_key, rsa.RSAPublicKey)
        issuer = state.signing_cert
        try:
            issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
        except x509.ExtensionNotFound:
            # The signing certificate's own key (checked to match it when the CA loads).
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(state.signing_key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False,
                    key_encipherment=usage_encipher, data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True
            )
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )
        leaf = builder.sign(state.signing_key, signature_hash(state.signing_key))
        issued = IssuedCertificate(
            chain_pem=certs_pem([leaf, *state.chain]),  # chain is empty when the root signs
            serial=leaf.serial_number,
            spiffe_id=spiffe,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            issued_at=now,
            root_fingerprint=state.root_fingerprint,
            leaf=leaf,
        )
        self.registry.add(IssuedRecord(
            serial=issued.serial, spiffe_id=spiffe, not_before=issued.not_before,
            not_after=issued.not_after, issued_at=now, proxy=proxy,
            root_fingerprint=issued.root_fingerprint, kind=kind,
        ))
        log.info("certificate issued", extra={
            "spiffe_id": spiffe, "serial": issued.serial_hex,
            "not_after": issued.not_after.isoformat(), "proxy": proxy, "kind": kind,
        })
        return issued


def _with_key(issued: IssuedCertificate, key_pem: bytes) -> IssuedCertificate:
    return replace(issued, key_pem=key_pem)
