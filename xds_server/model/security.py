"""Security policy kinds (`mesh.xds-server.io/v1alpha1`): mutual TLS and authorization.

`MTLSPolicy` says how a workload's sidecar accepts connections (Istio's PeerAuthentication,
flattened): STRICT (mTLS only), PERMISSIVE (mTLS and plaintext), DISABLE (plaintext; clients
send plaintext to it), for a whole namespace (no selector) or the workloads a selector picks,
with per-port overrides (keys are the workload's app ports, as in Istio). A policy in the
root namespace (`SecuritySettings.root_namespace`, default `xds-system`) without a selector
is the mesh default; the server setting `default_mode` applies where no policy says anything.

`AuthorizationPolicy` has Istio's shape and meanings, so policies carry over by changing the
apiVersion: `selector`, `action` (ALLOW or DENY), `rules[].from[].source`,
`rules[].to[].operation`, `rules[].when[]`. DENY wins over ALLOW; with no ALLOW policy a
request is allowed, with ALLOW policies only what one of them matches; an ALLOW policy with
no rules matches nothing ("allow-nothing": in the root namespace without a selector it is a
mesh-wide default-deny, as in Istio; `SecuritySettings.default_deny` does the same from the
server's settings). A policy in the root namespace applies to the workloads its selector
picks in every namespace.

Matching of values follows Istio: exact, `prefix*`, `*suffix`, or `*` (any / present).
Principals are SPIFFE IDs (`spiffe://cluster.local/ns/shop/sa/api`), or Istio's spelling
without the scheme (`cluster.local/ns/shop/sa/api`); service accounts are `namespace/name`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator

from .policy import Spec

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


ModeName = Literal["STRICT", "PERMISSIVE", "DISABLE", "UNSET"]


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


class WorkloadSelector(Spec):
    """Workloads whose labels include all of `matchLabels`."""

    match_labels: dict[str, str] = Field(default_factory=dict)

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())


def _port_text(value: object) -> object:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


PortText = Annotated[str, Field(pattern=r"^[0-9]{1,5}$"), BeforeValidator(_port_text)]
Port = Annotated[int, Field(ge=1, le=65535)]
_WILDCARD_VALUE = re.compile(r"^(\*|\*?[^*]+|[^*]+\*)$")


def check_wildcard(value: str) -> str:
    """Istio's value matching: exact, `prefix*`, `*suffix` or `*`; no other `*`."""
    if not value:
        raise ValueError("must not be empty")
    if not _WILDCARD_VALUE.match(value):
        raise ValueError(f"{value!r}: '*' may only be the whole value, its first or its last character")
    return value


def _wildcards(values: tuple[str, ...]) -> tuple[str, ...]:
    for value in values:
        check_wildcard(value)
    return values


# MTLSPolicy --------------------------------------------------------------------------------


class MTLSPolicySpec(Spec):
    """How the selected workloads' sidecars accept connections: STRICT (mutual TLS only),
    PERMISSIVE (mutual TLS and plaintext) or DISABLE (plaintext; clients send plaintext),
    with per-port overrides. UNSET (or no mode) inherits from the namespace, then the mesh."""

    selector: WorkloadSelector | None = None
    mode: ModeName | None = None
    port_level_mtls: dict[Port, ModeName] = Field(
        default_factory=dict,
        description="Mode per workload (app) port, overriding `mode` for that port.",
        json_schema_extra={"x-kubernetes-validations": [{
            "rule": "self.all(k, k.matches('^[0-9]{1,5}$') && int(k) >= 1 && int(k) <= 65535)",
            "message": "keys must be port numbers (1-65535)",
        }]},
    )

    @property
    def effective_mode(self) -> MtlsMode | None:
        return None if self.mode in (None, "UNSET") else MtlsMode(self.mode)

    def port_mode(self, port: int) -> MtlsMode | None:
        mode = self.port_level_mtls.get(port)
        return None if mode in (None, "UNSET") else MtlsMode(mode)


class MTLSPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str
    spec: MTLSPolicySpec
    created: str = ""


# AuthorizationPolicy -----------------------------------------------------------------------


def _principal(value: str) -> str:
    check_wildcard(value)
    if not value.startswith("*") and "/" not in value:
        raise ValueError(f"{value!r} is not a SPIFFE ID such as spiffe://cluster.local/ns/NS/sa/SA")
    return value


def _service_account(value: str) -> str:
    ns, sep, sa = value.partition("/")
    if not sep or not ns or not sa or "/" in sa:
        raise ValueError(f"{value!r}: write NAMESPACE/SERVICEACCOUNT")
    return value


def _cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR block") from None
    return value


