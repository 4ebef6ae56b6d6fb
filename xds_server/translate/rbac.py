"""AuthorizationPolicy -> Envoy RBAC, for one workload's app port.

Two RBAC filters run in order, as in Istio: the DENY one (any matching DENY rule: 403), then
the ALLOW one (present when an ALLOW policy applies or default-deny is on: a request must
match one ALLOW rule, else 403). So DENY wins, no ALLOW policy means allow, and an ALLOW
policy without rules allows nothing.

HTTP: the filters sit in the inbound connection manager with an empty (pass-through) base
config, and each inbound virtual host carries the compiled policy of its app port in
`typed_per_filter_config` (`http_per_route`). A policy change is then a route configuration
update: it applies to the next request, even on connections already open, and never drains
a listener. Ports are resolved here, at translation time: every inbound virtual host serves
exactly one app port, so `ports`/`notPorts`/`destination.port` become "this rule applies to
this virtual host or not" instead of a match on the listener's own port (always the
sidecar's single inbound port). TCP: network RBAC filters in the TCP chains (`network_filters`).

Principals are the peer certificate's URI SAN (`authenticated.principal_name`), so they only
match mTLS peers: a plaintext caller (PERMISSIVE) has no principal, namespace or service
account. HTTP-only fields (methods, paths, hosts, request headers) on a TCP port follow
Istio: an ALLOW rule that needs them matches nothing there, a DENY rule drops them (denies
more). Either way the result is more restrictive, never less.

Pure functions: no I/O, no globals, no clock.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2

from ..model.security import (
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    SecuritySettings,
    Source,
)
from .clusters import pack

HTTP_DENY_FILTER = "xds-server.authz.deny"
HTTP_ALLOW_FILTER = "xds-server.authz.allow"
NETWORK_RBAC = "envoy.filters.network.rbac"
DENY_STAT_PREFIX = "authz_deny."
ALLOW_STAT_PREFIX = "authz_allow."


@dataclass(frozen=True, slots=True)
class PortAuthz:
    """The compiled authorization of one app port: the DENY and ALLOW RBAC configs (None:
    that filter does nothing on this port)."""

    deny: rbac_pb2.RBAC | None = None
    allow: rbac_pb2.RBAC | None = None

    @property
    def empty(self) -> bool:
        return self.deny is None and self.allow is None


def authorize(
    policies: Sequence[AuthorizationPolicy], settings: SecuritySettings, port: int, *, http: bool
) -> PortAuthz:
    """Compile the policies that apply to a workload for traffic to one of its app ports."""
    deny: dict[str, rbac_pb2.Policy] = {}
    allow: dict[str, rbac_pb2.Policy] = {}
    any_allow = settings.default_deny
    compiler = _Compiler(settings.trust_domain, port, http)
    for policy in policies:
        is_deny = policy.spec.action == "DENY"
        any_allow = any_allow or not is_deny
        for index, rule in enumerate(policy.spec.rules):
            compiled = compiler.rule(rule, deny=is_deny)
            if compiled is not None:
                name = f"ns[{policy.namespace}]-policy[{policy.name}]-rule[{index}]"
                (deny if is_deny else allow)[name] = compiled
    return PortAuthz(
        deny=rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY, policies=deny) if deny else None,
        allow=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=allow) if any_allow else None,
    )


# Envoy filters ------------------------------------------------------------------------------


def http_filters() -> list[hcm_pb2.HttpFilter]:
    """The inbound connection manager's RBAC filters, pass-through until a virtual host
    overrides them (see `http_per_route`)."""
    return [
        hcm_pb2.HttpFilter(name=HTTP_DENY_FILTER, typed_config=pack(http_rbac_pb2.RBAC())),
        hcm_pb2.HttpFilter(name=HTTP_ALLOW_FILTER, typed_config=pack(http_rbac_pb2.RBAC())),
    ]


def http_per_route(authz: PortAuthz) -> dict[str, any_pb2.Any]:
    """`typed_per_filter_config` entries of a virtual host for its app port."""
    out: dict[str, any_pb2.Any] = {}
    for name, rules, prefix in (
        (HTTP_DENY_FILTER, authz.deny, DENY_STAT_PREFIX),
        (HTTP_ALLOW_FILTER, authz.allow, ALLOW_STAT_PREFIX),
    ):
        if rules is not None:
            config = http_rbac_pb2.RBAC(rules=rules, rules_stat_prefix=prefix)
            out[name] = pack(http_rbac_pb2.RBACPerRoute(rbac=config))
    return out


def network_filters(authz: PortAuthz, stat_prefix: str) -> list[listener_components_pb2.Filter]:
    """Network RBAC filters to put before a TCP chain's tcp_proxy (none when nothing applies)."""
    filters = []
    for rules, prefix in ((authz.deny, DENY_STAT_PREFIX), (authz.allow, ALLOW_STAT_PREFIX)):
        if rules is not None:
            config = network_rbac_pb2.RBAC(rules=rules, stat_prefix=f"{prefix}{stat_prefix}")
            filters.append(listener_components_pb2.Filter(name=NETWORK_RBAC, typed_config=pack(config)))
    return filters


