"""Gateway API routes in mesh mode (GAMMA) + TrafficPolicy -> Envoy route configuration.

Outbound (client sidecar): one virtual host per (service, port) answers every name a client
may put in the Host header; its routes are the HTTPRoute/GRPCRoute rules attached to that
service (or one default route to the service's own cluster), ordered by Gateway API match
precedence because Envoy takes the first route that matches.

Inbound (destination sidecar): the single inbound listener receives HTTP for all of the
workload's app ports and picks the app port from the Host header; the destination's local
rate limits live here.

Pure functions: no I/O, no globals, no clock. Choices where the specs leave room are written
next to the code that makes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from ..regex import re2_error
from ..model.client_kinds import GRPC_MAX_RETRIES, grpc_retry_conditions
from ..model.mesh import AppProtocol, Service, ServiceKey, ServicePort
from ..model.policy import Fault, FaultAbort, LocalRateLimit, Retries, TrafficPolicySpec
from ..model.routes import (
    BackendRef,
    HeaderModifier,
    MatchType,
    PathMatch,
    PathModifier,
    PathModifierType,
    Redirect,
    Route,
    RouteMatch,
    RouteRule,
    ValueMatch,
)
from . import names
from .http_filters import fault_per_route, fractional_percent, rate_limit_per_route, seconds

__all__ = [
    "DEFAULT_ROUTE_TIMEOUT",
    "INVALID_BACKEND_CLUSTER",
    "RETRY_HOST_SELECTION_ATTEMPTS",
    "attached_routes",
    "inbound_route_configuration",
    "outbound_route_configuration",
    "service_domains",
    "service_virtual_host",
]

# Envoy's own default route timeout, written out so a config dump says what applies.
DEFAULT_ROUTE_TIMEOUT = 15.0
# Weighted-cluster entry for the share of traffic that belongs to invalid backendRefs. No
# cluster has this name (cluster names are `outbound|...`/`inbound|...`), so Envoy answers
# that share with the route's cluster_not_found_response_code: 500, as Gateway API requires.
INVALID_BACKEND_CLUSTER = "invalid-backend-ref"
# The answer for the share of invalid backendRefs. Gateway API: 500 for an HTTPRoute; UNAVAILABLE
# for a GRPCRoute (its spec says so; Envoy sends a 503 local reply to a gRPC request as
# UNAVAILABLE, and a 500 as UNKNOWN, gRPC's HTTP mapping).
INVALID_BACKEND_HTTP_STATUS = {"HTTPRoute": 500, "GRPCRoute": 503}
GRPC_UNAVAILABLE = 14
# How many times a retry may re-pick a host to avoid the ones already tried.
RETRY_HOST_SELECTION_ATTEMPTS = 5
PREVIOUS_HOSTS_PREDICATE = "envoy.retry_host_predicates.previous_hosts"
# Connection-level failures are always safe to retry for GEP-1731 retries; status codes are
# retried only when the user lists them.
ROUTE_RETRY_ON = "connect-failure,refused-stream"

_WELL_KNOWN_PORTS = {"http": 80, "https": 443}
_REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


# ----------------------------------------------------------------------------- host names


def _host(host: str, port: int | None = None) -> str:
    """A Host header value: IPv6 literals in brackets, `:port` when given."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def _name_forms(service: Service, *, short: bool) -> list[str]:
    """Every name of the service's frontend: DNS forms, then the cluster IP (if any)."""
    forms = [service.name] if short else []
    forms += [f"{service.name}.{service.namespace}", f"{service.name}.{service.namespace}.svc"]
    forms.append(service.key.fqdn)
    if service.cluster_ip and service.cluster_ip.lower() != "none":  # headless: no frontend IP
        forms.append(service.cluster_ip)
    return forms


def service_domains(service: Service, port: ServicePort, *, local: bool, default_port: bool) -> list[str]:
    """Host header values that address (service, port) from a client sidecar.

    `name.ns`, `name.ns.svc`, the FQDN and the cluster IP, plus the bare `name` when `local`
    (the client is in the service's namespace: DNS search-path semantics), each with
    `:port`, and also without a port when this is the service's default port. Never a
    wildcard: domains must stay unique across the route configuration.
    """
    out: list[str] = []
    for form in _name_forms(service, short=local):
        out.append(_host(form, port.port))
        if default_port:
            out.append(_host(form))
    return out


# ------------------------------------------------------------------------ attached routes


def attached_routes(service: Service, port: int, routes: Iterable[Route], *, local: bool) -> list[Route]:
    """The routes that apply to traffic for (service, port), GAMMA rules applied.

    - A route attaches when one of its parentRefs names the service with this port or none.
    - GEP-1294 "Route types": when GRPCRoutes and HTTPRoutes both attach to one service port,
      only the GRPCRoutes apply.
    - GEP-1294 "Namespace boundaries": a route in the service's namespace is a producer route
      (applies to every client); a route elsewhere is a consumer route, which applies only to
      clients in the route's own namespace and then replaces the producer routes. A `local`
      client is in the service's namespace, so consumer routes never apply to it. Otherwise
      the caller must pass only the consumer routes of the client's own namespace (the
      outbound route configuration is built per client namespace); any consumer route
      passed here wins over the producer routes.
    - `hostnames` is ignored: GEP-1294 says meshes SHOULD NOT infer anything from it (match
      the Host header instead).
    """
    attached = [
        r
        for r in routes
        if any(p.service == service.key and p.port in (None, port) for p in r.parents)
    ]
    if any(r.kind == "GRPCRoute" for r in attached):
        attached = [r for r in attached if r.kind == "GRPCRoute"]
    producer = [r for r in attached if r.namespace == service.namespace]
    consumer = [r for r in attached if r.namespace != service.namespace]
    if local or not consumer:
        return producer
    return consumer


