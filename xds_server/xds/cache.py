"""The resource cache: per type URL, name -> Resource (version + pre-serialized bytes).

Producers (sources, translators) write into it; the protocol server reads from it through a
`View`, which decides what one proxy may see. Every write reports exactly which names
changed or disappeared, so the server can wake only the streams that care.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from google.protobuf.message import Message

from .resource import Resource, set_version

log = logging.getLogger(__name__)

_EMPTY: Mapping[str, Resource] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Change:
    """What one write did to one type: names added or modified, and names removed."""

    type_url: str
    changed: frozenset[str]
    removed: frozenset[str]

    def __bool__(self) -> bool:
        return bool(self.changed or self.removed)

    @property
    def names(self) -> frozenset[str]:
        return self.changed | self.removed


ChangeListener = Callable[[Change], None]


def _as_resource(type_url: str, item: Resource | Message) -> Resource:
    resource = item if isinstance(item, Resource) else Resource.from_message(item)
    if resource.type_url != type_url:
        raise ValueError(f"resource {resource.name!r} is a {resource.type_url}, not a {type_url}")
    return resource


class ResourceCache:
    def __init__(self) -> None:
        self._types: dict[str, dict[str, Resource]] = {}
        self._generation: dict[str, int] = {}
        self._listeners: list[ChangeListener] = []

    # Reading -------------------------------------------------------------------------------

    def resources(self, type_url: str) -> Mapping[str, Resource]:
        store = self._types.get(type_url)
        return MappingProxyType(store) if store is not None else _EMPTY

    def get(self, type_url: str, name: str) -> Resource | None:
        store = self._types.get(type_url)
        return store.get(name) if store is not None else None

    def type_urls(self) -> list[str]:
        return list(self._types)

    def generation(self, type_url: str) -> int:
        """Bumped on every effective write of a type: a cheap key for derived caches."""
        return self._generation.get(type_url, 0)

    # Writing -------------------------------------------------------------------------------

    def set_type(self, type_url: str, items: Iterable[Resource | Message]) -> Change:
        """Replace the whole set of one type; names not given are removed."""
        new: dict[str, Resource] = {}
        for item in items:
            resource = _as_resource(type_url, item)
            if resource.cache_key in new:
                raise ValueError(f"duplicate {type_url} name {resource.cache_key!r}")
            new[resource.cache_key] = resource
        old = self._types.get(type_url, {})
        changed = frozenset(n for n, r in new.items() if old.get(n) != r)
        removed = frozenset(old.keys() - new.keys())
        # Keep the old objects for unchanged names so identity-based caches stay warm.
        for name in new.keys() - changed:
            new[name] = old[name]
        self._types[type_url] = new
        return self._commit(Change(type_url, changed, removed))

    def update(
        self,
        type_url: str,
        upsert: Iterable[Resource | Message] = (),
        remove: Iterable[str] = (),
    ) -> Change:
        """Add or replace some resources and remove others, leaving the rest alone."""
        store = self._types.setdefault(type_url, {})
        changed: set[str] = set()
        removed: set[str] = set()
        for item in upsert:
            resource = _as_resource(type_url, item)
            if store.get(resource.cache_key) != resource:
                store[resource.cache_key] = resource
                changed.add(resource.cache_key)
        for name in remove:
            if store.pop(name, None) is not None:
                removed.add(name)
                changed.discard(name)
        return self._commit(Change(type_url, frozenset(changed), frozenset(removed)))

    def touch(self, type_url: str, names: Iterable[str]) -> Change:
        """Report existing resources as changed without changing them.

        For a change of *who may see* them rather than of their content (a Service's export
        annotation, a Namespace's tenant label): streams re-evaluate these names against
        their views, so a newly visible resource is sent and a newly hidden one removed.
        """
        store = self._types.get(type_url, {})
        return self._commit(Change(type_url, frozenset(n for n in names if n in store), frozenset()))

    def _commit(self, change: Change) -> Change:
        if change:
            self._generation[change.type_url] = self._generation.get(change.type_url, 0) + 1
            for listener in list(self._listeners):
                try:
                    listener(change)
                except Exception:  # a broken listener must not stop the others
                    log.exception("cache change listener failed")
        return change

    # Watching ------------------------------------------------------------------------------

    def add_listener(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


class View(Protocol):
    """What one proxy may see. Streams with equal `key` see exactly the same resources."""

    @property
    def key(self) -> Hashable: ...

    def get(self, type_url: str, name: str) -> Resource | None:
        """The resource a proxy asking for `name` receives, or None (absent or not visible)."""

    def visible(self, type_url: str) -> Iterable[Resource]:
        """Everything of one type a wildcard subscriber receives."""

    def may_see(self, type_url: str, name: str) -> bool:
        """Whether a change to cache entry `name` can concern this view."""

    def cache_key(self, type_url: str, name: str) -> str:
        """The cache entry a subscription to `name` follows (usually `name` itself)."""


class FullView:
    """Every resource in the cache: the default for a single-tenant server."""

    def __init__(self, cache: ResourceCache) -> None:
        self._cache = cache
        self._maps: dict[str, tuple[int, dict[str, Resource], str]] = {}

    @property
    def key(self) -> Hashable:
        return ("full", id(self._cache))

    def visible_map(self, type_url: str) -> tuple[dict[str, Resource], str]:
        """Everything of one type with its set version, built once per cache generation and
        shared by every wildcard stream (never mutate the returned map)."""
        generation = self._cache.generation(type_url)
        cached = self._maps.get(type_url)
        if cached is None or cached[0] != generation:
            resources = {r.name: r for r in self._cache.resources(type_url).values()}
            version = set_version({n: r.version for n, r in resources.items()})
            cached = (generation, resources, version)
            self._maps[type_url] = cached
        return cached[1], cached[2]

    def get(self, type_url: str, name: str) -> Resource | None:
        return self._cache.get(type_url, name)

    def visible(self, type_url: str) -> Iterable[Resource]:
        return self._cache.resources(type_url).values()

    def may_see(self, type_url: str, name: str) -> bool:
        return True

    def cache_key(self, type_url: str, name: str) -> str:
        return name


class FilteredView:
    """Only the resources an `allow(type_url, name)` predicate admits.

    Used to scope proxies to what they may see (tenants, namespaces). Resources outside the
    view are invisible in every way: not sent to wildcard subscribers and absent when asked
    for by name.
    """

    def __init__(
        self, cache: ResourceCache, key: Hashable, allow: Callable[[str, str], bool]
    ) -> None:
        self._cache = cache
        self._key = key
        self._allow = allow

    @property
    def key(self) -> Hashable:
        return self._key

    def get(self, type_url: str, name: str) -> Resource | None:
        if not self._allow(type_url, name):
            return None
        return self._cache.get(type_url, name)

    def visible(self, type_url: str) -> Iterable[Resource]:
        allow = self._allow
        return [r for n, r in self._cache.resources(type_url).items() if allow(type_url, n)]

    def may_see(self, type_url: str, name: str) -> bool:
        return self._allow(type_url, name)

    def cache_key(self, type_url: str, name: str) -> str:
        return name
