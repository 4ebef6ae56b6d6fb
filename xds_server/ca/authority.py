"""The certificate authority: which key signs workload certificates, the chain served with
every leaf, and the trust bundle.

Two ways to get one, both read from one directory (default `certs/`) in the layout operators
already know from Istio's plug-in CA:

    ca-cert.pem     the signing certificate (a root, or an intermediate)
    ca-key.pem      its private key (0600)
    root-cert.pem   the trust bundle: one or more roots
    cert-chain.pem  the chain from ca-cert.pem up to the root (ca-cert.pem first)

- **Self-signed**: when the directory has no `ca-cert.pem`/`ca-key.pem`, a root (10 years,
  ECDSA P-256 unless told otherwise) is generated on first start and written in that layout,
  so a restart signs with the same root and every proxy keeps trusting it.
- **Plugged in**: an operator puts their own files there, typically an intermediate issued by
  their offline root. Leaves then carry `leaf + intermediates`, and the bundle is the root(s).

The files are validated as a set (key matches certificate, the signing certificate may sign,
the chain links up to a root in the bundle). `reload()` re-reads them; `watch()` does it on
change. Invalid or half-copied files are reported and the last good state stays in use: a bad
copy never stops issuance. `changed` is called whenever the state in use changes.

Private keys are never logged: logs name certificates by subject, serial and fingerprint.

Root rotation (see rotation.py for the state machine) uses three primitives here:
`prepare_next_root()` (a new root joins the bundle; stored as `next-ca-*.pem` until used),
`activate_next_root()` (signing switches to it) and `remove_root()` (the old one leaves the
bundle). Only a self-signed CA rotates its own root; an operator's CA is rotated by replacing
the files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from enum import Enum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from .files import ensure_private_dir, write_atomic, write_key
from ..model.identity import DEFAULT_TRUST_DOMAIN, validate_trust_domain

log = logging.getLogger("xds_server.ca")

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
NEXT_CERT = "next-ca-cert.pem"  # a root being rotated in: in the bundle, not yet signing
NEXT_KEY = "next-ca-key.pem"
CA_FILES = frozenset({CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN, NEXT_CERT, NEXT_KEY})

ROOT_TTL = timedelta(days=3650)
# Backdating covers clocks a little behind ours (certificates, roots and tokens alike).
CLOCK_SKEW = timedelta(minutes=5)
EXPIRY_WARNING = timedelta(days=30)

PrivateKey = (
    ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class CAError(Exception):
    """The CA cannot be loaded or cannot do what was asked (message names the file/problem)."""


class KeyAlgorithm(str, Enum):
    """Key types this server generates (roots, and workload keys for Envoy over SDS).

    ECDSA P-256 is the default: key generation ~0.01 ms against ~40 ms for RSA 2048
    (FIELD-NOTES.md), and every TLS stack in a mesh speaks it. RSA 2048 exists for peers
    that still need it.
    """

    EC_P256 = "ec-p256"
    RSA_2048 = "rsa-2048"


def generate_private_key(algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256) -> PrivateKey:
    algorithm = KeyAlgorithm(algorithm)
    if algorithm is KeyAlgorithm.RSA_2048:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None:
    """The digest to sign with for an issuer key (None for Ed25519/Ed448, which hash inside)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        size = key.curve.key_size
        return hashes.SHA512() if size > 384 else hashes.SHA384() if size > 256 else hashes.SHA256()
    if isinstance(key, rsa.RSAPrivateKey):
        return hashes.SHA256()
    return None


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: what Envoy, gRPC and the SPIFFE libraries all read."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex: how logs and state name a certificate."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _public_der(key) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _can_sign(cert: x509.Certificate) -> str | None:
    """Why this certificate may not sign others, or None when it may."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "has no basicConstraints extension (a CA certificate needs CA:TRUE)"
    if not constraints.ca:
        return "is not a CA certificate (basicConstraints CA:FALSE)"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not usage.key_cert_sign:
        return "lacks the keyCertSign key usage"
    return None


def describe(cert: x509.Certificate) -> dict[str, str]:
    """What logs say about a certificate: never its key."""
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "fingerprint": fingerprint(cert)[:16],
    }


def create_root(
    key: PrivateKey,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    ttl: timedelta = ROOT_TTL,
    now: datetime | None = None,
) -> x509.Certificate:
    """A self-signed root for the trust domain.

    The common name carries a random suffix so that during a root rotation the old and the new
    root have distinct subjects: chain building then never has to guess between two roots with
    the same name (the key identifiers would tell them apart too; distinct names make logs and
    `openssl` output readable as well).
    """
    now = now or utcnow()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, f"xds-server root CA {secrets.token_hex(4)}"),
    ])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return builder.sign(key, signature_hash(key))


@dataclass(frozen=True)
class CAState:
    """One consistent, validated set of CA material. Immutable: swapped whole on change."""

    signing_cert: x509.Certificate
    signing_key: PrivateKey = field(repr=False)
    # Served after every leaf: the signing certificate and any intermediates above it, up to
    # but excluding the root (a root in a chain is dead weight: peers must already trust it).
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]  # the trust bundle
    root: x509.Certificate  # the root the signing chain ends at
    pending_root: x509.Certificate | None = None  # rotation: in the bundle, not yet signing

    @property
    def self_signed(self) -> bool:
        """The signing certificate is itself the root (this server's own CA)."""
        return self.signing_cert == self.root

    @property
    def root_fingerprint(self) -> str:
        return fingerprint(self.root)

    @property
    def not_after(self) -> datetime:
        """The earliest expiry on the way to the root: no leaf may outlive it."""
        return min(c.not_valid_after_utc for c in (*self.chain, self.signing_cert, self.root))

    @property
    def not_before(self) -> datetime:
        return max(c.not_valid_before_utc for c in (*self.chain, self.signing_cert, self.root))

    @property
    def chain_pem(self) -> bytes:
        return certs_pem(self.chain)

    @property
    def trust_bundle_pem(self) -> bytes:
        return certs_pem(self.roots)

    @property
    def version(self) -> tuple[str, ...]:
        """Equal for equal material: what `reload()` compares to decide if anything changed."""
        return (
            fingerprint(self.signing_cert),
            hashlib.sha256(_public_der(self.signing_key.public_key())).hexdigest(),
            *("chain:" + fingerprint(c) for c in self.chain),
            *("root:" + fingerprint(c) for c in self.roots),
            "pending:" + (fingerprint(self.pending_root) if self.pending_root else ""),
        )


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CAError(f"{path}: cannot read: {err.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CAError(f"{path}: not a PEM certificate (or a truncated one)") from None
    if not certs:
        raise CAError(f"{path}: holds no certificate")
    return certs


def _read_key(path: Path) -> PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CAError(f"{path}: cannot read: {err.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CAError(f"{path}: the key is encrypted; give it unencrypted (mode 0600)") from None
    except Exception:
        raise CAError(f"{path}: not a PEM private key (or a truncated one)") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey,
                            ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise CAError(f"{path}: unsupported key type {type(key).__name__}")
    return key


def load_state(directory: Path) -> CAState:
    """Read and validate the CA files in `directory` (raises CAError naming the problem)."""
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    ca_certs = _read_certs(cert_path)
    signing = ca_certs[0]
    key = _read_key(key_path)
    if _public_der(key.public_key()) != _public_der(signing.public_key()):
        raise CAError(f"{key_path} does not hold the private key of {cert_path}")
    problem = _can_sign(signing)
    if problem:
        raise CAError(f"{cert_path}: the signing certificate {problem}")

    chain_path = directory / CERT_CHAIN
    listed = _read_certs(chain_path) if chain_path.exists() else list(ca_certs)
    if listed[0] != signing:
        listed.insert(0, signing)
    root_path = directory / ROOT_CERT
    if root_path.exists():
        roots = _read_certs(root_path)
    else:
        roots = [c for c in listed if is_self_signed(c)]
        if not roots:
            raise CAError(
                f"{root_path} is missing and {cert_path} is not self-signed: "
                "give the root certificate(s) that the trust bundle must contain"
            )
    for cert in roots:
        if not is_self_signed(cert):
            log.warning("a trust bundle certificate is not self-signed", extra=describe(cert))
    chain = [c for c in listed if not is_self_signed(c)]
    for lower, upper in itertools.pairwise(chain):
        if not _issued_by(lower, upper):
            raise CAError(
                f"{chain_path}: {lower.subject.rfc4514_string()} is not issued by the next "
                f"certificate {upper.subject.rfc4514_string()} (order: ca-cert.pem first, root last)"
            )
    top = chain[-1] if chain else signing
    if chain:
        root = next((r for r in roots if _issued_by(top, r)), None)
        if root is None:
            raise CAError(
                f"the chain of {cert_path} does not lead to any root in {root_path} "
                f"(top of chain: issuer {top.issuer.rfc4514_string()})"
            )
    else:
        if signing not in roots:
            raise CAError(f"{root_path} does not contain the self-signed {cert_path}")
        root = signing

    pending = None
    if (directory / NEXT_CERT).exists() and (directory / NEXT_KEY).exists():
        pending = _read_certs(directory / NEXT_CERT)[0]
        next_key = _read_key(directory / NEXT_KEY)
        if _public_der(next_key.public_key()) != _public_der(pending.public_key()):
            raise CAError(f"{directory / NEXT_KEY} does not hold the key of {directory / NEXT_CERT}")
    return CAState(signing, key, tuple(chain), tuple(roots), root, pending)


class CertificateAuthority:
    """Loads (or creates) the CA in `directory` and keeps it current.

    `changed(authority)` is called after the state in use changed (files reloaded with new
    content, a root rotation step). Safe to read from any thread: `state` is one immutable
    object, replaced whole.
    """

    def __init__(
        self,
        directory: str | Path = "certs",
        *,
        key_algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
        root_ttl: timedelta = ROOT_TTL,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        create: bool = True,
        changed: Callable[[CertificateAuthority], None] | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.directory = Path(directory)
        self.key_algorithm = KeyAlgorithm(key_algorithm)
        self.root_ttl = root_ttl
        self.trust_domain = validate_trust_domain(trust_domain)
        self.changed = changed
        self.clock = clock
        self._lock = threading.RLock()
        # Roots generated by this process: every certificate they signed went through this
        # process, so its registry knows them all (root rotation may retire them early).
        self.created_roots: set[str] = set()
        self._state = self._load_or_create(create)
        self._log_loaded("CA loaded")

    # -- reading -------------------------------------------------------------------------

    @property
    def state(self) -> CAState:
        return self._state

    @property
    def trust_bundle_pem(self) -> bytes:
        return self._state.trust_bundle_pem

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self._state.roots

    @property
    def self_signed(self) -> bool:
        return self._state.self_signed

    # -- loading -------------------------------------------------------------------------

    def _has_files(self) -> bool:
        return (self.directory / CA_CERT).exists() or (self.directory / CA_KEY).exists()

    def _load_or_create(self, create: bool) -> CAState:
        if self._has_files():
            self._finish_interrupted_activation()
            return load_state(self.directory)
        if not create:
            raise CAError(f"no CA in {self.directory}: expected {CA_CERT} and {CA_KEY}")
        ensure_private_dir(self.directory)
        key = generate_private_key(self.key_algorithm)
        root = create_root(key, trust_domain=self.trust_domain, ttl=self.root_ttl, now=self.clock())
        # Key first: a crash in between leaves no certificate without its key.
        write_key(self.directory / CA_KEY, private_key_pem(key))
        write_atomic(self.directory / ROOT_CERT, certs_pem([root]))
        write_atomic(self.directory / CERT_CHAIN, certs_pem([root]))
        write_atomic(self.directory / CA_CERT, certs_pem([root]))
        self.created_roots.add(fingerprint(root))
        log.info("created a self-signed root CA", extra={**describe(root), "directory": str(self.directory)})
        return load_state(self.directory)

    def _finish_interrupted_activation(self) -> None:
        """A crash between writing ca-key.pem and ca-cert.pem during `activate_next_root()`
        leaves the next root's key under ca-key.pem: complete the switch."""
        next_cert = self.directory / NEXT_CERT
        if not next_cert.exists() or not (self.directory / CA_KEY).exists():
            return
        with contextlib.suppress(CAError):
            pending = _read_certs(next_cert)[0]
            key = _read_key(self.directory / CA_KEY)
            if _public_der(key.public_key()) == _public_der(pending.public_key()):
                log.warning("finishing an interrupted root activation", extra=describe(pending))
                self._write_signing(pending)

    def reload(self) -> bool:
        """Re-read the files. True when the state in use changed. Invalid files are logged
        and the last good state is kept."""
        with self._lock:
            try:
                self._finish_interrupted_activation()
                state = load_state(self.directory)
            except CAError as err:
                log.error("CA files rejected, still using the previous CA: %s", err,
                          extra={"directory": str(self.directory)})
                return False
            if state.version == self._state.version:
                return False
            self._state = state
        self._log_loaded("CA reloaded")
        self._notify()
        return True

    async def watch(self, stop_event: asyncio.Event | None = None, *, debounce_ms: int = 300) -> None:
        """Reload whenever the CA files change, until `stop_event` is set (or cancelled).

        Kubernetes Secret volumes replace files by swapping a `..data` symlink, so changes to
        `..`-prefixed entries count too.
        """
        import watchfiles

        def relevant(_change: watchfiles.Change, path: str) -> bool:
            name = Path(path).name
            return name in CA_FILES or name.startswith("..")

        async for _changes in watchfiles.awatch(
            self.directory, stop_event=stop_event, debounce=debounce_ms,
            watch_filter=relevant, recursive=False,
        ):
            self.reload()

    def _notify(self) -> None:
        if self.changed is None:
            return
        try:
            self.changed(self)
        except Exception:
            log.exception("CA change listener failed")

    def _log_loaded(self, message: str) -> None:
        state = self._state
        log.info(message, extra={
            **describe(state.signing_cert),
            "mode": "self-signed" if state.self_signed else "plugged-in",
            "intermediates": len(state.chain),
            "roots": len(state.roots),
            "directory": str(self.directory),
        })
        now = self.clock()
        if state.not_after <= now:
            log.error("the CA certificate has expired: no certificate can be issued",
                      extra=describe(state.signing_cert))
        elif state.not_after - now < EXPIRY_WARNING:
            log.warning("the CA certificate expires soon", extra=describe(state.signing_cert))

    # -- root rotation primitives (driven by rotation.RootRotation) -----------------------

    def _require_self_signed(self) -> None:
        if not self._state.self_signed:
            raise CAError(
                "this CA signs with an operator's intermediate: rotate it by replacing "
                f"the files in {self.directory}, not with a root rotation"
            )

    def prepare_next_root(self) -> x509.Certificate:
        """Generate the next root and add it to the trust bundle (it does not sign yet).
        Idempotent: an already prepared root is returned (and put back in the bundle)."""
        with self._lock:
            self._require_self_signed()
            state = self._state
            pending = state.pending_root
            if pending is None:
                key = generate_private_key(self.key_algorithm)
                pending = create_root(key, trust_domain=self.trust_domain, ttl=self.root_ttl,
                                      now=self.clock())
                write_key(self.directory / NEXT_KEY, private_key_pem(key))
                write_atomic(self.directory / NEXT_CERT, certs_pem([pending]))
                self.created_roots.add(fingerprint(pending))
            if pending not in state.roots:
                write_atomic(self.directory / ROOT_CERT, certs_pem([*state.roots, pending]))
            log.info("next root CA added to the trust bundle", extra=describe(pending))
        self.reload()
        return pending

    def _write_signing(self, root: x509.Certificate) -> None:
        key_pem = (self.directory / NEXT_KEY).read_bytes()
        write_key(self.directory / CA_KEY, key_pem)
        write_atomic(self.directory / CA_CERT, certs_pem([root]))
        write_atomic(self.directory / CERT_CHAIN, certs_pem([root]))
        for name in (NEXT_CERT, NEXT_KEY):
            with contextlib.suppress(FileNotFoundError):
                (self.directory / name).unlink()

    def activate_next_root(self) -> x509.Certificate:
        """Sign with the prepared root from now on. Returns the root that signed until now
        (it stays in the bundle until `remove_root`)."""
        with self._lock:
            self._require_self_signed()
            state = self._state
            if state.pending_root is None:
                raise CAError("no next root prepared: call prepare_next_root() first")
            if state.pending_root not in state.roots:
                raise CAError("the next root is not in the trust bundle yet")
            old = state.root
            self._write_signing(state.pending_root)
            log.info("signing switched to the next root CA", extra=describe(state.pending_root))
        self.reload()
        return old

    def discard_next_root(self) -> None:
        """Abandon a prepared root: it leaves the bundle and its files are deleted."""
        with self._lock:
            state = self._state
            if state.pending_root is None:
                return
            roots = [r for r in state.roots if r != state.pending_root]
            write_atomic(self.directory / ROOT_CERT, certs_pem(roots))
            for name in (NEXT_CERT, NEXT_KEY):
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / name).unlink()
            log.info("next root CA discarded", extra=describe(state.pending_root))
        self.reload()

    def remove_root(self, root_fingerprint: str) -> bool:
        """Take a root out of the trust bundle. Refuses the root that signs now or the one
        being rotated in. False when it was not in the bundle."""
        with self._lock:
            state = self._state
            if root_fingerprint == state.root_fingerprint:
                raise CAError("cannot remove the root the CA signs with")
            if state.pending_root is not None and root_fingerprint == fingerprint(state.pending_root):
                raise CAError("cannot remove the root being rotated in (discard it instead)")
            remaining = [r for r in state.roots if fingerprint(r) != root_fingerprint]
            if len(remaining) == len(state.roots):
                return False
            removed = next(r for r in state.roots if fingerprint(r) == root_fingerprint)
            write_atomic(self.directory / ROOT_CERT, certs_pem(remaining))
            log.info("root CA removed from the trust bundle", extra=describe(removed))
        self.reload()
        return True

