"""A fake Kubernetes API server: a test double for the real `kubernetes` client.

No kube-apiserver can be installed on these machines (FIELD-NOTES.md), so tests run the
official Python client against this double. It speaks the API server's real JSON wire format
over HTTPS on a loopback port and keeps the documented semantics that clients depend on
(https://kubernetes.io/docs/reference/using-api/api-concepts/):

- one global, monotonically increasing resourceVersion (etcd's revision): every write bumps
  it and stamps the written object; a no-op update writes nothing and bumps nothing;
- lists answer `{"kind": "<Kind>List", "metadata": {"resourceVersion": ...}, "items": [...]}`
  sorted by namespace/name; items of built-in types carry no `kind`/`apiVersion` (the real
  server leaves them out: clients must fill them in), custom resources keep theirs;
  `limit`/`continue` paginate a consistent snapshot, and a continue token older than the
  compaction point answers 410 Expired;
- watches (`?watch=1`) stream newline-delimited `{"type", "object"}` events: ADDED, MODIFIED,
  DELETED, BOOKMARK (only with `allowWatchBookmarks=true`, object holding just the
  resourceVersion), starting after `resourceVersion`, or with synthetic ADDED events for every
  current object when it is unset or "0"; `timeoutSeconds` ends the stream cleanly; a
  resourceVersion older than the compaction point gets HTTP 200 and a single ERROR event with
  a 410 Expired Status, as the real server does; a resourceVersion from the future gets 504;
- label selectors (equality and set-based) and `metadata.name`/`metadata.namespace` field
  selectors on lists and watches; an object whose labels stop (start) matching is sent to a
  watcher as DELETED (ADDED), as the watch cache does;
- status subresources: PUT/PATCH on `/status` changes only `status`, a PUT on the object
  keeps the stored status; optimistic concurrency: a stale `metadata.resourceVersion` gets
  409 Conflict; custom resources require a resourceVersion on update and bump
  `metadata.generation` on spec changes only;
- `application/merge-patch+json` PATCH (other patch types answer 415);
- Leases (coordination.k8s.io/v1), MutatingWebhookConfigurations
  (admissionregistration.k8s.io/v1, cluster-scoped, no status), TokenReview (authentication.k8s.io/v1) against tokens the
  test registers, bearer-token authentication (401 without a known token), discovery (/api,
  /apis, /version) and Status bodies on every error.

Deliberate simplifications, so nobody mistakes them for the real thing: no schema validation
(objects are stored as given, like a CRD that preserves unknown fields), no admission, no
defaulting, no finalizers or graceful deletion (DELETE is immediate; deleting a Namespace
deletes its content first), no server-side apply or strategic merge patch, no
`resourceVersionMatch=Exact` lists of the past.

Test control API: Python methods (`create`, `update`, `update_status`, `delete`, `get`,
`compact`, `drop_connections`, `go_down`/`come_up`, `latency`, `fail`, `register_token`...).
They are the cluster itself ("the kubelet set this status"), so unlike HTTP writes they may
set `status` on create. The server runs on its own thread and event loop; control methods are
safe to call from any other thread, including a test's event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime as dt
import ipaddress
import json
import re
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

__all__ = ["RESOURCE_TYPES", "FakeApiServer", "LabelSelector", "RequestRecord", "ResourceType"]

ADMIN_TOKEN = "fake-admin-token"
DEFAULT_API_AUDIENCES = ("https://kubernetes.default.svc.cluster.local",)


@dataclass(frozen=True, slots=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    crd: bool = False  # a custom resource: unstructured rules (generation, RV on update)
    status: bool = True  # has a /status subresource
    create_only: bool = False  # a virtual resource such as TokenReview

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def prefix(self) -> str:
        return f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


RESOURCE_TYPES: tuple[ResourceType, ...] = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False),
    ResourceType("", "v1", "services", "Service"),
    ResourceType("", "v1", "pods", "Pod"),
    ResourceType("", "v1", "configmaps", "ConfigMap", status=False),
    ResourceType("", "v1", "secrets", "Secret", status=False),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", status=False),
    ResourceType("gateway.networking.k8s.io", "v1", "httproutes", "HTTPRoute", crd=True),
    ResourceType("gateway.networking.k8s.io", "v1", "grpcroutes", "GRPCRoute", crd=True),
    ResourceType("mesh.xds-server.io", "v1alpha1", "trafficpolicies", "TrafficPolicy", crd=True),
    ResourceType("mesh.xds-server.io", "v1alpha1", "mtlspolicies", "MTLSPolicy", crd=True),
    ResourceType("mesh.xds-server.io", "v1alpha1", "authorizationpolicies", "AuthorizationPolicy",
                 crd=True),
    # Built in, without a status subresource (NetworkPolicyStatus left in Kubernetes 1.27).
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", status=False),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease", status=False),
    ResourceType("authentication.k8s.io", "v1", "tokenreviews", "TokenReview",
                 namespaced=False, status=False, create_only=True),
    # Cluster-scoped, no status: the injector's configuration, whose caBundle the server keeps.
    ResourceType("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
                 "MutatingWebhookConfiguration", namespaced=False, status=False),
)


# Errors as the API server writes them -------------------------------------------------------


class ApiError(Exception):
    """An error answer: a `Status` body with this code and reason."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return body


def _not_found(rtype: ResourceType, name: str) -> ApiError:
    details = {"name": name, "kind": rtype.plural}
    if rtype.group:
        details["group"] = rtype.group
    return ApiError(404, "NotFound", f'{rtype.qualified} "{name}" not found', details)


