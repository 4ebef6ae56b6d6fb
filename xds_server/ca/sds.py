"""SDS: each proxy's workload certificate and the trust bundle, as Envoy `Secret`s.

Two secret names, the ones Envoy configurations (and Istio users) know:

- `default`: the workload's X.509-SVID chain and its private key (`tls_certificate`). The key
  is generated here, in memory, for the identity the stream *proved* (xds/auth.py); it is
  never written to disk or logged (`Resource` and `IssuedCertificate` keep it out of
  `repr`, and logs name certificates by serial).
- `ROOTCA`: the trust bundle (`validation_context.trusted_ca`), the same for every proxy.

Every proxy asks for "default", but each identity's "default" is its own resource: the cache
keeps it under `default@<SPIFFE ID>` and a stream's `SecretView` maps the wire name to the key
of *its* identity (`View.cache_key`). One certificate per identity, shared by that identity's
proxies and released when its last stream goes. A request naming any identity-scoped key
(`default@...`, `ROOTCA@...`, `spiffe://...`) is never answered and is counted as refused
(CONFORMANCE rule 18 allows "left unanswered and counted"; closing the stream instead would
take the proxy's whole ADS config down with it).

`ROOTCA` carries the bundle only. The trust domain is enforced by the SPIFFE IDs the
transport sockets match (the mTLS translation): SAN matchers put in this secret would be
merged (OR-ed) with those of a combined validation context and could only widen them.

Renewal: at half the certificate's lifetime with +-10 % jitter (rotation.RenewalSchedule),
under the same name, so Envoy swaps the certificate in place and no listener drains. A loop
on the event loop re-issues due identities in small batches (an ECDSA P-256 key and leaf take
~0.06 ms).

Root rotation (rotation.RootRotation) is driven from here:
1. `start_root_rotation()` (admin call) or `xds-server ca rotate-root` (a file change the CA
   watcher picks up): the new root joins the bundle; `ROOTCA` is pushed to everyone.
2. When every stream subscribed to `ROOTCA` has ACKed the bundle holding the new root
   (`server.on_ack`), signing switches to it and every identity's certificate is re-issued.
3. When the last certificate the old root signed has expired, it leaves the bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from ..xds import types
from ..xds.cache import ResourceCache, View
from ..xds.resource import Resource
from .authority import CertificateAuthority, describe, fingerprint
from .identity import Identity
from .rotation import DEFAULT_JITTER, RenewalSchedule, RootRotation, RotationError, RotationPhase
from .svid import IssuedCertificate, IssueError, SvidIssuer

log = logging.getLogger("xds_server.sds")

DEFAULT_SECRET = "default"
ROOTCA_SECRET = "ROOTCA"
_RESERVED_PREFIXES = ("default@", "ROOTCA@", "spiffe://")
_REFUSED_KEY = "\0refused"  # what a refused name is indexed under: nothing ever lives there
RETRY_AFTER_FAILURE = timedelta(seconds=30)
MAX_REFUSED_LOGGED = 64  # refused names remembered (and logged) per stream


def identity_key(spiffe_id: str) -> str:
    """The cache key of an identity's `default` secret."""
    return f"{DEFAULT_SECRET}@{spiffe_id}"


def is_identity_scoped(name: str) -> bool:
    return name.startswith(_RESERVED_PREFIXES)


def workload_secret(issued: IssuedCertificate) -> secret_pb2.Secret:
    if issued.key_pem is None:
        raise ValueError("a workload secret needs the server-generated key")
    secret = secret_pb2.Secret(name=DEFAULT_SECRET)
    secret.tls_certificate.certificate_chain.inline_bytes = issued.chain_pem
    secret.tls_certificate.private_key.inline_bytes = issued.key_pem
    return secret


def bundle_secret(bundle_pem: bytes) -> secret_pb2.Secret:
    secret = secret_pb2.Secret(name=ROOTCA_SECRET)
    secret.validation_context.trusted_ca.inline_bytes = bundle_pem
    return secret


