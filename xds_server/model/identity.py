"""Who a proxy is: what its node claims, and what authentication proved.

One parse of the node (`xds/node.py` `proxy_claim`) gives a `ProxyClaim`; the stream guard
(`xds/auth.py`) checks it against the stream's credential and returns a `VerifiedProxy`. That
one object is what scoping (translate/), SDS and the admin API read: authentication and
scoping can no longer disagree about who a proxy is.

No Envoy and no Kubernetes types here: this is the model layer.
"""

from __future__ import annotations

import re
from datetime import datetime
from dataclasses import dataclass, field
from typing import Protocol

from .mesh import ProxyIdentity

__all__ = [
    "DEFAULT_TRUST_DOMAIN",
    "AuthError",
    "HasIdentity",
    "Identity",
    "Proof",
    "ProxyClaim",
    "VerifiedProxy",
    "spiffe_id",
    "validate_names",
    "validate_trust_domain",
]

DEFAULT_TRUST_DOMAIN = "cluster.local"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# SPIFFE trust domain: lowercase letters, digits, '.', '-', '_' (SPIFFE-ID standard, 2.1).
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")


class AuthError(Exception):
    """The caller did not prove an identity (bad signature, expired, revoked, malformed...).

    `reason` is safe to return to the caller and to log: it never contains the credential.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class HasIdentity(Protocol):
    """Anything naming a workload: `Identity`, or the model's `ProxyIdentity`."""

    @property
    def namespace(self) -> str: ...

    @property
    def service_account(self) -> str: ...


def validate_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.match(trust_domain) or trust_domain.strip(".") != trust_domain:
        raise ValueError(
            f"invalid trust domain {trust_domain!r}: use lowercase letters, digits, '.', '-', '_'"
        )
    return trust_domain


def validate_names(namespace: str, service_account: str) -> None:
    if not _LABEL.match(namespace or ""):
        raise ValueError(
            f"invalid namespace {namespace!r}: must be a DNS-1123 label "
            "(lowercase letters, digits and '-', at most 63 characters)"
        )
    if len(service_account or "") > 253 or not _SUBDOMAIN.match(service_account or ""):
        raise ValueError(
            f"invalid service account {service_account!r}: must be a DNS-1123 subdomain "
            "(lowercase letters, digits, '-' and '.', at most 253 characters)"
        )


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated workload identity."""

    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_names(self.namespace, self.service_account)

    def spiffe_id(self, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
        return spiffe_id(self, trust_domain)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def spiffe_id(identity: HasIdentity, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    """The SPIFFE ID of a workload, after checking every part of it."""
    validate_trust_domain(trust_domain)
    validate_names(identity.namespace, identity.service_account)
    return f"spiffe://{trust_domain}/ns/{identity.namespace}/sa/{identity.service_account}"


@dataclass(frozen=True, slots=True)
class ProxyClaim:
    """What a node says about itself (unverified): metadata written by `xds-server bootstrap`,
    else an id `<pod>.<namespace>`; an absent namespace or service account means `default`."""

    node_id: str
    namespace: str
    service_account: str
    pod: str
    ip: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    proxyless: bool = False  # a gRPC xDS client or server, not an Envoy
    inbound_port: int = 15006
    outbound_port: int = 15001
    capture: bool = True  # metadata `interception`: "explicit" turns it off (model/mesh.py)
    # Every other string-valued metadata field, for features that read their own keys.
    metadata: tuple[tuple[str, str], ...] = field(default=())

    @property
    def identity(self) -> ProxyIdentity:
        return ProxyIdentity(
            namespace=self.namespace,
            service_account=self.service_account,
            pod=self.pod,
            ip=self.ip,
            labels=self.labels,
        )

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, pod): one registered proxy."""
        return (self.namespace, self.pod)


@dataclass(frozen=True, slots=True)
class Proof:
    """What a stream's credential proved."""

    namespace: str
    service_account: str
    method: str  # "workload-token" | "kubernetes-token" | "node-metadata" | "client-certificate"
    token_id: str = ""  # a workload token's id (jti), to notice its revocation
    pod: str = ""  # the pod a pod-bound token names ("" when the token is not pod-bound)
    # When the credential was issued (a workload token's iat, a certificate's issuance), to
    # notice a revocation of the identity; None when unknown (Kubernetes tokens).
    issued_at: datetime | None = None

    @property
    def identity(self) -> Identity:
        """The proven workload identity (names already checked by whoever proved it)."""
        return Identity(self.namespace, self.service_account)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account} ({self.method})"


def proves_pod(proof: Proof | None, claim: ProxyClaim, pod_service_account: str | None,
               pod_ip: str = "") -> bool:
    """Whether a stream may have the pod-scoped config of the pod it claims: no identity to
    check (`--auth none`); a pod-bound token naming that pod; else a pod of the proven
    service account (and of the claimed IP, when both say one). `pod_service_account` None:
    the pod is not known (yet); what was proven is all there is to check, and the builder
    checks again once the pod is known."""
    if proof is None:
        return True
    if proof.pod:
        return proof.pod == claim.pod
    if pod_service_account is None:
        return True
    same_ip = not claim.ip or not pod_ip or claim.ip == pod_ip
    return pod_service_account == proof.service_account and same_ip


@dataclass(frozen=True, slots=True)
class VerifiedProxy:
    """A claim after authentication: `proof` is None only in `--auth none` (no identity, so
    nothing secret can be served)."""

    claim: ProxyClaim
    proof: Proof | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.claim.key

    @property
    def identity(self) -> ProxyIdentity:
        return self.claim.identity

    @property
    def proxyless(self) -> bool:
        return self.claim.proxyless

    @classmethod
    def unverified(cls, claim: ProxyClaim) -> VerifiedProxy:
        """For offline tools (`xds-server translate`, tests of translation): no proof."""
        return cls(claim, None)