def _conflict(rtype: ResourceType, name: str) -> ApiError:
    message = (f'Operation cannot be fulfilled on {rtype.qualified} "{name}": the object has been'
               " modified; please apply your changes to the latest version and try again")
    return ApiError(409, "Conflict", message, {"name": name, "kind": rtype.plural})


def _gone(requested: int, oldest: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {requested} ({oldest})")


# Selectors ---------------------------------------------------------------------------------

_KEY = r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?"
_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SET_REQ = re.compile(rf"^\s*(?P<key>{_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)\s*$")
_EQ_REQ = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})\s*$")
_EXISTS_REQ = re.compile(rf"^\s*(?P<neg>!?)\s*(?P<key>{_KEY})\s*$")
_CMP_REQ = re.compile(rf"^\s*(?P<key>{_KEY})\s*(?P<op>[<>])\s*(?P<value>-?\d+)\s*$")


class LabelSelector:
    """A parsed label selector, equality- and set-based (k8s.io/apimachinery/pkg/labels)."""

    def __init__(self, text: str | None) -> None:
        self.text = text or ""
        self.requirements: list[Callable[[dict[str, str]], bool]] = []
        for part in _split_requirements(self.text):
            self.requirements.append(self._parse(part))

    @staticmethod
    def _parse(part: str) -> Callable[[dict[str, str]], bool]:
        if m := _SET_REQ.match(part):
            key, values = m["key"], {v.strip() for v in m["values"].split(",") if v.strip()}
            if not values:
                raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}: "
                               "for 'in', 'notin' operators, values set can't be empty")
            if m["op"] == "in":
                return lambda labels: labels.get(key) in values
            return lambda labels: labels.get(key) not in values
        if m := _EQ_REQ.match(part):
            key, value = m["key"], m["value"] or ""
            if m["op"] == "!=":
                return lambda labels: labels.get(key) != value
            return lambda labels: labels.get(key) == value
        if m := _CMP_REQ.match(part):
            key, number = m["key"], int(m["value"])
            greater = m["op"] == ">"

            def compare(labels: dict[str, str]) -> bool:
                try:
                    have = int(labels[key])
                except (KeyError, ValueError):
                    return False
                return have > number if greater else have < number

            return compare
        if m := _EXISTS_REQ.match(part):
            key = m["key"]
            if m["neg"]:
                return lambda labels: key not in labels
            return lambda labels: key in labels
        raise ApiError(400, "BadRequest", f"unable to parse requirement: {part!r}")

    def matches(self, labels: dict[str, str] | None) -> bool:
        labels = labels or {}
        return all(req(labels) for req in self.requirements)


