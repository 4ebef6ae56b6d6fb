"""`xds-server agent`: keeps an X.509-SVID on disk for a workload that holds its own key.

The files are the ones Envoy's file-based SDS and the stock grpcio xDS client's
`file_watcher` certificate provider read (and most TLS servers too):

    cert.pem  leaf + intermediates      (0644)
    key.pem   the private key, PKCS#8    (0600)
    ca.pem    the trust bundle (roots)   (0644)

plus the two SDS resource files Envoy's bootstrap points at (`xds-server bootstrap --tls`).
Each renewal generates a fresh key locally (it never leaves the machine), sends a CSR to the
server, checks that the answer certifies that key and chains to the bundle, and switches all
three files at once (certdir.py: a new generation directory, then one symlink rename), so no
reader ever pairs a new key with an old certificate.

Renewal at half-life with jitter (rotation.renewal_time); on failure, retries with
exponential backoff (capped, jittered) and keeps the old files while they are valid.

The transport is a `CsrSigner`; `GrpcCsrSigner` calls the server's
`/xds_server.ca.v1.CertificateService/Sign` with `authorization: Bearer <token>`, the token
read from its file on every call (the kubelet replaces projected tokens before they expire).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc import aio

from .authority import (
    Clock,
    KeyAlgorithm,
    generate_private_key,
    private_key_pem,
    signature_hash,
    utcnow,
)
from .certdir import CA_FILE, CERT_FILE, KEY_FILE, write_generation, write_sds_files
from .files import ensure_private_dir
from .rotation import DEFAULT_JITTER, renewal_time
from .service import SIGN_METHOD, decode_json, encode_json

log = logging.getLogger("xds_server.ca.agent")

__all__ = ["CA_FILE", "CERT_FILE", "KEY_FILE", "CertAgent", "GrpcCsrSigner", "SignError",
           "SignedCertificate"]


class SignError(Exception):
    """The signer refused or failed (message safe to log; says which)."""


@dataclass(frozen=True)
class SignedCertificate:
    chain_pem: bytes  # leaf + intermediates
    trust_bundle_pem: bytes
    spiffe_id: str
    serial: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime

    @classmethod
    def from_json(cls, message: dict) -> SignedCertificate:
        try:
            return cls(
                chain_pem=message["certificate_chain"].encode(),
                trust_bundle_pem=message["trust_bundle"].encode(),
                spiffe_id=message["spiffe_id"],
                serial=message["serial"],
                not_before=datetime.fromisoformat(message["not_before"]),
                not_after=datetime.fromisoformat(message["not_after"]),
                issued_at=datetime.fromisoformat(message["issued_at"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise SignError(f"malformed response from the signer: {err!r}") from None


class CsrSigner(Protocol):
    async def sign(self, csr_pem: bytes, ttl: timedelta | None) -> SignedCertificate: ...

    async def close(self) -> None: ...


class GrpcCsrSigner:
    """Calls `/xds_server.ca.v1.CertificateService/Sign` on the xDS server.

    The token is read on every call from `token_file` when given (projected service-account
    tokens rotate), else `token`. `credentials`: TLS channel credentials; None means
    plaintext, for loopback only (the token travels in the clear otherwise). `roots`: instead
    of `credentials`, a function returning the PEM roots that verify the server, asked before
    every call; the channel is rebuilt when they change (the agent adds its own trust bundle,
    so a root rotation's new server certificate is trusted).
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        token_file: str | Path | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        roots: Callable[[], bytes] | None = None,
        options: list[tuple[str, object]] | None = None,
        timeout: float = 10.0,
    ) -> None:
        if not token and not token_file:
            raise ValueError("a bearer token (or a token file) is required")
        self.target = target
        self._token = token
        self._token_file = Path(token_file) if token_file else None
        self.timeout = timeout
        self._options = options
        self._roots = roots
        self._roots_pem: bytes | None = None
        self._channel = self._open(credentials)

    def _open(self, credentials: grpc.ChannelCredentials | None) -> aio.Channel:
        if credentials is None and self._roots is not None:
            self._roots_pem = self._roots()
            credentials = grpc.ssl_channel_credentials(root_certificates=self._roots_pem)
        if credentials is None:
            channel = aio.insecure_channel(self.target, options=self._options)
        else:
            channel = aio.secure_channel(self.target, credentials, options=self._options)
        self._call = channel.unary_unary(
            SIGN_METHOD, request_serializer=encode_json, response_deserializer=decode_json,
        )
        return channel

    async def _follow_roots(self) -> None:
        if self._roots is None or self._roots() == self._roots_pem:
            return
        old, self._channel = self._channel, self._open(None)
        await old.close()

    def _bearer(self) -> str:
        if self._token_file is not None:
            try:
                return self._token_file.read_text().strip()
            except OSError as err:
                raise SignError(f"cannot read the token file {self._token_file}: {err.strerror}") from None
        assert self._token
        return self._token

    async def sign(self, csr_pem: bytes, ttl: timedelta | None) -> SignedCertificate:
        request: dict[str, object] = {"csr": csr_pem.decode()}
        await self._follow_roots()
        if ttl is not None:
            request["ttl_seconds"] = ttl.total_seconds()
        try:
            response = await self._call(
                request, timeout=self.timeout,
                metadata=(("authorization", f"Bearer {self._bearer()}"),),
            )
        except aio.AioRpcError as err:
            raise SignError(f"{err.code().name}: {err.details()}") from None
        return SignedCertificate.from_json(response)

    async def close(self) -> None:
        await self._channel.close()