class Source(Spec):
    """Who sends the request (from the peer's mTLS certificate and address). Fields are
    ANDed; values of one field ORed; `not*` fields must not match. Needs at least one field."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[str, ...] = ()
    not_ip_blocks: tuple[str, ...] = ()

    @field_validator("principals", "not_principals")
    @classmethod
    def _principals(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_principal(v) for v in values)

    @field_validator("namespaces", "not_namespaces")
    @classmethod
    def _namespaces(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _wildcards(values)

    @field_validator("service_accounts", "not_service_accounts")
    @classmethod
    def _accounts(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_service_account(v) for v in values)

    @field_validator("ip_blocks", "not_ip_blocks")
    @classmethod
    def _ips(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_cidr(v) for v in values)

    @model_validator(mode="after")
    def _not_empty(self) -> "Source":
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("a source needs at least one field (principals, namespaces, ...)")
        return self


_HTTP_METHODS = r"^[A-Z]+$"


class Operation(Spec):
    """What the request does. Fields are ANDed, values ORed; `not*` fields must not match.
    Ports are the workload's app ports. hosts, methods and paths are HTTP-only."""

    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    ports: tuple[PortText, ...] = ()
    not_ports: tuple[PortText, ...] = ()
    methods: tuple[Annotated[str, Field(pattern=_HTTP_METHODS)], ...] = ()
    not_methods: tuple[Annotated[str, Field(pattern=_HTTP_METHODS)], ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    @field_validator("hosts", "not_hosts")
    @classmethod
    def _hosts(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return _wildcards(values)

    @field_validator("paths", "not_paths")
    @classmethod
    def _paths(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in _wildcards(values):
            if not value.startswith(("/", "*")):
                raise ValueError(f"{value!r}: a path starts with '/' (or is a '*suffix' match)")
        return values

    @field_validator("ports", "not_ports")
    @classmethod
    def _ports(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            if not 1 <= int(value) <= 65535:
                raise ValueError(f"port {value} is out of range [1, 65535]")
        return values

    @model_validator(mode="after")
    def _not_empty(self) -> "Operation":
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("an operation needs at least one field (methods, paths, ports, ...)")
        return self

    @property
    def http_only(self) -> bool:
        return bool(self.hosts or self.not_hosts or self.methods or self.not_methods
                    or self.paths or self.not_paths)


class From(Spec):
    source: Source


class To(Spec):
    operation: Operation


_HEADER_KEY = re.compile(r"^request\.headers\[([A-Za-z0-9!#$%&'*+\-.^_`|~:]+)\]$")
CONDITION_KEYS = ("request.headers[NAME]", "source.ip", "source.namespace", "source.principal",
                  "destination.port")


class Condition(Spec):
    """An extra condition: `key` is one of request.headers[NAME], source.ip,
    source.namespace, source.principal, destination.port; one of `values` must match and
    none of `notValues`."""

    key: str = Field(min_length=1)
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> "Condition":
        if not self.values and not self.not_values:
            raise ValueError("set values or notValues")
        key = self.key
        if _HEADER_KEY.match(key):
            _wildcards(self.values + self.not_values)
        elif key in ("source.namespace", "source.principal"):
            check = _principal if key == "source.principal" else check_wildcard
            for value in self.values + self.not_values:
                check(value)
        elif key == "source.ip":
            for value in self.values + self.not_values:
                _cidr(value)
        elif key == "destination.port":
            for value in self.values + self.not_values:
                if not value.isdigit() or not 1 <= int(value) <= 65535:
                    raise ValueError(f"{value!r} is not a port number")
        else:
            raise ValueError(f"unsupported key {key!r}: use one of {', '.join(CONDITION_KEYS)}")
        return self

    @property
    def header(self) -> str | None:
        match = _HEADER_KEY.match(self.key)
        return match.group(1) if match else None


class Rule(Spec):
    """A request matches a rule when it matches one of `from` (or `from` is empty), one of
    `to` (or `to` is empty) and every `when` condition."""

    from_: tuple[From, ...] = Field(default=(), alias="from")
    to: tuple[To, ...] = ()
    when: tuple[Condition, ...] = ()


class AuthorizationPolicySpec(Spec):
    """Access control for the selected workloads' inbound traffic (Istio's
    AuthorizationPolicy): DENY policies win over ALLOW policies; when any ALLOW policy
    applies, a request must match one of them. An ALLOW policy without rules allows nothing."""

    selector: WorkloadSelector | None = None
    action: Literal["ALLOW", "DENY"] = "ALLOW"
    rules: tuple[Rule, ...] = ()


class AuthorizationPolicy(BaseModel):
    model_config = ConfigDict(frozen=True)

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
