"""State-of-the-world: how a SotW request changes a stream's subscriptions and how its
responses are built (CONFORMANCE rules 9-12; shared rules in `stream.py`)."""

from __future__ import annotations

import sys
import time

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .resource import Resource, set_version
from .stream import (
    WILDCARD,
    Push,
    Request,
    RequestResult,
    StreamState,
    TypeState,
    Variant,
    differs,
    note_changes,
    touch,
)


class SotwStream(StreamState):
    """A SotW stream: every response of a type names the version of what it carries;
    Listener and Cluster responses carry the complete set (rule 10)."""

    variant = Variant.SOTW

    @staticmethod
    def _encode_plane(plane: base_pb2.ControlPlane) -> bytes:
        data: bytes = discovery_pb2.DiscoveryResponse(control_plane=plane).SerializeToString()
        return data

    def on_request(self, request: Request) -> RequestResult:
        """Apply a SotW request (state None: ignored as stale)."""
        assert isinstance(request, discovery_pb2.DiscoveryRequest)
        self._take_node(request.node, request.HasField("node"))
        type_url = self._resolve_type(request.type_url)
        self._check_names(len(request.resource_names))
        state = self._type_state(type_url)
        nonce = request.response_nonce
        # Rule 9: a request answering anything but our latest response of its type is stale.
        if state.latest_nonce is not None and nonce != state.latest_nonce:
            return RequestResult(None, None, set(), set())
        ack = self._settle(state, nonce, request.version_info, request)

        raw_names = request.resource_names
        if (
            state.seen_request
            and len(raw_names) == len(state.names) + state.request_star
            and all(n in state.names or n == WILDCARD for n in raw_names)
        ):
            # The common case, an ACK repeating the subscription: nothing else to apply.
            if ack is None:
                touch(state, None)
            return RequestResult(state, ack, set(), set())
        requested = {sys.intern(n) for n in raw_names}  # shared across streams, not copied
        state.request_star = WILDCARD in requested
        wants_wildcard = WILDCARD in requested
        requested.discard(WILDCARD)
        if not state.seen_request:
            # Rule 12: an empty first request and an explicit "*" both mean wildcard.
            state.legacy_wildcard = not requested and not wants_wildcard
            wildcard = state.legacy_wildcard or wants_wildcard
            if state.full_state and wildcard and not requested:
                # A reconnecting client names the complete set it holds (see _sotw_full_push).
                state.resume_version = request.version_info
        elif wants_wildcard:
            wildcard = True
        elif not requested:
            # Empty after names: unsubscribe from all (Envoy does this for EDS), unless
            # the stream has been legacy wildcard all along.
            wildcard = state.legacy_wildcard
        else:
            wildcard = False
            state.legacy_wildcard = False
        added = requested - state.names
        dropped = state.names - requested
        self._check_subscriptions(state, len(added), len(dropped))
        state.seen_request = True
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
            touch(state, None)
        elif added or dropped:
            touch(state, added)
        return RequestResult(state, ack, added, dropped)

    def _push(self, state: TypeState, allow_removals: bool) -> Push | None:
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
            assert view is not None  # a stream has its view before its first push
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
        note_changes(state, send)
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
        if state.resume_version:
            resumed, state.resume_version = state.resume_version, ""
            if resumed == version and not state.names:
                # A new stream whose client already holds this complete set: its first
                # wildcard request carries the set's version (a content hash, equal on every
                # replica). The xDS protocol lets a server skip resending then ("generally
                # safe for wildcard LDS and CDS requests"), and the client has its config, so
                # it waits for no initial fetch (rule 12 is for a client that has nothing).
                # A reconnect then costs what changed, as a delta resume does.
                state.full_version = state.sent_version = state.acked_version = version
                state.last_full = targets
                state.must_reply = False
                state.acked_at = time.time()
                return None
        if version == state.full_version and not state.must_reply:
            state.removal_pending = False
            return None
        state.removal_pending = False
        if removed and not allow_removals:
            changed = any(differs(state.last_full.get(n), r) for n, r in targets.items())
            state.removal_pending = True
            if not changed and not state.must_reply:
                return None
            targets = dict(targets)
            for name in removed:  # keep them until what referenced them is updated
                targets[name] = state.last_full[name]
            version = set_version({n: r.version for n, r in targets.items()})
        state.must_reply = False
        state.full_version = version if not state.removal_pending else None
        updated = [r for n, r in targets.items() if differs(state.last_full.get(n), r)]
        self._rewarm(updated)
        note_changes(state, updated)
        state.last_full = targets
        return self._sotw_response(state, list(targets.values()), version)

    def _sotw_response(self, state: TypeState, resources: list[Resource], version: str) -> Push:
        nonce = self._nonce_for(state)
        header = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=state.type_url, nonce=nonce
        ).SerializeToString()
        data = b"".join([r.sotw_entry for r in resources]) + header + self._plane
        state.pending_version = version
        state.sent_version = version
        return Push(state.type_url, data, nonce, version, len(resources), 0)