def redacted(resource: Resource) -> secret_pb2.Secret:
    """A secret fit to show (admin API, CSDS): private keys replaced, as Envoy's own
    config_dump does."""
    secret = resource.unpack(secret_pb2.Secret)
    if secret.HasField("tls_certificate"):
        key = secret.tls_certificate.private_key
        if key.WhichOneof("specifier") is not None:
            key.Clear()
            key.inline_string = "[redacted]"
    if secret.HasField("generic_secret"):
        secret.generic_secret.secret.Clear()
        secret.generic_secret.secret.inline_string = "[redacted]"
    return secret


@dataclass(frozen=True, slots=True)
class CurrentCertificate:
    """What the provider remembers of an identity's certificate: never the key."""

    spiffe_id: str
    serial: int
    not_after: datetime
    issued_at: datetime
    root_fingerprint: str
    renew_at: datetime

    def to_dict(self) -> dict[str, str]:
        return {
            "spiffe_id": self.spiffe_id,
            "serial": format(self.serial, "x"),
            "not_after": self.not_after.isoformat(),
            "issued_at": self.issued_at.isoformat(),
            "renew_at": self.renew_at.isoformat(),
            "root_fingerprint": self.root_fingerprint,
        }


@dataclass
class SdsStats:
    issued: int = 0  # first certificate of an identity
    renewed: int = 0  # re-issued (half-life, or a new signing root)
    released: int = 0  # an identity's last stream went
    issue_failures: int = 0
    bundles_published: int = 0
    refused: Counter = field(default_factory=Counter)  # secret requests refused, by reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "issued": self.issued, "renewed": self.renewed, "released": self.released,
            "issue_failures": self.issue_failures, "bundles_published": self.bundles_published,
            "refused": dict(self.refused),
        }


@dataclass
class _StreamSecrets:
    conn: Any
    identity_key: str | None = None  # the identity secret this stream holds
    bundle: bool = False  # subscribed to ROOTCA
    bundle_acked: str = ""  # the ROOTCA version it last ACKed
    refused: set[str] = field(default_factory=set)  # names already counted as refused


def _follows_bundle(conn: Any) -> bool:
    """The stream is subscribed to ROOTCA now (a proxy that dropped it waits for nothing)."""
    type_state = conn.state.types.get(types.SECRET)
    return type_state is not None and (type_state.wildcard or ROOTCA_SECRET in type_state.names)


class SecretView:
    """A stream's view with its secrets mapped: `default` -> its identity's secret, `ROOTCA`
    -> the bundle; every other type (and other secret names) as the inner view says."""

    def __init__(self, inner: View, provider: SecretProvider, identity: Identity | None) -> None:
        self._inner = inner
        self._provider = provider
        self._own = provider.identity_key(identity) if identity is not None else None
        self._bundle = provider.bundle_key

    @property
    def inner(self) -> View:
        return self._inner

    @property
    def key(self) -> Hashable:
        return ("sds", self._inner.key, self._own)

    def cache_key(self, type_url: str, name: str) -> str:
        if type_url == types.SECRET:
            if name == DEFAULT_SECRET and self._own is not None:
                return self._own
            if name == ROOTCA_SECRET:
                return self._bundle
            if is_identity_scoped(name):
                return _REFUSED_KEY
        return self._inner.cache_key(type_url, name)

    def get(self, type_url: str, name: str) -> Resource | None:
        if type_url != types.SECRET:
            return self._inner.get(type_url, name)
        key = self.cache_key(type_url, name)
        if key == _REFUSED_KEY:
            return None
        if key == self._own or key == self._bundle:
            return self._provider.cache.get(types.SECRET, key)
        return self._inner.get(type_url, name)

    def visible(self, type_url: str) -> Iterable[Resource]:
        if type_url != types.SECRET:
            return self._inner.visible(type_url)
        found = [r for r in self._inner.visible(type_url) if not is_identity_scoped(r.cache_key)]
        for key in (self._own, self._bundle):
            resource = self._provider.cache.get(types.SECRET, key) if key else None
            if resource is not None:
                found.append(resource)
        return found

    def may_see(self, type_url: str, name: str) -> bool:
        """`name` is a cache key here (the server asks about changed cache entries)."""
        if type_url != types.SECRET:
            return self._inner.may_see(type_url, name)
        if name == self._own or name == self._bundle:
            return True
        if is_identity_scoped(name):
            return False
        return self._inner.may_see(type_url, name)


