"""xDS over TLS: the server credentials of the TLS listeners and what a handshake proved.

The certificate and the trust bundle come from outside (the mesh CA, wired in security.py):
`TlsCredentials.update()` replaces them, and every grpc credentials object made by
`server_credentials()` picks the new pair up for its next handshake through grpc's dynamic
certificate configuration (a fetch callback asked at each handshake). Open connections keep
the session they negotiated: a swap drops no stream.

grpcio (1.85) offers two client-certificate modes on a server: not asked at all, or asked,
required and verified against the configured roots. There is no "verify if given"
(OpenSSL's VERIFY_PEER without FAIL_IF_NO_PEER_CERT) in its Python API. So the two ways a
client authenticates over TLS are two listeners sharing one certificate:

- mutual TLS (`--xds-tls-address`, 15012): a client certificate is required and verified
  against the current trust bundle (both roots during a root rotation); a certificate of
  another CA, or an expired one, fails the handshake. The stream's identity is the
  certificate's SPIFFE ID (`peer_certificate`).
- server-authenticated TLS (`--xds-tls-token-address`): no client certificate; the client
  proves who it is with a bearer token, as on the plaintext port (first contact: an agent
  obtaining its first SVID through the CSR service, or an Envoy with a token).
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from cryptography import x509

__all__ = ["PeerCertificate", "TlsCredentials", "peer_certificate", "relayed", "transport_of"]

# Connections the TLS front (xds/tls_front.py) relays to the internal plaintext listener:
# the relay socket's local (host, port), as the gRPC peer of the internal side, to the
# certificate the front verified. Registered before the relay's first byte, removed at
# close; the relay binds its port explicitly, so no other socket on the host holds it then.
# A caller on the internal port that is not listed here proves nothing (plaintext loopback).
RELAYED: dict[tuple[str, int], PeerCertificate] = {}


def _relay_key(peer: str | None) -> tuple[str, int] | None:
    """"ipv4:127.0.0.1:5555" -> ("127.0.0.1", 5555); None for anything else."""
    if not peer or not peer.startswith(("ipv4:", "ipv6:")):
        return None
    host, _, port = peer.split(":", 1)[1].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def relayed(peer: str | None) -> PeerCertificate | None:
    """The certificate verified by the TLS front for a call whose gRPC peer is one of its
    relay sockets, else None."""
    key = _relay_key(peer)
    return None if key is None else RELAYED.get(key)


@dataclass(frozen=True)
class PeerCertificate:
    """The client certificate grpc verified during the handshake."""

    uris: tuple[str, ...]  # URI SANs (an X.509-SVID has exactly one: the SPIFFE ID)
    pem: bytes = b""

    @property
    def spiffe_ids(self) -> tuple[str, ...]:
        return tuple(u for u in self.uris if u.startswith("spiffe://"))

    @functools.cached_property
    def not_before(self) -> datetime | None:
        """The leaf's NotBefore (None when the PEM does not parse: grpc verified it, so
        only a test's hand-made value)."""
        try:
            return x509.load_pem_x509_certificates(self.pem)[0].not_valid_before_utc
        except (ValueError, IndexError):
            return None


def _values(auth: Mapping[str, Iterable[bytes]], key: str) -> tuple[str, ...]:
    return tuple(v.decode(errors="replace") for v in auth.get(key, ()) or ())


def peer_certificate(auth: Mapping[str, Iterable[bytes]] | None,
                     peer: str | None = None) -> PeerCertificate | None:
    """The verified client certificate of a call, from `context.auth_context()` (grpc's own
    TLS) or, given the call's `context.peer()`, from the TLS front's relay; None when the
    connection is not TLS or the client sent none. grpc puts the peer's SANs in
    `x509_subject_alternative_name` (URIs among them) only after verifying the chain."""
    if not auth or _values(auth, "transport_security_type") != ("ssl",):
        return relayed(peer)
    pem = b"".join(auth.get("x509_pem_cert", ()) or ())
    if not pem:
        return None
    sans = _values(auth, "x509_subject_alternative_name")
    uris = tuple(dict.fromkeys(s for s in sans if "://" in s))
    return PeerCertificate(uris, pem)


def transport_of(auth: Mapping[str, Iterable[bytes]] | None, peer: str | None = None) -> str:
    """"tls" when the call came over TLS (grpc's, or the TLS front's relay given the call's
    peer), else "plaintext" (the peer address then says whether it stayed on this host)."""
    if auth and _values(auth, "transport_security_type") == ("ssl",):
        return "tls"
    return "tls" if relayed(peer) is not None else "plaintext"


@dataclass(frozen=True)
class _Material:
    chain_pem: bytes
    key_pem: bytes
    roots_pem: bytes

    @property
    def version(self) -> str:
        digest = hashlib.sha256(self.chain_pem + b"\0" + self.roots_pem)
        return digest.hexdigest()[:16]


class TlsCredentials:
    """The serving certificate, its key and the client-certificate roots of the TLS
    listeners, replaceable while they serve. Thread-safe: grpc calls the fetch callbacks
    from its own threads."""

    def __init__(self, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> None:
        self._lock = threading.Lock()
        self._material = _Material(chain_pem, key_pem, roots_pem)
        self.swaps = 0  # certificate or roots replaced after the first

    @property
    def version(self) -> str:
        return self._material.version

    def material(self) -> tuple[str, bytes, bytes, bytes]:
        """(version, chain, key, roots) of now, read at once (the TLS front builds its
        context from them)."""
        m = self._material
        return m.version, m.chain_pem, m.key_pem, m.roots_pem

    @property
    def chain_pem(self) -> bytes:
        return self._material.chain_pem

    @property
    def roots_pem(self) -> bytes:
        return self._material.roots_pem

    def update(self, *, chain_pem: bytes | None = None, key_pem: bytes | None = None,
               roots_pem: bytes | None = None) -> bool:
        """Replace the certificate (with its key) and/or the roots; new handshakes use them.
        Returns whether anything changed."""
        with self._lock:
            old = self._material
            new = _Material(chain_pem if chain_pem is not None else old.chain_pem,
                            key_pem if key_pem is not None else old.key_pem,
                            roots_pem if roots_pem is not None else old.roots_pem)
            if new == old:
                return False
            self._material = new
            self.swaps += 1
            return True

    @staticmethod
    def _configuration(material: _Material) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(material.key_pem, material.chain_pem)], root_certificates=material.roots_pem)

    def server_credentials(self, *, client_certificates: bool) -> grpc.ServerCredentials:
        """Credentials for one listener: `client_certificates` True asks for, requires and
        verifies a client certificate (mutual TLS); False asks for none."""
        material = self._material
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(material), self._fetcher(material.version),
            require_client_authentication=client_certificates)

    def _fetcher(self, initial: str) -> Callable[[], Any]:
        served = [initial]

        def fetch() -> Any:
            material = self._material
            if material.version == served[0]:
                return None  # grpc: keep the configuration it has
            served[0] = material.version
            return self._configuration(material)

        return fetch
