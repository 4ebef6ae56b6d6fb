"""Garbage collection around big translation drains.

CPython's collector is not incremental: a full (generation 2) collection walks every tracked
object, and while a full build of 10,000 services grows the heap by millions of objects it
runs several times, each holding the event loop for hundreds of milliseconds (measured in
bench/RESULTS.md, "Event-loop lag"); with `app.tune_gc`'s large young generation, one
generation-1 pass can take 60 ms. While the translation drains (translate/orchestrator.py)
this policy turns automatic collection off, collects the youngest generation between slices
(cycles among fresh objects are still found, and each pass costs only what was allocated
since the last), and at the end of a big drain freezes what survived: the new mesh state is
long-lived, and leaving it out of later full collections is what `app.tune_gc` does for the
start-up state too. Between drains the collector runs as configured.

The cost: cyclic garbage among frozen objects is never collected. The translation's own
objects (resources, records, indexes) are freed by reference counting when they are replaced.
"""

from __future__ import annotations

import gc

__all__ = ["DrainCollector"]


class DrainCollector:
    """The orchestrator's collector hooks (see translate/orchestrator.py `Collector`)."""

    def __init__(self, young: int = 2_000) -> None:
        self.young = young  # objects allocated before a young collection between slices
        self.active = False
        self.freezes = 0

    def begin(self) -> None:
        if gc.isenabled():
            gc.disable()
            self.active = True

    def between_slices(self) -> None:
        if self.active and gc.get_count()[0] >= self.young:
            gc.collect(0)  # bounded by `young`: an older generation can hold millions

    def end(self, big: bool) -> None:
        if not self.active:
            return
        if big:  # what survived a big drain is the new mesh state: long-lived
            gc.collect(0)
            gc.freeze()
            self.freezes += 1
        self.active = False
        gc.enable()
