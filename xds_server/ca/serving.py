"""Serving certificates: a TLS server certificate for DNS names (and IP addresses), from
the mesh CA: the admission webhook's, and the xDS TLS port's (tls_serving.py).

Not an X.509-SVID (svid.py): the client is the Kubernetes API server calling a webhook at
`https://<service>.<namespace>.svc` (verifying the name against the webhook configuration's
`caBundle`, the mesh roots), or a proxy dialing the xDS server by name or address (verifying
it against the bundle). So: DNS (or IP) SANs only (no SPIFFE URI), CA:FALSE,
keyUsage digitalSignature (+ keyEncipherment for RSA), EKU serverAuth only, NotBefore
backdated for clock skew, NotAfter never past the signing certificate's. The key is generated
here and returned in memory only; `load_chain` hands it to OpenSSL without a file. Recorded in
the certificate registry (kind `serving`) so that a root rotation keeps the old root until
this certificate is gone too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import ssl
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from .authority import (
    CLOCK_SKEW,
    CertificateAuthority,
    KeyAlgorithm,
    certs_pem,
    generate_private_key,
    private_key_pem,
    signature_hash,
)
from .svid import CertificateRegistry, IssuedCertificate, IssuedRecord, IssueError

__all__ = ["SERVING_TTL", "issue_serving_certificate", "load_chain", "on_ca_change",
           "server_tls_context"]

SERVING_TTL = timedelta(hours=24)


def issue_serving_certificate(
    authority: CertificateAuthority,
    dns_names: tuple[str, ...] | list[str],
    *,
    ttl: timedelta = SERVING_TTL,
    key_algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
    registry: CertificateRegistry | None = None,
    owner: str = "",
) -> IssuedCertificate:
    """A new key and a server certificate for `dns_names`, signed by the CA's current signing
    certificate (chain included). Raises IssueError."""
    names = list(dict.fromkeys(name.strip().lower().rstrip(".").strip("[]") for name in dns_names))
    if not names or any(not name or " " in name for name in names):
        raise IssueError(f"serving certificate: bad DNS names {list(dns_names)!r}")
    sans: list[x509.GeneralName] = []
    for name in names:  # an IP address a client dials is an IP SAN, not a DNS one
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    if ttl <= timedelta(0):
        raise IssueError("serving certificate: the TTL must be positive")
    state = authority.state
    now = authority.clock().replace(microsecond=0)
    not_before = max(now - CLOCK_SKEW, state.not_before)
    not_after = min(now + ttl, state.not_after)
    if not_after <= now:
        raise IssueError("the CA certificate has expired: no certificate can be issued")
    key = generate_private_key(key_algorithm)
    public_key = key.public_key()
    issuer = state.signing_cert
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(state.signing_key.public_key())
    rsa = key_algorithm != KeyAlgorithm.EC_P256 and str(key_algorithm).startswith("rsa")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(issuer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=rsa,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(aki, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(state.signing_key, signature_hash(state.signing_key))
    )
    issued = IssuedCertificate(
        chain_pem=certs_pem([leaf, *state.chain]), serial=leaf.serial_number,
        spiffe_id=f"dns:{names[0]}", not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc, issued_at=now,
        root_fingerprint=state.root_fingerprint, leaf=leaf, key_pem=private_key_pem(key),
    )
    if registry is not None:
        registry.add(IssuedRecord(
            serial=issued.serial, spiffe_id=issued.spiffe_id, not_before=issued.not_before,
            not_after=issued.not_after, issued_at=now, proxy=owner,
            root_fingerprint=issued.root_fingerprint, kind="serving"))
    return issued


def on_ca_change(authority: CertificateAuthority, callback: Callable[[], None]) -> None:
    """Call `callback` in the running loop whenever the CA's state changes (files reloaded,
    root rotation steps), after the listeners already there."""
    loop = asyncio.get_running_loop()
    previous = authority.changed

    def changed(current: CertificateAuthority) -> None:
        if previous is not None:
            previous(current)
        loop.call_soon_threadsafe(callback)

    authority.changed = changed


def load_chain(context: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """Load a certificate chain and key into `context` without writing the key to disk (an
    anonymous memfd on Linux; elsewhere a private temporary file removed at once)."""
    data = chain_pem + b"\n" + key_pem
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("xds-serving-cert", getattr(os, "MFD_CLOEXEC", 0))
        try:
            os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as directory:  # pragma: no cover - non-Linux
        path = Path(directory) / "cert.pem"
        path.touch(mode=0o600)
        path.write_bytes(data)
        context.load_cert_chain(path)


def server_tls_context(issued: IssuedCertificate) -> ssl.SSLContext:
    """A TLS >= 1.2 server context serving `issued` (no client certificates asked)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if issued.key_pem is None:
        raise ValueError("a serving context needs the certificate's key")
    load_chain(context, issued.chain_pem, issued.key_pem)
    return context
