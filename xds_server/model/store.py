"""The mesh store: every model object the sources know, and who told us.

Sources write whole states (`sync`) or single objects (`put`, `remove`); the store keeps one
object per (kind, namespace, name) and tells listeners exactly which objects changed, so the
translator recomputes only what depends on them. It holds no Envoy and no Kubernetes types.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .mesh import EndpointSlice, Namespace, Service, Workload
from .netpol import NetworkPolicy
from .policy import TrafficPolicy
from .routes import Route
from .security import AuthorizationPolicy, MTLSPolicy

log = logging.getLogger(__name__)

MeshObject = (
    Namespace | Service | EndpointSlice | Workload | Route | TrafficPolicy | MTLSPolicy | AuthorizationPolicy
    | NetworkPolicy
)

# Kinds as users write them.
NAMESPACE = "Namespace"
SERVICE = "Service"
ENDPOINT_SLICE = "EndpointSlice"
POD = "Pod"
HTTP_ROUTE = "HTTPRoute"
GRPC_ROUTE = "GRPCRoute"
TRAFFIC_POLICY = "TrafficPolicy"
MTLS_POLICY = "MTLSPolicy"
AUTHORIZATION_POLICY = "AuthorizationPolicy"
NETWORK_POLICY = "NetworkPolicy"
KINDS = (
    NAMESPACE, SERVICE, ENDPOINT_SLICE, POD, HTTP_ROUTE, GRPC_ROUTE, TRAFFIC_POLICY,
    MTLS_POLICY, AUTHORIZATION_POLICY, NETWORK_POLICY,
)


def kind_of(obj: MeshObject) -> str:
    if isinstance(obj, Route):
        return obj.kind
    return {
        Namespace: NAMESPACE,
        Service: SERVICE,
        EndpointSlice: ENDPOINT_SLICE,
        Workload: POD,
        TrafficPolicy: TRAFFIC_POLICY,
        MTLSPolicy: MTLS_POLICY,
        AuthorizationPolicy: AUTHORIZATION_POLICY,
        NetworkPolicy: NETWORK_POLICY,
    }[type(obj)]


def key_of(obj: MeshObject) -> tuple[str, str, str]:
    """(kind, namespace, name); a Namespace lives in the namespace "" ."""
    if isinstance(obj, Namespace):
        return (NAMESPACE, "", obj.name)
    return (kind_of(obj), obj.namespace, obj.name)


ObjectKey = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class ObjectChange:
    key: ObjectKey
    old: Any  # MeshObject | None
    new: Any  # MeshObject | None

    @property
    def kind(self) -> str:
        return self.key[0]


ChangeListener = Callable[[list[ObjectChange]], None]


async def _yield_to_loop() -> None:
    """Let every timer and I/O callback that became ready meanwhile run before going on (one
    `sleep(0)` comes back before them, at the head of the next loop iteration)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


# Objects a sliced sync applies per event-loop turn (about 10 ms at 10,000 services).
SYNC_CHUNK = 4096


