"""gateway.networking.k8s.io: HTTPRoute and GRPCRoute (v1; v1beta1 and v1alpha2 have the
same shape for these fields), as the Gateway API CRDs' schemas and CEL rules check them.

Limits (maxItems, lengths, patterns, enums) are the upstream schema's. Deliberate
differences, kept from before: a Service backendRef may leave out `port` (the parent's port
is used), RequestRedirect also takes 303, 307 and 308, filters on a backendRef are refused
(the mesh applies filters per rule), and a GRPCRoute has no `timeouts` or `retry` (use a
TrafficPolicy).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, PlainValidator, StrictInt, StrictStr, model_validator

from ...api.v1alpha1 import parse_duration
from ...regex import re2_error
from .base import Invalid, KubeModel, Port, RequiredText, check, in_range, max_length
from .meta import ObjectMeta

GATEWAY_GROUP = "gateway.networking.k8s.io"

_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")  # Gateway API HTTPHeaderName
_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SECTION_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
# Gateway API: an Exact or PathPrefix path is absolute and normalized.
_UNNORMALIZED = ("//", "/./", "/../", "%2f", "%2F", "#")


def _header_name(value: str) -> None:
    if value == "":
        raise Invalid("required")
    if not _HEADER_NAME.match(value) or len(value) > 256:
        raise Invalid(f"{value!r} is not a valid header name")


def _hostname(value: str) -> None:
    if value == "":
        raise Invalid("required")
    if not _HOSTNAME.match(value) or len(value) > 253:
        raise Invalid(f"{value!r} is not a hostname (a lowercase DNS name, '*.' allowed first)")


def _section_name(value: str) -> None:
    if value and (not _SECTION_NAME.match(value) or len(value) > 253):
        raise Invalid(f"{value!r} is not a DNS name (a-z, 0-9, '-', '.')")


def regex(value: str) -> None:
    # Envoy uses RE2: a pattern RE2 rejects would be NACKed by every proxy.
    if not value:
        raise Invalid("required")
    problem = re2_error(value)
    if problem is not None:
        raise Invalid(f"invalid regular expression {value!r} (RE2 syntax): {problem}")


def _duration(value: Any) -> float:
    return parse_duration(value)


HeaderName = Annotated[StrictStr, check(_header_name)]
HeaderValue = Annotated[RequiredText, max_length(4096)]
Hostname = Annotated[StrictStr, check(_hostname)]
SectionName = Annotated[StrictStr, check(_section_name)]
Duration = Annotated[float, PlainValidator(_duration)]
Weight = Annotated[StrictInt, in_range(0, 1_000_000)]
ValueMatchType = Literal["Exact", "RegularExpression"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]


# References ----------------------------------------------------------------------------------


class ParentReference(KubeModel):
    group: StrictStr = GATEWAY_GROUP
    kind: StrictStr = "Gateway"
    name: RequiredText
    namespace: StrictStr = ""
    section_name: SectionName = ""
    port: Port | None = None

    @property
    def is_service(self) -> bool:
        """A Service parent (GAMMA); a Gateway's routes are not the mesh's business."""
        return self.kind == "Service" and self.group in ("", "core")


class BackendObjectReference(KubeModel):
    group: StrictStr = ""
    kind: StrictStr = "Service"
    name: RequiredText
    namespace: StrictStr = ""
    port: Port | None = None

    @model_validator(mode="after")
    def _a_service(self) -> BackendObjectReference:
        if self.kind != "Service" or self.group not in ("", "core"):
            what = f"{self.group}/{self.kind}" if self.group else self.kind
            raise Invalid(f"only Services can be backends, not {what}", at=("kind",))
        return self


class BackendRef(BackendObjectReference):
    weight: Weight = 1
    # backendRefs[].filters: applied only to requests forwarded to this backend (validated
    # with the filter types below, which are declared later in this module).
    filters: list[BackendFilter] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _filters_once(self) -> BackendRef:
        seen: set[str] = set()
        for i, item in enumerate(self.filters):
            if item.type in seen:
                raise Invalid(f"{item.type} may appear only once on a backendRef",
                              at=("filters", i, "type"))
            seen.add(item.type)
        return self


# Matches -------------------------------------------------------------------------------------


class PathMatch(KubeModel):
    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: Annotated[StrictStr, max_length(1024)] = "/"

    @model_validator(mode="after")
    def _a_path(self) -> PathMatch:
        if self.type == "RegularExpression":
            try:
                regex(self.value)
            except Invalid as e:
                raise Invalid(e.message, at=("value",)) from None
        elif not self.value.startswith("/"):
            raise Invalid(f"{self.value!r} must start with '/'", at=("value",))
        elif any(part in self.value for part in _UNNORMALIZED) or self.value.endswith(("/..", "/.")):
            message = f"{self.value!r} must not contain '//', '/./', '/../', '%2f', '#' or end in '/.' or '/..'"
            raise Invalid(message, at=("value",))
        return self


class ValueMatch(KubeModel):
    """A header or query parameter match."""

    type: ValueMatchType = "Exact"
    name: HeaderName
    value: HeaderValue

    @model_validator(mode="after")
    def _a_regex(self) -> ValueMatch:
        if self.type == "RegularExpression":
            try:
                regex(self.value)
            except Invalid as e:
                raise Invalid(e.message, at=("value",)) from None
        return self


class HTTPRouteMatch(KubeModel):
    path: PathMatch = Field(default_factory=PathMatch)
    headers: list[ValueMatch] = Field(default_factory=list, max_length=16)
    query_params: list[ValueMatch] = Field(default_factory=list, max_length=16)
    method: HttpMethod | None = None


class GRPCMethodMatch(KubeModel):
    type: ValueMatchType = "Exact"
    service: Annotated[StrictStr, max_length(1024)] = ""
    method: Annotated[StrictStr, max_length(1024)] = ""

    @model_validator(mode="after")
    def _a_method(self) -> GRPCMethodMatch:
        if not self.service and not self.method:
            raise Invalid("set service, method, or both")
        if self.type == "Exact":
            if self.service and not _GRPC_SERVICE.match(self.service):
                message = f"{self.service!r} is not a gRPC service name (package.Service)"
                raise Invalid(message, at=("service",))
            if self.method and not _GRPC_METHOD.match(self.method):
                raise Invalid(f"{self.method!r} is not a gRPC method name", at=("method",))
            return self
        for value, field in ((self.service, "service"), (self.method, "method")):
            if value:
                try:
                    regex(value)
                except Invalid as e:
                    raise Invalid(e.message, at=(field,)) from None
        return self


class GRPCRouteMatch(KubeModel):
    method: GRPCMethodMatch | None = None
    headers: list[ValueMatch] = Field(default_factory=list, max_length=16)


# Filters -------------------------------------------------------------------------------------


class HTTPHeader(KubeModel):
    name: HeaderName
    value: HeaderValue


class HeaderModifier(KubeModel):
    set: list[HTTPHeader] = Field(default_factory=list, max_length=16)
    add: list[HTTPHeader] = Field(default_factory=list, max_length=16)
    remove: list[HeaderName] = Field(default_factory=list, max_length=16)

    @model_validator(mode="after")
    def _each_header_once(self) -> HeaderModifier:
        for field, headers in (("set", self.set), ("add", self.add)):
            seen: set[str] = set()
            for i, header in enumerate(headers):
                if header.name.lower() in seen:
                    raise Invalid(f"header {header.name!r} appears twice", at=(field, i, "name"))
                seen.add(header.name.lower())
        return self


class PathModifier(KubeModel):
    type: Literal["ReplaceFullPath", "ReplacePrefixMatch"]
    replace_full_path: Annotated[StrictStr, max_length(1024)] | None = None
    replace_prefix_match: Annotated[StrictStr, max_length(1024)] | None = None

    @model_validator(mode="after")
    def _its_value(self) -> PathModifier:
        field = "replaceFullPath" if self.type == "ReplaceFullPath" else "replacePrefixMatch"
        if not self.value:
            raise Invalid("required", at=(field,))
        if not self.value.startswith("/"):
            raise Invalid(f"{self.value!r} must start with '/'", at=(field,))
        return self

    @property
    def value(self) -> str:
        chosen = self.replace_full_path if self.type == "ReplaceFullPath" else self.replace_prefix_match
        return chosen or ""


def _status_code(value: Any) -> int:
    if isinstance(value, bool) or value not in (301, 302, 303, 307, 308):
        raise Invalid(f"{value!r} is not one of 301, 302, 303, 307, 308")
    return int(value)


class RequestRedirect(KubeModel):
    scheme: Literal["http", "https"] | None = None
    hostname: Hostname | None = None
    path: PathModifier | None = None
    port: Port | None = None
    status_code: Annotated[int, PlainValidator(_status_code)] = 302


class URLRewrite(KubeModel):
    hostname: Hostname | None = None
    path: PathModifier | None = None


class Fraction(KubeModel):
    numerator: Annotated[StrictInt, in_range(0, 2**31 - 1)]
    denominator: Annotated[StrictInt, in_range(1, 2**31 - 1)] = 100

    @model_validator(mode="after")
    def _at_most_whole(self) -> Fraction:
        if self.numerator > self.denominator:
            message = f"{self.numerator} is out of range [0, {self.denominator}]"
            raise Invalid(message, at=("numerator",))
        return self


class RequestMirror(KubeModel):
    backend_ref: BackendObjectReference
    percent: Annotated[StrictInt, in_range(0, 100)] | None = None
    fraction: Fraction | None = None

    @model_validator(mode="after")
    def _one_share(self) -> RequestMirror:
        if self.percent is not None and self.fraction is not None:
            raise Invalid("set percent or fraction, not both")
        return self

    @property
    def share(self) -> float:
        """The percentage of requests mirrored."""
        if self.percent is not None:
            return float(self.percent)
        if self.fraction is not None:
            return self.fraction.numerator * 100.0 / self.fraction.denominator
        return 100.0


# The field that holds each filter type's settings.
FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
}
# Each at most once per rule (Gateway API); RequestMirror may repeat.
_ONCE = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite")


class HTTPRouteFilter(KubeModel):
    supported: ClassVar[tuple[str, ...]] = tuple(FILTER_FIELDS)

    type: RequiredText
    request_header_modifier: HeaderModifier | None = None
    response_header_modifier: HeaderModifier | None = None
    request_redirect: RequestRedirect | None = None
    url_rewrite: URLRewrite | None = None
    request_mirror: RequestMirror | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> HTTPRouteFilter:
        if self.type not in self.supported:
            message = f"{self.type!r} is not supported; use {', '.join(self.supported)}"
            raise Invalid(message, at=("type",))
        field = FILTER_FIELDS[self.type]
        if self.settings is None:
            raise Invalid(f"required for type {self.type}", at=(field,))
        for other_type, other in FILTER_FIELDS.items():
            if other != field and self._settings(other_type) is not None:
                raise Invalid(f"must not be set for type {self.type}", at=(other,))
        return self

    def _settings(self, type_: str) -> Any:
        return getattr(self, {
            "RequestHeaderModifier": "request_header_modifier",
            "ResponseHeaderModifier": "response_header_modifier",
            "RequestRedirect": "request_redirect",
            "URLRewrite": "url_rewrite",
            "RequestMirror": "request_mirror",
        }[type_], None)

    @property
    def settings(self) -> Any:
        return self._settings(self.type) if self.type in FILTER_FIELDS else None


class GRPCRouteFilter(HTTPRouteFilter):
    supported: ClassVar[tuple[str, ...]] = (
        "RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror",
    )


class BackendFilter(HTTPRouteFilter):
    """A filter on one backendRef. Envoy applies header changes per weighted cluster; a
    mirror, a redirect or a rewrite acts on the whole route, so those stay on the rule."""

    supported: ClassVar[tuple[str, ...]] = ("RequestHeaderModifier", "ResponseHeaderModifier")


def _filter_rules(filters: list[HTTPRouteFilter]) -> None:
    seen: set[str] = set()
    for i, item in enumerate(filters):
        if item.type in _ONCE and item.type in seen:
            raise Invalid(f"{item.type} may appear only once in a rule", at=("filters", i, "type"))
        seen.add(item.type)
    if "RequestRedirect" in seen and "URLRewrite" in seen:
        raise Invalid("RequestRedirect and URLRewrite cannot be used together", at=("filters",))


# Rules ---------------------------------------------------------------------------------------


class Timeouts(KubeModel):
    request: Duration | None = None
    backend_request: Duration | None = None

    @model_validator(mode="after")
    def _backend_within_request(self) -> Timeouts:
        request, backend = self.request, self.backend_request
        if request and backend and backend > request:  # a zero request timeout: none
            raise Invalid("must not be longer than timeouts.request", at=("backendRequest",))
        return self


class Retry(KubeModel):
    """HTTPRouteRetry (GEP-1731)."""

    attempts: Annotated[StrictInt, in_range(0, 100)] | None = None
    codes: list[Annotated[StrictInt, in_range(400, 599)]] = Field(default_factory=list)
    backoff: Duration | None = None


def _default_matches() -> list[HTTPRouteMatch]:
    return [HTTPRouteMatch()]  # the API's default: every request (PathPrefix "/")


class HTTPRouteRule(KubeModel):
    name: SectionName = ""
    matches: list[HTTPRouteMatch] = Field(default_factory=_default_matches, max_length=64)
    filters: list[HTTPRouteFilter] = Field(default_factory=list, max_length=16)
    backend_refs: list[BackendRef] = Field(default_factory=list, max_length=16)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    retry: Retry | None = None

    @model_validator(mode="after")
    def _rule(self) -> HTTPRouteRule:
        _filter_rules(self.filters)
        if self.backend_refs and any(f.type == "RequestRedirect" for f in self.filters):
            raise Invalid("a rule with a RequestRedirect filter has no backendRefs", at=("backendRefs",))
        # Gateway API: replacing a prefix needs exactly one PathPrefix match to know the prefix.
        matches = self.matches or _default_matches()
        one_prefix = len(matches) == 1 and matches[0].path.type == "PathPrefix"
        for i, item in enumerate(self.filters):
            path = getattr(item.settings, "path", None)
            if isinstance(path, PathModifier) and path.type == "ReplacePrefixMatch" and not one_prefix:
                message = "ReplacePrefixMatch needs exactly one PathPrefix match in this rule's matches"
                raise Invalid(message, at=("filters", i, FILTER_FIELDS[item.type], "path"))
        return self


class GRPCRouteRule(KubeModel):
    name: SectionName = ""
    matches: list[GRPCRouteMatch] = Field(default_factory=list, max_length=64)
    filters: list[GRPCRouteFilter] = Field(default_factory=list, max_length=16)
    backend_refs: list[BackendRef] = Field(default_factory=list, max_length=16)
    timeouts: Any = None
    retry: Any = None

    @model_validator(mode="after")
    def _rule(self) -> GRPCRouteRule:
        for field in ("timeouts", "retry"):
            if getattr(self, field) is not None:
                raise Invalid("GRPCRoute has no such field; use a TrafficPolicy", at=(field,))
        _filter_rules(list(self.filters))
        return self


# Routes --------------------------------------------------------------------------------------


def _some_parents(parents: list[ParentReference]) -> None:
    if not parents:
        raise Invalid("required: the Service this route applies to (kind: Service)")


Parents = Annotated[list[ParentReference], Field(max_length=32), check(_some_parents)]


class HTTPRouteSpec(KubeModel):
    parent_refs: Parents = Field(default_factory=list, validate_default=True)
    hostnames: list[Hostname] = Field(default_factory=list, max_length=16)
    rules: list[HTTPRouteRule] = Field(default_factory=list, max_length=16)


class GRPCRouteSpec(KubeModel):
    parent_refs: Parents = Field(default_factory=list, validate_default=True)
    hostnames: list[Hostname] = Field(default_factory=list, max_length=16)
    rules: list[GRPCRouteRule] = Field(default_factory=list, max_length=16)


class HTTPRoute(KubeModel):
    metadata: ObjectMeta
    spec: HTTPRouteSpec = Field(default_factory=dict, validate_default=True)


class GRPCRoute(KubeModel):
    metadata: ObjectMeta
    spec: GRPCRouteSpec = Field(default_factory=dict, validate_default=True)


BackendRef.model_rebuild()  # its filters' type is declared after it
