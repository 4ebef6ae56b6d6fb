"""Push scheduling: debounce cache changes and find the streams a change concerns."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from .cache import Change

Pending = dict[str, set[str]]  # type URL -> names changed or removed since the last flush

S = TypeVar("S", bound=Hashable)  # what subscribes: the server's connections


class Debouncer:
    """Coalesces bursts of changes into one flush.

    A flush happens once `quiet` seconds pass with no new change, or `longest` seconds after
    the first change of the burst, whichever comes first (the semantics Istio's
    PILOT_DEBOUNCE_AFTER / PILOT_DEBOUNCE_MAX operators know). `quiet == 0` turns debouncing
    off: changes made in the same event-loop turn still flush together.
    """

    def __init__(self, quiet: float, longest: float, flush: Callable[[Pending, float], None]) -> None:
        self.quiet = quiet
        self.longest = max(longest, quiet)
        self._flush = flush
        self._pending: Pending = defaultdict(set)
        self._first = 0.0
        self._last = 0.0
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None

    @property
    def pending(self) -> int:
        return sum(len(v) for v in self._pending.values())

    def add(self, change: Change) -> None:
        now = time.monotonic()
        if not self._pending:
            self._first = now
        self._last = now
        self._pending[change.type_url] |= change.names
        if self._handle is None:
            loop = asyncio.get_running_loop()
            if self.quiet <= 0:
                self._handle = loop.call_soon(self._fire)
            else:
                self._handle = loop.call_later(self.quiet, self._fire)

    def _fire(self) -> None:
        self._handle = None
        if not self._pending:
            return
        now = time.monotonic()
        if self.quiet > 0:
            due = min(self._last + self.quiet, self._first + self.longest)
            if now < due - 0.001:
                self._handle = asyncio.get_running_loop().call_later(due - now, self._fire)
                return
        pending, self._pending = self._pending, defaultdict(set)
        self._flush(pending, now - self._first)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class SubscriptionIndex(Generic[S]):
    """Which streams subscribe to which names, so a change wakes only those streams."""

    def __init__(self) -> None:
        self._by_name: dict[str, dict[str, set[S]]] = defaultdict(lambda: defaultdict(set))
        self._wildcard: dict[str, set[S]] = defaultdict(set)

    def subscribe(self, stream: S, type_url: str, names: set[str]) -> None:
        by_name = self._by_name[type_url]
        for name in names:
            by_name[name].add(stream)

    def unsubscribe(self, stream: S, type_url: str, names: set[str]) -> None:
        by_name = self._by_name.get(type_url)
        if by_name is None:
            return
        for name in names:
            holders = by_name.get(name)
            if holders is not None:
                holders.discard(stream)
                if not holders:
                    del by_name[name]

    def set_wildcard(self, stream: S, type_url: str, on: bool) -> None:
        if on:
            self._wildcard[type_url].add(stream)
        else:
            self._wildcard[type_url].discard(stream)

    def affected(self, type_url: str, names: set[str]) -> set[S]:
        streams = set(self._wildcard.get(type_url, ()))
        by_name = self._by_name.get(type_url)
        if by_name:
            if len(names) < len(by_name):
                for name in names:
                    holders = by_name.get(name)
                    if holders:
                        streams |= holders
            else:
                for name, holders in by_name.items():
                    if name in names:
                        streams |= holders
        return streams
