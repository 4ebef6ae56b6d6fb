"""Per-stream protocol state shared by both protocol variants: what one xDS stream asked for,
was sent, and acknowledged.

The protocol's rule book (see CONFORMANCE.md; rule numbers are cited inline) is split by
room: this module holds the state and the rules both variants share (node, type resolution,
ACK/NACK settling, make-before-break ordering, nonces, re-warming); `sotw.py` and `delta.py`
hold what differs (how a request changes subscriptions, how a response is built). No gRPC
here: the server feeds requests in and asks for the next response. Responses are built from
the cache's pre-encoded entries, so a push to a stream costs a byte join plus a small header.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .cache import View
from .resource import Resource
from .types import CLUSTER, ENDPOINT, FULL_STATE_TYPES, LISTENER, ROUTE, SECRET, order_key

WILDCARD = "*"
# A change touching more names than this makes a stream recompute everything of the type
# instead of tracking each name (cheaper for bulk reloads).
MAX_TRACKED_CHANGES = 256

# Break order (rule 6): a resource is removed only after what refers to it. Listeners refer to
# route configurations, routes to clusters, clusters to their endpoints, listeners and clusters
# to secrets. (The reverse of the push order would remove routes before the listeners using
# them and endpoints before their clusters.) Unknown types go last.
REMOVAL_ORDER: tuple[str, ...] = (LISTENER, ROUTE, CLUSTER, ENDPOINT, SECRET)


def _removal_rank(type_url: str) -> int:
    try:
        return REMOVAL_ORDER.index(type_url)
    except ValueError:
        return len(REMOVAL_ORDER)


class Variant(Enum):
    SOTW = "sotw"
    DELTA = "delta"


class ProtocolError(Exception):
    """A request that breaks the protocol; the stream is closed with INVALID_ARGUMENT.
    `limit` names the bound it broke, if it broke one (counted per bound)."""

    def __init__(self, message: str, limit: str = "") -> None:
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Nack:
    version: str  # the version the client rejected
    nonce: str
    message: str
    at: float  # unix time


@dataclass(slots=True)
class TypeState:
    type_url: str
    full_state: bool
    wildcard: bool = False
    legacy_wildcard: bool = False  # wildcard because the first request named nothing
    names: set[str] = field(default_factory=set)  # explicit subscriptions
    seen_request: bool = False
    # What the client has been sent (or told us it has): name -> version. (SotW Listener and
    # Cluster keep `last_full` instead: the resources last sent, to re-send a deferred removal.)
    known: dict[str, str] = field(default_factory=dict)
    last_full: dict[str, Resource] = field(default_factory=dict)
    full_version: str | None = None
    latest_nonce: str | None = None
    pending_nonce: str | None = None  # the one response that may be outstanding (rule 5)
    pending_version: str = ""
    sent_version: str = ""
    acked_version: str = ""
    nack: Nack | None = None
    # The resources the responses since the last ACK added or changed (cleared by an ACK):
    # what is in flight, or what a NACK may have rejected (CSDS reports them per resource).
    last_changes: Sequence[Resource] = ()
    dirty: bool = False  # something this stream may need changed
    # Names that may have changed since the last response was computed; None means "any".
    # Keeps a push proportional to the change, not to the subscription.
    pending: set[str] | None = None
    request_star: bool = False  # the last SotW request named "*" (besides `names`)
    removal_pending: bool = False  # a removal waits for make-before-break (rule 6)
    # Make-before-break bookkeeping, in passes of `next_push` (a pass reads one cache state):
    # the pass that first deferred a removal of this type, the pass whose response is
    # outstanding, and the latest pass whose outcome the client holds (it ACKed that
    # response, or the pass had nothing to send). A removal is due once every referring type
    # holds a pass at or after the removal's.
    removal_since: int = 0
    inflight_pass: int = 0
    applied_pass: int = 0
    must_reply: bool = False  # answer even an empty set (rule 12)
    # SotW Listener/Cluster: the version_info of a new stream's first wildcard request (what a
    # reconnecting client holds), compared once with the complete set before it is sent.
    resume_version: str = ""
    sent_at: float = 0.0
    acked_at: float = 0.0

    def status(self) -> str:
        """The operator's word for this type, as `istioctl proxy-status` uses it."""
        if self.sent_version == "":
            return "NOT SENT"
        if self.nack is not None and self.pending_nonce is None and self.nack.version == self.sent_version:
            return "NACKED"
        if self.pending_nonce is not None or self.acked_version != self.sent_version:
            return "STALE"
        return "SYNCED"


@dataclass(slots=True)
class Push:
    """A response ready to write, with what to record once it is on the wire."""

    type_url: str
    data: bytes
    nonce: str
    version: str
    resources: int
    removed: int


@dataclass(slots=True)
class Ack:
    """What a request said about the previous response of its type."""

    type_url: str
    nonce: str
    nack: Nack | None


# A request as the variants receive it (SotW or delta).
Request: TypeAlias = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest


@dataclass(slots=True)
class RequestResult:
    """What one request did: the type's state (None when it was ignored as stale), the ACK or
    NACK it carried, and the names it subscribed to and dropped."""

    state: TypeState | None
    ack: Ack | None
    added: set[str]
    dropped: set[str]


class StreamState(ABC):
    """The protocol state of one stream (ADS or a per-type service). `sotw.SotwStream` and
    `delta.DeltaStream` add their variant's requests and responses; `new_stream` picks one."""

    variant: Variant

    def __init__(
        self,
        stream_id: int,
        *,
        fixed_type: str | None = None,
        control_plane: str = "xds-server",
        max_names: int = 100_000,
        max_stream_names: int = 100_000,
    ) -> None:
        self.id = stream_id
        self.fixed_type = fixed_type
        self.node: base_pb2.Node | None = None
        self.view: View | None = None
        self.types: dict[str, TypeState] = {}
        self._ordered: list[TypeState] = []
        self.connected_at = time.time()
        self._nonce = 0
        self._pass = 0  # passes of next_push (see TypeState.removal_since)
        # Encoded once per stream and appended to every response (protobuf merges fields).
        self._plane = self._encode_plane(base_pb2.ControlPlane(identifier=control_plane))
        self._max_names = max_names
        self._max_stream_names = max_stream_names

    @staticmethod
    @abstractmethod
    def _encode_plane(plane: base_pb2.ControlPlane) -> bytes:
        """The control_plane field as this variant's response encodes it."""

    @abstractmethod
    def on_request(self, request: Request) -> RequestResult:
        """Apply one request of this variant."""

    @abstractmethod
    def _push(self, state: TypeState, allow_removals: bool) -> Push | None:
        """This variant's next response for one type, or None."""

    # Requests ----------------------------------------------------------------------------

    def _type_state(self, type_url: str) -> TypeState:
        state = self.types.get(type_url)
        if state is None:
            state = TypeState(type_url, full_state=type_url in FULL_STATE_TYPES)
            self.types[type_url] = state
            self._ordered = sorted(self.types.values(), key=lambda s: order_key(s.type_url))
        return state

    def _resolve_type(self, type_url: str) -> str:
        if self.fixed_type is not None:
            if type_url and type_url != self.fixed_type:
                raise ProtocolError(f"type_url {type_url!r} on the {self.fixed_type} service")
            return self.fixed_type  # per-type services fill it in (rule 2)
        if not type_url:
            raise ProtocolError("an ADS request must carry type_url")
        return type_url

    def _take_node(self, node: base_pb2.Node, has_node: bool) -> None:
        # Rule 1: the node comes with the first request and is kept for the whole stream.
        if self.node is None:
            if not has_node:
                raise ProtocolError("the first request of a stream must carry the node")
            self.node = node

    def _check_names(self, count: int) -> None:
        if count > self._max_names:
            raise ProtocolError(f"{count} resource names in one request (limit {self._max_names})",
                                "names-per-request")

    def _check_subscriptions(self, state: TypeState, added: int, dropped: int) -> None:
        """Names subscribed on the whole stream, with this change: bounded, so one stream
        cannot grow the server's memory by subscribing a little more with every request."""
        total = sum(len(t.names) for t in self.types.values()) + added - dropped
        if total > self._max_stream_names:
            raise ProtocolError(
                f"{total} resource names subscribed on one stream (limit {self._max_stream_names})",
                "names-per-stream",
            )

    def _settle(self, state: TypeState, nonce: str, version: str, request: Request) -> Ack | None:
        """Record the ACK or NACK of the outstanding response, if this request answers it."""
        if not nonce or nonce != state.pending_nonce:
            return None
        state.pending_nonce = None
        if request.HasField("error_detail"):
            # Rule 4: record the NACK; `known` already holds the rejected content, so the same
            # content is not sent again; only a change of config produces a new push.
            message = redact_key_material(request.error_detail.message)
            nack = Nack(state.pending_version, nonce, message, time.time())
            state.nack = nack
            return Ack(state.type_url, nonce, nack)
        state.acked_version = state.pending_version
        state.applied_pass = state.inflight_pass
        state.acked_at = time.time()
        state.nack = None
        state.last_changes = ()
        return Ack(state.type_url, nonce, None)

    # Responses -----------------------------------------------------------------------------

    def ordered_types(self) -> list[TypeState]:
        return self._ordered

    def settled(self) -> bool:
        """Nothing this stream should be sent is waiting, and nothing sent is unanswered."""
        return all(t.pending_nonce is None and not t.dirty for t in self.types.values())

    def wants_push(self) -> bool:
        return any(
            (s.dirty or s.removal_pending) and s.pending_nonce is None for s in self.types.values()
        )

    def next_push(self) -> Push | None:
        """The next response to write, in make-before-break order, or None."""
        states = self.ordered_types()
        # Whether a removal may go depends on its referrers, and a pass settles types as it
        # goes (a dirty type with nothing to send is just cleaned). So a pass that cleaned
        # something and sent nothing is followed by one more, or a deferred removal would
        # wait for some unrelated later event. A second pass cleans nothing, so a third could
        # not decide differently.
        for _ in range(2):
            self._pass += 1
            cleaned = False
            for state in states:
                if state.pending_nonce is not None or not (state.dirty or state.removal_pending):
                    continue
                allow_removals = self._removal_due(state, states)
                cleaned = cleaned or state.dirty
                state.dirty = False
                was_pending = state.removal_pending
                push = self._push(state, allow_removals)
                if state.removal_pending and not was_pending:
                    state.removal_since = self._pass
                if push is not None:
                    state.inflight_pass = self._pass
                    return push
                if not state.removal_pending:
                    state.applied_pass = self._pass  # nothing to send: the client is current
            if not cleaned:
                break
        return None

    def _removal_due(self, state: TypeState, states: list[TypeState]) -> bool:
        """Rule 6 (make-before-break), and never starved: removals go referrers first
        (listeners, routes, clusters, endpoints, secrets), and a removal of a type waits only
        for the types that may refer to it, never for the others (constant EDS churn must not
        hold back a cluster removal). A referring type is current for the removal when it has
        nothing in flight or waiting, or when the client has accepted a response computed at
        or after the pass that found the removal (that response already reflects the cache
        without the removed resource, so later churn of the referrer does not matter). A type
        whose last update was rejected may still refer to what we would remove, so its NACK
        holds back removals of the types it can refer to until an update of it is accepted,
        and a type with a removal of its own waiting goes first."""
        rank = _removal_rank(state.type_url)
        since = state.removal_since if state.removal_pending else self._pass
        for other in states:
            if other is state or _removal_rank(other.type_url) >= rank:
                continue
            if other.removal_pending or other.nack is not None:
                return False
            settled = other.pending_nonce is None and not other.dirty
            if not settled and other.applied_pass < since:
                return False
        return True

    def _nonce_for(self, state: TypeState) -> str:
        self._nonce += 1
        nonce = str(self._nonce)  # unique per stream (rule 3)
        state.latest_nonce = nonce
        state.pending_nonce = nonce
        state.sent_at = time.time()
        return nonce

    def _targets(self, state: TypeState) -> dict[str, Resource]:
        view = self.view
        assert view is not None
        targets: dict[str, Resource] = {}
        if state.wildcard:
            for resource in view.visible(state.type_url):
                targets[resource.name] = resource
        for name in state.names:
            if name not in targets:
                named = view.get(state.type_url, name)
                if named is not None:
                    targets[name] = named
        return targets

    def _rewarm(self, sent: list[Resource]) -> None:
        """Envoy re-creates a changed EDS cluster and the new one waits for its endpoints:
        forget that the client has them, so they follow the cluster (as Istio does)."""
        endpoints = None
        for resource in sent:
            if resource.warms_with is None:
                continue
            if endpoints is None:
                endpoints = self.types.get(ENDPOINT)
                if endpoints is None:
                    return
            if endpoints.known.pop(resource.warms_with, None) is not None:
                touch(endpoints, (resource.warms_with,))

    # Changes -------------------------------------------------------------------------------

    def mark_dirty(self, type_url: str, names: Iterable[str] | None = None) -> bool:
        """Note that these names of a type changed (None: anything may have); True if this
        stream can push now (nothing of that type outstanding)."""
        state = self.types.get(type_url)
        if state is None or not state.seen_request:
            return False
        touch(state, names)
        return state.pending_nonce is None