# -------------------------------------------------------------------------------- matches


def _normalized_prefix(value: str) -> str:
    """Gateway API ignores a trailing `/` of PathPrefix: `/foo/` == `/foo`; `/` becomes ``."""
    return value.rstrip("/")


def _regex_escape(text: str) -> str:
    """Escape RE2 metacharacters (Python's re.escape also escapes characters RE2 rejects)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _valid_regex(pattern: str) -> bool:
    """One bad regex makes Envoy reject the whole route configuration, so a match whose
    regex RE2 rejects is dropped instead (sources validate first; this is the last line of
    defence)."""
    return re2_error(pattern) is None


def _usable(match: RouteMatch) -> bool:
    values = [v.value for v in (*match.headers, *match.query) if v.type is MatchType.REGEX]
    if match.path is not None and match.path.type is MatchType.REGEX:
        values.append(match.path.value)
    return all(_valid_regex(v) for v in values)


def _first_per_name(values: Sequence[ValueMatch], *, fold_case: bool) -> list[ValueMatch]:
    """Gateway API: with several matches for one name, only the first one counts."""
    seen: set[str] = set()
    out = []
    for v in values:
        key = v.name.lower() if fold_case else v.name
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _string_matcher(value: ValueMatch) -> string_pb2.StringMatcher:
    if value.type is MatchType.REGEX:
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=value.value))
    if value.type is MatchType.PREFIX:
        return string_pb2.StringMatcher(prefix=value.value)
    return string_pb2.StringMatcher(exact=value.value)


def _path_of(match: RouteMatch) -> PathMatch:
    return match.path if match.path is not None else PathMatch()


def _envoy_match(match: RouteMatch, *, grpc: bool = False) -> rc.RouteMatch:
    """grpc: for proxyless gRPC, which knows prefix, path and safe_regex only (gRFC A28): a
    path_separated_prefix becomes the equivalent regex."""
    out = rc.RouteMatch()
    path = _path_of(match)
    if path.type is MatchType.EXACT:
        out.path = path.value
    elif path.type is MatchType.REGEX:
        out.safe_regex.regex = path.value
    else:
        prefix = _normalized_prefix(path.value)
        if not prefix:
            out.prefix = "/"
        elif grpc or "?" in prefix or "#" in prefix:  # outside path_separated_prefix's grammar
            out.safe_regex.regex = _regex_escape(prefix) + "(/.*)?"
        else:
            # `/foo` matches `/foo` and `/foo/...`, never `/foobar` (element-wise prefix).
            out.path_separated_prefix = prefix
    if match.method:
        out.headers.add(name=":method", string_match=string_pb2.StringMatcher(exact=match.method.upper()))
    for header in _first_per_name(match.headers, fold_case=True):
        name = header.name.lower()
        # Envoy keeps Host as :authority; GEP-1294 points users to Host header matches.
        out.headers.add(name=":authority" if name == "host" else name, string_match=_string_matcher(header))
    for param in _first_per_name(match.query, fold_case=False):
        out.query_parameters.add(name=param.name, string_match=_string_matcher(param))
    return out


@dataclass(frozen=True, slots=True)
class _Entry:
    """One match of one rule of one route: becomes one Envoy route."""

    route: Route
    rule_index: int
    rule: RouteRule
    match_index: int
    match: RouteMatch

    @property
    def precedence(self) -> tuple[object, ...]:
        """Gateway API HTTPRoute match precedence, most specific first:
        exact path > longest prefix > regex (regex precedence is implementation-specific;
        a prefix `/` therefore sits before every regex), then method, most header matches,
        most query matches; ties across routes: oldest creation time (unknown last), then
        `namespace/name`; within a route: rule order, then match order."""
        path = _path_of(self.match)
        if path.type is MatchType.EXACT:
            kind, length = 0, len(path.value)
        elif path.type is MatchType.PREFIX:
            kind, length = 1, len(_normalized_prefix(path.value))
        else:
            kind, length = 2, 0
        created = (0, self.route.created) if self.route.created else (1, "")
        return (
            kind,
            -length,
            0 if self.match.method else 1,
            -len(_first_per_name(self.match.headers, fold_case=True)),
            -len(_first_per_name(self.match.query, fold_case=False)),
            created,
            f"{self.route.namespace}/{self.route.name}",
            self.rule_index,
            self.match_index,
        )

    @property
    def name(self) -> str:
        r = self.route
        return f"{r.kind.lower()}/{r.namespace}/{r.name}/rule/{self.rule_index}/match/{self.match_index}"


def _entries(routes: Sequence[Route]) -> list[_Entry]:
    out = []
    for route in routes:
        for i, rule in enumerate(route.rules):
            matches = rule.matches or (RouteMatch(path=PathMatch()),)
            for j, match in enumerate(matches):
                if _usable(match):
                    out.append(_Entry(route, i, rule, j, match))
    out.sort(key=lambda e: e.precedence)
    return out


# ------------------------------------------------------------------------ path rewriting


@dataclass(frozen=True, slots=True)
class _PathRewrite:
    prefix: str | None = None  # prefix_rewrite: swap the matched prefix (or exact path)
    regex: tuple[str, str] | None = None  # regex_rewrite: (pattern, substitution)


def _literal_substitution(text: str) -> str:
    """User text inside an RE2 substitution: a backslash would start an escape."""
    return text.replace("\\", "\\\\")


def _path_rewrite(modifier: PathModifier | None, match: RouteMatch) -> _PathRewrite | None:
    """Gateway API path modifiers as Envoy rewrites (same for URLRewrite and redirects).

    ReplaceFullPath: the whole path (query string kept) becomes the value.
    ReplacePrefixMatch, per the Gateway API table: trailing `/` of both the matched prefix and
    the replacement are ignored, the rest of the path is kept, an empty result is `/`:
      /foo/bar, prefix /foo, replacement /xyz -> /xyz/bar;  /foo -> /xyz;  /foo/ -> /xyz/
      replacement `/` (or empty): /foo/bar -> /bar;  /foo -> /;  /foo/ -> /
    Envoy's prefix_rewrite does exactly this for a non-empty replacement after a
    path_separated_prefix match; an empty replacement (which would give `//bar` or ``) and
    a `/` prefix (where the rest has no leading `/`) use a regex instead.
    ReplacePrefixMatch is only defined for PathPrefix matches; after an Exact match the
    exact path counts as the prefix, after a RegularExpression match it is ignored.
    """
    if modifier is None:
        return None
    if modifier.type is PathModifierType.FULL:
        return _PathRewrite(regex=("^.*$", _literal_substitution(modifier.value)))
    replacement = modifier.value.rstrip("/")
    path = _path_of(match)
    if path.type is MatchType.EXACT:
        prefix = _normalized_prefix(path.value)
        rest = path.value[len(prefix):]
        return _PathRewrite(prefix=(replacement + rest) or "/")
    if path.type is not MatchType.PREFIX:
        return None
    prefix = _normalized_prefix(path.value)
    if not prefix:
        return _PathRewrite(regex=("^/", _literal_substitution(replacement) + "/")) if replacement else None
    if not replacement:
        return _PathRewrite(regex=(f"^{_regex_escape(prefix)}/?", "/"))
    if "?" in prefix or "#" in prefix:  # matched by regex, not path_separated_prefix
        pattern = f"^{_regex_escape(prefix)}(/.*)?$"
        return _PathRewrite(regex=(pattern, _literal_substitution(replacement) + "\\1"))
    return _PathRewrite(prefix=replacement)


def _apply_path_rewrite(
    target: rc.RouteAction | rc.RedirectAction, rewrite: _PathRewrite | None
) -> None:
    if rewrite is None:
        return
    if rewrite.prefix is not None:
        target.prefix_rewrite = rewrite.prefix
    elif rewrite.regex is not None:
        target.regex_rewrite.pattern.regex = rewrite.regex[0]
        target.regex_rewrite.substitution = rewrite.regex[1]


# ------------------------------------------------------------------------- route actions


def _redirect_action(redirect: Redirect, match: RouteMatch, listener_port: int) -> rc.RedirectAction:
    """RequestRedirect. Gateway API port rules: no port given -> the well-known port of the
    redirect scheme when a scheme is given, else the listener (= service) port; the default
    port SHOULD be left out of Location. Envoy keeps the request's `:port` unless told
    otherwise (dropping an explicit `:80` when the scheme changes) and drops it whenever
    host_redirect is set, so: with a scheme and neither hostname nor port, no port_redirect
    (`Host: api` -> `https://api/...`; _rule_routes adds the variants for a request that named
    a port); with a scheme and a hostname, the scheme's port, left out as the default; with a
    hostname and no scheme/port, the service port; a port that is the scheme's well-known one
    is left out when a hostname is set (and without one, by _rule_routes' variants)."""
    out = rc.RedirectAction(response_code=_REDIRECT_CODES.get(redirect.status_code, rc.RedirectAction.FOUND))
    scheme = redirect.scheme.lower() if redirect.scheme else None
    if scheme:
        out.scheme_redirect = scheme
    if redirect.hostname:
        out.host_redirect = redirect.hostname
    port = redirect.port
    if port is None:
        if scheme and redirect.hostname:
            port = _WELL_KNOWN_PORTS.get(scheme)
        elif redirect.hostname:
            port = listener_port
    if port is not None and not (redirect.hostname and port == _WELL_KNOWN_PORTS.get(scheme or "http")):
        out.port_redirect = port
    if redirect.path is not None:
        if redirect.path.type is PathModifierType.FULL:
            out.path_redirect = redirect.path.value
        else:
            _apply_path_rewrite(out, _path_rewrite(redirect.path, match))
    return out


def _backend_cluster(
    ref: BackendRef, parent: Service, parent_port: int, services: Mapping[ServiceKey, Service]
) -> str | None:
    """The cluster of a backendRef, or None when the Service or its port does not exist."""
    port = ref.port if ref.port is not None else parent_port
    service = parent if ref.service == parent.key else services.get(ref.service)
    if service is None or service.port(port) is None:
        return None
    return names.cluster_name(ref.service, port)


def _headers_to_add(modifier: HeaderModifier) -> list[base_pb2.HeaderValueOption]:
    """set -> overwrite-or-add, add -> append-or-add. Envoy refuses to modify pseudo-headers
    and `host` this way, so those are skipped (set Host with URLRewrite hostname instead).
    Envoy reads `%` in a header value as the start of a substitution command (%REQ(...)%),
    so a literal value has each `%` doubled: a user's "50%" is sent as "50%", not rejected."""
    out = []
    for action, pairs in ((_OVERWRITE, modifier.set), (_APPEND, modifier.add)):
        for key, value in pairs:
            if _modifiable(key):
                header = base_pb2.HeaderValue(key=key, value=value.replace("%", "%%"))
                out.append(base_pb2.HeaderValueOption(header=header, append_action=action))
    return out


def _modifiable(header: str) -> bool:
    return not header.startswith(":") and header.lower() != "host"


def _apply_header_modifiers(route: rc.Route, rule: RouteRule) -> None:
    if rule.request_headers is not None:
        route.request_headers_to_add.extend(_headers_to_add(rule.request_headers))
        route.request_headers_to_remove.extend(h for h in rule.request_headers.remove if _modifiable(h))
    if rule.response_headers is not None:
        route.response_headers_to_add.extend(_headers_to_add(rule.response_headers))
        route.response_headers_to_remove.extend(h for h in rule.response_headers.remove if _modifiable(h))


def _retry_on_policy(retries: Retries) -> tuple[list[str], list[int]]:
    """TrafficPolicy retryOn: Envoy conditions; bare status codes (Istio style `503`) become
    retriable_status_codes under `retriable-status-codes`."""
    conditions: list[str] = []
    codes: list[int] = []
    for item in (c.strip() for c in retries.retry_on.split(",")):
        if not item:
            continue
        if item.isdigit():
            codes.append(int(item))
        elif item not in conditions:
            conditions.append(item)
    if codes and "retriable-status-codes" not in conditions:
        conditions.append("retriable-status-codes")
    return conditions, codes


@dataclass(frozen=True, slots=True)
class _RetrySettings:
    retries: int  # 0: no retries
    conditions: tuple[str, ...] = ()
    codes: tuple[int, ...] = ()
    backoff: float | None = None
    per_try: float | None = None  # the per-try timeout (of the only try without retries)


def _retry_settings(rule: RouteRule | None, policy: TrafficPolicySpec | None) -> _RetrySettings:
    """GEP-1731 `retry` of the rule wins over TrafficPolicy.retries; attempts 0 = no retries.
    timeouts.backendRequest is the per-try timeout (also of the only try), else the policy's
    perTryTimeout when the policy's retries apply."""
    per_try = rule.backend_timeout if rule is not None else None
    if rule is not None and rule.retry is not None:
        retry = rule.retry
        codes = tuple(sorted(set(retry.codes)))
        conditions = ROUTE_RETRY_ON.split(",") + (["retriable-status-codes"] if codes else [])
        backoff = retry.backoff if retry.backoff is not None and retry.backoff > 0 else None
        return _RetrySettings(max(retry.attempts, 0), tuple(conditions), codes, backoff, per_try)
    if policy is not None and policy.retries is not None:
        if per_try is None:
            per_try = policy.retries.per_try_timeout
        policy_conditions, policy_codes = _retry_on_policy(policy.retries)
        return _RetrySettings(
            policy.retries.attempts, tuple(policy_conditions), tuple(policy_codes), None, per_try
        )
    return _RetrySettings(0, per_try=per_try)


def _retry_policy(settings: _RetrySettings) -> rc.RetryPolicy | None:
    """Envoy's retry policy; none without retries (`num_retries: 0` says nothing Envoy's
    route timeout does not, and gRPC rejects it): the only try's timeout is then folded into
    the route timeout (`_envoy_timeout`)."""
    if not settings.retries:
        return None
    out = rc.RetryPolicy(retry_on=",".join(settings.conditions))
    out.num_retries.value = settings.retries
    out.retriable_status_codes.extend(settings.codes)
    if settings.backoff is not None:
        out.retry_back_off.base_interval.CopyFrom(seconds(settings.backoff))
    if settings.per_try is not None:
        out.per_try_timeout.CopyFrom(seconds(settings.per_try))
    out.retry_host_predicate.add(name=PREVIOUS_HOSTS_PREDICATE).typed_config.Pack(
        previous_hosts_pb2.PreviousHostsPredicate()
    )
    out.host_selection_retry_max_attempts = RETRY_HOST_SELECTION_ATTEMPTS
    return out


def _grpc_retry_policy(settings: _RetrySettings) -> rc.RetryPolicy | None:
    """The retry policy as gRPC reads it (gRFC A44): only the gRPC status conditions, more
    than 0 retries (at most GRPC_MAX_RETRIES count), backoff; nothing else. None when no
    retry remains: gRPC would drop the policy, and rejects `num_retries: 0`."""
    conditions = grpc_retry_conditions(list(settings.conditions))
    if not settings.retries or not conditions:
        return None
    out = rc.RetryPolicy(retry_on=",".join(conditions))
    out.num_retries.value = min(settings.retries, GRPC_MAX_RETRIES)
    if settings.backoff is not None:
        # gRPC treats intervals under 1 ms as 1 ms; max_interval defaults to 10 x base.
        out.retry_back_off.base_interval.CopyFrom(seconds(max(settings.backoff, 0.001)))
    return out


def _only_try_bound(timeout: float, per_try: float | None) -> float:
    """The request timeout when its only try has a timeout of its own: the smaller (0 = none)."""
    if per_try is None or per_try <= 0:
        return timeout
    return per_try if timeout <= 0 else min(timeout, per_try)


def _envoy_timeout(rule: RouteRule | None, policy: TrafficPolicySpec | None, default: float,
                   settings: _RetrySettings) -> float:
    timeout = _route_timeout(rule, policy, default)
    return timeout if settings.retries else _only_try_bound(timeout, settings.per_try)


def _grpc_timeout(rule: RouteRule | None, policy: TrafficPolicySpec | None,
                  settings: _RetrySettings, retry: rc.RetryPolicy | None) -> float:
    """The call timeout gRPC applies: only an explicit one (Envoy's 15 s default route timeout
    is Envoy's), bounded by the only try's timeout when gRPC does not retry (it has no
    per-try timeout, gRFC A44)."""
    timeout = _route_timeout(rule, policy, 0.0)
    return timeout if retry is not None else _only_try_bound(timeout, settings.per_try)


def _apply_timeouts_and_retries(
    action: rc.RouteAction, rule: RouteRule | None, policy: TrafficPolicySpec | None,
    port: ServicePort, grpc: bool,
) -> None:
    settings = _retry_settings(rule, policy)
    if not grpc:
        action.timeout.CopyFrom(seconds(_envoy_timeout(rule, policy, _default_timeout(port), settings)))
        retry = _retry_policy(settings)
    else:
        retry = _grpc_retry_policy(settings)
        timeout = _grpc_timeout(rule, policy, settings, retry)
        if timeout > 0:
            # gRFC A31: grpc_timeout_header_max, when present, caps the application's deadline
            # (gRPC uses it in place of max_stream_duration); both say the same here.
            action.max_stream_duration.max_stream_duration.CopyFrom(seconds(timeout))
            action.max_stream_duration.grpc_timeout_header_max.CopyFrom(seconds(timeout))
    if retry is not None:
        action.retry_policy.CopyFrom(retry)


def _grpc_hash_policies(policy: TrafficPolicySpec | None) -> list[rc.RouteAction.HashPolicy]:
    """gRPC hashes on headers only (gRFC A42): other keys are left out."""
    return [h for h in _hash_policies(policy) if h.HasField("header")]


def _default_timeout(port: ServicePort) -> float:
    # gRPC streams live for minutes or hours: a default request timeout would cut them.
    return 0.0 if port.app_protocol is AppProtocol.GRPC else DEFAULT_ROUTE_TIMEOUT


def _hash_policies(policy: TrafficPolicySpec | None) -> list[rc.RouteAction.HashPolicy]:
    """The key of ring-hash load balancing (TrafficPolicy loadBalancer.consistentHash)."""
    balancer = policy.load_balancer if policy is not None else None
    key = balancer.consistent_hash if balancer is not None else None
    if key is None:
        return []
    hashing = rc.RouteAction.HashPolicy(terminal=True)
    if key.http_header_name is not None:
        hashing.header.header_name = key.http_header_name
    elif key.http_cookie is not None:
        hashing.cookie.name = key.http_cookie
    else:
        hashing.connection_properties.source_ip = True
    return [hashing]


def _route_timeout(
    rule: RouteRule | None, policy: TrafficPolicySpec | None, default: float = DEFAULT_ROUTE_TIMEOUT
) -> float:
    """timeouts.request, else timeouts.backendRequest, else the policy's timeout, else
    Envoy's 15 s default (explicit; none for gRPC). 0 disables the timeout, as in Gateway API."""
    if rule is not None and rule.request_timeout is not None:
        return rule.request_timeout
    if rule is not None and rule.backend_timeout is not None:
        return rule.backend_timeout
    if policy is not None and policy.timeout is not None:
        return policy.timeout
    return default


def _mirror_policies(
    rule: RouteRule, parent: Service, parent_port: int, services: Mapping[ServiceKey, Service]
) -> list[rc.RouteAction.RequestMirrorPolicy]:
    """RequestMirror filters; a mirror to a missing backend, or of 0 %, is left out."""
    out = []
    for mirror in rule.mirrors:
        cluster = _backend_cluster(mirror.backend, parent, parent_port, services)
        if cluster is None or mirror.percent <= 0:
            continue
        policy = rc.RouteAction.RequestMirrorPolicy(cluster=cluster)
        if mirror.percent < 100:
            policy.runtime_fraction.default_value.CopyFrom(fractional_percent(mirror.percent))
        out.append(policy)
    return out


def _forward(
    route: rc.Route,
    entry: _Entry,
    parent: Service,
    port: ServicePort,
    policy: TrafficPolicySpec | None,
    services: Mapping[ServiceKey, Service],
    grpc: bool = False,
) -> None:
    """Fill the route's action for a forwarding rule (backendRefs), or answer 500.

    Gateway API: each backendRef gets its weight's share; a ref to a Service that does not
    exist (or lacks the port) gets its share answered with 500 (UNAVAILABLE for a GRPCRoute);
    weight 0 receives nothing; no backendRefs, all weights 0, or no valid backend with weight:
    every request gets that answer.

    grpc: gRPC has no direct response (a route without a forwarding action fails with
    UNAVAILABLE, gRFC A28), and an unknown cluster name would hold every channel of the
    namespace until gRPC gives the name up (15 s). So the invalid share is a weighted entry to
    the parent service's own cluster that never reaches it: a fault abort of 100 % in the
    entry's own filter config (gRFC A33; it wins over a TrafficPolicy's route-level fault),
    with the HTTPRoute's 500 (which gRPC maps to UNKNOWN, not retried) or the GRPCRoute's
    UNAVAILABLE.
    """
    rule = entry.rule
    # By (cluster, the backendRef's own header filters): refs to one cluster with the same
    # filters share an entry.
    weights: dict[tuple[str, HeaderModifier | None, HeaderModifier | None], int] = {}
    invalid = 0
    for ref in rule.backends:
        cluster = _backend_cluster(ref, parent, port.port, services)
        if cluster is None:
            invalid += max(ref.weight, 0)
        else:
            key = (cluster, ref.request_headers, ref.response_headers)
            weights[key] = weights.get(key, 0) + max(ref.weight, 0)
    status = INVALID_BACKEND_HTTP_STATUS.get(entry.route.kind, 500)
    if sum(weights.values()) == 0:
        if not grpc:
            route.direct_response.status = status
            return
        weights, invalid = {}, 1
    action = route.route
    filtered = any(request or response for _, request, response in weights)
    if len(weights) == 1 and not invalid and not filtered:
        action.cluster = next(iter(weights))[0]
    else:
        for (cluster, request, response), weight in weights.items():
            entry_ = action.weighted_clusters.clusters.add(name=cluster)
            entry_.weight.value = weight
            # backendRefs[].filters: applied only to requests sent to this backend.
            if request is not None:
                entry_.request_headers_to_add.extend(_headers_to_add(request))
                entry_.request_headers_to_remove.extend(h for h in request.remove if _modifiable(h))
            if response is not None:
                entry_.response_headers_to_add.extend(_headers_to_add(response))
                entry_.response_headers_to_remove.extend(h for h in response.remove if _modifiable(h))
        if invalid and grpc:
            failing = action.weighted_clusters.clusters.add(name=names.cluster_name(parent.key, port.port))
            failing.weight.value = invalid
            abort = (FaultAbort(100.0, grpc_status=GRPC_UNAVAILABLE) if status == 503
                     else FaultAbort(100.0, http_status=status))
            failing.typed_per_filter_config[names.FAULT_FILTER].CopyFrom(fault_per_route(Fault(abort=abort)))
        elif invalid:
            action.weighted_clusters.clusters.add(name=INVALID_BACKEND_CLUSTER).weight.value = invalid
            action.cluster_not_found_response_code = (
                rc.RouteAction.SERVICE_UNAVAILABLE if status == 503 else rc.RouteAction.INTERNAL_SERVER_ERROR)
    if rule.rewrite is not None:
        if rule.rewrite.hostname:
            action.host_rewrite_literal = rule.rewrite.hostname
        _apply_path_rewrite(action, _path_rewrite(rule.rewrite.path, entry.match))
    if not grpc:  # gRPC does not mirror
        action.request_mirror_policies.extend(_mirror_policies(rule, parent, port.port, services))
    action.hash_policy.extend(_grpc_hash_policies(policy) if grpc else _hash_policies(policy))
    _apply_timeouts_and_retries(action, rule, policy, port, grpc)


# An authority that names a port other than 80 (RE2 has no lookahead): digit strings != "80".
_NON_DEFAULT_PORT_AUTHORITY = r".+:(?:[0-79][0-9]*|8|8[1-9][0-9]*|80[0-9]+)"


def _rule_routes(
    entry: _Entry,
    parent: Service,
    port: ServicePort,
    policy: TrafficPolicySpec | None,
    services: Mapping[ServiceKey, Service],
    grpc: bool = False,
) -> list[rc.Route]:
    route = rc.Route(name=entry.name, match=_envoy_match(entry.match, grpc=grpc))
    _apply_header_modifiers(route, entry.rule)
    redirect = entry.rule.redirect
    if redirect is None:
        _forward(route, entry, parent, port, policy, services, grpc)
        return [route]
    # Gateway API: a redirect rule has no backends.
    route.redirect.CopyFrom(_redirect_action(redirect, entry.match, port.port))
    default_port = _default_port_redirect(redirect)
    if default_port is None:
        return [route]
    # To the request's own host at the (new) scheme's default port: Location SHOULD carry no
    # port. Envoy keeps the request's `:port` (dropping only `:80` on a scheme change) unless
    # host_redirect is set, and never drops a port_redirect that is the default. So: the
    # service's own names with this port (`api:8080`, `api.shop:8080`, the cluster IP, ...)
    # are redirected to the bare name; another authority naming a port other than 80 gets
    # the default port explicitly (`https://other:443/`), never its own; a request that
    # named no port (or :80) gets none.
    fallback = rc.Route()
    fallback.CopyFrom(route)
    fallback.redirect.ClearField("port_redirect")
    out = []
    for index, form in enumerate(_name_forms(parent, short=True)):
        named = rc.Route()
        named.CopyFrom(fallback)
        named.name = f"{entry.name}|host|{index}"
        authority = named.match.headers.add(name=":authority")
        authority.string_match.exact = _host(form, port.port)
        authority.string_match.ignore_case = True
        named.redirect.host_redirect = _host(form)
        out.append(named)
    explicit = rc.Route()
    explicit.CopyFrom(fallback)
    explicit.name = f"{entry.name}|port"
    header = explicit.match.headers.add(name=":authority")
    header.string_match.safe_regex.regex = _NON_DEFAULT_PORT_AUTHORITY
    explicit.redirect.port_redirect = default_port
    return [*out, explicit, fallback]


def _default_port_redirect(redirect: Redirect) -> int | None:
    """The well-known port a redirect keeping the request's host goes to, if it does: a
    scheme given with no port, or a port that is the default of the redirect's scheme (the
    request's, http in the mesh, when none is given). None otherwise (a hostname is given,
    another port, or neither scheme nor port: the request's own port is kept)."""
    if redirect.hostname:
        return None
    scheme = (redirect.scheme or "").lower()
    if redirect.port is None:
        return _WELL_KNOWN_PORTS.get(scheme) if scheme else None
    return redirect.port if redirect.port == _WELL_KNOWN_PORTS.get(scheme or "http") else None


def _default_route(
    service: Service, port: ServicePort, policy: TrafficPolicySpec | None, grpc: bool = False
) -> rc.Route:
    route = rc.Route(name="default")
    route.match.prefix = "/"
    action = route.route
    action.cluster = names.cluster_name(service.key, port.port)
    action.hash_policy.extend(_grpc_hash_policies(policy) if grpc else _hash_policies(policy))
    _apply_timeouts_and_retries(action, None, policy, port, grpc)
    return route


# ----------------------------------------------------------------------------- outbound


def service_virtual_host(
    service: Service,
    port: ServicePort,
    routes: Sequence[Route],
    policy: TrafficPolicySpec | None,
    services: Mapping[ServiceKey, Service],
    *,
    local: bool,
    default_port: bool,
    grpc: bool = False,
) -> rc.VirtualHost:
    """The client-side virtual host for traffic to (service, port).

    grpc: the form for proxyless gRPC clients (model/client_kinds.py): timeouts as
    max_stream_duration, retries as gRPC reads them (never `num_retries: 0`), path prefixes
    as regexes, no routes gRPC would skip (query matches) and nothing gRPC ignores
    (mirrors, hashing on anything but headers).

    routes: candidate routes (those not attached to this service port are ignored; see
    attached_routes for producer/consumer rules). policy: the TrafficPolicy of `service`
    (timeouts, retries, fault). services: what backendRefs and mirrors may resolve to.
    local: the client is in the service's namespace (the short name resolves).
    default_port: Host without a port means this port.
    With no attached route: one route `/` to the service's own cluster. With routes: their
    matches in Gateway API precedence order; a request matching none gets Envoy's 404.
    """
    vhost = rc.VirtualHost(
        name=f"{service.key.fqdn}:{port.port}",
        domains=service_domains(service, port, local=local, default_port=default_port),
    )
    attached = attached_routes(service, port.port, routes, local=local)
    if not attached:
        vhost.routes.append(_default_route(service, port, policy, grpc))
    else:
        for e in _entries(attached):
            if grpc and e.match.query:  # gRPC skips routes with query matches (gRFC A28)
                continue
            vhost.routes.extend(_rule_routes(e, service, port, policy, services, grpc))
    if policy is not None and policy.fault is not None and (policy.fault.delay or policy.fault.abort):
        fault = fault_per_route(policy.fault)
        for route in vhost.routes:
            route.typed_per_filter_config[names.FAULT_FILTER].CopyFrom(fault)
    return vhost


def outbound_route_configuration(
    name: str, virtual_hosts: Sequence[rc.VirtualHost]
) -> route_pb2.RouteConfiguration:
    """The client-side route configuration from virtual hosts (in the given order).

    Envoy rejects a whole route configuration with a domain in two virtual hosts (or two
    virtual hosts of one name): a later duplicate is dropped instead (first wins, a virtual
    host left without domains is dropped), so one odd service cannot break every route.
    validate_clusters is off: the referenced clusters arrive over CDS, and the invalid-backend
    sentinel must stay unresolved.
    """
    config = route_pb2.RouteConfiguration(name=name)
    config.validate_clusters.value = False
    seen_domains: set[str] = set()
    seen_names: set[str] = set()
    for vhost in virtual_hosts:
        domains = [d for d in vhost.domains if d.lower() not in seen_domains]
        if not domains or vhost.name in seen_names:
            continue
        seen_names.add(vhost.name)
        seen_domains.update(d.lower() for d in domains)
        copy = config.virtual_hosts.add()
        copy.CopyFrom(vhost)
        if len(domains) != len(vhost.domains):
            del copy.domains[:]
            copy.domains.extend(domains)
    return config


# ------------------------------------------------------------------------------ inbound


def _target_port(port: ServicePort) -> int | None:
    """The app port a service port forwards to. Named targetPorts cannot be resolved here
    (the caller resolves them against the workload's container ports before calling)."""
    if port.target_port is None:
        return port.port
    if isinstance(port.target_port, int):
        return port.target_port
    text = str(port.target_port)
    return int(text) if text.isdigit() else None


def _inbound_route(app_port: int, limit: LocalRateLimit | None, namespace: str, pod: str) -> rc.Route:
    route = rc.Route(name=f"inbound|{app_port}")
    route.match.prefix = "/"
    route.route.cluster = names.inbound_cluster_name(app_port, namespace, pod)
    route.route.timeout.CopyFrom(seconds(0))  # the client sidecar owns timeouts
    if limit is not None:
        route.typed_per_filter_config[names.LOCAL_RATE_LIMIT_FILTER].CopyFrom(rate_limit_per_route(limit))
    return route


def inbound_route_configuration(
    name: str,
    workload_ports: Sequence[tuple[int, AppProtocol]],
    services: Sequence[tuple[Service, ServicePort]],
    policies: Mapping[ServiceKey, TrafficPolicySpec],
    *,
    namespace: str = "",
    pod: str = "",
) -> route_pb2.RouteConfiguration:
    """The destination-side route configuration of one workload's inbound listener
    (`namespace`/`pod` name its per-proxy inbound clusters).

    workload_ports: the workload's app ports (first HTTP one is the fallback); services: the
    (service, service port) pairs it backs, with named targetPorts already resolved to
    numbers; policies: TrafficPolicies by service (their rateLimit is enforced here).

    Requests are routed by Host: every name form of a service *with* the service port
    (`api:8080`, `api.shop:8080`, FQDN:8080, clusterIP:8080) goes to the app port that port
    targets; the same forms without a port are added when the service has only one HTTP port
    on this workload (no ambiguity). Services sharing an app port share a virtual host,
    except a service with a rate limit: it gets its own virtual host, as Envoy keeps one
    token bucket per route (one bucket per rate-limited service and app port). `*` catches
    the rest and goes to the first HTTP app port; it joins that port's first virtual host
    (a rate-limited one if any), so no Host header form can bypass that bucket.
    Route timeout 0: the client side owns timeouts.
    """
    config = route_pb2.RouteConfiguration(name=name)
    config.validate_clusters.value = False
    http_ports: list[int] = []
    for app_port, protocol in workload_ports:
        if protocol.is_http and app_port not in http_ports:
            http_ports.append(app_port)

    backed: list[tuple[Service, ServicePort, int]] = []
    for service, port in services:
        target = _target_port(port)
        duplicate = any(s.key == service.key and p.port == port.port for s, p, _ in backed)
        if target in http_ports and not duplicate:
            backed.append((service, port, target))
    ports_per_service: dict[ServiceKey, int] = {}
    for service, _, _ in backed:
        ports_per_service[service.key] = ports_per_service.get(service.key, 0) + 1

    # (app port, rate-limited service or None, its limit) -> domains, in first-seen order.
    groups: dict[tuple[int, ServiceKey | None, LocalRateLimit | None], list[str]] = {}
    seen: set[str] = set()
    for service, port, target in backed:
        policy = policies.get(service.key)
        limit = policy.rate_limit if policy is not None else None
        domains = groups.setdefault((target, service.key if limit else None, limit), [])
        portless = ports_per_service[service.key] == 1
        for form in _name_forms(service, short=True):
            for domain in (_host(form, port.port), _host(form) if portless else None):
                if domain is not None and domain.lower() not in seen:
                    seen.add(domain.lower())
                    domains.append(domain)

    for app_port in http_ports:
        keys = [k for k in groups if k[0] == app_port]
        keys.sort(key=lambda k: k[2] is None)  # limited groups first (stable: first-seen order)
        if app_port == http_ports[0]:
            if keys:
                groups[keys[0]].append("*")
            else:
                keys = [(app_port, None, None)]
                groups[keys[0]] = ["*"]
        for index, key in enumerate(keys):
            if not groups[key]:
                continue
            vhost = config.virtual_hosts.add(name=f"inbound|{app_port}" + (f"|{index}" if index else ""))
            vhost.domains.extend(groups[key])
            vhost.routes.append(_inbound_route(app_port, key[2], namespace, pod))
    return config