class CertificateRenewalSigner:
    """Renews over the server's mutual-TLS port with the certificate the agent holds (the
    CSR service takes the verified client certificate as the identity: no token), and falls
    back to `fallback` (the token signer) when there is no valid certificate yet or the
    server refuses it (a revoked identity, a new root the server does not trust).

    The key and certificate are read from `cert_dir` at each renewal, so the channel always
    presents the current pair."""

    def __init__(self, target: str, cert_dir: Path, roots: Callable[[], bytes],
                 fallback: CsrSigner, *, options: list[tuple[str, object]] | None = None,
                 timeout: float = 10.0, clock: Clock = utcnow) -> None:
        self.target = target
        self.cert_dir = Path(cert_dir)
        self.roots = roots
        self.fallback = fallback
        self.options = options
        self.timeout = timeout
        self.clock = clock
        self.by_certificate = 0  # renewals done with the certificate
        self.fallbacks = 0

    def _current(self) -> tuple[bytes, bytes] | None:
        try:
            chain = (self.cert_dir / CERT_FILE).read_bytes()
            key = (self.cert_dir / KEY_FILE).read_bytes()
            leaf = x509.load_pem_x509_certificates(chain)[0]
        except (OSError, ValueError, IndexError):
            return None
        now = self.clock()
        if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
            return None
        return chain, key

    async def sign(self, csr_pem: bytes, ttl: timedelta | None) -> SignedCertificate:
        current = self._current()
        if current is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.roots(), private_key=current[1], certificate_chain=current[0])
            request: dict[str, object] = {"csr": csr_pem.decode()}
            if ttl is not None:
                request["ttl_seconds"] = ttl.total_seconds()
            try:
                async with aio.secure_channel(self.target, credentials, options=self.options) as channel:
                    call = channel.unary_unary(SIGN_METHOD, request_serializer=encode_json,
                                               response_deserializer=decode_json)
                    response = await call(request, timeout=self.timeout)
                self.by_certificate += 1
                return SignedCertificate.from_json(response)
            except aio.AioRpcError as err:
                log.warning("renewal with the current certificate failed, using the token: %s: %s",
                            err.code().name, err.details())
        self.fallbacks += 1
        return await self.fallback.sign(csr_pem, ttl)

    async def close(self) -> None:
        await self.fallback.close()


