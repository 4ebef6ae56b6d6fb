"""Per-stream protocol state: what one xDS stream asked for, was sent, and acknowledged.

This module is the protocol's rule book (see CONFORMANCE.md; rule numbers are cited inline)
and has no gRPC in it: the server feeds it requests and asks it for the next response.
Responses are built from the cache's pre-encoded entries, so a push to a stream costs a byte
join plus a small header.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .cache import View
from .resource import Resource, set_version
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
    """A request that breaks the protocol; the stream is closed with INVALID_ARGUMENT."""


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
    must_reply: bool = False  # answer even an empty set (rule 12)
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


class StreamState:
    """The protocol state of one stream (ADS or a per-type service, SotW or delta)."""

    def __init__(
        self,
        stream_id: int,
        variant: Variant,
        *,
        fixed_type: str | None = None,
        control_plane: str = "xds-server",
        max_names: int = 100_000,
    ) -> None:
        self.id = stream_id
        self.variant = variant
        self.fixed_type = fixed_type
        self.node: base_pb2.Node | None = None
        self.view: View | None = None
        self.types: dict[str, TypeState] = {}
        self._ordered: list[TypeState] = []
        self.connected_at = time.time()
        self._nonce = 0
        plane = base_pb2.ControlPlane(identifier=control_plane)
        # Encoded once per stream and appended to every response (protobuf merges fields).
        self._plane_sotw = discovery_pb2.DiscoveryResponse(control_plane=plane).SerializeToString()
        self._plane_delta = discovery_pb2.DeltaDiscoveryResponse(
            control_plane=plane
        ).SerializeToString()
        self._max_names = max_names

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
            raise ProtocolError(f"{count} resource names in one request (limit {self._max_names})")

    def on_sotw_request(
        self, request: discovery_pb2.DiscoveryRequest
    ) -> tuple[TypeState | None, Ack | None, set[str], set[str]]:
        """Apply a SotW request. Returns (state or None if ignored, ack, names added, names dropped)."""
        self._take_node(request.node, request.HasField("node"))
        type_url = self._resolve_type(request.type_url)
        self._check_names(len(request.resource_names))
        state = self._type_state(type_url)
        nonce = request.response_nonce
        # Rule 9: a request answering anything but our latest response of its type is stale.
        if state.latest_nonce is not None and nonce != state.latest_nonce:
            return None, None, set(), set()
        ack = self._settle(state, nonce, request.version_info, request)

        raw_names = request.resource_names
        if (
            state.seen_request
            and len(raw_names) == len(state.names) + state.request_star
            and all(n in state.names or n == WILDCARD for n in raw_names)
        ):
            # The common case, an ACK repeating the subscription: nothing else to apply.
            if ack is None:
                _touch(state, None)
            return state, ack, set(), set()
        requested = {sys.intern(n) for n in raw_names}  # shared across streams, not copied
        state.request_star = WILDCARD in requested
        wants_wildcard = WILDCARD in requested
        requested.discard(WILDCARD)
        if not state.seen_request:
            # Rule 12: an empty first request and an explicit "*" both mean wildcard.
            state.legacy_wildcard = not requested and not wants_wildcard
            wildcard = state.legacy_wildcard or wants_wildcard
        elif wants_wildcard:
            wildcard = True
        elif not requested:
            # Empty after names: unsubscribe from all (Envoy does this for EDS), unless
            # the stream has been legacy wildcard all along.
            wildcard = state.legacy_wildcard
        else:
            wildcard = False
            state.legacy_wildcard = False
        state.seen_request = True
        added = requested - state.names
        dropped = state.names - requested
        wildcard_turned_on = wildcard and not state.wildcard
        if wildcard_turned_on:
            state.must_reply = True  # rule 12: answered even when there is nothing to send
        state.wildcard = wildcard
        state.names = requested
        # Rule 11: forget what an unsubscribed name was sent, so re-subscribing re-sends it.
        for name in dropped:
            state.known.pop(name, None)
            if name in state.last_full and not wildcard:
                state.full_version = None  # the next complete set leaves it out
        if state.full_state and (added or dropped):
            state.full_version = None
        if wildcard_turned_on or ack is None:
            _touch(state, None)
        elif added or dropped:
            _touch(state, added)
        return state, ack, added, dropped

    def on_delta_request(
        self, request: discovery_pb2.DeltaDiscoveryRequest
    ) -> tuple[TypeState, Ack | None, set[str], set[str]]:
        """Apply a delta request. Returns (state, ack, names added, names dropped)."""
        self._take_node(request.node, request.HasField("node"))
        type_url = self._resolve_type(request.type_url)
        self._check_names(
            len(request.resource_names_subscribe)
            + len(request.resource_names_unsubscribe)
            + len(request.initial_resource_versions)
        )
        state = self._type_state(type_url)
        ack = None
        nonce = request.response_nonce
        if nonce and nonce == state.pending_nonce:
            ack = self._settle(state, nonce, "", request)
        # Rule 13: subscription changes count even when the nonce is stale.
        subscribe = {sys.intern(n) for n in request.resource_names_subscribe}
        unsubscribe = set(request.resource_names_unsubscribe)
        was_wildcard = state.wildcard
        first = not state.seen_request
        if not state.seen_request:
            # Rule 14: resume from what the client already has.
            state.known.update(request.initial_resource_versions)
            # Rule 15: a first request naming nothing is (legacy) wildcard.
            if not subscribe and not unsubscribe:
                state.wildcard = True
                state.must_reply = True
            state.seen_request = True
        if WILDCARD in subscribe:
            if not state.wildcard:
                state.must_reply = True
            state.wildcard = True
        if WILDCARD in unsubscribe:
            state.wildcard = False
            if state.names:
                # Forget what came only through the wildcard: the client drops it too.
                for name in [n for n in state.known if n not in state.names]:
                    del state.known[name]
            else:
                state.known.clear()
        subscribe.discard(WILDCARD)
        unsubscribe.discard(WILDCARD)
        added = subscribe - state.names
        dropped = (unsubscribe - subscribe) & state.names
        state.names |= added
        state.names -= dropped
        for name in dropped:
            if not state.wildcard:
                state.known.pop(name, None)
        if first or (state.wildcard and not was_wildcard) or not nonce:
            _touch(state, None)
        elif added or dropped:
            _touch(state, added)
        return state, ack, added, dropped

    def _settle(self, state: TypeState, nonce: str, version: str, request) -> Ack | None:
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
        state.acked_at = time.time()
        state.nack = None
        state.last_changes = ()
        return Ack(state.type_url, nonce, None)

    # Responses -----------------------------------------------------------------------------

    def ordered_types(self) -> list[TypeState]:
        return self._ordered

    def wants_push(self) -> bool:
        return any(
            (s.dirty or s.removal_pending) and s.pending_nonce is None for s in self.types.values()
        )

    def next_push(self) -> Push | None:
        """The next response to write, in make-before-break order, or None."""
        states = self.ordered_types()
        # Whether a removal may go depends on the other types being settled, and a pass
        # settles types as it goes (a dirty type with nothing to send is just cleaned). So a
        # pass that cleaned something and sent nothing is followed by one more, or a deferred
        # removal would wait for some unrelated later event. A second pass cleans nothing, so
        # a third could not decide differently.
        for _ in range(2):
            cleaned = False
            for state in states:
                if state.pending_nonce is not None or not (state.dirty or state.removal_pending):
                    continue
                others_settled = all(
                    o.pending_nonce is None and not o.dirty for o in states if o is not state
                )
                # Removals go referrers first (listeners, routes, clusters, endpoints,
                # secrets), one type at a time, once everything else has been applied (rule
                # 6). A type whose last update was rejected may still refer to what we would
                # remove, so its NACK holds back removals of the types it can refer to until
                # an update of it is accepted.
                rank = _removal_rank(state.type_url)
                referrers_pending = any(
                    (o.removal_pending or o.nack is not None) and _removal_rank(o.type_url) < rank
                    for o in states
                    if o is not state
                )
                allow_removals = others_settled and not referrers_pending
                cleaned = cleaned or state.dirty
                state.dirty = False
                push = (
                    self._sotw_push(state, allow_removals)
                    if self.variant is Variant.SOTW
                    else self._delta_push(state, allow_removals)
                )
                if push is not None:
                    return push
            if not cleaned:
                break
        return None

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
                resource = view.get(state.type_url, name)
                if resource is not None:
                    targets[name] = resource
        return targets

    def _sotw_push(self, state: TypeState, allow_removals: bool) -> Push | None:
        candidates, state.pending = state.pending, set()
        if state.full_state:
            shared = self._shared_targets(state)
            if shared is not None:
                return self._sotw_full_push(state, shared[0], allow_removals, shared[1])
            return self._sotw_full_push(state, self._targets(state), allow_removals)
        known = state.known
        if candidates is None:
            targets = self._targets(state)
            # Names that left the cache are forgotten, so their return is sent again.
            for name in [n for n in known if n not in targets]:
                del known[name]
            send = [r for n, r in targets.items() if known.get(n) != r.version]
        else:
            send = []
            view, type_url = self.view, state.type_url
            for name in candidates:
                if not state.wildcard and name not in state.names:
                    continue
                resource = view.get(type_url, name)
                if resource is None:
                    known.pop(name, None)
                elif known.get(name) != resource.version:
                    send.append(resource)
            if len(send) > 1:
                send.sort(key=lambda r: r.name)
        if not send and not state.must_reply:
            return None
        state.must_reply = False
        for resource in send:
            known[resource.name] = resource.version
        _note_changes(state, send)
        version = set_version({r.name: r.version for r in send})
        return self._sotw_response(state, send, version)

    def _shared_targets(self, state: TypeState) -> tuple[dict[str, Resource], str] | None:
        """A plain wildcard subscriber's complete set, shared with every stream of the same
        view (and its version, hashed once), when the view offers one."""
        if not state.wildcard or state.names:
            return None
        visible_map = getattr(self.view, "visible_map", None)
        return visible_map(state.type_url) if visible_map is not None else None

    def _sotw_full_push(
        self,
        state: TypeState,
        targets: dict[str, Resource],
        allow_removals: bool,
        version: str | None = None,
    ) -> Push | None:
        # Rule 10: Listener and Cluster responses carry the complete set. `targets` may be
        # shared with other streams: it is read, never changed, here.
        removed = state.last_full.keys() - targets.keys()
        if version is None:
            version = set_version({n: r.version for n, r in targets.items()})
        if version == state.full_version and not state.must_reply:
            state.removal_pending = False
            return None
        state.removal_pending = False
        if removed and not allow_removals:
            changed = any(_differs(state.last_full.get(n), r) for n, r in targets.items())
            state.removal_pending = True
            if not changed and not state.must_reply:
                return None
            targets = dict(targets)
            for name in removed:  # keep them until what referenced them is updated
                targets[name] = state.last_full[name]
            version = set_version({n: r.version for n, r in targets.items()})
        state.must_reply = False
        state.full_version = version if not state.removal_pending else None
        updated = [r for n, r in targets.items() if _differs(state.last_full.get(n), r)]
        self._rewarm(updated)
        _note_changes(state, updated)
        state.last_full = targets
        return self._sotw_response(state, list(targets.values()), version)

    def _sotw_response(self, state: TypeState, resources: list[Resource], version: str) -> Push:
        nonce = self._nonce_for(state)
        header = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=state.type_url, nonce=nonce
        ).SerializeToString()
        data = b"".join([r.sotw_entry for r in resources]) + header + self._plane_sotw
        state.pending_version = version
        state.sent_version = version
        return Push(state.type_url, data, nonce, version, len(resources), 0)

    def _delta_push(self, state: TypeState, allow_removals: bool) -> Push | None:
        candidates, state.pending = state.pending, set()
        known = state.known
        if candidates is None:
            targets = self._targets(state)
            send = [r for n, r in targets.items() if known.get(n) != r.version]
            # Rule 14/17: only names the client has are reported removed.
            removed = [n for n in known if n not in targets]
        else:
            send, removed = [], []
            view, type_url = self.view, state.type_url
            for name in candidates:
                subscribed = state.wildcard or name in state.names
                resource = view.get(type_url, name) if subscribed else None
                if resource is None:
                    if name in known:
                        removed.append(name)
                elif known.get(name) != resource.version:
                    send.append(resource)
            if len(send) > 1:
                send.sort(key=lambda r: r.name)
        state.removal_pending = False
        if removed and not allow_removals:
            state.removal_pending = True
            state.pending.update(removed)  # reconsidered once the referrers are settled
            removed = []
        if not send and not removed and not state.must_reply:
            return None
        state.must_reply = False
        self._rewarm(send)
        for resource in send:
            known[resource.name] = resource.version
        _note_changes(state, send)
        for name in removed:
            del known[name]
        # The response's own content (not the whole known set): cheap, and still equal for
        # equal responses on every replica.
        version = set_version({**{r.name: r.version for r in send}, **dict.fromkeys(removed, "")})
        nonce = self._nonce_for(state)
        header = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=state.type_url,
            nonce=nonce,
            removed_resources=sorted(removed),
        ).SerializeToString()
        data = header + b"".join([r.delta_entry for r in send]) + self._plane_delta
        state.pending_version = version
        state.sent_version = version
        return Push(state.type_url, data, nonce, version, len(send), len(removed))

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
                _touch(endpoints, (resource.warms_with,))

    # Changes -------------------------------------------------------------------------------

    def mark_dirty(self, type_url: str, names: Iterable[str] | None = None) -> bool:
        """Note that these names of a type changed (None: anything may have); True if this
        stream can push now (nothing of that type outstanding)."""
        state = self.types.get(type_url)
        if state is None or not state.seen_request:
            return False
        _touch(state, names)
        return state.pending_nonce is None


def _note_changes(state: TypeState, sent: list[Resource]) -> None:
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


def _differs(old: Resource | None, new: Resource) -> bool:
    return old is None or old.version != new.version


def _touch(state: TypeState, names: Iterable[str] | None) -> None:
    state.dirty = True
    if state.pending is None:
        return
    if names is None:
        state.pending = None
        return
    state.pending.update(names)
    if len(state.pending) > MAX_TRACKED_CHANGES:
        state.pending = None

