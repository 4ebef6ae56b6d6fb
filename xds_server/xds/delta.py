"""Incremental (delta) xDS: how a delta request changes a stream's subscriptions and how its
responses are built (CONFORMANCE rules 13-17; shared rules in `stream.py`)."""

from __future__ import annotations

import sys

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .resource import set_version
from .stream import (
    WILDCARD,
    Push,
    Request,
    RequestResult,
    StreamState,
    TypeState,
    Variant,
    note_changes,
    touch,
)


class DeltaStream(StreamState):
    """A delta stream: responses carry what changed and the names removed."""

    variant = Variant.DELTA

    @staticmethod
    def _encode_plane(plane: base_pb2.ControlPlane) -> bytes:
        data: bytes = discovery_pb2.DeltaDiscoveryResponse(control_plane=plane).SerializeToString()
        return data

    def on_request(self, request: Request) -> RequestResult:
        """Apply a delta request."""
        assert isinstance(request, discovery_pb2.DeltaDiscoveryRequest)
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
            # Rule 14: resume from what the client already has. Interned: the protobuf map
            # hands out fresh strings, and every resumed stream would otherwise keep its own
            # copy of each name and version (~32 KB a stream at 200 resources, measured in
            # bench/soak.py), which a reconnect churn turns into server memory that stays.
            state.known.update(
                (sys.intern(name), sys.intern(version))
                for name, version in request.initial_resource_versions.items()
            )
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
        self._check_subscriptions(state, len(added), len(dropped))
        state.names |= added
        state.names -= dropped
        for name in dropped:
            if not state.wildcard:
                state.known.pop(name, None)
        if first or (state.wildcard and not was_wildcard) or not nonce:
            touch(state, None)
        elif added or dropped:
            touch(state, added)
        return RequestResult(state, ack, added, dropped)

    def _push(self, state: TypeState, allow_removals: bool) -> Push | None:
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
            assert view is not None  # a stream has its view before its first push
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
        note_changes(state, send)
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
        data = header + b"".join([r.delta_entry for r in send]) + self._plane
        state.pending_version = version
        state.sent_version = version
        return Push(state.type_url, data, nonce, version, len(send), len(removed))