def build_csr(key) -> bytes:
    """A CSR that proves possession of `key`. It names nothing: the server derives the
    identity from the caller's token and would ignore any name here."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, signature_hash(key)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def check_response(signed: SignedCertificate, key) -> None:
    """The certificate certifies our key and chains to the trust bundle."""
    try:
        chain = x509.load_pem_x509_certificates(signed.chain_pem)
        roots = x509.load_pem_x509_certificates(signed.trust_bundle_pem)
    except ValueError:
        raise SignError("the signer returned unparsable certificates") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(serialization.Encoding.DER, public) != \
            key.public_key().public_bytes(serialization.Encoding.DER, public):
        raise SignError("the returned certificate does not certify our key")
    top = chain[-1]
    for lower, upper in itertools.pairwise(chain):
        try:
            lower.verify_directly_issued_by(upper)
        except Exception:
            raise SignError("the returned chain is not in order") from None
    for root in roots:
        try:
            top.verify_directly_issued_by(root)
            return
        except Exception:
            continue
    raise SignError("the returned chain does not lead to any root of the trust bundle")


class CertAgent:
    """Obtains and renews a certificate into `out_dir`."""

    def __init__(
        self,
        signer: CsrSigner,
        out_dir: str | Path,
        *,
        ttl: timedelta | None = None,
        key_algorithm: KeyAlgorithm | str = KeyAlgorithm.EC_P256,
        jitter: float = DEFAULT_JITTER,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        clock: Clock = utcnow,
        envoy_sds: bool = True,
    ) -> None:
        self.signer = signer
        self.envoy_sds = envoy_sds  # also write the SDS resource files Envoy reads
        self.out_dir = Path(out_dir)
        self.ttl = ttl
        self.key_algorithm = KeyAlgorithm(key_algorithm)
        self.jitter = jitter
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.clock = clock
        self.current: SignedCertificate | None = None
        self.next_renewal: datetime | None = None
        self.renewals = 0

    @property
    def cert_path(self) -> Path:
        return self.out_dir / CERT_FILE

    @property
    def key_path(self) -> Path:
        return self.out_dir / KEY_FILE

    @property
    def ca_path(self) -> Path:
        return self.out_dir / CA_FILE

    def ready(self) -> bool:
        """Holds a certificate that is valid now (what the readiness endpoint reports)."""
        current = self.current
        return current is not None and current.not_before <= self.clock() < current.not_after

    async def renew(self) -> SignedCertificate:
        """One round: new key, CSR, signed certificate, files written."""
        if self.key_algorithm is KeyAlgorithm.RSA_2048:
            key = await asyncio.to_thread(generate_private_key, self.key_algorithm)
        else:
            key = generate_private_key(self.key_algorithm)
        signed = await self.signer.sign(build_csr(key), self.ttl)
        check_response(signed, key)
        ensure_private_dir(self.out_dir)
        write_generation(self.out_dir, signed.chain_pem, private_key_pem(key),
                         signed.trust_bundle_pem)
        if self.envoy_sds:
            write_sds_files(self.out_dir)
        self.current = signed
        self.renewals += 1
        self.next_renewal = renewal_time(signed.issued_at, signed.not_after, jitter=self.jitter)
        log.info("certificate written", extra={
            "spiffe_id": signed.spiffe_id, "serial": signed.serial,
            "not_after": signed.not_after.isoformat(), "next_renewal": self.next_renewal.isoformat(),
            "out_dir": str(self.out_dir),
        })
        return signed

    async def run(self, stop_event: asyncio.Event | None = None, *, once: bool = False) -> None:
        """Renew until `stop_event` is set. With `once`, return after the first success
        (raising if it fails)."""
        stop_event = stop_event or asyncio.Event()
        delay = self.retry_initial
        while not stop_event.is_set():
            try:
                await self.renew()
            except Exception as err:
                if once:
                    raise
                wait = min(delay, self.retry_max) * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.retry_max)
                expires = self.current.not_after.isoformat() if self.current else None
                log.error("certificate renewal failed, retrying in %.1fs: %s", wait, err,
                          extra={"current_not_after": expires})
            else:
                if once:
                    return
                delay = self.retry_initial
                assert self.next_renewal is not None
                wait = max((self.next_renewal - self.clock()).total_seconds(), 0.0)
            try:
                await asyncio.wait_for(stop_event.wait(), timeout=wait)
            except TimeoutError:
                pass
