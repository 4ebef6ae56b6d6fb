"""Raw Envoy resources (`--resources DIR`) into the cache: the translation of a source whose
objects are already Envoy messages.

The source (`sources/resource_files.py`) parses and validates the files and hands over every
good resource by type; this module serializes each message once and writes the types whose
content changed. Nothing here reads files, and the source never touches the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from google.protobuf.message import Message

from ..xds.cache import ResourceCache
from ..xds.resource import Resource
from ..xds.types import order_key, short_name

log = logging.getLogger(__name__)

__all__ = ["RawResources"]


class RawResources:
    """Publishes the raw resources of one source into the cache."""

    def __init__(self, cache: ResourceCache) -> None:
        self.cache = cache
        # The names this source wrote, by type: the cache also holds what the mesh translation
        # publishes, so a reload changes and removes only these (never the whole type).
        self._written: dict[str, set[str]] = {}
        # One serialization per parsed message: an unchanged file hands over the same message
        # objects again, and they cost nothing (keyed by identity; the message is kept alive
        # by the entry so the id is not reused).
        self._serialized: dict[int, tuple[Message, Resource]] = {}

    def publish(self, by_type: Mapping[str, Sequence[Message]]) -> None:
        """The whole current set of raw resources, by type URL."""
        serialized: dict[int, tuple[Message, Resource]] = {}
        resources: dict[str, list[Resource]] = {}
        for type_url, messages in by_type.items():
            out = resources.setdefault(type_url, [])
            for message in messages:
                held = self._serialized.get(id(message))
                if held is None or held[0] is not message:
                    held = (message, Resource.from_message(message))
                serialized[id(message)] = held
                out.append(held[1])
        self._serialized = serialized
        # update() compares by name and version, so untouched resources are not written.
        for type_url in sorted(self._written.keys() | resources.keys(), key=order_key):
            current = resources.get(type_url, [])
            names = {resource.cache_key for resource in current}
            gone = self._written.get(type_url, set()) - names
            self._written[type_url] = names
            change = self.cache.update(type_url, current, remove=gone)
            if change:
                log.info(
                    "resources: %s: %d changed, %d removed",
                    short_name(type_url), len(change.changed), len(change.removed),
                )
