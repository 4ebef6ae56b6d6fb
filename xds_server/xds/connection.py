"""One open xDS stream as the server drives it: protocol state plus scheduling and who the
proxy proved to be."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

import grpc

from envoy.config.core.v3 import base_pb2

from ..bearer import Metadata
from ..model.identity import Identity, Proof, ProxyClaim, VerifiedProxy
from .stream import StreamState
from .tls import relayed

if TYPE_CHECKING:
    from .tls import PeerCertificate


def peer_is_loopback(peer: str) -> bool:
    """gRPC peer strings: `ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000` (or `%5B::1%5D`),
    `unix:/path`."""
    scheme = peer.partition(":")[0]
    if relayed(peer) is not None:
        return False  # the TLS front's relay (xds/tls_front.py): the client is elsewhere
    if scheme in ("unix", "unix-abstract"):
        return True  # only local processes reach a unix socket
    ip = peer_ip(peer)
    return ip is not None and ipaddress.ip_address(ip).is_loopback


def peer_ip(peer: str) -> str | None:
    """The IP address of a gRPC peer string, or None (a Unix socket, an unknown scheme)."""
    scheme, _, rest = peer.partition(":")
    if scheme not in ("ipv4", "ipv6"):
        return None
    host = rest.rsplit(":", 1)[0].replace("%5B", "[").replace("%5D", "]").strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def proxy_label(node: base_pb2.Node | None) -> str:
    return node.id if node is not None and node.id else "<unknown>"


class Connection:
    """One open xDS stream: protocol state plus what the server needs to drive it."""

    def __init__(self, state: StreamState, peer: str, method: str) -> None:
        self.state = state
        self.peer = peer
        self.method = method
        self.wake = asyncio.Event()
        self.closing = False
        self.holds_slot = False  # a push slot is held for the write in flight
        self.write_started = 0.0
        self.opened_at = 0.0  # loop time the stream was admitted
        self.first_config_timer: asyncio.TimerHandle | None = None
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.metadata: Metadata = ()  # the call's invocation metadata (credentials)
        # Who the proxy is, once admitted: its node's claim and what its credential proved.
        # The same object the view provider scoped it with and SDS issues for.
        self.verified: VerifiedProxy | None = None
        self.transport = "plaintext"  # or "tls" (the server reads the call's auth context)
        # The client certificate grpc verified in the TLS handshake (mutual TLS), if any.
        self.peer_certificate: PeerCertificate | None = None

    @property
    def in_clear_off_host(self) -> bool:
        """Plaintext from another host: nothing secret (tokens aside, which were already
        sent) may be sent back on it."""
        return self.transport != "tls" and not peer_is_loopback(self.peer)

    @property
    def proxy_id(self) -> str:
        return proxy_label(self.state.node)

    @property
    def claim(self) -> ProxyClaim | None:
        return self.verified.claim if self.verified is not None else None

    @property
    def proof(self) -> Proof | None:
        """What authentication proved, if anything."""
        return self.verified.proof if self.verified is not None else None

    @property
    def identity(self) -> Identity | None:
        """The proven workload identity, or None."""
        proof = self.proof
        return proof.identity if proof is not None else None

    def __hash__(self) -> int:
        return self.state.id

    def __eq__(self, other: object) -> bool:
        return self is other
