"""Which outputs read what: the records that let a change find its dependents.

Each output (a service's clusters, its assignments, its virtual hosts, a scope's route
configuration, a proxy's own resources) is built by a builder that reads the model through
a `Reader` (translate/reads.py); the tracker keeps what each build read. A change then finds
its dependents by lookup: `dependents(deps)` returns the outputs whose last build read one
of the changed keys. A new builder reading a new kind of lookup needs no rule here.

An output may also read "every key of one lookup" (a scope reads every service to decide what
it sees): `read_each(output, lookup)`. A change of `(lookup, x)` then marks only the part
`x` of that output dirty (the part is the changed key itself), so the scope re-checks one
service instead of all of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable

from .index import Dep

OutputKey = tuple[str, Hashable]  # (builder kind, argument)
# What must be rebuilt of one output: None for all of it, else the parts (keys) named.
Parts = set[Hashable] | None


class DependencyTracker:
    def __init__(self) -> None:
        self._reads: dict[OutputKey, set[Dep]] = {}
        self._readers: dict[Dep, set[OutputKey]] = defaultdict(set)
        self._each: dict[str, set[OutputKey]] = defaultdict(set)

    def record(self, output: OutputKey, reads: set[Dep]) -> None:
        """Replace what `output` depends on by what its latest build read."""
        old = self._reads.get(output)
        if old is not None:
            for dep in old - reads:
                readers = self._readers.get(dep)
                if readers is not None:
                    readers.discard(output)
                    if not readers:
                        del self._readers[dep]
            added = reads - old
        else:
            added = reads
        for dep in added:
            self._readers[dep].add(output)
        self._reads[output] = reads

    def read_each(self, output: OutputKey, lookup: str) -> None:
        self._each[lookup].add(output)

    def forget(self, output: OutputKey) -> None:
        """The output is gone (a removed proxy or scope)."""
        self.record(output, set())
        del self._reads[output]
        for outputs in self._each.values():
            outputs.discard(output)

    def reads_of(self, output: OutputKey) -> frozenset[Dep]:
        return frozenset(self._reads.get(output, ()))

    def dependents(self, deps: Iterable[Dep]) -> dict[OutputKey, Parts]:
        """The outputs to rebuild for these changed keys, with the parts that changed."""
        out: dict[OutputKey, Parts] = {}
        for dep in deps:
            for output in self._readers.get(dep, ()):
                out[output] = None
            if len(dep) == 2:
                for output in self._each.get(dep[0], ()):  # type: ignore[call-overload]
                    if output not in out:
                        out[output] = {dep}
                    elif (parts := out[output]) is not None:
                        parts.add(dep)
        return out