def new_stream(variant: Variant, stream_id: int, **options: object) -> StreamState:
    """A stream of `variant` (options as `StreamState`)."""
    from .delta import DeltaStream
    from .sotw import SotwStream

    kind: type[StreamState] = SotwStream if variant is Variant.SOTW else DeltaStream
    return kind(stream_id, **options)  # type: ignore[arg-type]


def note_changes(state: TypeState, sent: list[Resource]) -> None:
    """Record what a response changes; after a NACK, on top of what is still unaccepted."""
    if state.nack is not None and state.last_changes:
        merged = {r.name: r for r in state.last_changes}
        merged.update((r.name, r) for r in sent)
        state.last_changes = list(merged.values())
    else:
        state.last_changes = sent


_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|$)", re.S
)
_INLINE_SECRET = re.compile(r'(inline_(?:string|bytes)\s*:\s*)"(?:[^"\\]|\\.)*"')


def redact_key_material(text: str) -> str:
    """Envoy's NACK text quotes the rejected resource; for a Secret that includes the private
    key. Keep the error, drop key bytes, before it reaches logs, metrics or the admin API."""
    text = _PEM_KEY.sub("[redacted private key]", text)
    return _INLINE_SECRET.sub(r'\1"[redacted]"', text)


def differs(old: Resource | None, new: Resource) -> bool:
    return old is None or old.version != new.version


def touch(state: TypeState, names: Iterable[str] | None) -> None:
    state.dirty = True
    if state.pending is None:
        return
    if names is None:
        state.pending = None
        return
    state.pending.update(names)
    if len(state.pending) > MAX_TRACKED_CHANGES:
        state.pending = None

