"""Workload-token revocations shared by every replica (Redis hash + pub/sub, sealed).

A revocation is stored as a field of the `revoked-tokens` hash (its value sealed under the
name `revoked-tokens/<id>`, so an entry Redis did not get from a key holder is refused) and
announced on the `revoked` channel. Every replica applies it on the announcement: the token no
longer verifies and the streams it opened are closed at once, on whichever replica they are.
Each replica also re-reads the whole hash when Redis returns and every `RESYNC_SECONDS`, so an
announcement missed while its subscription was reconnecting still applies.

During a Redis outage a revocation made on a replica (admin API) applies on that replica at
once and is stored and announced when Redis returns; `xds-server token revoke --redis-url`
fails instead (the operator retries), so it never reports a revocation that did not happen.
Entries are kept (not expired): a revoked id must stay revoked as long as the token could be
valid, at most the longest token lifetime (365 days).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

from .ca.authority import utcnow
from .ca.tokens import TokenIssuer, validate_token_id
from .shared.sealed import SealError
from .shared.store import SharedStateUnavailable, SharedStore

log = logging.getLogger("xds_server.shared")

REVOKED_HASH = "revoked-tokens"
REVOKED_CHANNEL = "revoked"
RESYNC_SECONDS = 10.0


def _entry_name(token_id: str) -> str:
    return f"{REVOKED_HASH}/{token_id}"


async def store_revocation(store: SharedStore, token_id: str, when: str) -> None:
    """Write and announce one revocation (raises SharedStateUnavailable)."""
    value = store.sealed(_entry_name(token_id), json.dumps({"revoked_at": when}).encode())
    await store.hset(REVOKED_HASH, token_id, value)
    await store.publish(REVOKED_CHANNEL, token_id.encode())


class SharedRevocations:
    """One replica's view of the shared revocations (see the module doc)."""

    def __init__(self, store: SharedStore, tokens: TokenIssuer,
                 close_streams: Callable[[Iterable[str]], int] | None = None) -> None:
        self.store = store
        self.tokens = tokens
        self.close_streams = close_streams
        self.pending: dict[str, str] = {}  # revoked here while Redis was down
        store.subscribe(REVOKED_CHANNEL, self._one)
        store.on_reconnect(self._resync)

    def _apply(self, revoked: dict[str, str]) -> None:
        new = self.tokens.add_shared_revocations(revoked)
        if new and self.close_streams is not None:
            closed = self.close_streams(new)
            if closed:
                log.info("closed streams of revoked tokens", extra={"streams": closed, "tokens": len(new)})

    async def revoke(self, token_id: str) -> bool:
        """Revoke on every replica. False when it was already revoked."""
        validate_token_id(token_id)
        fresh = not self.tokens.is_revoked(token_id)
        when = utcnow().isoformat()
        self._apply({token_id: when})
        try:
            await store_revocation(self.store, token_id, when)
        except SharedStateUnavailable:
            self.pending[token_id] = when
            log.warning("Redis unreachable: token revoked on this replica now, on the others when "
                        "Redis returns", extra={"token_id": token_id})
        else:
            log.info("workload token revoked on every replica", extra={"token_id": token_id})
        return fresh

    async def _one(self, message: bytes) -> None:
        token_id = message.decode(errors="replace")
        try:
            validate_token_id(token_id)
        except ValueError:
            return
        with contextlib.suppress(SharedStateUnavailable):
            blob = await self.store.hget(REVOKED_HASH, token_id)
            if blob is not None:
                self._accept(token_id, blob)

    def _accept(self, token_id: str, blob: bytes) -> None:
        try:
            data = json.loads(self.store.open_sealed(_entry_name(token_id), blob))
            when = str(data["revoked_at"])
        except SealError:
            return  # counted and logged: an entry no key holder wrote revokes nothing
        except (ValueError, KeyError, TypeError):
            self.store.refused["malformed"] += 1
            return
        self._apply({token_id: when})

    async def load(self) -> None:
        """Re-read every revocation (raises SharedStateUnavailable)."""
        for field, blob in (await self.store.hgetall(REVOKED_HASH)).items():
            token_id = field.decode(errors="replace")
            with contextlib.suppress(ValueError):
                validate_token_id(token_id)
                self._accept(token_id, blob)

    async def _resync(self) -> None:
        for token_id, when in list(self.pending.items()):
            await store_revocation(self.store, token_id, when)
            del self.pending[token_id]
            log.info("shared a revocation made while Redis was unreachable", extra={"token_id": token_id})
        await self.load()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), RESYNC_SECONDS)
                return
            except TimeoutError:
                with contextlib.suppress(SharedStateUnavailable):
                    await self._resync()

    def status(self) -> dict[str, Any]:
        return {"pending": sorted(self.pending)}
