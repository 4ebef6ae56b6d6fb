"""The TLS front of the mutual-TLS xDS port: handshakes in Python, so refusals are counted.

grpcio (1.85) refuses a client certificate of another CA, or an expired one, inside grpc
core and tells Python nothing (an INFO log line of core). The front accepts on the
mutual-TLS address in the server's event loop, performs the handshake with `ssl` (an
SSLContext built from the current certificate and trust bundle of `TlsCredentials`, rebuilt
when their version changes: renewals and root rotations apply to new connections, open ones
keep their session; CERT_REQUIRED, TLS 1.2+, ALPN h2), counts each refusal by reason, and
relays the bytes to the same gRPC server on an internal loopback plaintext listener.

The verified certificate crosses by the relay socket's local address (`tls.RELAYED`),
registered before the relay's first byte and removed at close. The relay binds its port
explicitly, so while it is registered no other socket on this host can connect from it; a
caller of the internal port from anywhere else is plaintext loopback, as on --xds-address.

The relay is two protocols writing into each other's transport (no task or copy per chunk
beyond asyncio's), with flow control: when one side's write buffer is full, the other side's
reading pauses until it drains. An end of stream is passed on as a half-close where TCP allows,
and closes the TLS side otherwise (TLS has no half-close in asyncio).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import ssl
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .tls import RELAYED, PeerCertificate, TlsCredentials

log = logging.getLogger("xds_server.xds")

__all__ = ["REFUSAL_REASONS", "TlsFront"]

HANDSHAKE_TIMEOUT = 10.0  # a client that never finishes its handshake is dropped (counted)
# OpenSSL verify codes (X509_V_ERR_*) to the reasons counted.
_VERIFY_REASONS = {
    9: "not_yet_valid", 10: "expired",
    2: "unknown_ca", 18: "unknown_ca", 19: "unknown_ca", 20: "unknown_ca", 21: "unknown_ca",
    23: "revoked",
}
REFUSAL_REASONS = ("unknown_ca", "expired", "not_yet_valid", "bad_certificate", "no_certificate",
                   "no_spiffe_id", "timeout", "protocol")


def _reason(err: BaseException) -> str:
    if isinstance(err, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(err.verify_code, "bad_certificate")
    if isinstance(err, (TimeoutError, asyncio.TimeoutError)):
        return "timeout"
    if isinstance(err, ssl.SSLError) and err.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "no_certificate"
    return "protocol"  # garbage, a client's alert, a reset mid-handshake


def _memory_file(name: str, data: bytes) -> int:
    """A file descriptor of an anonymous in-memory file: `load_cert_chain` reads paths only,
    and the serving key must never reach a disk."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def build_context(chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    chain, key = _memory_file("xds-tls-chain", chain_pem), _memory_file("xds-tls-key", key_pem)
    try:
        context.load_cert_chain(f"/proc/self/fd/{chain}", f"/proc/self/fd/{key}")
    finally:
        os.close(chain)
        os.close(key)
    context.load_verify_locations(cadata=roots_pem.decode())
    return context


