"""networking.k8s.io/v1: NetworkPolicy, checked as the API server checks it
(pkg/apis/networking/validation: selectors, peers, ipBlock CIDRs and their `except`, ports and
`endPort`, policyTypes)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, StrictStr, model_validator

from .base import Invalid, KubeModel, Port
from .core import Protocol, _target_port
from .meta import ObjectMeta

# A label key: an optional DNS-subdomain prefix and '/', then a name of 63 at most.
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _LABEL_PREFIX.match(prefix)):
        return f"{key!r} is not a label key (its prefix must be a DNS subdomain)"
    if not name or len(name) > 63 or not _LABEL_NAME.match(name):
        return f"{key!r} is not a label key (alphanumerics, '-', '_', '.'; 63 at most)"
    return None


def label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return f"{value!r} is not a label value (alphanumerics, '-', '_', '.'; 63 at most)"
    return None


class Requirement(KubeModel):
    key: StrictStr = ""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] | None = None
    values: list[StrictStr] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Requirement:
        if not self.key:
            raise Invalid("required", at=("key",))
        problem = label_key_problem(self.key)
        if problem:
            raise Invalid(problem, at=("key",))
        if self.operator is None:
            raise Invalid("required", at=("operator",))
        if self.operator in ("In", "NotIn") and not self.values:
            raise Invalid(f"must be specified when operator is {self.operator}", at=("values",))
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise Invalid(f"may not be specified when operator is {self.operator}", at=("values",))
        for i, value in enumerate(self.values):
            problem = label_value_problem(value)
            if problem:
                raise Invalid(problem, at=("values", i))
        return self


class LabelSelector(KubeModel):
    match_labels: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    match_expressions: list[Requirement] = Field(default_factory=list)

    @model_validator(mode="after")
    def _labels(self) -> LabelSelector:
        for key, value in self.match_labels.items():
            problem = label_key_problem(key) or label_value_problem(value)
            if problem:
                raise Invalid(problem, at=("matchLabels", key))
        return self


def _cidr(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a CIDR such as 10.0.0.0/8, got {value!r}")
    if "/" not in value:
        raise Invalid(f"{value!r} is not a CIDR: write the prefix length, e.g. {value}/32")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise Invalid(f"{value!r} is not a CIDR such as 10.0.0.0/8") from None
    return value


Cidr = Annotated[str, PlainValidator(_cidr)]


class IPBlock(KubeModel):
    cidr: Cidr | None = None
    except_: list[Cidr] = Field(default_factory=list, alias="except")

    @model_validator(mode="after")
    def _inside(self) -> IPBlock:
        if self.cidr is None:
            raise Invalid("required", at=("cidr",))
        outer = ipaddress.ip_network(self.cidr, strict=False)
        for i, value in enumerate(self.except_):
            inner = ipaddress.ip_network(value, strict=False)
            if inner.version != outer.version or not inner.subnet_of(outer) or inner == outer:  # type: ignore[arg-type]
                raise Invalid(f"{value!r} must be a strict subset of cidr {self.cidr}", at=("except", i))
        return self


class Peer(KubeModel):
    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = Field(default=None, alias="ipBlock")

    @model_validator(mode="after")
    def _one_kind(self) -> Peer:
        selectors = self.pod_selector is not None or self.namespace_selector is not None
        if self.ip_block is not None and selectors:
            raise Invalid("may not be combined with podSelector or namespaceSelector", at=("ipBlock",))
        if self.ip_block is None and not selectors:
            raise Invalid("must specify a peer: podSelector, namespaceSelector or ipBlock")
        return self


def _port(value: Any) -> int | str:
    return _target_port(value)


class NetworkPolicyPort(KubeModel):
    protocol: Protocol = "TCP"
    port: Annotated[int | str, PlainValidator(_port)] | None = None
    end_port: Port | None = None

    @model_validator(mode="after")
    def _range(self) -> NetworkPolicyPort:
        if self.end_port is not None:
            if not isinstance(self.port, int):
                raise Invalid("may only be set with a numeric port", at=("endPort",))
            if self.end_port < self.port:
                raise Invalid(f"must be greater than or equal to port {self.port}", at=("endPort",))
        return self


class IngressRule(KubeModel):
    from_: list[Peer] = Field(default_factory=list, alias="from")
    ports: list[NetworkPolicyPort] = Field(default_factory=list)


class EgressRule(KubeModel):
    to: list[Peer] = Field(default_factory=list)
    ports: list[NetworkPolicyPort] = Field(default_factory=list)


class NetworkPolicySpec(KubeModel):
    pod_selector: LabelSelector | None = None
    policy_types: list[Literal["Ingress", "Egress"]] | None = None
    ingress: list[IngressRule] = Field(default_factory=list)
    egress: list[EgressRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _selector(self) -> NetworkPolicySpec:
        if self.pod_selector is None:
            raise Invalid("required (an empty selector {} selects every pod of the namespace)",
                          at=("podSelector",))
        if self.policy_types is not None:
            seen: set[str] = set()
            for i, kind in enumerate(self.policy_types):
                if kind in seen:
                    raise Invalid(f"duplicate {kind}", at=("policyTypes", i))
                seen.add(kind)
        return self

    def types(self) -> frozenset[str]:
        """Kubernetes' defaulting: Ingress always, Egress when egress rules exist."""
        if self.policy_types:
            return frozenset(self.policy_types)
        return frozenset({"Ingress", "Egress"} if self.egress else {"Ingress"})


class NetworkPolicy(KubeModel):
    metadata: ObjectMeta
    spec: NetworkPolicySpec | None = None

    @model_validator(mode="after")
    def _spec(self) -> NetworkPolicy:
        if self.spec is None:
            raise Invalid("required", at=("spec",))
        return self

