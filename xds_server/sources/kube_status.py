"""Status written back to the cluster: what the mesh made of each route and policy.

- TrafficPolicy (our CRD): `status.conditions` holds one `Accepted` condition: True/Accepted
  (its message naming each field a client kind cannot apply: proxyless gRPC clients, see
  model/client_kinds.py), or False with reason `Invalid` and a message naming the field
  (`spec.retries.retryOn: unknown retry condition 'sometimes'`), or False/`TargetNotFound`.
- MTLSPolicy and AuthorizationPolicy (they select workloads by labels, no target): the same
  `Accepted` condition, True or False/`Invalid` naming the field.
- HTTPRoute and GRPCRoute attached to Services (GAMMA): `status.parents` gets one
  RouteParentStatus per Service parentRef, with our `controllerName`, conditions `Accepted`
  (True; or False with `UnsupportedValue` naming the field, or `NoMatchingParent`) and
  `ResolvedRefs` (True; or False/`BackendNotFound`). Entries of other controllers are kept:
  the route may also be attached to Gateways that another implementation serves.

Conditions follow metav1.Condition: `lastTransitionTime` changes only when `status` does, and
`observedGeneration` is the spec generation that was judged. Writes go to the `/status`
subresource with the object's resourceVersion (a 409 means re-read and try again), and only
when something other than timestamps would change, so a replica that restarts or takes over
leadership writes nothing for objects that are already right.

Only the leader writes (`is_leader`, checked again right before every request).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass
from typing import Any

from ..model.client_kinds import format_notes
from ..model.mesh import ServiceKey
from ..model.routes import Route
from ..model.store import ObjectKey
from .k8s_objects import ObjectError
from .kube_api import ApiException, KubeApi, ResourceKind, status_message

log = logging.getLogger(__name__)

CONTROLLER_NAME = "xds-server.io/mesh-controller"

# Condition types and reasons (Gateway API's where they exist).
ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
REASON_ACCEPTED = "Accepted"
REASON_INVALID = "Invalid"
REASON_TARGET_NOT_FOUND = "TargetNotFound"
REASON_UNSUPPORTED_VALUE = "UnsupportedValue"
REASON_NO_MATCHING_PARENT = "NoMatchingParent"
REASON_RESOLVED_REFS = "ResolvedRefs"
REASON_BACKEND_NOT_FOUND = "BackendNotFound"

_KEEPING = "; the last valid version stays in effect"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    type_: str, ok: bool, reason: str, message: str, generation: int | None
) -> dict[str, str | int]:
    cond: dict[str, str | int] = {"type": type_, "status": "True" if ok else "False", "reason": reason,
            "message": message[:32768]}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def error_message(error: ObjectError) -> str:
    """Every problem of an object, each with its field: `spec.x: message; spec.y: ...`."""
    return "; ".join(f"{path}: {message}" if path else message for path, message in error.problems)


def set_conditions(current: Iterable[Any], wanted: Iterable[dict], now: str) -> list[dict]:
    """`current` with each wanted condition set (meta.SetStatusCondition): the transition time
    is kept when the status did not change; conditions of other types are kept."""
    result = [dict(c) for c in current if isinstance(c, dict)]
    for new in wanted:
        old = next((c for c in result if c.get("type") == new["type"]), None)
        merged = dict(new)
        if old is not None and old.get("status") == new["status"] and old.get(
                "lastTransitionTime"):
            merged["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            merged["lastTransitionTime"] = now
        if old is None:
            result.append(merged)
        else:
            result[result.index(old)] = merged
    return result


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "lastTransitionTime"}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def same_status(a: Any, b: Any) -> bool:
    """Equal but for transition times: no write needed."""
    return _without_times(a or {}) == _without_times(b or {})


def _generation(raw: dict) -> int | None:
    value = (raw.get("metadata") or {}).get("generation")
    return value if isinstance(value, int) else None


# What each kind's status should say -----------------------------------------------------------


def policy_status(raw: dict, *, error: ObjectError | None, kept_last_good: bool,
                  services: Container[ServiceKey], now: str | None = None,
                  notes: list[tuple[str, str]] | None = None) -> dict:
    """The TrafficPolicy status we want, merged into the one `raw` carries. `notes`: what
    a client kind cannot apply (model/client_kinds.py), said in the Accepted message."""
    now = now or _now()
    generation = _generation(raw)
    namespace = (raw.get("metadata") or {}).get("namespace", "")
    if error is not None:
        message = error_message(error) + (_KEEPING if kept_last_good else "")
        wanted = condition(ACCEPTED, False, REASON_INVALID, message, generation)
    else:
        target = ((raw.get("spec") or {}).get("targetRef") or {}).get("name", "")
        key = ServiceKey(namespace, target)
        if key not in services:
            wanted = condition(ACCEPTED, False, REASON_TARGET_NOT_FOUND,
                               f"spec.targetRef: Service {key} not found", generation)
        else:
            message = "the mesh applies this policy"
            if notes:
                message += "; not for every client kind: " + format_notes(notes)
            wanted = condition(ACCEPTED, True, REASON_ACCEPTED, message, generation)
    status = dict(raw.get("status") or {})
    status["conditions"] = set_conditions(status.get("conditions") or [], [wanted], now)
    return status


def accepted_status(raw: dict, *, error: ObjectError | None, kept_last_good: bool,
                    now: str | None = None) -> dict:
    """The status of a policy without a target (MTLSPolicy, AuthorizationPolicy: they select
    workloads by labels): Accepted, or not with the fields that are wrong."""
    now = now or _now()
    generation = _generation(raw)
    if error is not None:
        message = error_message(error) + (_KEEPING if kept_last_good else "")
        wanted = condition(ACCEPTED, False, REASON_INVALID, message, generation)
    else:
        wanted = condition(ACCEPTED, True, REASON_ACCEPTED, "the mesh applies this policy",
                           generation)
    status = dict(raw.get("status") or {})
    status["conditions"] = set_conditions(status.get("conditions") or [], [wanted], now)
    return status


def _service_parent_refs(raw: dict) -> list[tuple[int, dict]]:
    refs = (raw.get("spec") or {}).get("parentRefs")
    if not isinstance(refs, list):
        return []
    return [
        (i, ref) for i, ref in enumerate(refs)
        if isinstance(ref, dict) and ref.get("kind") == "Service"
        and ref.get("group", "") in ("", "core") and isinstance(ref.get("name"), str)
    ]


def route_status(raw: dict, *, route: Route | None, error: ObjectError | None,
                 kept_last_good: bool, services: Container[ServiceKey],
                 now: str | None = None) -> dict:
    """The HTTPRoute/GRPCRoute status we want: our parent entries replaced, others kept."""
    now = now or _now()
    generation = _generation(raw)
    namespace = (raw.get("metadata") or {}).get("namespace", "")
    status = dict(raw.get("status") or {})
    existing = [p for p in status.get("parents") or [] if isinstance(p, dict)]
    ours_before = {
        _ref_key(p.get("parentRef") or {}, namespace): p for p in existing
        if p.get("controllerName") == CONTROLLER_NAME
    }
    parents = [p for p in existing if p.get("controllerName") != CONTROLLER_NAME]

    missing_backend = None
    if error is None and route is not None:
        for i, rule in enumerate(route.rules):
            for j, backend in enumerate(rule.backends):
                if backend.service not in services:
                    missing_backend = (f"spec.rules[{i}].backendRefs[{j}]: Service "
                                       f"{backend.service} not found")
                    break
            if missing_backend:
                break
    seen = set()
    for _, ref in _service_parent_refs(raw):
        key = _ref_key(ref, namespace)
        if key in seen:
            continue
        seen.add(key)
        service = ServiceKey(ref.get("namespace") or namespace, ref["name"])
        if error is not None:
            message = error_message(error) + (_KEEPING if kept_last_good else "")
            wanted = [condition(ACCEPTED, False, REASON_UNSUPPORTED_VALUE, message, generation)]
        elif service not in services:
            wanted = [condition(ACCEPTED, False, REASON_NO_MATCHING_PARENT,
                                f"Service {service} not found", generation)]
        else:
            wanted = [condition(ACCEPTED, True, REASON_ACCEPTED,
                                "the mesh routes traffic to this Service with this route",
                                generation)]
        if error is None:
            if missing_backend:
                wanted.append(condition(RESOLVED_REFS, False, REASON_BACKEND_NOT_FOUND,
                                        missing_backend, generation))
            else:
                wanted.append(condition(RESOLVED_REFS, True, REASON_RESOLVED_REFS,
                                        "every backendRef names a Service", generation))
        before = ours_before.get(key, {}).get("conditions") or []
        # The condition set is ours: drop types we no longer report (e.g. ResolvedRefs of a
        # route that turned invalid).
        before = [c for c in before if isinstance(c, dict) and c.get("type") in
                  {w["type"] for w in wanted}]
        parents.append({
            "parentRef": dict(ref),
            "controllerName": CONTROLLER_NAME,
            "conditions": set_conditions(before, wanted, now),
        })
    status["parents"] = parents
    return status


def _ref_key(ref: dict, namespace: str) -> tuple[Any, ...]:
    return (ref.get("group", ""), ref.get("kind", ""), ref.get("namespace") or namespace,
            ref.get("name", ""), ref.get("sectionName"), ref.get("port"))


def has_our_status(raw: dict) -> bool:
    return any(isinstance(p, dict) and p.get("controllerName") == CONTROLLER_NAME
               for p in (raw.get("status") or {}).get("parents") or [])


def wants_route_status(raw: dict) -> bool:
    """A route is ours to report on if it names a Service parent (or we reported before)."""
    return bool(_service_parent_refs(raw)) or has_our_status(raw)


# Writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StatusTarget:
    """One object to bring up to date: where it is, what we last saw of it, and how to compute
    its status from any version of it (a re-read after a conflict included)."""

    resource: ResourceKind
    namespace: str
    name: str
    observed: dict
    compute: Callable[[dict], dict]  # raw object -> the status it should have


class StatusWriter:
    """Writes status for dirty objects, one at a time, while `is_leader()`.

    `mark(key)` queues an object; `compute(key)` (called on the event loop) returns its target,
    or None when nothing should be written. Failed writes are retried after `retry_delay`.
    """

    def __init__(
        self,
        api: KubeApi,
        compute: Callable[[ObjectKey], StatusTarget | None],
        *,
        is_leader: Callable[[], bool] = lambda: True,
        on_write: Callable[[ObjectKey, dict], None] | None = None,
        retry_delay: float = 1.0,
    ) -> None:
        self._api = api
        self._compute = compute
        self._is_leader = is_leader
        self._on_write = on_write
        self.retry_delay = retry_delay
        self._dirty: dict[ObjectKey, None] = {}
        self._wake = asyncio.Event()
        self.writes = 0  # successful status writes, for tests and metrics

    def mark(self, key: ObjectKey) -> None:
        self._dirty[key] = None
        self._wake.set()

    def mark_all(self, keys: Iterable[ObjectKey]) -> None:
        for key in keys:
            self._dirty[key] = None
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._dirty)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            stopping = asyncio.ensure_future(stop.wait())
            waking = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({stopping, waking}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (stopping, waking):
                    task.cancel()
            self._wake.clear()
            while self._dirty and self._is_leader() and not stop.is_set():
                key = next(iter(self._dirty))
                del self._dirty[key]
                target = self._compute(key)
                if target is None:
                    continue
                try:
                    written = await asyncio.to_thread(self._write, target)
                except Exception as e:
                    log.warning("status: cannot write %s %s/%s (%s); will retry",
                                target.resource.kind, target.namespace, target.name,
                                status_message(e))
                    loop.call_later(self.retry_delay, self.mark, key)
                    continue
                if written is not None:
                    self.writes += 1
                    if self._on_write is not None:
                        with contextlib.suppress(Exception):
                            self._on_write(key, written)

    def _write(self, target: StatusTarget) -> dict | None:
        """Write the status if it differs; the written status, or None. Runs in a thread."""
        obj = target.observed
        for _ in range(5):
            if not self._is_leader():
                return None
            wanted = target.compute(obj)
            if same_status(obj.get("status"), wanted):
                return None
            body = dict(obj)
            body["status"] = wanted
            try:
                self._api.replace(target.resource, target.namespace, target.name, body,
                                  subresource="status")
                log.info("status: updated %s %s/%s", target.resource.kind, target.namespace,
                         target.name)
                return wanted
            except ApiException as e:
                if e.status == 404:  # deleted meanwhile: nothing to report on
                    return None
                if e.status != 409:
                    raise
            # 409: somebody else wrote it; judge the latest version again
            try:
                obj = self._api.get(target.resource, target.namespace, target.name)
            except ApiException as e:
                if e.status == 404:
                    return None
                raise
            if _generation(obj) != _generation(target.observed):
                # The spec changed since it was judged: its watch event brings a fresh judgement.
                return None
        raise RuntimeError("conflicting writes kept winning")