def _split_requirements(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


_FIELDS: dict[str, Callable[[dict], str]] = {
    "metadata.name": lambda o: o.get("metadata", {}).get("name", ""),
    "metadata.namespace": lambda o: o.get("metadata", {}).get("namespace", ""),
}
_POD_FIELDS: dict[str, Callable[[dict], str]] = {
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
    "status.phase": lambda o: (o.get("status") or {}).get("phase", ""),
}


class FieldSelector:
    def __init__(self, text: str | None, rtype: ResourceType) -> None:
        self.terms: list[tuple[Callable[[dict], str], bool, str]] = []
        fields = dict(_FIELDS)
        if rtype.kind == "Pod":
            fields.update(_POD_FIELDS)
        for part in _split_requirements(text or ""):
            m = re.match(r"^\s*([\w.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
            if not m:
                raise ApiError(400, "BadRequest", f"invalid field selector: {part!r}")
            if m[1] not in fields:
                raise ApiError(400, "BadRequest",
                               f'field label not supported: {m[1]}')
            self.terms.append((fields[m[1]], m[2] == "!=", m[3]))

    def matches(self, obj: dict) -> bool:
        return all((get(obj) != value) if negate else (get(obj) == value)
                   for get, negate, value in self.terms)


# Small helpers -----------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _copy(obj: Any) -> Any:
    return copy.deepcopy(obj)


def _labels(obj: dict) -> dict[str, str]:
    return (obj.get("metadata") or {}).get("labels") or {}


def _rv_of(obj: dict) -> int:
    return int(obj["metadata"]["resourceVersion"])


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return _copy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


_MICROTIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")


@dataclass(slots=True)
class _Event:
    rv: int
    rtype: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    obj: dict
    old: dict | None


@dataclass(eq=False, slots=True)
class _Watcher:
    rtype: ResourceType
    namespace: str | None
    labels: LabelSelector
    fields: FieldSelector
    queue: asyncio.Queue
    user: str

    def visible(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        if self.namespace is not None and obj["metadata"].get("namespace") != self.namespace:
            return False
        return self.labels.matches(_labels(obj)) and self.fields.matches(obj)

    def translate(self, event: _Event) -> tuple[str, dict] | None:
        """The event this watcher sees, given its selectors (moves in and out included)."""
        now, before = self.visible(event.obj), self.visible(event.old)
        if event.type == "DELETED":
            return ("DELETED", event.obj) if now or before else None
        if now and before:
            return ("MODIFIED", event.obj)
        if now:
            return ("ADDED", event.obj)
        if before:
            return ("DELETED", event.obj)
        return None


@dataclass(frozen=True, slots=True)
class RequestRecord:
    user: str
    method: str
    path: str
    query: dict[str, str]
    status: int

    @property
    def is_write(self) -> bool:
        return self.method in ("POST", "PUT", "PATCH", "DELETE")


@dataclass(slots=True)
class _Fault:
    status: int
    method: str | None
    path: str | None  # a substring of the path
    user: str | None
    remaining: int | None  # None: until cleared
    message: str


@dataclass(slots=True)
class _Token:
    username: str
    uid: str
    groups: list[str]
    audiences: list[str] | None
    extra: dict[str, list[str]]
    expires: float | None


@dataclass(slots=True)
class _Snapshot:
    rv: int
    items: list[dict]


@dataclass
class _State:
    rv: int = 1
    compacted: int = 0
    objects: dict[ResourceType, dict[tuple[str, str], dict]] = field(default_factory=dict)
    history: list[_Event] = field(default_factory=list)
    watchers: set[_Watcher] = field(default_factory=set)
    snapshots: dict[str, _Snapshot] = field(default_factory=dict)


# The server ---------------------------------------------------------------------------------


class FakeApiServer:
    """A fake kube-apiserver on https://127.0.0.1:<free port> (see the module docstring).

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        tls: bool = True,
        bookmark_interval: float = 60.0,
        default_watch_timeout: float = 1800.0,
        api_audiences: tuple[str, ...] = DEFAULT_API_AUDIENCES,
        max_history: int | None = None,
    ) -> None:
        self.host = host
        self.tls = tls
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.api_audiences = tuple(api_audiences)
        self.max_history = max_history
        self.port = 0
        self._state = _State(objects={rt: {} for rt in RESOURCE_TYPES})
        self._types = {(rt.group, rt.version, rt.plural): rt for rt in RESOURCE_TYPES}
        self._uninstalled: set[ResourceType] = set()
        self._users: dict[str, str] = {ADMIN_TOKEN: "admin"}
        self._tokens: dict[str, _Token] = {}
        self._faults: list[_Fault] = []
        self._latency = 0.0
        self._requests: list[RequestRecord] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._ssl: ssl.SSLContext | None = None
        self.ca_pem = b""
        self._up = False

    # Life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> FakeApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.tls:
            self._ssl, self.ca_pem = _tls_context(self.host)
        started = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start())
            except BaseException as e:
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._cleanup())
            loop.close()

        self._thread = threading.Thread(target=main, name="fake-apiserver", daemon=True)
        self._thread.start()
        started.wait(10)
        if failure:
            raise failure[0]

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._ssl,
                                 reuse_address=True)
        await self._site.start()
        self.port = self._site.port
        self._up = True

    async def _cleanup(self) -> None:
        self._abort_connections()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the server's loop (where all state lives) and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the fake API server is not running")

        async def run() -> Any:
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), loop).result(15)

    # Clients -----------------------------------------------------------------------------------

    def add_user(self, username: str, token: str | None = None) -> str:
        """A client credential (bearer token) for `username`; returns the token."""
        token = token or f"{username}-{secrets.token_hex(8)}"
        self._call(self._users.__setitem__, token, username)
        return token

    def kubeconfig(self, path: str | Path, *, user: str = "admin", namespace: str = "default",
                   token: str | None = None) -> Path:
        """Write a kubeconfig for this server (as `user`) to `path` and return the path."""
        if token is None:
            token = ADMIN_TOKEN if user == "admin" else self.add_user(user)
        cluster: dict[str, Any] = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": user,
                                                      "namespace": namespace}}],
            "current-context": "fake",
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config))
        return path

    # Control API: objects ----------------------------------------------------------------------

    def resource_type(self, kind_or_plural: str, api_version: str | None = None) -> ResourceType:
        for rt in RESOURCE_TYPES:
            if kind_or_plural in (rt.kind, rt.plural, rt.qualified) and (
                api_version is None or api_version == rt.api_version
            ):
                return rt
        raise KeyError(f"no resource type {kind_or_plural!r} ({api_version})")

    def create(self, obj: dict) -> dict:
        """Create an object as the cluster holds it (status included). Returns the stored copy."""
        rtype = self.resource_type(obj["kind"], obj.get("apiVersion"))
        namespace = obj.get("metadata", {}).get("namespace") or ("default" if rtype.namespaced
                                                                  else None)
        return self._call(self._create, rtype, namespace, _copy(obj), keep_status=True)

    def apply(self, obj: dict) -> dict:
        """Create, or replace everything (status included) of an existing object."""
        rtype = self.resource_type(obj["kind"], obj.get("apiVersion"))
        namespace = obj.get("metadata", {}).get("namespace") or ("default" if rtype.namespaced
                                                                  else None)
        return self._call(self._apply, rtype, namespace, _copy(obj))

    def update(self, obj: dict) -> dict:
        """Replace an object's metadata and spec (status kept), unconditionally."""
        return self.apply_fields(obj, status=False)

    def update_status(self, obj: dict) -> dict:
        """Replace an object's status (as a controller or the kubelet would)."""
        return self.apply_fields(obj, status=True)

    def apply_fields(self, obj: dict, *, status: bool) -> dict:
        rtype = self.resource_type(obj["kind"], obj.get("apiVersion"))
        meta = obj.get("metadata", {})
        namespace = meta.get("namespace") or ("default" if rtype.namespaced else None)

        def run() -> dict:
            body = _copy(obj)
            current = self._get_or_404(rtype, namespace, meta["name"])
            rv = current["metadata"]["resourceVersion"]
            body.setdefault("metadata", {})["resourceVersion"] = rv
            return self._update(rtype, namespace, meta["name"], body, subresource="status"
                                if status else None)

        return self._call(run)

    def delete(self, kind: str, namespace: str | None, name: str, *,
               api_version: str | None = None) -> dict:
        rtype = self.resource_type(kind, api_version)
        return self._call(self._delete, rtype, namespace if rtype.namespaced else None, name)

    def get(self, kind: str, namespace: str | None, name: str, *,
            api_version: str | None = None) -> dict | None:
        rtype = self.resource_type(kind, api_version)
        key = (namespace or "" if rtype.namespaced else "", name)
        found = self._call(lambda: self._state.objects[rtype].get(key))
        return _copy(found) if found is not None else None

    def list(self, kind: str, namespace: str | None = None, *,
             api_version: str | None = None) -> list[dict]:
        rtype = self.resource_type(kind, api_version)

        def run() -> list[dict]:
            return [
                _copy(o) for (ns, _), o in sorted(self._state.objects[rtype].items())
                if namespace is None or ns == namespace
            ]

        return self._call(run)

    @property
    def resource_version(self) -> int:
        """The current (latest) resourceVersion."""
        return self._call(lambda: self._state.rv)

    def compact(self, resource_version: int | None = None) -> int:
        """Forget history up to `resource_version` (default: now), as etcd compaction does:
        a watch or continue token from before it answers 410 Gone. Returns the compaction
        point."""

        def run() -> int:
            point = self._state.rv if resource_version is None else resource_version
            self._compact(point)
            return point

        return self._call(run)

    def uninstall(self, kind: str) -> None:
        """Remove a resource type (as deleting a CRD does: its objects go, then 404)."""
        rtype = self.resource_type(kind)

        def run() -> None:
            for (ns, name) in list(self._state.objects[rtype]):
                self._delete(rtype, ns or None, name)
            self._uninstalled.add(rtype)

        self._call(run)

    def install(self, kind: str) -> None:
        rtype = self.resource_type(kind)
        self._call(self._uninstalled.discard, rtype)

    # Control API: faults -----------------------------------------------------------------------

    def drop_connections(self) -> int:
        """Abort every open connection (watches mid-stream included), without a clean end.
        Returns how many were dropped."""
        return self._call(self._abort_connections)

    def go_down(self) -> None:
        """Stop listening and drop every connection: the server is unreachable
        (connection refused) until `come_up()`. State is kept, as etcd keeps it."""

        async def run() -> None:
            if self._site is not None:
                await self._site.stop()
                self._site = None
            self._up = False
            self._abort_connections()

        self._call(run)

    def come_up(self) -> None:
        async def run() -> None:
            if not self._up:
                await self._listen()

        self._call(run)

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        self.go_down()
        try:
            yield
        finally:
            self.come_up()

    @property
    def latency(self) -> float:
        return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        """Delay every response, and every watch event, by `seconds` (a slow server)."""
        self._call(setattr, self, "_latency", float(seconds))

    def fail(self, status: int, *, method: str | None = None, path: str | None = None,
             user: str | None = None, times: int | None = None, message: str = "injected") -> None:
        """Answer matching requests with `status` (a Status body): `times` of them, or every
        one until `clear_faults()`. `path` matches a substring of the URL path."""
        fault = _Fault(status, method, path, user, times, message)
        self._call(self._faults.append, fault)

    def clear_faults(self) -> None:
        self._call(self._faults.clear)

    # Control API: observation ------------------------------------------------------------------

    def requests(self, *, user: str | None = None, method: str | None = None,
                 path: str | None = None) -> list[RequestRecord]:
        def run() -> list[RequestRecord]:
            return [
                r for r in self._requests
                if (user is None or r.user == user) and (method is None or r.method == method)
                and (path is None or path in r.path)
            ]

        return self._call(run)

    def clear_requests(self) -> None:
        self._call(self._requests.clear)

    def watch_count(self, kind: str | None = None, user: str | None = None) -> int:
        rtype = self.resource_type(kind) if kind else None
        return self._call(lambda: sum(
            1 for w in self._state.watchers
            if (rtype is None or w.rtype == rtype) and (user is None or w.user == user)
        ))

    def wait_for_watches(self, count: int, kind: str | None = None, *, user: str | None = None,
                         timeout: float = 10.0) -> None:
        """Block until at least `count` watches (of `kind`) are open."""
        deadline = time.monotonic() + timeout
        while self.watch_count(kind, user) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.watch_count(kind, user)} watches of {kind or 'any kind'}"
                                   f" open, wanted {count}")
            time.sleep(0.01)

    # Control API: TokenReview ------------------------------------------------------------------

    def register_token(self, token: str, username: str, *, uid: str | None = None,
                       groups: tuple[str, ...] = (), audiences: tuple[str, ...] | None = None,
                       extra: dict[str, list[str]] | None = None,
                       ttl: float | None = None) -> None:
        """A token TokenReview will accept: for a service account, username
        `system:serviceaccount:<ns>:<name>`. `audiences` default to the server's own."""
        entry = _Token(username, uid or str(uuid.uuid4()), list(groups),
                       list(audiences) if audiences is not None else None, dict(extra or {}),
                       time.monotonic() + ttl if ttl is not None else None)
        self._call(self._tokens.__setitem__, token, entry)

    def revoke_token(self, token: str) -> None:
        self._call(self._tokens.pop, token, None)

    # State changes (on the server's loop) -----------------------------------------------------

    def _bump(self) -> int:
        self._state.rv += 1
        return self._state.rv

    def _record(self, rtype: ResourceType, type_: str, obj: dict, old: dict | None) -> None:
        event = _Event(_rv_of(obj), rtype, type_, obj, old)
        self._state.history.append(event)
        if self.max_history is not None and len(self._state.history) > self.max_history:
            self._compact(self._state.history[-self.max_history - 1].rv)
        for watcher in list(self._state.watchers):
            if watcher.rtype == rtype:
                watcher.queue.put_nowait(event)

    def _compact(self, point: int) -> None:
        self._state.compacted = max(self._state.compacted, point)
        self._state.history = [e for e in self._state.history if e.rv > self._state.compacted]
        self._state.snapshots = {
            k: s for k, s in self._state.snapshots.items() if s.rv >= self._state.compacted
        }

    def _get_or_404(self, rtype: ResourceType, namespace: str | None, name: str) -> dict:
        found = self._state.objects[rtype].get((namespace or "", name))
        if found is None:
            raise _not_found(rtype, name)
        return found

    def _check_namespace(self, rtype: ResourceType, namespace: str | None) -> None:
        if not rtype.namespaced:
            return
        namespaces = self._state.objects[self.resource_type("Namespace")]
        if ("", namespace or "") not in namespaces:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})

    def _create(self, rtype: ResourceType, namespace: str | None, body: Any, *,
                keep_status: bool) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not an object")
        self._check_kind(rtype, body)
        meta = body.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            else:
                raise ApiError(422, "Invalid", f"{rtype.kind} \"\" is invalid: metadata.name: "
                               "Required value: name or generateName is required")
        name = meta["name"]
        if rtype.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does "
                               "not match the namespace sent on the request")
            meta["namespace"] = namespace = meta.get("namespace") or namespace or "default"
        else:
            meta.pop("namespace", None)
        self._check_namespace(rtype, namespace)
        key = (namespace or "", name)
        if key in self._state.objects[rtype]:
            raise ApiError(409, "AlreadyExists", f'{rtype.qualified} "{name}" already exists',
                           {"name": name, "kind": rtype.plural})
        self._validate(rtype, body)
        if rtype.status and not keep_status:
            body.pop("status", None)
        for server_field in ("deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(server_field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if rtype.crd:
            meta["generation"] = 1
        meta["resourceVersion"] = str(self._bump())
        body["apiVersion"], body["kind"] = rtype.api_version, rtype.kind
        self._state.objects[rtype][key] = body
        self._record(rtype, "ADDED", body, None)
        return _copy(body)

    def _apply(self, rtype: ResourceType, namespace: str | None, body: dict) -> dict:
        name = body["metadata"]["name"]
        current = self._state.objects[rtype].get((namespace or "" if rtype.namespaced else "",
                                                  name))
        if current is None:
            return self._create(rtype, namespace, body, keep_status=True)
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        self._update(rtype, namespace, name, _copy(body), subresource=None)
        if rtype.status:
            body["metadata"]["resourceVersion"] = self._get_or_404(
                rtype, namespace, name)["metadata"]["resourceVersion"]
            self._update(rtype, namespace, name, body, subresource="status")
        return _copy(self._get_or_404(rtype, namespace, name))

    def _check_kind(self, rtype: ResourceType, body: dict) -> None:
        kind, api_version = body.get("kind"), body.get("apiVersion")
        if api_version and api_version != rtype.api_version:
            raise ApiError(400, "BadRequest", f"the API version in the data ({api_version}) "
                           f"does not match the expected API version ({rtype.api_version})")
        if kind and kind != rtype.kind:
            raise ApiError(400, "BadRequest", f"the kind in the data ({kind}) does not match "
                           f"the expected kind ({rtype.kind})")

    def _validate(self, rtype: ResourceType, body: dict) -> None:
        if rtype.kind == "MutatingWebhookConfiguration":
            # clientConfig.caBundle is []byte: base64 in JSON, as every byte field.
            for i, webhook in enumerate(body.get("webhooks") or []):
                bundle = ((webhook or {}).get("clientConfig") or {}).get("caBundle")
                if bundle is None:
                    continue
                try:
                    base64.b64decode(bundle, validate=True)
                except (ValueError, TypeError):
                    raise ApiError(400, "BadRequest", f"webhooks[{i}].clientConfig.caBundle: "
                                   "illegal base64 data") from None
        if rtype.kind == "Lease":
            spec = body.get("spec") or {}
            duration = spec.get("leaseDurationSeconds")
            if duration is not None and (not isinstance(duration, int) or duration <= 0):
                raise ApiError(422, "Invalid", "spec.leaseDurationSeconds: Invalid value: must be"
                               " greater than 0")
            for name in ("acquireTime", "renewTime"):
                value = spec.get(name)
                if value is not None and not (isinstance(value, str) and _MICROTIME.match(value)):
                    raise ApiError(400, "BadRequest", f"spec.{name}: {value!r} is not an RFC 3339"
                                   " time")

    def _update(self, rtype: ResourceType, namespace: str | None, name: str, body: Any,
                subresource: str | None) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request is not an object")
        self._check_kind(rtype, body)
        current = self._get_or_404(rtype, namespace, name)
        meta = body.setdefault("metadata", {})
        if meta.get("name") not in (None, name):
            raise ApiError(400, "BadRequest", "the name of the object "
                           f"({meta.get('name')}) does not match the name on the URL ({name})")
        if rtype.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not "
                           "match the namespace sent on the request")
        requested_rv = meta.get("resourceVersion")
        if requested_rv in (None, ""):
            if rtype.crd:
                raise ApiError(422, "Invalid", f'{rtype.kind}.{rtype.group} "{name}" is invalid:'
                               " metadata.resourceVersion: Invalid value: 0x0: must be specified"
                               " for an update")
        elif str(requested_rv) != current["metadata"]["resourceVersion"]:
            raise _conflict(rtype, name)
        self._validate(rtype, body)
        if subresource == "status":
            new = _copy(current)
            if "status" in body:
                new["status"] = body["status"]
            else:
                new.pop("status", None)
        else:
            new = body
            new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
            if rtype.status:  # the main resource cannot change status
                if "status" in current:
                    new["status"] = _copy(current["status"])
                else:
                    new.pop("status", None)
            kept = ("uid", "creationTimestamp", "generation", "resourceVersion")
            for key in kept:
                if key in current["metadata"]:
                    new["metadata"][key] = current["metadata"][key]
                else:
                    new["metadata"].pop(key, None)
            new["metadata"]["name"] = name
            if rtype.namespaced:
                new["metadata"]["namespace"] = namespace
            else:
                new["metadata"].pop("namespace", None)
            if rtype.crd and _spec_of(new) != _spec_of(current):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
        if new == current:  # a no-op write: nothing stored, no new resourceVersion, no event
            return _copy(current)
        new["metadata"]["resourceVersion"] = str(self._bump())
        self._state.objects[rtype][(namespace or "", name)] = new
        self._record(rtype, "MODIFIED", new, current)
        return _copy(new)

    def _patch(self, rtype: ResourceType, namespace: str | None, name: str, patch: Any,
               subresource: str | None) -> dict:
        current = self._get_or_404(rtype, namespace, name)
        merged = _merge_patch(current, patch)
        if not isinstance(merged, dict):
            raise ApiError(400, "BadRequest", "the patch does not make an object")
        patch_rv = (patch.get("metadata") or {}).get("resourceVersion") if isinstance(
            patch, dict) else None
        merged.setdefault("metadata", {})["resourceVersion"] = (
            str(patch_rv) if patch_rv else current["metadata"]["resourceVersion"]
        )
        return self._update(rtype, namespace, name, merged, subresource)

    def _delete(self, rtype: ResourceType, namespace: str | None, name: str,
                precondition_rv: str | None = None) -> dict:
        current = self._get_or_404(rtype, namespace, name)
        if precondition_rv and precondition_rv != current["metadata"]["resourceVersion"]:
            raise _conflict(rtype, name)
        if rtype.kind == "Namespace":  # the namespace controller empties it first
            for other in RESOURCE_TYPES:
                if other.namespaced:
                    for (ns, obj_name) in list(self._state.objects[other]):
                        if ns == name:
                            self._delete(other, ns, obj_name)
        gone = _copy(current)
        gone["metadata"]["resourceVersion"] = str(self._bump())
        del self._state.objects[rtype][(namespace or "", name)]
        self._record(rtype, "DELETED", gone, current)
        return _copy(gone)

    # HTTP --------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        user = self._authenticate(request)
        status = 500
        try:
            if user is None:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if self._latency:
                await asyncio.sleep(self._latency)
            self._check_faults(request, user)
            response = await handler(request)
            status = response.status
            return response
        except ApiError as e:
            status = e.code
            return web.json_response(e.status(), status=e.code)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            status = 400
            error = ApiError(400, "BadRequest", f"the body of the request cannot be decoded: {e}")
            return web.json_response(error.status(), status=400)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # a body of a bad shape
            status = 400
            error = ApiError(400, "BadRequest", f"cannot handle the request: {e!r}")
            return web.json_response(error.status(), status=400)
        finally:
            self._requests.append(RequestRecord(
                user or "", request.method, request.path, dict(request.query), status))

    def _authenticate(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":  # the API server accepts any case ("bearer" in-cluster)
            return None
        return self._users.get(token.strip())

    def _check_faults(self, request: web.Request, user: str) -> None:
        for fault in list(self._faults):
            if fault.method is not None and fault.method != request.method:
                continue
            if fault.path is not None and fault.path not in request.path:
                continue
            if fault.user is not None and fault.user != user:
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._faults.remove(fault)
            reasons = {403: "Forbidden", 404: "NotFound", 409: "Conflict", 410: "Expired",
                       429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
                       504: "Timeout"}
            raise ApiError(fault.status, reasons.get(fault.status, "Unknown"), fault.message)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        segments = [s for s in request.path.split("/") if s]
        if segments in (["version"], ["version", ""]):
            return web.json_response({
                "major": "1", "minor": "33", "emulationMajor": "1", "emulationMinor": "33",
                "minCompatibilityMajor": "1", "minCompatibilityMinor": "32",
                "gitVersion": "v1.33.0-fake", "gitCommit": "0" * 40, "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0",
                "compiler": "gc", "platform": "linux/amd64",
            })
        if segments == ["api"]:
            return web.json_response({"kind": "APIVersions", "versions": ["v1"],
                                      "serverAddressByClientCIDRs": [
                                          {"clientCIDR": "0.0.0.0/0",
                                           "serverAddress": f"{self.host}:{self.port}"}]})
        if segments == ["apis"]:
            return web.json_response(self._group_list())
        if len(segments) >= 2 and segments[0] == "api":
            group, version, rest = "", segments[1], segments[2:]
        elif len(segments) >= 3 and segments[0] == "apis":
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if not rest:
            return web.json_response(self._resource_list(group, version))
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], rest[1] if len(rest) > 1 else None
        subresource = rest[2] if len(rest) > 2 else None
        rtype = self._types.get((group, version, plural))
        if rtype is None or rtype in self._uninstalled or len(rest) > 3:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rtype.namespaced is False and namespace is not None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if subresource is not None and (subresource != "status" or not rtype.status):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        method = request.method
        if rtype.create_only:
            if method != "POST" or name is not None:
                raise ApiError(405, "MethodNotAllowed",
                               "the server does not allow this method on the requested resource")
            return await self._token_review(request)
        if name is None:
            if method == "GET":
                if _truthy(request.query.get("watch")):
                    return await self._watch(request, rtype, namespace)
                return self._list(request, rtype, namespace)
            if method == "POST":
                if rtype.namespaced and namespace is None:
                    raise ApiError(405, "MethodNotAllowed", "create needs a namespace in the path")
                body = await request.json()
                created = self._create(rtype, namespace, body, keep_status=False)
                return web.json_response(created, status=201)
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on"
                           " the requested resource")
        if rtype.namespaced and namespace is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if method == "GET":
            return web.json_response(self._get_or_404(rtype, namespace, name))
        if method == "PUT":
            body = await request.json()
            return web.json_response(self._update(rtype, namespace, name, body, subresource))
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
            if content_type != "application/merge-patch+json":
                raise ApiError(415, "UnsupportedMediaType", f"the fake API server supports only "
                               f"application/merge-patch+json patches, not {content_type!r}")
            patch = await request.json()
            return web.json_response(self._patch(rtype, namespace, name, patch, subresource))
        if method == "DELETE" and subresource is None:
            precondition = None
            if request.can_read_body:
                with contextlib.suppress(json.JSONDecodeError):
                    options = await request.json()
                    precondition = ((options or {}).get("preconditions") or {}).get(
                        "resourceVersion")
            return web.json_response(self._delete(rtype, namespace, name, precondition))
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on the "
                       "requested resource")

    def _group_list(self) -> dict:
        groups: dict[str, list[str]] = {}
        for rt in RESOURCE_TYPES:
            if rt.group and rt not in self._uninstalled:
                groups.setdefault(rt.group, [])
                if rt.version not in groups[rt.group]:
                    groups[rt.group].append(rt.version)
        return {
            "kind": "APIGroupList", "apiVersion": "v1",
            "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in sorted(groups.items())
            ],
        }

    def _resource_list(self, group: str, version: str) -> dict:
        resources = []
        for rt in RESOURCE_TYPES:
            if rt.group != group or rt.version != version or rt in self._uninstalled:
                continue
            verbs = ["create"] if rt.create_only else [
                "create", "delete", "get", "list", "patch", "update", "watch"]
            resources.append({"name": rt.plural, "singularName": rt.kind.lower(),
                              "namespaced": rt.namespaced, "kind": rt.kind, "verbs": verbs})
            if rt.status:
                resources.append({"name": f"{rt.plural}/status", "singularName": "",
                                  "namespaced": rt.namespaced, "kind": rt.kind,
                                  "verbs": ["get", "patch", "update"]})
        if not resources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}

    def _selected(self, request: web.Request, rtype: ResourceType,
                  namespace: str | None) -> tuple[LabelSelector, FieldSelector]:
        return (LabelSelector(request.query.get("labelSelector")),
                FieldSelector(request.query.get("fieldSelector"), rtype))

    def _list(self, request: web.Request, rtype: ResourceType,
              namespace: str | None) -> web.Response:
        labels, fields = self._selected(request, rtype, namespace)
        query = request.query
        match = query.get("resourceVersionMatch", "")
        rv_text = query.get("resourceVersion", "")
        if rv_text and rv_text != "0":
            rv = self._parse_rv(rv_text)
            if rv > self._state.rv:
                raise ApiError(504, "Timeout", f"Too large resource version: {rv}, current: "
                               f"{self._state.rv}")
            if match == "Exact" and rv != self._state.rv:
                if rv < self._state.compacted:
                    raise _gone(rv, self._state.compacted)
                raise ApiError(400, "BadRequest", "the fake API server cannot list the past "
                               "(resourceVersionMatch=Exact of an older resourceVersion)")
        token = query.get("continue")
        if token:
            try:
                snapshot_id, offset = json.loads(base64.urlsafe_b64decode(token))
            except (ValueError, TypeError) as e:
                raise ApiError(400, "BadRequest", f"invalid continue token: {e}") from None
            snapshot = self._state.snapshots.get(snapshot_id)
            if snapshot is None:
                raise ApiError(410, "Expired", "The provided continue parameter is too old to "
                               "display a consistent list result. You can start a new list "
                               "without the continue parameter.")
        else:
            items = [
                o for (ns, _), o in sorted(self._state.objects[rtype].items())
                if (namespace is None or ns == namespace)
                and labels.matches(_labels(o)) and fields.matches(o)
            ]
            snapshot_id, offset = "", 0
            snapshot = _Snapshot(self._state.rv, items)
        limit = int(query.get("limit") or 0)
        page = snapshot.items[offset:offset + limit] if limit > 0 else snapshot.items[offset:]
        metadata: dict[str, Any] = {"resourceVersion": str(snapshot.rv)}
        end = offset + len(page)
        if end < len(snapshot.items):
            if not snapshot_id:
                snapshot_id = uuid.uuid4().hex
                self._state.snapshots[snapshot_id] = snapshot
            metadata["continue"] = base64.urlsafe_b64encode(
                json.dumps([snapshot_id, end]).encode()).decode()
            metadata["remainingItemCount"] = len(snapshot.items) - end
        items = [self._list_item(rtype, o) for o in page]
        return web.json_response({"kind": f"{rtype.kind}List", "apiVersion": rtype.api_version,
                                  "metadata": metadata, "items": items})

    @staticmethod
    def _list_item(rtype: ResourceType, obj: dict) -> dict:
        if rtype.crd:
            return obj  # unstructured lists keep each item's apiVersion and kind
        return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}

    @staticmethod
    def _parse_rv(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid resource version: {text!r}") from None
        if value < 0:
            raise ApiError(400, "BadRequest", f"invalid resource version: {text!r}")
        return value

    async def _watch(self, request: web.Request, rtype: ResourceType,
                     namespace: str | None) -> web.StreamResponse:
        labels, fields = self._selected(request, rtype, namespace)
        query = request.query
        if _truthy(query.get("sendInitialEvents")):
            raise ApiError(400, "BadRequest", "the fake API server does not implement "
                           "sendInitialEvents (streaming lists)")
        timeout = float(query.get("timeoutSeconds") or self.default_watch_timeout)
        bookmarks = _truthy(query.get("allowWatchBookmarks"))
        rv_text = query.get("resourceVersion", "")
        watcher = _Watcher(rtype, namespace, labels, fields, asyncio.Queue(),
                           self._authenticate(request) or "")
        backlog: list[tuple[str, dict]] = []
        gone: ApiError | None = None
        if rv_text in ("", "0"):
            for (_ns, _), obj in sorted(self._state.objects[rtype].items()):
                if watcher.visible(obj):
                    backlog.append(("ADDED", obj))
        else:
            rv = self._parse_rv(rv_text)
            if rv > self._state.rv:
                raise ApiError(504, "Timeout", f"Too large resource version: {rv}, current: "
                               f"{self._state.rv}")
            if rv < self._state.compacted:
                gone = _gone(rv, self._state.compacted)
            else:
                for event in self._state.history:
                    if event.rv > rv and event.rtype == rtype:
                        seen = watcher.translate(event)
                        if seen is not None:
                            backlog.append(seen)
        if gone is None:
            # Registered before the first await: no write can slip between backlog and stream.
            self._state.watchers.add(watcher)
        try:
            response = web.StreamResponse(status=200,
                                          headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            if gone is not None:  # the real server answers 200, then one ERROR event
                await self._send(response, "ERROR", gone.status())
                await response.write_eof()
                return response
            for type_, obj in backlog:
                await self._send(response, type_, obj)
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + self.bookmark_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if bookmarks and now >= next_bookmark and watcher.queue.empty():
                    await self._bookmark(response, rtype)
                    next_bookmark = now + self.bookmark_interval
                wake = min(deadline, next_bookmark if bookmarks else deadline)
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), max(0.0, wake - now))
                except TimeoutError:
                    continue
                seen = watcher.translate(event)
                if seen is not None:
                    await self._send(response, *seen)
            if bookmarks and watcher.queue.empty():
                await self._bookmark(response, rtype)
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self._state.watchers.discard(watcher)
        return response

    async def _send(self, response: web.StreamResponse, type_: str, obj: dict) -> None:
        if self._latency:
            await asyncio.sleep(self._latency)
        line = json.dumps({"type": type_, "object": obj}, separators=(",", ":")) + "\n"
        await response.write(line.encode())

    async def _bookmark(self, response: web.StreamResponse, rtype: ResourceType) -> None:
        await self._send(response, "BOOKMARK", {
            "kind": rtype.kind, "apiVersion": rtype.api_version,
            "metadata": {"resourceVersion": str(self._state.rv), "creationTimestamp": None},
        })

    async def _token_review(self, request: web.Request) -> web.Response:
        body = await request.json()
        if not isinstance(body, dict) or body.get("kind") not in (None, "TokenReview"):
            raise ApiError(400, "BadRequest", "expected a TokenReview")
        spec = body.get("spec") or {}
        token = spec.get("token") or ""
        wanted = list(spec.get("audiences") or [])
        status: dict[str, Any] = {"user": {}}
        entry = self._tokens.get(token)
        if entry is not None and entry.expires is not None and entry.expires < time.monotonic():
            entry = None
        if entry is None:
            status.update(authenticated=False, error="[invalid bearer token, token lookup failed]")
        else:
            valid_for = entry.audiences if entry.audiences is not None else list(self.api_audiences)
            requested = wanted or list(self.api_audiences)
            common = [a for a in requested if a in valid_for]
            if not common:
                status.update(authenticated=False,
                              error="[invalid bearer token, token audiences are invalid]")
            else:
                user: dict[str, Any] = {"username": entry.username, "uid": entry.uid,
                                        "groups": list(entry.groups)}
                if entry.extra:
                    user["extra"] = dict(entry.extra)
                status.update(authenticated=True, user=user, audiences=common)
        review = {
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
        return web.json_response(review, status=201)

    def _abort_connections(self) -> int:
        count = 0
        if self._runner is not None and self._runner.server is not None:
            for handler in self._runner.server.connections:
                transport = handler.transport
                if transport is not None and not transport.is_closing():
                    transport.abort()
                    count += 1
        return count


def _spec_of(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _tls_context(host: str) -> tuple[ssl.SSLContext, bytes]:
    """A throwaway CA and a server certificate for `host` (an IP SAN, as for an API server
    reached by address)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-apiserver-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san, x509.DNSName("localhost")]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    import tempfile

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "tls.crt"), Path(tmp, "tls.key")
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context.load_cert_chain(cert_file, key_file)
    return context, ca.public_bytes(serialization.Encoding.PEM)
