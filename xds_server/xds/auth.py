"""Who is on the other end of an xDS stream, proven before anything is sent (CONFORMANCE 18),
and the per-stream and per-identity bounds of rule 19.

A `StreamGuard` is one of the server's `StreamHooks` (hooks.py), at three points of a stream:

- `admit(conn, proxy)` once, with the node's claim (`xds/node.py` `proxy_claim`, parsed once
  by the server) and the call's metadata, *before* the stream gets a view (so before any
  response can be computed). It returns the `VerifiedProxy` (claim + `Proof`) that the view
  provider and SDS then use, or raises `StreamRefused` with a gRPC status and a reason, and
  the server closes the stream with it:
  UNAUTHENTICATED (no or bad credential, identity other than the node claims),
  UNAVAILABLE (TokenReview could not be asked: not the caller's fault, retry),
  RESOURCE_EXHAUSTED (too many streams for one identity).
- `requested(conn)` for every request: a token bucket per stream (RESOURCE_EXHAUSTED).
- `closed(conn)` when the stream ends.

Authentication modes (`--auth`):

- `tokens`: a bearer token in the `authorization` metadata of the stream. A workload token
  this server issued (`xds-server token create`, ES256, our key id) is verified locally,
  revocation included; any other token is a Kubernetes service-account token and is asked to
  the API server with TokenReview (audience-bound, see sources/tokenreview.py). The proven
  (namespace, service account) must equal what the node claims (the node metadata written by
  `xds-server bootstrap`, or an id `<pod>.<namespace>`); a token bound to a pod must match the
  node's pod too.
- In either mode, a stream on the mutual-TLS port (xds/tls.py) is proven by its client
  certificate, which grpc verified in the handshake against the current trust bundle: the
  identity is its SPIFFE ID (one `spiffe://<our trust domain>/ns/<ns>/sa/<sa>` URI SAN, proof
  `client-certificate`), and the node must claim it. A token sent as well must prove the same.
  A certificate of another CA, or an expired one, never gets past the handshake.
- `insecure-node-metadata`: the node's claim is believed. Only on a loopback listener and for
  loopback peers, with a warning at start and on every stream. A token, when one is sent
  anyway, is still verified: this mode only adds trust, never skips a check.
- `none`: no identity at all (the library default, for tests of the protocol alone). No SDS
  secret can be issued without an identity, so nothing secret is served either.

Failures are counted by reason (`stats.auth_failures`) and logged without the token.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from datetime import UTC, datetime, timedelta
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import grpc

from ..bearer import Metadata, bearer_token
from ..config import ConfigError, is_loopback, parse_address
from ..model.identity import (
    DEFAULT_TRUST_DOMAIN,
    AuthError,
    Identity,
    Proof,
    ProxyClaim,
    VerifiedProxy,
)
from .connection import Connection, peer_ip, peer_is_loopback
from .tls import PeerCertificate
from .hooks import StreamHooks, StreamRefused

log = logging.getLogger("xds_server.auth")

__all__ = [
    "AuthMode",
    "AuthUnavailable",
    "Authenticator",
    "GuardSettings",
    "PodLookup",
    "StreamGuard",
    "StreamRefused",
    "TokenReview",
    "TokenVerifier",
    "failure_reason",
]


class AuthMode(str, Enum):
    TOKENS = "tokens"
    INSECURE_NODE_METADATA = "insecure-node-metadata"
    NONE = "none"


class AuthUnavailable(AuthError):
    """The credential could not be checked (TokenReview down): refused, retry later."""


class TokenVerifier(Protocol):
    """Workload tokens this server issued (implemented by `ca.tokens.TokenIssuer`, wired in
    security.py): the xDS side needs only these three questions answered."""

    def recognizes(self, token: str) -> bool:
        """Whether the token says it is one of ours (unverified: a forged one still fails
        `verify_claims`)."""
        ...

    def verify_claims(self, token: str) -> tuple[Identity, Mapping[str, Any]]:
        """The identity a token proves and its claims; raises AuthError."""
        ...

    def is_revoked(self, token_id: str) -> bool: ...

    def check_identity(self, identity: Identity, issued_at: datetime) -> None:
        """Raises AuthError when the identity was revoked after `issued_at` (every credential
        issued to it until then is void: `xds-server ca revoke-identity`)."""
        ...


class ReviewResult(Protocol):
    """What a TokenReview answered (`sources.tokenreview.TokenReviewResult`)."""

    authenticated: bool
    error: str
    unavailable: bool

    @property
    def service_account(self) -> tuple[str, str] | None: ...

    @property
    def pod_name(self) -> str | None: ...


class TokenReview(Protocol):
    """Kubernetes service-account tokens (`sources.tokenreview.TokenReviewer`)."""

    async def review(self, token: str) -> ReviewResult: ...


# Reasons, as counters: what an operator needs to tell apart.
_REASONS: tuple[tuple[str, str], ...] = (
    ("missing 'authorization", "missing-token"),
    ("revoked identity", "identity-revoked"),
    ("expired", "expired"),
    ("revoked", "revoked"),
    ("not valid yet", "not-yet-valid"),
    ("signature", "bad-signature"),
    ("audience", "wrong-audience"),
    ("issuer", "wrong-issuer"),
    ("bound to pod", "pod-mismatch"),
    ("node claims", "identity-mismatch"),
    ("not a service-account", "not-a-service-account"),
    ("loopback", "not-loopback"),
    ("node metadata", "bad-node-metadata"),
    ("unavailable", "review-unavailable"),
    ("client certificate refused", "bad-client-certificate"),
    ("malformed", "malformed"),
    ("algorithm", "malformed"),
)


def failure_reason(reason: str) -> str:
    """The counter an authentication failure is counted under."""
    lowered = reason.lower()
    for needle, counter in _REASONS:
        if needle.lower() in lowered:
            return counter
    return "refused"


_peer_is_loopback = peer_is_loopback  # (its old name here)


class Authenticator:
    """Turns a stream's credential (and node) into a `Proof`, or raises `AuthError`."""

    def __init__(
        self,
        mode: AuthMode | str = AuthMode.TOKENS,
        *,
        tokens: TokenVerifier | None = None,
        reviewer: TokenReview | None = None,
        listen_address: str | None = None,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        certificate_backdate: timedelta = timedelta(minutes=5),
    ) -> None:
        self.mode = AuthMode(mode)
        # The CA backdates NotBefore by this much (clock skew): issuance = NotBefore + it.
        self.certificate_backdate = certificate_backdate
        self.tokens = tokens
        self.reviewer = reviewer
        self.trust_domain = trust_domain
        if self.mode is AuthMode.TOKENS and tokens is None and reviewer is None:
            raise ConfigError("--auth tokens needs workload tokens (a CA directory) or TokenReview")
        if self.mode is AuthMode.INSECURE_NODE_METADATA:
            host = parse_address(listen_address or "", "--xds-address")[0] if listen_address else ""
            if not is_loopback(host):
                raise ConfigError(
                    "--auth insecure-node-metadata trusts whatever a node claims: it is only "
                    f"allowed on a loopback --xds-address, not {listen_address!r}"
                )
            log.warning(
                "INSECURE: --auth insecure-node-metadata: proxies without a token are trusted "
                "to be who their node metadata says. Loopback demos only; never in production.",
                extra={"address": listen_address},
            )

    # Credentials -----------------------------------------------------------------------------

    def _is_workload_token(self, token: str) -> bool:
        """Ours (verified locally) or someone else's (a Kubernetes token, for TokenReview)?
        Decided on the unverified header/claims only: a forged 'ours' still fails our
        signature check, and a forged 'theirs' fails TokenReview."""
        if self.tokens is None:
            return False
        return self.reviewer is None or self.tokens.recognizes(token)

    async def prove(self, token: str) -> Proof:
        """Verify a bearer token (either kind). Raises AuthError (AuthUnavailable when the
        API server could not be asked)."""
        if self._is_workload_token(token):
            assert self.tokens is not None
            identity, claims = self.tokens.verify_claims(token)
            issued = claims.get("iat")
            return Proof(identity.namespace, identity.service_account, "workload-token",
                         token_id=str(claims.get("jti", "")),
                         issued_at=datetime.fromtimestamp(issued, UTC)
                         if isinstance(issued, int) else None)
        if self.reviewer is None:
            raise AuthError("malformed token: not a token of this server (and TokenReview is off)")
        result = await self.reviewer.review(token)
        if not result.authenticated:
            error = result.error or "not authenticated"
            if result.unavailable:
                raise AuthUnavailable(f"token review unavailable: {error}")
            raise AuthError(f"token refused by TokenReview: {error}")
        account = result.service_account
        if account is None:
            raise AuthError("the token is not a service-account token")
        try:
            identity = Identity(*account)
        except ValueError as err:
            raise AuthError(f"the token names an invalid service account: {err}") from None
        return Proof(identity.namespace, identity.service_account, "kubernetes-token",
                     pod=result.pod_name or "")

    async def verify_token(self, token: str) -> Identity:
        """For the CSR service (ca/service.py `Authenticator`): token -> identity."""
        return (await self.prove(token)).identity

    # Streams ---------------------------------------------------------------------------------

    def prove_certificate(self, certificate: PeerCertificate) -> Proof:
        """The identity of a client certificate grpc verified in the TLS handshake (chain to
        the current bundle, validity period): its SPIFFE ID, in our trust domain."""
        ids = certificate.spiffe_ids
        if len(ids) != 1:
            raise AuthError("client certificate refused: an X.509-SVID has exactly one "
                            f"spiffe:// URI SAN, this one has {len(ids)}")
        prefix = f"spiffe://{self.trust_domain}/ns/"
        namespace, sep, service_account = ids[0].removeprefix(prefix).partition("/sa/")
        if not ids[0].startswith(prefix) or not sep or "/" in service_account:
            raise AuthError(f"client certificate refused: {ids[0]!r} is not a workload "
                            f"identity of trust domain {self.trust_domain}")
        try:
            identity = Identity(namespace, service_account)
        except ValueError as err:
            raise AuthError(f"client certificate refused: {err}") from None
        issued = certificate.not_before
        if issued is not None:
            issued += self.certificate_backdate
            if self.tokens is not None:
                self.tokens.check_identity(identity, issued)  # raises for a revoked identity
        return Proof(identity.namespace, identity.service_account, "client-certificate",
                     issued_at=issued)

    async def authenticate(
        self, metadata: Metadata | None, claim: ProxyClaim, peer: str,
        certificate: PeerCertificate | None = None,
    ) -> Proof | None:
        """The proof of a new stream whose node claims `claim` (None in mode `none`): its
        verified client certificate (mutual TLS), else its bearer token. Raises AuthError."""
        if self.mode is AuthMode.NONE:
            return None
        token = bearer_token(metadata)
        if certificate is not None:
            proof = self.prove_certificate(certificate)
            if token is not None:  # sent anyway: checked too, and must prove the same
                other = (await self.prove(token)).identity
                if other != proof.identity:
                    raise AuthError(f"the token proves {other} but the client certificate "
                                    f"proves {proof.identity}")
            self._check_claim(proof, claim, "client certificate")
            return proof
        if token is None:
            if self.mode is not AuthMode.INSECURE_NODE_METADATA:
                raise AuthError("missing 'authorization: Bearer <token>' metadata")
            if not _peer_is_loopback(peer):
                raise AuthError("insecure-node-metadata only trusts loopback peers")
            try:
                identity = Identity(claim.namespace, claim.service_account)
            except ValueError as err:
                raise AuthError(f"invalid node metadata: {err}") from None
            log.warning(
                "INSECURE: stream trusted on its node metadata alone (no token)",
                extra={"identity": str(identity), "proxy": claim.node_id, "peer": peer},
            )
            return Proof(identity.namespace, identity.service_account, "node-metadata",
                         pod=claim.pod)
        proof = await self.prove(token)
        self._check_claim(proof, claim, "token")
        return proof

    @staticmethod
    def _check_claim(proof: Proof, claim: ProxyClaim, credential: str) -> None:
        identity = proof.identity
        if (identity.namespace, identity.service_account) != (claim.namespace, claim.service_account):
            raise AuthError(
                f"the {credential} proves {identity} but the node claims "
                f"{claim.namespace}/{claim.service_account}"
            )
        if proof.pod and claim.pod and proof.pod != claim.pod:
            raise AuthError(f"the {credential} is bound to pod {proof.pod}, the node claims {claim.pod}")

    def still_valid(self, proof: Proof) -> str | None:
        """Why an open stream's credential no longer holds (a revoked workload token, a
        revoked identity), or None. Expiry is not checked here: a proxy keeps its stream past
        its token's expiry, as a TLS session outlives its certificate; the next connection
        needs a valid credential."""
        if self.tokens is None:
            return None
        if proof.token_id and self.tokens.is_revoked(proof.token_id):
            return f"token {proof.token_id} was revoked"
        if proof.issued_at is not None:
            try:
                self.tokens.check_identity(proof.identity, proof.issued_at)
            except AuthError as err:
                return err.reason
        return None