def _certificate(der: bytes | None) -> PeerCertificate | None:
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(sans.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = ()
    return PeerCertificate(uris, cert.public_bytes(Encoding.PEM))


class TlsFront:
    """Accepts on `address`, relays verified connections to `internal` (HOST, PORT)."""

    def __init__(self, credentials: TlsCredentials, internal: tuple[str, int], *,
                 port_label: str = "mtls", handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.credentials = credentials
        self.internal = internal
        self.port_label = port_label
        self.handshake_timeout = handshake_timeout
        self.refusals: collections.Counter[str] = collections.Counter()
        self.accepted = 0
        self.port = 0
        self._context: tuple[str, ssl.SSLContext] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[asyncio.Task[None]] = set()

    def context(self) -> ssl.SSLContext:
        version, chain, key, roots = self.credentials.material()
        if self._context is None or self._context[0] != version:
            self._context = (version, build_context(chain, key, roots))
        return self._context[1]

    async def start(self, host: str, port: int) -> int:
        self.context()  # a bad certificate fails the start, not the first client
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accepting(self), host, port,
                                                reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._relays):
            task.cancel()
        if self._relays:
            await asyncio.gather(*self._relays, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _refuse(self, reason: str, transport: asyncio.BaseTransport, detail: object) -> None:
        self.refusals[reason] += 1
        log.info("xDS TLS handshake refused", extra={
            "reason": reason, "peer": str(transport.get_extra_info("peername")),
            "detail": str(detail)})
        _abort(transport)

    def accepted_connection(self, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self._accept(transport))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _accept(self, transport: asyncio.Transport) -> None:
        try:
            await self._serve(transport)
        except asyncio.CancelledError:
            _abort(transport)
        except Exception as err:  # never a traceback for what a client sent
            log.debug("xDS TLS relay ended: %r", err)
            _abort(transport)

    async def _serve(self, raw: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        client = _Side()
        try:
            transport = await asyncio.wait_for(
                loop.start_tls(raw, client, self.context(), server_side=True,
                               ssl_handshake_timeout=self.handshake_timeout * 2),
                self.handshake_timeout)
        except (OSError, TimeoutError, EOFError) as err:
            self._refuse(_reason(err), raw, err)
            return
        if transport is None:  # closed during the handshake
            self._refuse("protocol", raw, "closed")
            return
        client.connection_made(transport)  # start_tls does not call it
        try:
            cert = _certificate(transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
        except ValueError as err:
            self._refuse("bad_certificate", transport, err)
            return
        if cert is None:
            self._refuse("no_certificate", transport, "none sent")
            return
        if not cert.spiffe_ids:
            self._refuse("no_spiffe_id", transport, cert.uris)
            return
        self.accepted += 1
        host, port = self.internal
        server = _Side()
        key: tuple[str, int] | None = None
        try:
            relay, _ = await loop.create_connection(lambda: server, host, port,
                                                    local_addr=(host, 0))
            local = relay.get_extra_info("sockname")
            key = (local[0], local[1])
            RELAYED[key] = cert  # before the first byte: the stream's first call looks it up
            client.pair(server)
            await asyncio.gather(client.closed, server.closed)
        finally:
            if key is not None:
                RELAYED.pop(key, None)
            for side in (client, server):
                if side.transport is not None:
                    side.transport.abort()


class _Side(asyncio.Protocol):
    """One end of the relay: what it receives is written to the other end. Flow control:
    when the other end's write buffer is full (`pause_writing` on it), this end stops
    reading until it drains. An end of stream is passed on as a half-close where the other
    transport can (plain TCP), else closes it (TLS has no half-close); a closed end closes
    the other after its buffered bytes are written (`abort` after an error)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._early: list[bytes] = []  # received before the other end existed

    def pair(self, other: _Side) -> None:
        self.other, other.other = other, self
        assert self.transport is not None and other.transport is not None
        for data in self._early:
            other.transport.write(data)
        self._early.clear()
        if self.closed.done():
            other.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            self._early.append(data)
        else:
            other.transport.write(data)

    def eof_received(self) -> bool:
        other = self.other
        if other is None or other.transport is None:
            return False
        if other.transport.can_write_eof():
            other.transport.write_eof()
            return self.transport is not None and self.transport.can_write_eof()
        other.transport.close()
        return False

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        other = self.other
        if other is not None and other.transport is not None:
            if exc is None:
                other.transport.close()
            else:
                other.transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)


class _Accepting(asyncio.Protocol):
    """A new TCP connection: nothing is read until the TLS layer takes the transport (a
    ClientHello read before would be lost to it)."""

    def __init__(self, front: TlsFront) -> None:
        self.front = front

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        self.front.accepted_connection(transport)


def _abort(transport: asyncio.BaseTransport) -> None:
    abort = getattr(transport, "abort", None)
    if abort is not None:
        abort()
    else:
        transport.close()
