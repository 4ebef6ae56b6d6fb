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
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic.functional_validators import BeforeValidator

from .common import Spec

ModeName = Literal["STRICT", "PERMISSIVE", "DISABLE", "UNSET"]


# Shared pieces -----------------------------------------------------------------------------


class WorkloadSelector(Spec):
    """Workloads whose labels include all of `matchLabels`."""

    match_labels: dict[str, str] = Field(default_factory=dict)


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
    def _not_empty(self) -> Source:
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
    def _not_empty(self) -> Operation:
        if not any(getattr(self, name) for name in type(self).model_fields):
            raise ValueError("an operation needs at least one field (methods, paths, ports, ...)")
        return self


class From(Spec):
    source: Source


class To(Spec):
    operation: Operation


HEADER_KEY = re.compile(r"^request\.headers\[([A-Za-z0-9!#$%&'*+\-.^_`|~:]+)\]$")
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
    def _check(self) -> Condition:
        if not self.values and not self.not_values:
            raise ValueError("set values or notValues")
        key = self.key
        if HEADER_KEY.match(key):
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