class SecretProvider:
    """Issues, renews and releases identity secrets and publishes the trust bundle (see
    the module doc). Runs on the event loop; `run()` drives renewal and root rotation."""

    def __init__(
        self,
        cache: ResourceCache,
        issuer: SvidIssuer,
        *,
        rotation: RootRotation | None = None,
        ttl: timedelta | None = None,
        jitter: float = DEFAULT_JITTER,
        batch_size: int = 64,
        rng: random.Random | None = None,
        startup_grace: float = 30.0,
    ) -> None:
        self.cache = cache
        self.issuer = issuer
        self.authority: CertificateAuthority = issuer.authority
        self.rotation = rotation
        self.ttl = ttl or issuer.default_ttl
        self.batch_size = max(1, batch_size)
        # After a (re)start, proxies connected before are still reconnecting with the bundle
        # they had: "every connected proxy has the new bundle" means nothing until they are
        # back, so a root rotation does not switch signing during this many seconds.
        self.startup_grace = startup_grace
        self._started_at: float | None = None
        self.trust_domain = issuer.trust_domain
        self.bundle_key = f"{ROOTCA_SECRET}@spiffe://{self.trust_domain}"
        self.schedule = RenewalSchedule(jitter=jitter, rng=rng, clock=issuer.clock)
        self.stats = SdsStats()
        self._holders: Counter[str] = Counter()  # identity key -> streams holding it
        self._identities: dict[str, Identity] = {}
        self._current: dict[str, CurrentCertificate] = {}
        self._streams: dict[int, _StreamSecrets] = {}
        self._bundle_version = ""
        self._signer = self._signer_of()
        self._stepping = False  # a rotation step of ours is changing the CA right now
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        previous = self.authority.changed

        def changed(authority: CertificateAuthority) -> None:
            if previous is not None:
                previous(authority)
            self._ca_changed()

        self.authority.changed = changed
        self._publish_bundle()

    # Keys ------------------------------------------------------------------------------------

    def identity_key(self, identity: Identity) -> str:
        return identity_key(self.issuer.spiffe_id(identity))

    # Views and streams (called by xds/auth.py StreamGuard) -----------------------------------

    def view(self, inner: View, identity: Identity | None) -> View:
        return SecretView(inner, self, identity)

    def subscribed(self, conn: Any, identity: Identity | None, names: Iterable[str],
                   wildcard: bool) -> None:
        stream = self._streams.get(conn.state.id)
        if stream is None:
            stream = self._streams[conn.state.id] = _StreamSecrets(conn)
        wants_default = wildcard
        for name in names:
            if name == DEFAULT_SECRET:
                wants_default = True
            elif name == ROOTCA_SECRET:
                stream.bundle = True
            elif is_identity_scoped(name):
                self._refuse(stream, identity, name, "other-identity")
        if wildcard:
            stream.bundle = True
        if wants_default and stream.identity_key is None:
            if identity is None:
                self._refuse(stream, identity, DEFAULT_SECRET, "no-proven-identity")
            else:
                stream.identity_key = self.acquire(identity, proxy=conn.proxy_id)

    def _refuse(self, stream: _StreamSecrets, identity: Identity | None, name: str,
                reason: str) -> None:
        if name in stream.refused:
            return  # once per stream and name: a proxy repeating its subscription is one case
        self.stats.refused[reason] += 1
        if len(stream.refused) >= MAX_REFUSED_LOGGED:
            return  # counted; a stream asking for ever new names is not logged (or kept) forever
        stream.refused.add(name)
        log.warning("secret request refused: %s", reason, extra={
            "proxy": stream.conn.proxy_id, "identity": str(identity) if identity else "",
            "secret": name[:200],
        })

    def closed(self, conn: Any) -> None:
        stream = self._streams.pop(conn.state.id, None)
        if stream is None:
            return
        if stream.identity_key is not None:
            self.release(stream.identity_key)
        if stream.bundle:
            self._wake_up()  # one fewer proxy a root rotation waits for

    def on_ack(self, conn: Any, ack: Any) -> None:
        """`XdsServer.on_ack` hook: remember which bundle each stream has accepted."""
        if ack.type_url != types.SECRET or ack.nack is not None:
            return
        stream = self._streams.get(conn.state.id)
        if stream is None or not stream.bundle:
            return
        type_state = conn.state.types.get(types.SECRET)
        if type_state is None:
            return
        # One response per type is outstanding (rule 5): what the ACKed response left the
        # client with is what we recorded as sent.
        stream.bundle_acked = type_state.known.get(ROOTCA_SECRET, "")
        if self.rotation is not None and self.rotation.phase is RotationPhase.PUBLISHING:
            self._wake_up()

    def attach(self, server: Any) -> None:
        """Follow a server's ACKs (root rotation waits for them)."""
        server.on_ack.append(self.on_ack)

    # Identity secrets ------------------------------------------------------------------------

    def acquire(self, identity: Identity, *, proxy: str = "") -> str:
        """Make sure `identity` has a secret in the cache (issue one now if not); one more
        stream holds it. Returns its cache key."""
        key = self.identity_key(identity)
        self._holders[key] += 1
        if key not in self._identities:
            self._identities[key] = identity
            self._issue(key, proxy=proxy, first=True)
        return key

    def release(self, key: str) -> None:
        """One stream fewer holds the secret; the last one takes it out of the cache."""
        if key not in self._holders:
            return
        self._holders[key] -= 1
        if self._holders[key] > 0:
            return
        del self._holders[key]
        self._identities.pop(key, None)
        self._current.pop(key, None)
        self.schedule.forget(key)
        self.cache.update(types.SECRET, remove=[key])
        self.stats.released += 1
        log.info("workload secret released: no stream of its identity left",
                 extra={"spiffe_id": key.partition("@")[2]})

    def _issue(self, key: str, *, proxy: str = "", first: bool = False) -> bool:
        identity = self._identities.get(key)
        if identity is None:
            return False
        now = self.issuer.clock()
        try:
            issued = self.issuer.issue_for_identity(identity, ttl=self.ttl, proxy=proxy or "sds")
        except IssueError as err:
            self.stats.issue_failures += 1
            log.error("cannot issue a workload certificate: %s", err,
                      extra={"identity": str(identity)})
            self.schedule.schedule_at(key, self.issuer.clock() + RETRY_AFTER_FAILURE)
            self._wake_up()
            return False
        resource = Resource.from_message(workload_secret(issued), name=DEFAULT_SECRET, key=key)
        # From the moment of issuance, not the certificate's whole-second issued_at: with a
        # short TTL, a truncated start would make a fresh certificate look half-used.
        renew_at = self.schedule.track_validity(key, max(now, issued.issued_at), issued.not_after)
        self._current[key] = CurrentCertificate(
            issued.spiffe_id, issued.serial, issued.not_after, issued.issued_at,
            issued.root_fingerprint, renew_at,
        )
        del issued  # the key now lives only in the cached resource
        self.cache.update(types.SECRET, upsert=[resource])
        if first:
            self.stats.issued += 1
        else:
            self.stats.renewed += 1
        self._wake_up()
        return True

    def current(self, identity: Identity) -> CurrentCertificate | None:
        return self._current.get(self.identity_key(identity))

    def identities(self) -> list[dict[str, Any]]:
        """For the admin API: every identity served, its certificate and its streams."""
        return [
            {**cert.to_dict(), "streams": self._holders.get(key, 0)}
            for key, cert in sorted(self._current.items())
        ]

    # Trust bundle ----------------------------------------------------------------------------

    @property
    def bundle_version(self) -> str:
        return self._bundle_version

    def _publish_bundle(self) -> None:
        resource = Resource.from_message(
            bundle_secret(self.authority.trust_bundle_pem), name=ROOTCA_SECRET, key=self.bundle_key
        )
        if resource.version == self._bundle_version:
            return
        self._bundle_version = resource.version
        self.cache.update(types.SECRET, upsert=[resource])
        self.stats.bundles_published += 1
        log.info("trust bundle published", extra={
            "roots": len(self.authority.roots), "version": resource.version,
            "fingerprints": ",".join(fingerprint(r)[:16] for r in self.authority.roots),
        })

    def bundle_delivery(self) -> tuple[bool, list[str]]:
        """(every stream subscribed to ROOTCA has ACKed the current bundle, the proxies that
        have not yet)."""
        waiting = sorted({
            s.conn.proxy_id for s in self._streams.values()
            if s.bundle and s.bundle_acked != self._bundle_version and _follows_bundle(s.conn)
        })
        return not waiting, waiting

    # CA changes ------------------------------------------------------------------------------

    def _signer_of(self) -> tuple[str, ...]:
        state = self.authority.state
        return (fingerprint(state.signing_cert), *(fingerprint(c) for c in state.chain))

    def _ca_changed(self) -> None:
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            self._loop.call_soon_threadsafe(self._ca_changed)
            return
        self._publish_bundle()
        if self.rotation is not None and not self._stepping:
            self.rotation.reconcile()
        signer = self._signer_of()
        if signer != self._signer:
            self._signer = signer
            # Every identity's certificate comes from the new signer now, in batches.
            self.schedule.mark_due()
            log.info("the signing certificate changed: re-issuing every workload certificate",
                     extra={**describe(self.authority.state.signing_cert),
                            "identities": len(self._identities)})
        self._wake_up()

    # Root rotation ---------------------------------------------------------------------------

    def start_root_rotation(self) -> dict[str, Any]:
        """Step 1 (the admin call): publish a new root. Raises RotationError."""
        if self.rotation is None:
            raise RotationError("root rotation is not enabled on this server")
        self._stepping = True
        try:
            self.rotation.start_root_rotation()
        finally:
            self._stepping = False
        self._ca_changed()
        return self.rotation_status()

    def rotation_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.rotation.status() if self.rotation is not None else {
            "phase": RotationPhase.IDLE.value}
        delivered, waiting = self.bundle_delivery()
        status.update({
            "bundle_version": self._bundle_version,
            "bundle_roots": [fingerprint(r) for r in self.authority.roots],
            "signing_root": self.authority.state.root_fingerprint,
            "bundle_delivered_to_all": delivered,
            "waiting_for": waiting[:100],
            "waiting_count": len(waiting),
            "startup_grace_remaining": round(self._settling(), 1),
        })
        return status

    def _settling(self) -> float:
        """Seconds of the start-up grace still to go."""
        if self._started_at is None or self._loop is None:
            return self.startup_grace
        return max(0.0, self._started_at + self.startup_grace - self._loop.time())

    def _advance_rotation(self) -> datetime | None:
        """Take the rotation step that is due, if any; returns when to look again."""
        rotation = self.rotation
        if rotation is None:
            return None
        if rotation.phase is RotationPhase.PUBLISHING:
            delivered, waiting = self.bundle_delivery()
            if not delivered:
                return None  # an ACK (or a stream closing) wakes us
            settling = self._settling()
            if settling > 0:
                return self.issuer.clock() + timedelta(seconds=settling)
            self._stepping = True
            try:
                rotation.bundle_delivered_to_all()
            except RotationError as err:
                log.error("root rotation cannot switch signing: %s", err)
                return None
            finally:
                self._stepping = False
            self._ca_changed()
        if rotation.phase is RotationPhase.RETIRING:
            self._stepping = True
            try:
                finished = rotation.tick()
            finally:
                self._stepping = False
            if finished:
                self._ca_changed()
                return None
            return rotation.retire_after()
        return None

    # The loop --------------------------------------------------------------------------------

    def _wake_up(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event, *, watch_files: bool = True) -> None:
        """Renew due certificates and drive root rotation until `stop` is set. With
        `watch_files`, CA file changes (an operator's new intermediate, the `ca rotate-root`
        command) are followed too."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._started_at = self._loop.time()
        self._wake = asyncio.Event()
        watcher = None
        if watch_files:
            watcher = asyncio.create_task(self.authority.watch(stop), name="ca-files")
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                self._wake.clear()
                await self._renew_due()
                rotation_next = self._advance_rotation()
                if self._wake.is_set():
                    continue
                due = [t for t in (self.schedule.next_due(), rotation_next) if t is not None]
                timeout = None
                if due:
                    timeout = max(0.0, (min(due) - self.issuer.clock()).total_seconds())
                waker = asyncio.create_task(self._wake.wait())
                await asyncio.wait({waker, stopper}, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                waker.cancel()
        finally:
            stopper.cancel()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watcher

    async def _renew_due(self) -> None:
        due = self.schedule.pop_due()
        for i, key in enumerate(due):
            if key in self._identities:
                self._issue(key)
            if (i + 1) % self.batch_size == 0:
                await asyncio.sleep(0)  # let the loop serve streams between batches