# Rules --------------------------------------------------------------------------------------


def _or_permissions(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    if not rules:
        return rbac_pb2.Permission(any=True)
    if len(rules) == 1:
        return rules[0]
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=rules))


def _and_permissions(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    if not rules:
        return rbac_pb2.Permission(any=True)
    if len(rules) == 1:
        return rules[0]
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=rules))


def _or_principals(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    if not ids:
        return rbac_pb2.Principal(any=True)
    if len(ids) == 1:
        return ids[0]
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


def _and_principals(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    if not ids:
        return rbac_pb2.Principal(any=True)
    if len(ids) == 1:
        return ids[0]
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids))


def _not_permission(rules: list[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(not_rule=_or_permissions(rules))


def _not_principal(ids: list[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(not_id=_or_principals(ids))


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def wildcard_matcher(value: str) -> string_pb2.StringMatcher:
    """Istio value matching: `*` (anything non-empty), `prefix*`, `*suffix`, exact."""
    if value == "*":
        return _regex(".+")
    if value.startswith("*"):
        return string_pb2.StringMatcher(suffix=value[1:])
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=value[:-1])
    return string_pb2.StringMatcher(exact=value)


def _escape(text: str) -> str:
    """Escape RE2 metacharacters (Python's re.escape also escapes characters RE2 rejects)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def _spiffe(value: str) -> str:
    return value if value.startswith("spiffe://") else f"spiffe://{value}"


class _Compiler:
    def __init__(self, trust_domain: str, port: int, http: bool) -> None:
        self.trust_domain = trust_domain
        self.port = port
        self.http = http

    # A rule: None when it can never match this port/protocol.
    def rule(self, rule: Rule, *, deny: bool) -> rbac_pb2.Policy | None:
        operations: list[rbac_pb2.Permission] = []
        for to in rule.to:
            permission = self.operation(to.operation, deny=deny)
            if permission is not None:
                operations.append(permission)
        if rule.to and not operations:
            return None
        permissions = [_or_permissions(operations)] if operations else []
        principals = [_or_principals([self.source(f.source) for f in rule.from_])] if rule.from_ else []
        for condition in rule.when:
            result = self.condition(condition, deny=deny)
            if result is False:
                return None
            if isinstance(result, rbac_pb2.Permission):
                permissions.append(result)
            elif isinstance(result, rbac_pb2.Principal):
                principals.append(result)
        return rbac_pb2.Policy(
            permissions=[_and_permissions(permissions)],
            principals=[_and_principals(principals)],
        )

    # Sources -> principals
    def source(self, source: Source) -> rbac_pb2.Principal:
        parts: list[rbac_pb2.Principal] = []
        for values, negate, convert in (
            (source.principals, False, self.principal),
            (source.not_principals, True, self.principal),
            (source.namespaces, False, self.namespace),
            (source.not_namespaces, True, self.namespace),
            (source.service_accounts, False, self.service_account),
            (source.not_service_accounts, True, self.service_account),
            (source.ip_blocks, False, _ip_block),
            (source.not_ip_blocks, True, _ip_block),
        ):
            if values:
                ids = [convert(v) for v in values]
                parts.append(_not_principal(ids) if negate else _or_principals(ids))
        return _and_principals(parts)

    def principal(self, value: str) -> rbac_pb2.Principal:
        if value == "*":  # any authenticated (mTLS) peer
            return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated())
        if value.startswith("*"):
            matcher = string_pb2.StringMatcher(suffix=value[1:])
        elif value.endswith("*"):
            matcher = string_pb2.StringMatcher(prefix=_spiffe(value[:-1]))
        else:
            matcher = string_pb2.StringMatcher(exact=_spiffe(value))
        return _authenticated(matcher)

    def namespace(self, value: str) -> rbac_pb2.Principal:
        domain = _escape(self.trust_domain)
        if value == "*":
            return _authenticated(string_pb2.StringMatcher(prefix=f"spiffe://{self.trust_domain}/ns/"))
        if value.startswith("*"):
            pattern = f"[^/]*{_escape(value[1:])}"
        elif value.endswith("*"):
            pattern = f"{_escape(value[:-1])}[^/]*"
        else:
            prefix = f"spiffe://{self.trust_domain}/ns/{value}/sa/"
            return _authenticated(string_pb2.StringMatcher(prefix=prefix))
        return _authenticated(_regex(f"spiffe://{domain}/ns/{pattern}/sa/[^/]+"))

    def service_account(self, value: str) -> rbac_pb2.Principal:
        namespace, _, account = value.partition("/")
        exact = f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{account}"
        return _authenticated(string_pb2.StringMatcher(exact=exact))

    # Operations -> permissions
    def operation(self, op: Operation, *, deny: bool) -> rbac_pb2.Permission | None:
        port = str(self.port)
        if op.ports and port not in op.ports:
            return None
        if op.not_ports and port in op.not_ports:
            return None
        if not self.http and op.http_only:
            if not deny:
                return None  # an ALLOW rule that needs HTTP matches nothing on TCP
            return rbac_pb2.Permission(any=True)  # a DENY rule ignores its HTTP fields
        parts: list[rbac_pb2.Permission] = []
        for values, negate, convert in (
            (op.methods, False, _method),
            (op.not_methods, True, _method),
            (op.paths, False, _path),
            (op.not_paths, True, _path),
            (op.hosts, False, _host),
            (op.not_hosts, True, _host),
        ):
            if values:
                rules = [convert(v) for v in values]
                parts.append(_not_permission(rules) if negate else _or_permissions(rules))
        return _and_permissions(parts)

    # Conditions: a permission, a principal, True (always holds here) or False (never)
    def condition(
        self, condition: Condition, *, deny: bool
    ) -> rbac_pb2.Permission | rbac_pb2.Principal | bool:
        header = condition.header
        if header is not None:
            if not self.http:
                return bool(deny)
            parts = []
            if condition.values:
                parts.append(_or_permissions([_header(header, v) for v in condition.values]))
            if condition.not_values:
                parts.append(_not_permission([_header(header, v) for v in condition.not_values]))
            return _and_permissions(parts)
        if condition.key == "destination.port":
            port = str(self.port)
            if condition.values and port not in condition.values:
                return False
            return port not in condition.not_values
        convert = {
            "source.ip": _ip_block,
            "source.namespace": self.namespace,
            "source.principal": self.principal,
        }[condition.key]
        ids = []
        if condition.values:
            ids.append(_or_principals([convert(v) for v in condition.values]))
        if condition.not_values:
            ids.append(_not_principal([convert(v) for v in condition.not_values]))
        return _and_principals(ids)


def _authenticated(matcher: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(
        authenticated=rbac_pb2.Principal.Authenticated(principal_name=matcher)
    )


def _ip_block(value: str) -> rbac_pb2.Principal:
    network = ipaddress.ip_network(value, strict=False)
    cidr = address_pb2.CidrRange(address_prefix=str(network.network_address))
    cidr.prefix_len.value = network.prefixlen
    # The connecting peer: a client sidecar (or a plaintext client) connects from its pod IP.
    return rbac_pb2.Principal(direct_remote_ip=cidr)


def _method(value: str) -> rbac_pb2.Permission:
    return _header(":method", value)


def _header(name: str, value: str) -> rbac_pb2.Permission:
    matcher = route_components_pb2.HeaderMatcher(name=name)
    if value == "*":
        matcher.present_match = True
    else:
        matcher.string_match.CopyFrom(wildcard_matcher(value))
    return rbac_pb2.Permission(header=matcher)


def _path(value: str) -> rbac_pb2.Permission:
    """Paths match without the query string (`url_path`), after the connection manager has
    normalized them (`normalize_path`, `merge_slashes`), so `/a/../b` cannot dodge `/b`."""
    if value == "*":
        return rbac_pb2.Permission(any=True)
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=wildcard_matcher(value)))


def _host(value: str) -> rbac_pb2.Permission:
    """Host header, case-insensitive, with or without a port."""
    if value == "*":
        return rbac_pb2.Permission(any=True)
    port = "(:[0-9]+)?"
    if value.startswith("*"):
        pattern = f"(?i).*{_escape(value[1:])}{port}"
    elif value.endswith("*"):
        pattern = f"(?i){_escape(value[:-1])}.*"
    else:
        pattern = f"(?i){_escape(value)}{port}"
    matcher = route_components_pb2.HeaderMatcher(name=":authority")
    matcher.string_match.CopyFrom(_regex(pattern))
    return rbac_pb2.Permission(header=matcher)
