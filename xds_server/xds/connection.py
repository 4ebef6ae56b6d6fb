"""One open xDS stream as the server drives it: protocol state plus scheduling and who the
proxy proved to be."""

from __future__ import annotations

import asyncio

import grpc

from envoy.config.core.v3 import base_pb2

from ..bearer import Metadata
from ..model.identity import Identity, Proof, ProxyClaim, VerifiedProxy
from .stream import StreamState


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
