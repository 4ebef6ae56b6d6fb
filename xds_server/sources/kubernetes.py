"""The mesh from a Kubernetes API server (`xds-server serve --kubeconfig FILE | --in-cluster`).

Watches Namespaces, Services, EndpointSlices, Pods, HTTPRoutes, GRPCRoutes (Gateway API v1)
and TrafficPolicies (mesh.xds-server.io/v1alpha1), and keeps a `MeshStore` equal to what the
cluster holds, through the same `k8s_objects.convert` the file source uses: an object in the
cluster and the same object in a YAML file are the same model.

How it follows the cluster (client-go's Reflector, one per kind, each on its own thread since
the official client blocks; events reach the event loop through `call_soon_threadsafe`):

- List (paginated), then watch from the list's resourceVersion with bookmarks, so a quiet
  kind's resourceVersion stays fresh. Each watch asks the server to end it after a jittered
  `timeoutSeconds`, and is simply resumed from the last resourceVersion seen.
- A dropped connection or an unreachable server: the watch resumes from the last
  resourceVersion after an exponential backoff with jitter; nothing is lost and the store
  keeps its last state meanwhile.
- 410 Gone (the resourceVersion was compacted away while we were disconnected): list again
  and apply the difference, so objects deleted meanwhile are removed.
- A kind the server does not serve (Gateway API or our CRD not installed: 404) counts as
  empty and is looked for again every `absent_recheck` seconds.
- Nothing reaches the store until every kind has been listed once; then the whole first
  state is applied at once (`synced` turns true and a log line says so), so proxies never see
  Services without their endpoints or routes without their policies. Later changes are
  applied object by object.
- Invalid objects are reported (log, and status conditions on routes and policies naming the
  field) and the object's last valid version stays in the store, as with the file source.
- `namespace_selector` (a label selector) limits the mesh to matching namespaces. Namespaces
  are listed with the selector; other kinds are watched cluster-wide and objects outside the
  selected namespaces are held back (not in the store), so labelling a namespace brings its
  objects in at once, without re-listing (Istio's discoverySelectors work the same way).

Status (routes and policies, see kube_status.py) is written only by the replica holding the
leader Lease (leader.py), and only after the first full sync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch

from ..api import v1alpha1 as policy
from ..model.client_kinds import grpc_notes
from ..model.mesh import ServiceKey
from ..model.policy import TrafficPolicy
from ..model.routes import Route
from ..model.store import (
    ENDPOINT_SLICE,
    GRPC_ROUTE,
    HTTP_ROUTE,
    AUTHORIZATION_POLICY,
    KINDS,
    MTLS_POLICY,
    NAMESPACE,
    NETWORK_POLICY,
    POD,
    SERVICE,
    TRAFFIC_POLICY,
    MeshObject,
    MeshStore,
    ObjectKey,
)
from .k8s_objects import GATEWAY_GROUP, ObjectError, convert
from .kube_api import ApiException, KubeApi, ResourceKind, make_api_client, status_message
from .kube_status import (
    StatusTarget,
    StatusWriter,
    accepted_status,
    policy_status,
    route_status,
    wants_route_status,
)
from .leader import LeaderSettings, LeaseElector

log = logging.getLogger(__name__)
_random = random.Random()  # private: jitter must not disturb (or depend on) the global one

SOURCE_NAME = "kubernetes"

WATCHED: dict[str, ResourceKind] = {
    NAMESPACE: ResourceKind(NAMESPACE, "", "v1", "namespaces", namespaced=False),
    SERVICE: ResourceKind(SERVICE, "", "v1", "services"),
    ENDPOINT_SLICE: ResourceKind(ENDPOINT_SLICE, "discovery.k8s.io", "v1", "endpointslices"),
    POD: ResourceKind(POD, "", "v1", "pods"),
    HTTP_ROUTE: ResourceKind(HTTP_ROUTE, GATEWAY_GROUP, "v1", "httproutes"),
    GRPC_ROUTE: ResourceKind(GRPC_ROUTE, GATEWAY_GROUP, "v1", "grpcroutes"),
    TRAFFIC_POLICY: ResourceKind(TRAFFIC_POLICY, policy.GROUP, policy.VERSION, "trafficpolicies"),
    MTLS_POLICY: ResourceKind(MTLS_POLICY, policy.GROUP, policy.VERSION, "mtlspolicies"),
    AUTHORIZATION_POLICY: ResourceKind(
        AUTHORIZATION_POLICY, policy.GROUP, policy.VERSION, "authorizationpolicies"
    ),
    # No status written: networking.k8s.io/v1 has no NetworkPolicy status since Kubernetes
    # 1.27; what a policy means is shown by the admin API and `xds-server validate`.
    NETWORK_POLICY: ResourceKind(NETWORK_POLICY, "networking.k8s.io", "v1", "networkpolicies"),
}
STATUS_KINDS = (HTTP_ROUTE, GRPC_ROUTE, TRAFFIC_POLICY, MTLS_POLICY, AUTHORIZATION_POLICY)


@dataclass(frozen=True, slots=True)
class KubeSettings:
    namespace_selector: str | None = None  # a label selector on Namespaces; None: every one
    watch_timeout: float = 300.0  # server-side timeoutSeconds; each watch picks [t, 2t)
    page_size: int = 500
    list_timeout: float = 60.0
    backoff_initial: float = 0.8  # client-go's reflector backoff: 800 ms doubling to 30 s
    backoff_max: float = 30.0
    absent_recheck: float = 30.0  # how often a kind the server does not serve is looked for
    write_status: bool = True
    # None: no election, this replica always writes status (a single replica only).
    leader: LeaderSettings | None = field(default_factory=LeaderSettings)
    status_retry: float = 1.0


class Backoff:
    """Exponential backoff with jitter: the n-th delay is drawn from [d/2, d], d = min(max,
    initial * 2**n), so replicas that lost the API server together do not return in step."""

    def __init__(self, initial: float, maximum: float,
                 rand: Callable[[], float] = _random.random) -> None:
        self.initial, self.maximum, self._rand = initial, maximum, rand
        self.attempt = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * (2 ** self.attempt))
        self.attempt += 1
        return ceiling * (0.5 + 0.5 * self._rand())

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class _Entry:
    """One object as a reflector thread converted it."""

    key: ObjectKey
    model: MeshObject | None
    error: ObjectError | None
    raw: dict | None  # kept only for kinds whose status we write


@dataclass(slots=True)
class _Held:
    model: MeshObject | None  # the last valid version
    error: ObjectError | None  # what is wrong with the current version
    raw: dict | None


def _key(kind: str, raw: dict) -> ObjectKey:
    meta = raw.get("metadata") or {}
    namespace = "" if kind == NAMESPACE else str(meta.get("namespace") or "")
    return (kind, namespace, str(meta.get("name") or ""))


def to_entry(kind: str, raw: dict) -> _Entry:
    """Convert one API object (filling in the kind and apiVersion that list items lack)."""
    resource = WATCHED[kind]
    raw.setdefault("apiVersion", resource.api_version)
    raw.setdefault("kind", resource.kind)
    key = _key(kind, raw)
    keep = raw if kind in STATUS_KINDS else None
    try:
        return _Entry(key, convert(raw), None, keep)
    except ObjectError as e:
        return _Entry(key, None, e, keep)
    except Exception as e:  # a converter bug must not stop the kind's watch
        log.exception("kubernetes: cannot convert %s %s/%s", kind, key[1], key[2])
        return _Entry(key, None, ObjectError(kind, key[1], key[2], "", f"internal error: {e!r}"),
                      keep)


class KubernetesSource:
    """Keeps `store` equal to the cluster, as source `source_name`.

    `api`: an `ApiClient`, a callable returning one, a kubeconfig path, or None for the
    default (in-cluster in a pod, else $KUBECONFIG or ~/.kube/config). Configuration errors
    raise `kube_api.ConfigError` here, not later.
    """

    def __init__(
        self,
        store: MeshStore,
        api: k8s_client.ApiClient | Callable[[], k8s_client.ApiClient] | str | Path | None = None,
        *,
        namespace_selector: str | None = None,
        settings: KubeSettings | None = None,
        source_name: str = SOURCE_NAME,
        on_status_write: Callable[[ObjectKey, dict], None] | None = None,
    ) -> None:
        settings = settings or KubeSettings()
        if namespace_selector is not None:
            settings = replace(settings, namespace_selector=namespace_selector or None)
        self.settings = settings
        self.store = store
        self.source_name = source_name
        if isinstance(api, k8s_client.ApiClient):
            client = api
        elif callable(api):
            client = api()
        else:
            client = make_api_client(api)
        self.api = KubeApi(client)
        self._objects: dict[str, dict[ObjectKey, _Held]] = {kind: {} for kind in KINDS}
        self._listed: set[str] = set()
        self._resource_versions: dict[str, str] = {}
        self._synced = False
        self._synced_event = asyncio.Event()
        self._initial_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.elector: LeaseElector | None = None
        self.status_writer: StatusWriter | None = None
        if settings.write_status:
            if settings.leader is not None:
                self.elector = LeaseElector(self.api, settings.leader,
                                            on_change=self._leadership_changed)
            self.status_writer = StatusWriter(
                self.api, self._status_target, is_leader=self._may_write,
                on_write=on_status_write, retry_delay=settings.status_retry,
            )

    # What others read ------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once every kind has been listed and the first state is in the store (ready)."""
        return self._synced

    async def wait_synced(self) -> None:
        """Until synced; bound it with `asyncio.timeout(...)` or `asyncio.wait_for(...)`."""
        await self._synced_event.wait()

    @property
    def is_leader(self) -> bool:
        """Whether this replica writes status now."""
        if not self.settings.write_status:
            return False
        return self.elector.is_leader if self.elector is not None else True

    @property
    def resource_versions(self) -> dict[str, str]:
        """The last resourceVersion applied per kind (opaque strings, as the API says)."""
        return dict(self._resource_versions)

    @property
    def errors(self) -> list[ObjectError]:
        """Every invalid object (in the selected namespaces) and what is wrong with it."""
        return [
            held.error for kind in KINDS for key, held in sorted(self._objects[kind].items())
            if held.error is not None and self._admitted(key)
        ]

    # Running ---------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Follow the cluster until `stop` is set or the task is cancelled."""
        stop = stop or asyncio.Event()
        self._loop = asyncio.get_running_loop()
        done = asyncio.Event()  # set on stop *or* cancellation, for the helpers below
        reflectors = [
            _Reflector(self, kind, self.settings.namespace_selector if kind == NAMESPACE else None)
            for kind in KINDS
        ]
        tasks = []
        if self.elector is not None:
            tasks.append(asyncio.create_task(self.elector.run(done), name="kube-leader"))
        if self.status_writer is not None:
            tasks.append(asyncio.create_task(self.status_writer.run(done), name="kube-status"))
        for reflector in reflectors:
            reflector.start()
        log.info("kubernetes: watching", extra={
            "kinds": len(reflectors), "namespace_selector": self.settings.namespace_selector or "",
        })
        try:
            await stop.wait()
        finally:
            done.set()
            if self._initial_task is not None and not self._initial_task.done():
                self._initial_task.cancel()
            for reflector in reflectors:
                reflector.stop()
            if tasks:  # the elector releases the lease; an in-flight status write finishes
                _, late = await asyncio.wait(tasks, timeout=5.0)
                for task in late:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(_join, reflectors, 5.0)
            self._loop = None

    def close(self) -> None:
        self.api.close()

    # Events from the reflectors (on the loop) -------------------------------------------------

    def _deliver(self, fn: Callable[..., None], *args: Any) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(self._guarded, fn, *args)
            return True
        except RuntimeError:  # the loop is closed: we are shutting down
            return False

    @staticmethod
    def _guarded(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("kubernetes: applying a change failed")

    def _on_list(self, kind: str, entries: list[_Entry], resource_version: str) -> None:
        before = self._objects[kind]
        after: dict[ObjectKey, _Held] = {}
        for entry in entries:
            after[entry.key] = self._held(before.get(entry.key), entry)
        self._objects[kind] = after
        self._resource_versions[kind] = resource_version
        first = kind not in self._listed
        self._listed.add(kind)
        log.log(logging.DEBUG if first else logging.INFO, "kubernetes: listed %s", kind,
                extra={"objects": len(after), "resource_version": resource_version})
        if not self._synced:
            if self._listed.issuperset(KINDS):
                self._initial_sync()
            return
        changes = self.store.sync(self.source_name, self._desired())
        if changes:
            log.info("kubernetes: re-list of %s changed %d objects", kind, len(changes))
        if kind in (SERVICE, NAMESPACE):
            self._mark_all_status()
        elif kind in STATUS_KINDS and self.status_writer is not None:
            self.status_writer.mark_all(after)

    def _on_event(self, kind: str, type_: str, entry: _Entry, resource_version: str) -> None:
        self._resource_versions[kind] = resource_version
        objects = self._objects[kind]
        previous = objects.get(entry.key)
        if type_ == "DELETED":
            objects.pop(entry.key, None)
        else:
            objects[entry.key] = self._held(previous, entry)
        if not self._synced:
            return  # the initial sync will apply the state as it is by then
        if kind == NAMESPACE and self.settings.namespace_selector is not None:
            # A namespace entering or leaving the selection brings or takes all its objects.
            self.store.sync(self.source_name, self._desired())
            self._mark_all_status()
            return
        self._apply_key(entry.key)
        if kind == SERVICE:
            # Route parents and backends, policy targets: they resolve differently only when a
            # Service comes or goes, not when one changes.
            existed = previous is not None and previous.model is not None
            exists = entry.key in objects and objects[entry.key].model is not None
            if existed != exists:
                self._mark_all_status()
        if kind in STATUS_KINDS and self.status_writer is not None and type_ != "DELETED":
            self.status_writer.mark(entry.key)

    def _on_resource_version(self, kind: str, resource_version: str) -> None:
        self._resource_versions[kind] = resource_version

    def _held(self, previous: _Held | None, entry: _Entry) -> _Held:
        if entry.error is not None:
            old_error = previous.error if previous is not None else None
            if old_error is None or str(old_error) != str(entry.error):
                kept = previous is not None and previous.model is not None
                log.warning("kubernetes: invalid object%s: %s",
                            "; keeping its last valid version" if kept else "", entry.error,
                            extra={"object": entry.error.object, "field": entry.error.field_path})
        elif previous is not None and previous.error is not None:
            log.info("kubernetes: %s %s/%s is valid again", *entry.key)
        model = entry.model
        if model is None and previous is not None:
            model = previous.model
        return _Held(model, entry.error, entry.raw)

    def _initial_sync(self) -> None:
        """Every kind is listed: the first state goes into the store in slices (a big
        cluster's 100,000 objects never hold the event loop), then what changed meanwhile."""
        if self._initial_task is not None:
            return  # under way (a re-list while it runs is in `_objects`, caught up below)
        self._initial_task = asyncio.get_running_loop().create_task(
            self._initial_sync_in_slices(), name="kube-initial-sync"
        )

    async def _initial_sync_in_slices(self) -> None:
        try:
            await self.store.sync_in_slices(self.source_name, self._desired())
        except Exception:
            log.exception("kubernetes: the initial sync failed; applying it at once")
        self._synced_initially()

    def _synced_initially(self) -> None:
        desired = self._desired()
        self.store.sync(self.source_name, desired)  # events during the slices: a small diff
        self._synced = True
        self._synced_event.set()
        counts = {kind: sum(1 for k in self._objects[kind] if self._admitted(k)) for kind in KINDS}
        log.info("kubernetes: synced; every kind listed, the mesh is ready",
                 extra={"objects": len(desired), **{k.lower(): v for k, v in counts.items()},
                        "invalid": len(self.errors)})
        self._mark_all_status()

    def _admitted(self, key: ObjectKey) -> bool:
        if self.settings.namespace_selector is None or key[0] == NAMESPACE:
            return True  # Namespaces themselves are listed with the selector
        return (NAMESPACE, "", key[1]) in self._objects[NAMESPACE]

    def _desired(self) -> list[MeshObject]:
        return [
            held.model for kind in KINDS for key, held in self._objects[kind].items()
            if held.model is not None and self._admitted(key)
        ]

    def _apply_key(self, key: ObjectKey) -> None:
        held = self._objects[key[0]].get(key)
        if held is not None and held.model is not None and self._admitted(key):
            self.store.put(self.source_name, held.model)
        else:
            self.store.remove(self.source_name, key)

    # Status ------------------------------------------------------------------------------------

    def _may_write(self) -> bool:
        return self._synced and self.is_leader

    def _leadership_changed(self, leading: bool) -> None:
        if leading:
            self._mark_all_status()  # bring everything up to date; unchanged ones cost nothing
        elif self.status_writer is not None:
            self.status_writer.wake()

    def _mark_all_status(self) -> None:
        if self.status_writer is None:
            return
        self.status_writer.mark_all(
            key for kind in STATUS_KINDS for key in self._objects[kind] if self._admitted(key)
        )

    def _services(self) -> frozenset[ServiceKey]:
        return frozenset(
            ServiceKey(ns, name) for (_, ns, name), held in self._objects[SERVICE].items()
            if held.model is not None and self._admitted((SERVICE, ns, name))
        )

    def _status_target(self, key: ObjectKey) -> StatusTarget | None:
        kind, namespace, name = key
        held = self._objects[kind].get(key)
        if held is None or held.raw is None or not self._admitted(key):
            return None
        kept = held.error is not None and held.model is not None
        if kind == TRAFFIC_POLICY:
            spec = held.model.spec if isinstance(held.model, TrafficPolicy) else None
            compute = partial(policy_status, error=held.error, kept_last_good=kept,
                              services=self._services(),
                              notes=grpc_notes(spec) if spec is not None else None)
        elif kind in (MTLS_POLICY, AUTHORIZATION_POLICY):
            compute = partial(accepted_status, error=held.error, kept_last_good=kept)
        else:
            if not wants_route_status(held.raw):
                return None
            # HTTPRoute/GRPCRoute: the last valid version is a Route
            route = held.model if held.error is None and isinstance(held.model, Route) else None
            compute = partial(route_status, route=route, error=held.error, kept_last_good=kept,
                              services=self._services())
        return StatusTarget(WATCHED[kind], namespace, name, held.raw, compute)


def _join(reflectors: Iterable[_Reflector], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for reflector in reflectors:
        reflector.join(max(0.0, deadline - time.monotonic()))


class _Reflector:
    """List, then watch, one kind, forever (until stopped), on its own thread."""

    def __init__(self, source: KubernetesSource, kind: str, label_selector: str | None) -> None:
        self.source = source
        self.kind = kind
        self.resource = WATCHED[kind]
        self.label_selector = label_selector
        self.settings = source.settings
        self._stopped = threading.Event()
        self._watch: k8s_watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"kube-{kind}", daemon=True)
        self._absent = False
        self._failures = 0
        self.resource_version: str | None = None  # None: list first

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        watch = self._watch
        if watch is not None:
            watch.stop()  # shuts the socket down: the blocked read returns now

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _sleep(self, seconds: float) -> None:
        self._stopped.wait(seconds)

    def _run(self) -> None:
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        expired_in_a_row = 0
        while not self._stopped.is_set():
            try:
                if self.resource_version is None:
                    self.resource_version = self._list()
                    if self.resource_version is None:  # not served: look again later
                        self._sleep(self.settings.absent_recheck)
                        continue
                    backoff.reset()
                healthy = self._watch_once()
                if healthy:
                    backoff.reset()
                    expired_in_a_row = 0
                elif not self._stopped.is_set():
                    self._sleep(backoff.next())
            except ApiException as e:
                if self._stopped.is_set():
                    break
                if e.status == 410:
                    # Compacted while we were away: only a fresh list tells what was deleted.
                    log.info("kubernetes: %s watch expired (%s); re-listing", self.kind,
                             status_message(e))
                    self.resource_version = None
                    expired_in_a_row += 1
                    if expired_in_a_row > 1:
                        self._sleep(backoff.next())
                    continue
                if e.status == 404:
                    self.resource_version = None  # the kind went away: the re-list finds out
                self._failed(f"the API server answered {status_message(e)}", backoff)
            except Exception as e:  # unreachable, reset, timed out, garbage: retry
                if self._stopped.is_set():
                    break
                self._failed(f"connection to the API server failed ({status_message(e)})",
                             backoff)

    def _failed(self, problem: str, backoff: Backoff) -> None:
        """Log a failure (the first of a series as a warning, repeats at debug level: an
        outage of minutes must not flood the log) and wait before retrying."""
        delay = backoff.next()
        self._failures += 1
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "kubernetes: %s: %s; retrying in %.1fs", self.kind, problem, delay,
                extra={"kind": self.kind, "failures": self._failures})
        self._sleep(delay)

    def _recovered(self) -> None:
        if self._failures:
            log.info("kubernetes: %s: connected again after %d failed attempts", self.kind,
                     self._failures, extra={"kind": self.kind})
            self._failures = 0

    def _list(self) -> str | None:
        """List every object (page by page); deliver them; return the list's resourceVersion,
        or None when the server does not serve this kind."""
        items: list[dict] = []
        token: str | None = None
        while True:
            try:
                page = self.source.api.list_page(
                    self.resource, label_selector=self.label_selector,
                    limit=self.settings.page_size, continue_token=token,
                    timeout=self.settings.list_timeout,
                )
            except ApiException as e:
                if e.status != 404 or token is not None:
                    raise
                if not self._absent:
                    log.warning("kubernetes: the API server does not serve %s (%s); treating it"
                                " as empty (is its CRD installed?)", self.resource.api_version,
                                self.resource.plural)
                self._absent = True
                self.source._deliver(self.source._on_list, self.kind, [], "")
                return None
            items.extend(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                break
        if self._absent:
            log.info("kubernetes: the API server serves %s now", self.resource.plural)
            self._absent = False
        self._recovered()
        resource_version = str(meta.get("resourceVersion") or "")
        entries = [to_entry(self.kind, item) for item in items if isinstance(item, dict)]
        self.source._deliver(self.source._on_list, self.kind, entries, resource_version)
        return resource_version

    def _watch_once(self) -> bool:
        """Watch from `resource_version` until the server ends the stream, moving
        `resource_version` along event by event (so a broken stream resumes where it broke).
        Whether the watch was healthy (delivered events, or lasted)."""
        assert self.resource_version is not None
        watch = k8s_watch.Watch()
        self._watch = watch
        if self._stopped.is_set():
            return False
        timeout = int(self.settings.watch_timeout * (1 + _random.random()))
        started = time.monotonic()
        events = 0
        stream = self.source.api.watch(self.resource, watch,
                                       resource_version=self.resource_version,
                                       timeout_seconds=max(1, timeout),
                                       label_selector=self.label_selector)
        try:
            with contextlib.closing(stream):
                for event in stream:
                    if self._stopped.is_set():
                        break
                    self._recovered()
                    type_ = event.get("type")
                    obj = event.get("raw_object") or event.get("object")
                    if not isinstance(obj, dict):
                        continue
                    new_version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    if type_ == "BOOKMARK":
                        if new_version:
                            self.resource_version = new_version
                            self.source._deliver(self.source._on_resource_version, self.kind,
                                                 new_version)
                        continue
                    if type_ not in ("ADDED", "MODIFIED", "DELETED"):
                        log.warning("kubernetes: unexpected %s watch event %r", self.kind, type_)
                        continue
                    self.resource_version = new_version or self.resource_version
                    events += 1
                    self.source._deliver(self.source._on_event, self.kind, type_,
                                         to_entry(self.kind, obj), self.resource_version)
        finally:
            self._watch = None
        return events > 0 or time.monotonic() - started >= 1.0