# (namespace, pod) -> (its service account, its IP), or None for a pod the mesh does not know:
# the pod registry the stream bound checks claims against (wired by the composition root).
PodLookup = Callable[[str, str], "tuple[str, str] | None"]

# The slot pool of an identity's streams whose claimed pod could not be verified.
UNVERIFIED_POD = "~unverified"


@dataclass
class GuardSettings:
    """Bounds per identity and per stream (CONFORMANCE rule 19). 0 turns a bound off."""

    # Per verified pod of an identity (see `StreamGuard.slot`); per identity without a pod
    # registry to check claims against.
    max_streams_per_identity: int = 4096
    # All of an identity's streams whose pod is not verified share this many: a leaked
    # credential that is not pod-bound can fill only this pool, never a verified pod's.
    max_unverified_streams_per_identity: int = 256
    # Envoy sends one request per response (its ACK) plus subscription changes: a few per
    # second when busy, bursts of a few hundred when a large config first arrives.
    max_requests_per_second: float = 200.0
    request_burst: int = 1000
    revocation_check_seconds: float = 5.0  # how often open streams' tokens are re-checked


@dataclass
class GuardStats:
    authenticated: Counter[str] = field(default_factory=Counter)  # by method
    auth_failures: Counter[str] = field(default_factory=Counter)  # by reason
    limited: Counter[str] = field(default_factory=Counter)  # "streams-per-identity", "request-rate"
    revoked_streams: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "authenticated": dict(self.authenticated),
            "auth_failures": dict(self.auth_failures),
            "limited": dict(self.limited),
            "revoked_streams": self.revoked_streams,
        }


