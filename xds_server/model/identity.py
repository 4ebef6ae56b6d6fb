"""Who a proxy is: what its node claims, and what authentication proved.

One parse of the node (`xds/node.py` `proxy_claim`) gives a `ProxyClaim`; the stream guard
(`xds/auth.py`) checks it against the stream's credential and returns a `VerifiedProxy`. That
one object is what scoping (translate/), SDS and the admin API read: authentication and
scoping can no longer disagree about who a proxy is.

No Envoy and no Kubernetes types here: this is the model layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .mesh import ProxyIdentity

__all__ = ["Proof", "ProxyClaim", "VerifiedProxy"]


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

    def __str__(self) -> str:
        return f"{self.namespace}/{self.service_account} ({self.method})"


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
    def unverified(cls, claim: ProxyClaim) -> "VerifiedProxy":
        """For offline tools (`xds-server translate`, tests of translation): no proof."""
        return cls(claim, None)