class MeshStore:
    def __init__(self) -> None:
        self._objects: dict[str, dict[tuple[str, str], MeshObject]] = {k: {} for k in KINDS}
        self._owner: dict[ObjectKey, str] = {}
        self._by_source: dict[str, set[ObjectKey]] = {}
        self._listeners: list[ChangeListener] = []
        self._synced: set[str] = set()
        self._syncing = 0  # sliced syncs under way (`sync_in_slices`)

    # Reading --------------------------------------------------------------------------------

    def all(self, kind: str) -> Mapping[tuple[str, str], MeshObject]:
        return MappingProxyType(self._objects[kind])

    def get(self, kind: str, namespace: str, name: str) -> Any:
        return self._objects[kind].get((namespace, name))

    def owner(self, key: ObjectKey) -> str | None:
        return self._owner.get(key)

    def synced(self, source: str) -> bool:
        return source in self._synced

    # Writing --------------------------------------------------------------------------------

    def sync(self, source: str, objects: Iterable[MeshObject]) -> list[ObjectChange]:
        """Make `source`'s objects exactly these: new ones added, changed ones replaced, the
        ones it no longer has removed. Objects another source owns are left alone."""
        wanted: dict[ObjectKey, MeshObject] = {}
        for obj in objects:
            wanted[key_of(obj)] = obj
        changes: list[ObjectChange] = []
        for key, obj in wanted.items():
            change = self._put(source, key, obj)
            if change is not None:
                changes.append(change)
        for key in list(self._by_source.get(source, ())):
            if key not in wanted:
                change = self._remove(source, key)
                if change is not None:
                    changes.append(change)
        self._synced.add(source)
        self._notify(changes)
        return changes

    @property
    def syncing(self) -> bool:
        """A sliced sync is under way: the store holds part of a source's new set. Consumers
        that publish (translate/orchestrator.py) wait until it is whole."""
        return self._syncing > 0

    async def sync_in_slices(
        self, source: str, objects: Sequence[MeshObject], *, chunk: int = SYNC_CHUNK
    ) -> list[ObjectChange]:
        """`sync`, without holding the event loop: applied and announced `chunk` objects at a
        time, yielding between slices. `syncing` is true until the last slice; listeners are
        called once more, with no changes, when it ends."""
        self._syncing += 1
        changes: list[ObjectChange] = []
        pending: list[ObjectChange] = []
        try:
            wanted: dict[ObjectKey, MeshObject] = {}
            for start in range(0, len(objects), chunk):
                for obj in objects[start:start + chunk]:
                    key = key_of(obj)
                    wanted[key] = obj  # (a key given twice: the later one stays, as in `sync`)
                    change = self._put(source, key, obj)
                    if change is not None:
                        pending.append(change)
                self._notify(pending)
                changes += pending
                pending = []
                await _yield_to_loop()
            for key in [k for k in self._by_source.get(source, ()) if k not in wanted]:
                change = self._remove(source, key)
                if change is not None:
                    pending.append(change)
            self._synced.add(source)
        finally:
            self._syncing -= 1
            self._notify(pending, always=True)
            changes += pending
        return changes

    def put(self, source: str, obj: MeshObject) -> ObjectChange | None:
        change = self._put(source, key_of(obj), obj)
        if change is not None:
            self._notify([change])
        return change

    def remove(self, source: str, key: ObjectKey) -> ObjectChange | None:
        change = self._remove(source, key)
        if change is not None:
            self._notify([change])
        return change

    def _put(self, source: str, key: ObjectKey, obj: MeshObject) -> ObjectChange | None:
        owner = self._owner.get(key)
        if owner is not None and owner != source:
            log.warning(
                "object defined by two sources; keeping the first",
                extra={"object": "/".join(key), "kept": owner, "ignored": source},
            )
            return None
        kind, namespace, name = key
        old = self._objects[kind].get((namespace, name))
        self._owner[key] = source
        self._by_source.setdefault(source, set()).add(key)
        if old == obj:
            return None
        self._objects[kind][(namespace, name)] = obj
        return ObjectChange(key, old, obj)

    def _remove(self, source: str, key: ObjectKey) -> ObjectChange | None:
        if self._owner.get(key) != source:
            return None
        del self._owner[key]
        self._by_source[source].discard(key)
        kind, namespace, name = key
        old = self._objects[kind].pop((namespace, name), None)
        return ObjectChange(key, old, None) if old is not None else None

    # Watching -------------------------------------------------------------------------------

    def add_listener(self, listener: ChangeListener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _notify(self, changes: list[ObjectChange], *, always: bool = False) -> None:
        if not changes and not always:
            return
        for listener in list(self._listeners):
            try:
                listener(changes)
            except Exception:  # one broken consumer must not starve the others
                log.exception("mesh store listener failed")