class _Bucket:
    __slots__ = ("at", "tokens")

    def __init__(self, burst: float) -> None:
        self.tokens = burst
        self.at = time.monotonic()


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


class StreamGuard(StreamHooks):
    """What the xDS server asks before and while it serves a stream (see module doc)."""

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        settings: GuardSettings | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.settings = settings or GuardSettings()
        self.stats = GuardStats()
        self._per_identity: Counter[Hashable] = Counter()
        self._buckets: dict[int, _Bucket] = {}
        self._slots: dict[int, Hashable] = {}  # stream id -> identity slot it holds
        # The mesh's pods, to verify the pod a stream claims (None: no mesh, bound per identity).
        self.pods: PodLookup | None = None

    @property
    def mode(self) -> AuthMode:
        return self.authenticator.mode if self.authenticator is not None else AuthMode.NONE

    async def admit(self, conn: Connection, proxy: VerifiedProxy) -> VerifiedProxy:
        """Authenticate a new stream and take its identity slot. Returns the proxy with what
        its credential proved. Raises StreamRefused."""
        claim = proxy.claim
        proof = None
        if self.authenticator is not None:
            try:
                proof = await self.authenticator.authenticate(conn.metadata, claim, conn.peer,
                                                              conn.peer_certificate)
            except AuthError as err:
                counter = failure_reason(err.reason)
                self.stats.auth_failures[counter] += 1
                code = grpc.StatusCode.UNAVAILABLE if isinstance(err, AuthUnavailable) \
                    else grpc.StatusCode.UNAUTHENTICATED
                log.warning("stream refused: %s", err.reason, extra={
                    "proxy": claim.node_id, "peer": conn.peer,
                    "reason": counter, "method": conn.method,
                })
                raise StreamRefused(code, err.reason, counter) from None
        if proof is not None:
            self.stats.authenticated[proof.method] += 1
        slot, limit, pool = self.slot(proof, claim, conn.peer)
        if limit and self._per_identity[slot] >= limit:
            counter = "streams-unverified-pods" if pool == UNVERIFIED_POD else "streams-per-identity"
            self.stats.limited[counter] += 1
            who = proof.identity if proof else f"{claim.namespace}/{claim.service_account}"
            where = (" from pods it could not verify" if pool == UNVERIFIED_POD
                     else f" in pod {pool}" if pool else "")
            reason = f"too many streams for identity {who}{where} (limit {limit})"
            log.warning("stream refused: %s", reason, extra={"peer": conn.peer, "proxy": claim.node_id,
                                                              "reason": counter})
            raise StreamRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, counter)
        self._per_identity[slot] += 1
        self._slots[conn.state.id] = slot
        return VerifiedProxy(claim, proof)

    def slot(self, proof: Proof | None, claim: ProxyClaim, peer: str) -> tuple[Hashable, int, str]:
        """The slot pool a new stream counts against: (key, limit, pod or UNVERIFIED_POD or "").

        Fair per pod, so one leaked credential cannot lock its identity's other pods out:
        - a pod-bound credential (a projected token; authentication checked the node claims
          that pod): the pod's own pool;
        - another credential of the identity: the claimed pod's own pool when the mesh knows
          that pod with this service account and the connection comes from the pod's IP (or,
          when the peer address tells nothing, from this host (loopback, a Unix socket), the
          node states the pod's IP); otherwise the identity's small shared pool of unverified
          claims (`max_unverified_streams_per_identity`), which no verified pod draws from.
        Without a pod registry the bound is per identity."""
        per_pod = self.settings.max_streams_per_identity
        if proof is None:
            return ("unproven", claim.namespace, claim.service_account), per_pod, ""
        identity = str(proof.identity)
        if proof.pod:
            return (identity, proof.pod), per_pod, proof.pod
        if self.pods is None:
            return identity, per_pod, ""
        if claim.pod and self._pod_verified(proof, claim, peer):
            return (identity, claim.pod), per_pod, claim.pod
        return (identity, UNVERIFIED_POD), self.settings.max_unverified_streams_per_identity, UNVERIFIED_POD

    def _pod_verified(self, proof: Proof, claim: ProxyClaim, peer: str) -> bool:
        assert self.pods is not None
        known = self.pods(claim.namespace, claim.pod)
        if known is None:
            return False
        service_account, ip = known
        if service_account != proof.service_account or not ip:
            return False
        address = peer_ip(peer)
        if address is not None and not peer_is_loopback(peer):
            return _same_ip(address, ip)
        return _same_ip(claim.ip, ip)

    def requested(self, conn: Connection) -> None:
        """Count one request against the stream's rate. Raises StreamRefused."""
        rate = self.settings.max_requests_per_second
        if rate <= 0:
            return
        burst = max(1.0, float(self.settings.request_burst))
        bucket = self._buckets.get(conn.state.id)
        if bucket is None:
            bucket = self._buckets[conn.state.id] = _Bucket(burst)
        now = time.monotonic()
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
        bucket.at = now
        if bucket.tokens < 1.0:
            self.stats.limited["request-rate"] += 1
            reason = f"more than {rate:g} requests per second (burst {int(burst)})"
            log.warning("stream closed: %s", reason, extra={"peer": conn.peer})
            raise StreamRefused(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, "request-rate")
        bucket.tokens -= 1.0

    def closed(self, conn: Connection) -> None:
        self._buckets.pop(conn.state.id, None)
        slot = self._slots.pop(conn.state.id, None)
        if slot is not None:
            self._per_identity[slot] -= 1
            if self._per_identity[slot] <= 0:
                del self._per_identity[slot]

    def streams_of(self, identity: Identity) -> int:
        """Open streams of an identity, over all its slot pools."""
        name = str(identity)
        return sum(count for key, count in self._per_identity.items()
                   if key == name or (isinstance(key, tuple) and key[0] == name))

    async def watch_revocations(
        self, connections: Callable[[], Iterable[Connection]],
        close: Callable[[Connection, grpc.StatusCode, str], None], stop: asyncio.Event,
    ) -> None:
        """Close open streams whose workload token was revoked (checked every few seconds:
        `token revoke` writes a file the verifier re-reads when it changed)."""
        if self.authenticator is None or self.authenticator.tokens is None:
            return
        period = self.settings.revocation_check_seconds
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), period)
                return
            except TimeoutError:
                pass
            for conn in list(connections()):
                proof = conn.proof
                if proof is None or not (proof.token_id or proof.issued_at):
                    continue
                why = self.authenticator.still_valid(proof)
                if why is not None:
                    self.stats.revoked_streams += 1
                    log.warning("closing a stream: %s", why,
                                extra={"proxy": conn.proxy_id, "identity": str(proof.identity)})
                    close(conn, grpc.StatusCode.UNAUTHENTICATED, why)
