"""Routing in the model: Gateway API HTTPRoute and GRPCRoute in mesh mode (GAMMA).

A route whose parentRef names a Service changes how traffic *to that Service* is routed.
GRPCRoute method matches become path matches here, so the translator has one kind of rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .mesh import ServiceKey


class MatchType(str, Enum):
    EXACT = "Exact"
    PREFIX = "PathPrefix"
    REGEX = "RegularExpression"


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: MatchType = MatchType.PREFIX
    value: str = "/"


@dataclass(frozen=True, slots=True)
class ValueMatch:
    """A header or query-parameter match."""

    name: str
    value: str
    type: MatchType = MatchType.EXACT


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatch | None = None
    headers: tuple[ValueMatch, ...] = ()
    query: tuple[ValueMatch, ...] = ()
    method: str | None = None


@dataclass(frozen=True, slots=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


class PathModifierType(str, Enum):
    FULL = "ReplaceFullPath"
    PREFIX = "ReplacePrefixMatch"


@dataclass(frozen=True, slots=True)
class PathModifier:
    type: PathModifierType
    value: str


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathModifier | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True, slots=True)
class Rewrite:
    hostname: str | None = None
    path: PathModifier | None = None


@dataclass(frozen=True, slots=True)
class BackendRef:
    service: ServiceKey
    port: int | None = None  # None: the parent's port
    weight: int = 1
    # backendRefs[].filters: header changes for requests sent to this backend only.
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None


@dataclass(frozen=True, slots=True)
class Mirror:
    backend: BackendRef
    percent: float = 100.0


@dataclass(frozen=True, slots=True)
class Retry:
    """Gateway API HTTPRouteRetry (GEP-1731): retry on these status codes, this many times."""

    attempts: int = 2
    codes: tuple[int, ...] = ()
    backoff: float | None = None  # seconds


@dataclass(frozen=True, slots=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(path=PathMatch()),)
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    request_timeout: float | None = None  # timeouts.request, seconds
    backend_timeout: float | None = None  # timeouts.backendRequest, seconds
    retry: Retry | None = None
    name: str = ""


@dataclass(frozen=True, slots=True)
class ParentRef:
    service: ServiceKey
    port: int | None = None  # None: every port of the service


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # "HTTPRoute" or "GRPCRoute"
    namespace: str
    name: str
    parents: tuple[ParentRef, ...] = ()
    hostnames: tuple[str, ...] = ()
    rules: tuple[RouteRule, ...] = ()
    created: str = ""  # creationTimestamp: older routes win conflicts, as Gateway API says

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)
