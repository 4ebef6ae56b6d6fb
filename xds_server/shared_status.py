"""Proxy status for the whole control plane: each replica shares what its proxies report.

Every `INTERVAL` seconds a replica writes one field of the `proxy-status` hash, named after
itself: the time and its proxies' entries (the same entries `/api/v1/proxies` shows: node
id, identity, address, per-type status; nothing secret). Readers merge the fields written
within `TTL`: a replica that died (SIGKILL, no goodbye) drops out of the answer after TTL, and
the writers delete such stale fields. Each entry carries the `replica` serving it. One HSET
per replica per interval, whatever the number of proxies or pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .shared.store import SharedStateUnavailable, SharedStore

log = logging.getLogger("xds_server.shared")

STATUS_HASH = "proxy-status"
INTERVAL = 2.0
TTL = 10.0


class SharedProxyStatus:
    def __init__(self, store: SharedStore, entries: Callable[[], list[dict[str, Any]]], *,
                 interval: float = INTERVAL, ttl: float = TTL) -> None:
        self.store = store
        self.entries = entries
        self.interval = interval
        self.ttl = ttl

    @property
    def replica(self) -> str:
        return self.store.replica

    def local(self) -> list[dict[str, Any]]:
        return [{**entry, "replica": self.replica} for entry in self.entries()]

    async def publish(self) -> None:
        entries = self.local()  # read on the loop: streams change there
        # Fresh dicts nobody else holds: serialized in a thread, off the loop.
        document = await asyncio.to_thread(
            json.dumps, {"at": time.time(), "proxies": entries}, separators=(",", ":"))
        await self.store.hset(STATUS_HASH, self.replica, document.encode())

    async def control_plane(self) -> tuple[list[dict[str, Any]], list[str], bool]:
        """(every replica's proxies, the replicas answering, complete): this replica's from
        memory, the others' from Redis; Redis down: this replica's only, complete False."""
        proxies = self.local()
        replicas = [self.replica]
        try:
            fields = await self.store.hgetall(STATUS_HASH)
        except SharedStateUnavailable:
            return proxies, replicas, False
        now = time.time()
        stale = []
        for name, raw in fields.items():
            replica = name.decode(errors="replace")
            if replica == self.replica:
                continue
            try:
                document = json.loads(raw)
                at = float(document["at"])
                entries = list(document["proxies"])
            except (ValueError, KeyError, TypeError):
                stale.append(replica)
                continue
            if now - at > self.ttl:
                stale.append(replica)
                continue
            replicas.append(replica)
            proxies.extend(e for e in entries if isinstance(e, dict))
        if stale:
            with contextlib.suppress(SharedStateUnavailable):
                await self.store.hdel(STATUS_HASH, *stale)
        proxies.sort(key=lambda e: (str(e.get("id")), str(e.get("replica"))))
        return proxies, sorted(replicas), True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(SharedStateUnavailable):
                await self.publish()
            try:
                await asyncio.wait_for(stop.wait(), self.interval)
            except TimeoutError:
                continue
        with contextlib.suppress(Exception):
            await self.store.hdel(STATUS_HASH, self.replica)  # a clean stop leaves at once
