"""Workload identity: who a certificate or token is for, and the error raised when a caller
cannot prove who it is.

An identity is a (namespace, service account) pair. Its SPIFFE ID is
`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`. Names are checked against the
Kubernetes rules (namespace: DNS-1123 label; service account: DNS-1123 subdomain), which also
keeps them inside the SPIFFE path character set: a name can never smuggle a `/` or `..` into
the ID.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

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
