"""A batch of cache writes, published together so the cache never shows half of a change.

Builders write into the batch; the orchestrator publishes it once every output the batch's
changes made dirty is rebuilt. Publishing first updates what views read (which cluster names
belong to which service, what a scope sees: `on_publish`), then writes each type in xDS push
order (clusters, endpoints, listeners, routes: CONFORMANCE rule 6), so a route configuration
never reaches the cache before the clusters it names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..xds import types
from ..xds.cache import ResourceCache
from ..xds.resource import Resource


class Batch:
    def __init__(self) -> None:
        self._upsert: dict[str, dict[str, Resource]] = {}
        self._remove: dict[str, set[str]] = {}
        self._touch: dict[str, set[str]] = {}
        self._on_publish: list[Callable[[], object]] = []  # results are ignored

    def __bool__(self) -> bool:
        return bool(self._upsert or self._remove or self._touch or self._on_publish)

    def put(self, resources: Iterable[Resource]) -> None:
        for resource in resources:
            self._upsert.setdefault(resource.type_url, {})[resource.cache_key] = resource
            removed = self._remove.get(resource.type_url)
            if removed:
                removed.discard(resource.cache_key)

    def remove(self, type_url: str, names: Iterable[str]) -> None:
        upserts = self._upsert.get(type_url)
        removed = self._remove.setdefault(type_url, set())
        for name in names:
            removed.add(name)
            if upserts:
                upserts.pop(name, None)

    def touch(self, type_url: str, names: Iterable[str]) -> None:
        """Streams re-check these names against their views (a change of who may see them)."""
        self._touch.setdefault(type_url, set()).update(names)

    def on_publish(self, apply: Callable[[], object]) -> None:
        """Update state the views read, at the moment the cache changes."""
        self._on_publish.append(apply)

    def publish(self, cache: ResourceCache) -> None:
        for apply in self._on_publish:
            apply()
        for type_url in sorted(self._upsert.keys() | self._remove.keys(), key=types.order_key):
            cache.update(
                type_url,
                upsert=self._upsert.get(type_url, {}).values(),
                remove=self._remove.get(type_url, ()),
            )
        for type_url in sorted(self._touch, key=types.order_key):
            cache.touch(type_url, self._touch[type_url])
        self.__init__()  # type: ignore[misc]
