"""Security policies in the model (the IR the translators read): mutual TLS and authorization.

Produced by the sources from the user-facing API; what the kinds mean (modes, actions,
matching, the root namespace) is documented once, there: `xds_server/api/v1alpha1/security.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Literal

DEFAULT_ROOT_NAMESPACE = "xds-system"
DEFAULT_TRUST_DOMAIN = "cluster.local"


class MtlsMode(str, Enum):
    STRICT = "STRICT"
    PERMISSIVE = "PERMISSIVE"
    DISABLE = "DISABLE"

    @property
    def accepts_tls(self) -> bool:
        return self is not MtlsMode.DISABLE

    @property
    def accepts_plaintext(self) -> bool:
        return self is not MtlsMode.STRICT


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """Mesh-wide security settings (server flags, not objects).

    `mtls`: whether the server can deliver workload certificates (the CA and SDS are on).
    Without it no sidecar can do mTLS, so every workload is treated as DISABLE whatever the
    policies say (authorization on methods, paths, headers and IPs still applies).
    """

    mtls: bool = False
    default_mode: MtlsMode = MtlsMode.PERMISSIVE
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_deny: bool = False

    def spiffe_id(self, namespace: str, service_account: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account}"


# Shared pieces -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkloadSelector:
    """Workloads whose labels include all of `match_labels` (sorted pairs)."""

    match_labels: tuple[tuple[str, str], ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels)


# MTLSPolicy --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MTLSPolicySpec:
    """How the selected workloads' sidecars accept connections. A mode of None (UNSET)
    inherits from the namespace, then the mesh; `port_level_mtls` overrides it per app port
    (UNSET entries are left out: they inherit too)."""

    selector: WorkloadSelector | None = None
    mode: MtlsMode | None = None
    port_level_mtls: tuple[tuple[int, MtlsMode], ...] = ()

    @property
    def effective_mode(self) -> MtlsMode | None:
        return self.mode

    def port_mode(self, port: int) -> MtlsMode | None:
        return next((mode for p, mode in self.port_level_mtls if p == port), None)


@dataclass(frozen=True, slots=True)
class MTLSPolicy:
    namespace: str
    name: str
    spec: MTLSPolicySpec
    created: str = ""


# AuthorizationPolicy -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Source:
    """Who sends the request. Fields are ANDed; values of one field ORed; `not*` fields must
    not match."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """What the request does. Fields are ANDed, values ORed; `not*` fields must not match.
    Ports are the workload's app ports, as decimal text. hosts, methods and paths are
    HTTP-only."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()
    not_ports: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    @property
    def http_only(self) -> bool:
        return bool(self.hosts or self.not_hosts or self.methods or self.not_methods
                    or self.paths or self.not_paths)


@dataclass(frozen=True, slots=True)
class From:
    source: Source


@dataclass(frozen=True, slots=True)
class To:
    operation: Operation


@dataclass(frozen=True, slots=True)
class Condition:
    """An extra condition on `key`; `header` is the header name when the key is
    request.headers[NAME]. One of `values` must match and none of `not_values`."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()
    header: str | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """Matches when the request matches one of `from_` (or it is empty), one of `to` (or it
    is empty) and every `when` condition."""

    from_: tuple[From, ...] = ()
    to: tuple[To, ...] = ()
    when: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicySpec:
    """DENY policies win over ALLOW policies; when any ALLOW policy applies, a request must
    match one of them. An ALLOW policy without rules allows nothing."""

    selector: WorkloadSelector | None = None
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: tuple[Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class AuthorizationPolicy:
    namespace: str
    name: str
    spec: AuthorizationPolicySpec
    created: str = ""


# Which policies apply to a workload ---------------------------------------------------------


def _order(policy: MTLSPolicy | AuthorizationPolicy) -> tuple[str, str]:
    return (policy.created or "~", policy.name)


def mtls_policy_chain(
    namespace: str,
    labels: dict[str, str],
    policies: list[MTLSPolicy],
    settings: SecuritySettings,
) -> list[MTLSPolicySpec]:
    """The MTLSPolicies that decide a workload's modes, most specific first: the oldest
    workload policy (selector matches) of its namespace, the oldest namespace-wide policy,
    the oldest mesh-wide policy (root namespace, no selector). Istio's precedence."""
    chain: list[MTLSPolicySpec] = []
    own = sorted((p for p in policies if p.namespace == namespace), key=_order)
    workload = [p for p in own if p.spec.selector is not None and p.spec.selector.matches(labels)]
    if workload:
        chain.append(workload[0].spec)
    whole = [p for p in own if p.spec.selector is None]
    if whole:
        chain.append(whole[0].spec)
    if namespace != settings.root_namespace:
        mesh = sorted(
            (p for p in policies if p.namespace == settings.root_namespace and p.spec.selector is None),
            key=_order,
        )
        if mesh:
            chain.append(mesh[0].spec)
    return chain


def resolve_mode(chain: list[MTLSPolicySpec], port: int | None, settings: SecuritySettings) -> MtlsMode:
    """The mode of one app port (None: the workload's mode) from the policy chain: at each
    level a port override wins over that level's mode; UNSET inherits from the next level."""
    if not settings.mtls:
        return MtlsMode.DISABLE
    for spec in chain:
        if port is not None:
            mode = spec.port_mode(port)
            if mode is not None:
                return mode
        if spec.effective_mode is not None:
            return spec.effective_mode
    return settings.default_mode


def authorization_policies(
    namespace: str,
    labels: dict[str, str],
    policies: list[AuthorizationPolicy],
    settings: SecuritySettings,
) -> list[AuthorizationPolicy]:
    """Every AuthorizationPolicy that applies to a workload, in a stable order: those of its
    namespace whose selector matches (or that have none), and those of the root namespace
    whose selector matches it in any namespace."""
    found = [
        p for p in policies
        if (p.namespace == namespace or p.namespace == settings.root_namespace)
        and (p.spec.selector is None or p.spec.selector.matches(labels))
    ]
    return sorted(found, key=lambda p: (p.namespace, p.name))
