"""Push scheduling: debounce cache changes and find the streams a change concerns."""

from __future__ import annotations

import asyncio
import collections
import contextlib
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


class PushSlots:
    """The cap on responses being written at once, with two queues: a stream being brought to
    its first full config is served before incremental pushes to streams that already hold a
    good config (istiod's order under load: a new or reconnecting proxy has nothing to route
    with; a synced one only misses the latest change). FIFO within each queue.

    `release` may be called by whoever holds a slot (or gave it up for a stuck write), once
    per `acquire`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._free = self.capacity
        self._first: collections.deque[asyncio.Future[None]] = collections.deque()
        self._incremental: collections.deque[asyncio.Future[None]] = collections.deque()
        self.granted_first = 0  # slots given to first-config pushes after a wait
        self.granted_incremental = 0

    @property
    def waiting_first(self) -> int:
        return len(self._first)

    @property
    def waiting_incremental(self) -> int:
        return len(self._incremental)

    async def acquire(self, first: bool) -> None:
        if self._free > 0 and not self._first and not (self._incremental and not first):
            self._free -= 1
            return
        queue = self._first if first else self._incremental
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted as we were cancelled: pass it on
            else:
                # A release may already have popped (and skipped) the cancelled future
                # between its cancellation and this handler: then it is gone already.
                with contextlib.suppress(ValueError):
                    queue.remove(future)
            raise
        if first:
            self.granted_first += 1
        else:
            self.granted_incremental += 1

    def release(self) -> None:
        for queue in (self._first, self._incremental):
            while queue:
                future = queue.popleft()
                if not future.done():
                    future.set_result(None)  # the slot passes straight to the waiter
                    return
        self._free = min(self.capacity, self._free + 1)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; `rate <= 0` means unlimited."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, float(burst))
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()

    def take(self) -> bool:
        if self.rate <= 0:
            return True
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
