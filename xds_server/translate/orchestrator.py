"""Applies model changes in batches, rebuilds what they made dirty, publishes to the cache.

The loop (`step`):

1. queued store changes go into the model index (translate/index.py), which says which
   lookups they changed;
2. the outputs that read those lookups (translate/dependencies.py), and the outputs a new
   key of their family calls for (a new Service gets clusters, a new proxy its listeners),
   are marked dirty;
3. dirty outputs are rebuilt, lowest phase first (a service's clusters before the scopes that
   list them, scopes before the proxies that read them); what a rebuild changed that other
   builders read (`Built.emits`) marks those dirty in turn;
4. when nothing is dirty, the batch of cache writes is published at once (translate/batch.py).

Two ways to drive it. Synchronously (`run_until_idle`): offline tools, tests and a
controller with no running drain task apply each store change before `MeshStore.put`
returns. Time-sliced (`run`, an asyncio task): store changes are queued and drained in
slices of `budget` seconds with a yield to the event loop between them, so a full build of
10,000 services, a Namespace change (every scope) or a root-namespace policy (every proxy)
never holds the loop; the cache still changes only at the end of a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ..model.store import ObjectChange
from ..xds.cache import ResourceCache
from .batch import Batch
from .dependencies import DependencyTracker, OutputKey, Parts
from .index import Dep, ModelIndex
from .reads import Reader

log = logging.getLogger(__name__)

# Per slice of a time-sliced drain. A slice ends after the step that crosses it, and the
# largest steps (a scope's sorted rebuild or its publish at 10,000 services, a batch publish)
# take 20-30 ms, so the budget is small: a slice stays under the 50 ms a change may hold the
# loop (bench/loop_lag.py). Yielding costs a few microseconds.
DEFAULT_BUDGET = 0.005
# Past this many changed parts an output is rebuilt whole (a scope then recomputes from every
# service in one pass, cheaper than re-checking thousands one by one).
MAX_PARTS = 1024


@dataclass(frozen=True, slots=True)
class Built:
    emits: frozenset[Dep] = frozenset()  # derived keys whose value changed (others read them)
    alive: bool = True  # False: the output no longer exists (its records are dropped)
    translations: int = 0  # builder calls, for tests and benchmarks of incrementality
    # True: the build did part of its work and must be called again (with no parts) before
    # anything is published; a big output (a scope over 10,000 services) builds in slices.
    pending: bool = False


class Builder(Protocol):
    kind: str  # names its outputs: (kind, argument)
    phase: int  # built after every lower phase: a builder reads only lower phases' emits
    family: str  # its outputs are the keys of this lookup: ("service", key) -> (kind, key)

    def build(self, arg: Hashable, reader: Reader, parts: Parts, batch: Batch) -> Built: ...


@dataclass
class _Dirty:
    by_phase: dict[int, dict[OutputKey, Parts]] = field(default_factory=dict)

    def mark(self, phase: int, output: OutputKey, parts: Parts) -> None:
        outputs = self.by_phase.setdefault(phase, {})
        if output in outputs:
            current = outputs[output]
            if current is None or parts is None or len(current) > MAX_PARTS:
                outputs[output] = None  # so many parts changed that all of it is rebuilt
            else:
                current |= parts
        else:
            outputs[output] = None if parts is None else set(parts)

    def continue_(self, phase: int, output: OutputKey) -> None:
        """Build `output` again (it is part way through), unless it is already dirty: then
        the parts marked meanwhile are passed as they are."""
        self.by_phase.setdefault(phase, {}).setdefault(output, set())

    def pop(self) -> tuple[OutputKey, Parts] | None:
        for phase in sorted(self.by_phase):
            outputs = self.by_phase[phase]
            if outputs:
                return outputs.popitem()
            del self.by_phase[phase]
        return None

    def __len__(self) -> int:
        return sum(len(o) for o in self.by_phase.values())


class Collector(Protocol):
    """What a big drain tells the process's garbage-collection policy (xds_server/gc_policy.py
    wires one; the default does nothing)."""

    def begin(self) -> None: ...
    def between_slices(self) -> None: ...
    def end(self, big: bool) -> None: ...


class _NoCollector:
    def begin(self) -> None:
        pass

    def between_slices(self) -> None:
        pass

    def end(self, big: bool) -> None:
        pass


# A drain of this many slices or more is big (a full build, every scope or every proxy
# rebuilt): the collector is told, so it can keep its survivors out of later collections.
BIG_DRAIN_SLICES = 8


class Orchestrator:
    def __init__(
        self, index: ModelIndex, cache: ResourceCache, builders: Iterable[Builder],
        *, hold: Callable[[], bool] = lambda: False, collector: Collector | None = None,
    ) -> None:
        self.collector: Collector = collector or _NoCollector()
        self.index = index
        # True while the model is part way through a change that must reach proxies whole
        # (a sliced source sync, model/store.py): batches are built but not published.
        self._hold = hold
        self.cache = cache
        self.tracker = DependencyTracker()
        self.translations = 0
        self._builders = {b.kind: b for b in builders}
        self._families: dict[Hashable, list[Builder]] = {}  # by family: a Dep's lookup
        for builder in self._builders.values():
            self._families.setdefault(builder.family, []).append(builder)
        self._queue: deque[ObjectChange] = deque()
        self._dirty = _Dirty()
        self._batch = Batch()
        self._stepping = False
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.budget = DEFAULT_BUDGET
        self.longest_slice = 0.0  # seconds: the longest the drain task held the loop

    # Input ----------------------------------------------------------------------------------

    def submit(self, changes: Iterable[ObjectChange]) -> None:
        """The store's listener: queue changes; apply them now unless a drain task runs."""
        self._queue.extend(changes)
        self._kick()

    def emit(self, deps: Iterable[Dep]) -> None:
        """Something outside the model changed (a proxy connected): rebuild what reads it."""
        self._mark(deps)
        self._kick()

    def _kick(self) -> None:
        if self._task is None:
            self.run_until_idle()
        else:
            self._idle.clear()
            self._wake.set()

    def _mark(self, deps: Iterable[Dep]) -> None:
        deps = deps if isinstance(deps, (set, frozenset)) else set(deps)
        for dep in deps:
            if len(dep) == 2:
                for builder in self._families.get(dep[0], ()):
                    self._dirty.mark(builder.phase, (builder.kind, dep[1]), None)
        for output, parts in self.tracker.dependents(deps).items():
            owner = self._builders.get(output[0])
            if owner is not None:
                self._dirty.mark(owner.phase, output, parts)

    # Work -----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether a time-sliced drain task does the work (else callers' calls do it)."""
        return self._task is not None

    @property
    def idle(self) -> bool:
        return not self._queue and not self._dirty.by_phase and not self._batch

    def step(self, deadline: float = float("inf")) -> bool:
        """Work until `deadline` (time.perf_counter) or until idle; True when idle (the batch
        is published). Not reentrant: a call from inside a build does nothing."""
        if self._stepping:
            return False
        self._stepping = True
        try:
            return self._step(deadline)
        finally:
            self._stepping = False

    def _step(self, deadline: float) -> bool:
        clock = time.perf_counter
        while True:
            if self._queue:
                changed: set[Dep] = set()
                queue, apply = self._queue, self.index.apply
                for _ in range(min(len(queue), 512)):
                    changed |= apply(queue.popleft())
                self._mark(changed)
            else:
                item = self._dirty.pop()
                if item is None:
                    if self._batch and not self._hold():
                        self._batch.publish(self.cache)
                    return True  # (held: the store's last notice of the sync kicks it)
                self._build(*item)
            if clock() >= deadline:
                return False

    def _build(self, output: OutputKey, parts: Parts) -> None:
        builder = self._builders[output[0]]
        reader = Reader(self.index)
        built = builder.build(output[1], reader, parts, self._batch)
        self.translations += built.translations
        if built.alive:
            self.tracker.record(output, reader.reads)
            for lookup in reader.each:
                self.tracker.read_each(output, lookup)
        else:
            self.tracker.forget(output)
        if built.emits:
            self._mark(built.emits)
        if built.pending:
            self._dirty.continue_(builder.phase, output)

    def run_until_idle(self) -> None:
        self.step()

    # The time-sliced drain ------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        """Drain in the running loop from now on (store changes are then queued)."""
        if self._task is None:
            self._wake = asyncio.Event()
            self._idle = asyncio.Event()
            if self.idle:
                self._idle.set()
            else:
                self._wake.set()
            self._task = asyncio.get_running_loop().create_task(self.run(), name="translate")
            self._task.add_done_callback(self._stopped)
        return self._task

    def _stopped(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error("translation task failed", exc_info=task.exception())

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            slices = 0
            self.collector.begin()
            try:
                while True:
                    start = time.perf_counter()
                    try:
                        done = self.step(start + self.budget)
                    except Exception:  # a broken builder must not stop translation for good
                        log.exception("translation step failed")
                        done = self.idle
                    self.longest_slice = max(self.longest_slice, time.perf_counter() - start)
                    slices += 1
                    if done:
                        break
                    self.collector.between_slices()
                    # Let the server and the sources run. Twice: the first yield comes back
                    # at the head of the next loop iteration, before the timers and I/O that
                    # became ready meanwhile; the second queues behind them, so they wait
                    # one slice, not two.
                    await asyncio.sleep(0)
                    await asyncio.sleep(0)
            finally:
                self.collector.end(big=slices >= BIG_DRAIN_SLICES or self._hold())
            if self.idle:
                self._idle.set()

    async def settled(self) -> None:
        """Wait until every queued change is built and published."""
        while not self.idle:
            if self._task is None:
                self.run_until_idle()
                return
            self._idle.clear()
            self._wake.set()
            await self._idle.wait()

    async def stop(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
