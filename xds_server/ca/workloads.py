"""Workload certificates kept current: issued for the identities that need one, renewed at
half-life, re-issued when the signer changes, and the root rotation driven to its end.

This is the CA's side of SDS and knows nothing of xDS or Envoy. It reports what it issues as
plain data to a `CertificateSink` (the composition root's SDS glue, `xds_server/sds.py`,
turns it into Envoy `Secret`s): an `IssuedCertificate` per identity (its key lives only in
memory, in that object and whatever the sink builds from it), the withdrawal of an identity
nobody uses any more, and the trust bundle PEM whenever it changes. Identities are keyed by
their SPIFFE ID.

Renewal: at half the certificate's lifetime with +-10 % jitter (rotation.RenewalSchedule),
under the same name, so Envoy swaps the certificate in place and no listener drains.

Reuse: an identity nobody uses any more keeps its certificate (key in memory only) for up to
`park_limit` identities, least recently released dropped first; when a stream of it comes
back before that certificate is due for renewal, and the signer is the same, it gets the
same certificate again, so reconnects do not mint a key and certificate each (nor fill the
registry with them).

The event loop is never held by signing: a due batch is signed in a worker thread (key
generation included: RSA 2048 takes ~40 ms a key) and applied on the loop in batches of
`batch_size`, so a rotation storm of thousands of identities is a series of short loop turns.
The first certificate of an identity is issued at once on the loop when the key type is cheap
(ECDSA P-256: ~0.06 ms for key and leaf), so a new proxy is not kept waiting; with RSA it
goes through the thread like a renewal.

Root rotation (rotation.RootRotation) is driven from here:
1. `start_root_rotation()` (admin call; the new root is generated in a thread) or
   `xds-server ca rotate-root` (a file change the CA watcher picks up): the new root joins
   the bundle; the sink publishes it.
2. When `bundle_delivered()` (set by whoever delivers the bundle: every proxy following it
   has accepted it) says so, signing switches to the new root and every identity's
   certificate is re-issued.
3. When the last certificate the old root signed has expired, it leaves the bundle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from ..model.identity import Identity
from .authority import CertificateAuthority, KeyAlgorithm, describe, fingerprint
from .rotation import DEFAULT_JITTER, RenewalSchedule, RootRotation, RotationError, RotationPhase
from .svid import IssuedCertificate, IssueError, SvidIssuer

log = logging.getLogger("xds_server.sds")

RETRY_AFTER_FAILURE = timedelta(seconds=30)
# Key types whose generation is too slow for the event loop even once.
SLOW_KEYS = frozenset({KeyAlgorithm.RSA_2048})


class CertificateSink(Protocol):
    """Where issued material goes (the SDS glue at the composition root)."""

    def certificates_issued(self, issued: Sequence[IssuedCertificate]) -> None:
        """New certificates (with their keys) for identities that use them."""

    def certificate_withdrawn(self, spiffe_id: str) -> None:
        """Nobody uses this identity's certificate any more."""

    def bundle_changed(self, bundle_pem: bytes) -> None:
        """The trust bundle (every trusted root, PEM) changed."""


@dataclass(frozen=True, slots=True)
class CurrentCertificate:
    """What is remembered of an identity's certificate: never the key."""

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
class IssuanceStats:
    issued: int = 0  # first certificate of an identity
    renewed: int = 0  # re-issued (half-life, or a new signing root)
    reused: int = 0  # an identity back while its last certificate was still good
    released: int = 0  # an identity nobody uses any more
    issue_failures: int = 0
    bundles_published: int = 0

    def to_dict(self) -> dict[str, int]:
        return {
            "issued": self.issued, "renewed": self.renewed, "reused": self.reused,
            "released": self.released, "issue_failures": self.issue_failures,
            "bundles_published": self.bundles_published,
        }


@dataclass(frozen=True, slots=True)
class _Job:
    """One identity to sign for in a worker thread."""

    spiffe_id: str
    identity: Identity
    generation: int  # the identity's tracking generation when the job was made


@dataclass(frozen=True, slots=True)
class _Signed:
    job: _Job
    started: datetime
    issued: IssuedCertificate | None
    error: str = ""


def _no_barrier() -> bool:
    return True


class WorkloadCertificates:
    """Issues, renews and withdraws identity certificates and publishes the trust bundle
    (see the module doc). Runs on the event loop; `run()` drives renewal and root rotation."""

    def __init__(
        self,
        issuer: SvidIssuer,
        *,
        rotation: RootRotation | None = None,
        ttl: timedelta | None = None,
        jitter: float = DEFAULT_JITTER,
        batch_size: int = 64,
        rng: random.Random | None = None,
        startup_grace: float = 30.0,
        park_limit: int = 10_000,
    ) -> None:
        self.issuer = issuer
        self.authority: CertificateAuthority = issuer.authority
        self.rotation = rotation
        self.ttl = ttl or issuer.default_ttl
        self.batch_size = max(1, batch_size)
        # After a (re)start, proxies connected before are still reconnecting with the bundle
        # they had: "every connected proxy has the new bundle" means nothing until they are
        # back, so a root rotation does not switch signing during this many seconds.
        self.startup_grace = startup_grace
        self.trust_domain = issuer.trust_domain
        self.schedule = RenewalSchedule(jitter=jitter, rng=rng, clock=issuer.clock)
        self.stats = IssuanceStats()
        self.sink: CertificateSink | None = None
        # Whether every proxy following the trust bundle has accepted the current one (the
        # SDS glue answers from the proxies' ACKs); a root rotation waits for it.
        self.bundle_delivered: Callable[[], bool] = _no_barrier
        self._identities: dict[str, Identity] = {}
        self._generation: dict[str, int] = {}  # bumped on every (re)tracking of an identity
        self._generations = 0
        self._unissued: set[str] = set()  # tracked, first certificate still being signed
        self._current: dict[str, CurrentCertificate] = {}
        self._issued: dict[str, IssuedCertificate] = {}  # the current ones, keys included
        # Released identities' certificates, for reuse (see the module doc), oldest first.
        self._parked: OrderedDict[str, tuple[IssuedCertificate, CurrentCertificate]] = OrderedDict()
        self.park_limit = max(0, park_limit)
        self._bundle_pem = b""
        self._signer = self._signer_of()
        self._stepping = False  # a rotation step of ours is changing the CA right now
        self._started_at: float | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        previous = self.authority.changed

        def changed(authority: CertificateAuthority) -> None:
            if previous is not None:
                previous(authority)
            self._ca_changed()

        self.authority.changed = changed

    def connect(self, sink: CertificateSink) -> None:
        """Report issued material to `sink` from now on (the bundle at once)."""
        self.sink = sink
        self._bundle_pem = b""
        self._publish_bundle()

    @property
    def awaiting_bundle(self) -> bool:
        """A root rotation waits for the new bundle to be delivered (see `bundle_delivered`)."""
        return self.rotation is not None and self.rotation.phase is RotationPhase.PUBLISHING

    @property
    def slow_keys(self) -> bool:
        return self.issuer.key_algorithm in SLOW_KEYS

    # Identities ------------------------------------------------------------------------------

    def spiffe_id(self, identity: Identity) -> str:
        return self.issuer.spiffe_id(identity)

    def track(self, identity: Identity, *, proxy: str = "") -> str:
        """Make sure `identity` has a certificate (issued now, or soon in a thread when keys
        are slow to make) and keeps one. Returns its SPIFFE ID."""
        spiffe_id = self.spiffe_id(identity)
        if spiffe_id in self._identities:
            return spiffe_id
        self._identities[spiffe_id] = identity
        self._generations += 1
        self._generation[spiffe_id] = self._generations
        if self._reuse(spiffe_id):
            return spiffe_id
        self._unissued.add(spiffe_id)
        if self.slow_keys:
            self.schedule.schedule_at(spiffe_id, self.issuer.clock())
            self._wake_up()
        else:
            self._issue_now(spiffe_id, proxy=proxy)
            self._unissued.discard(spiffe_id)  # a failed first issuance is retried as a renewal
        return spiffe_id

    def forget(self, spiffe_id: str) -> None:
        """Nobody needs this identity's certificate any more: stop renewing, withdraw it."""
        if self._identities.pop(spiffe_id, None) is None:
            return
        self._generation.pop(spiffe_id, None)
        self._unissued.discard(spiffe_id)
        current = self._current.pop(spiffe_id, None)
        issued = self._issued.pop(spiffe_id, None)
        if current is not None and issued is not None and self.park_limit:
            self._parked[spiffe_id] = (issued, current)
            self._parked.move_to_end(spiffe_id)
            while len(self._parked) > self.park_limit:
                self._parked.popitem(last=False)
        self.schedule.forget(spiffe_id)
        if self.sink is not None:
            self.sink.certificate_withdrawn(spiffe_id)
        self.stats.released += 1
        log.info("workload secret released: no stream of its identity left",
                 extra={"spiffe_id": spiffe_id})

    def _reuse(self, spiffe_id: str) -> bool:
        """Give a returning identity its parked certificate if it is not due for renewal
        and its root still signs (see the module doc)."""
        parked = self._parked.pop(spiffe_id, None)
        if parked is None:
            return False
        issued, current = parked
        if self.issuer.clock() >= current.renew_at:  # (a signer change empties the parking)
            return False
        self._current[spiffe_id] = current
        self._issued[spiffe_id] = issued
        self.schedule.schedule_at(spiffe_id, current.renew_at)
        self.stats.reused += 1
        if self.sink is not None:
            self.sink.certificates_issued([issued])
        return True

    def tracks(self, spiffe_id: str) -> bool:
        return spiffe_id in self._identities

    def __len__(self) -> int:
        return len(self._identities)

    def current(self, identity: Identity) -> CurrentCertificate | None:
        return self._current.get(self.spiffe_id(identity))

    def certificates(self) -> dict[str, CurrentCertificate]:
        """SPIFFE ID -> the current certificate (no key), for the admin API."""
        return dict(self._current)

    # Issuing ---------------------------------------------------------------------------------

    def _issue_now(self, spiffe_id: str, *, proxy: str = "") -> bool:
        """Issue on the loop (cheap keys only; see the module doc)."""
        identity = self._identities[spiffe_id]
        job = _Job(spiffe_id, identity, self._generation[spiffe_id])
        return self._apply([self._sign_one(job, proxy or "sds")], self._signer) > 0

    def _sign_one(self, job: _Job, proxy: str) -> _Signed:
        """Key, leaf and chain for one identity. Safe in a worker thread: the authority's
        state is one immutable object and the registry locks."""
        started = self.issuer.clock()
        try:
            issued = self.issuer.issue_for_identity(job.identity, ttl=self.ttl, proxy=proxy)
        except IssueError as err:
            return _Signed(job, started, None, str(err))
        return _Signed(job, started, issued)

    def _sign_batch(self, jobs: Sequence[_Job]) -> list[_Signed]:
        return [self._sign_one(job, "sds") for job in jobs]

    def _apply(self, results: Sequence[_Signed], signer: tuple[str, ...]) -> int:
        """On the loop: record what was signed and hand it to the sink. Results for an
        identity released (or re-tracked) meanwhile are dropped; results signed by a signer
        that has since changed are used but due again at once. Returns how many applied."""
        published: list[IssuedCertificate] = []
        stale_signer = signer != self._signer
        for result in results:
            spiffe_id = result.job.spiffe_id
            if self._generation.get(spiffe_id) != result.job.generation:
                continue  # released while it was being signed
            issued = result.issued
            if issued is None:
                self.stats.issue_failures += 1
                log.error("cannot issue a workload certificate: %s", result.error,
                          extra={"identity": str(result.job.identity)})
                self.schedule.schedule_at(spiffe_id, self.issuer.clock() + RETRY_AFTER_FAILURE)
                continue
            # From the moment of issuance, not the certificate's whole-second issued_at: with
            # a short TTL, a truncated start would make a fresh certificate look half-used.
            renew_at = self.schedule.track_validity(
                spiffe_id, max(result.started, issued.issued_at), issued.not_after)
            if stale_signer:
                self.schedule.schedule_at(spiffe_id, self.issuer.clock())
            self._current[spiffe_id] = CurrentCertificate(
                issued.spiffe_id, issued.serial, issued.not_after, issued.issued_at,
                issued.root_fingerprint, renew_at,
            )
            self._issued[spiffe_id] = issued
            if spiffe_id in self._unissued:
                self._unissued.discard(spiffe_id)
                self.stats.issued += 1
            else:
                self.stats.renewed += 1
            published.append(issued)
        if published and self.sink is not None:
            self.sink.certificates_issued(published)
        del published  # the keys live on in what the sink built, and in _issued for reuse
        if results:
            self._wake_up()
        return len(results)

    async def _renew_due(self) -> None:
        """Take what is due `batch_size` identities at a time: sign each slice in a worker
        thread and apply it on the loop, which is never held for more than one slice."""
        while True:
            due = self.schedule.pop_due(limit=self.batch_size)
            if not due:
                return
            jobs = [_Job(s, self._identities[s], self._generation[s])
                    for s in due if s in self._identities]
            if not jobs:
                continue
            signer = self._signer
            try:
                results = await asyncio.to_thread(self._sign_batch, jobs)
            except BaseException:
                # Cancelled (shutdown) or a bug: what was popped is due again, not lost.
                for job in jobs:
                    if self._generation.get(job.spiffe_id) == job.generation:
                        self.schedule.schedule_at(job.spiffe_id, self.issuer.clock())
                raise
            self._apply(results, signer)

    # Trust bundle ----------------------------------------------------------------------------

    @property
    def bundle_pem(self) -> bytes:
        return self.authority.trust_bundle_pem

    def _publish_bundle(self) -> None:
        bundle = self.authority.trust_bundle_pem
        if bundle == self._bundle_pem or self.sink is None:
            return
        self._bundle_pem = bundle
        self.sink.bundle_changed(bundle)
        self.stats.bundles_published += 1
        log.info("trust bundle published", extra={
            "roots": len(self.authority.roots),
            "fingerprints": ",".join(fingerprint(r)[:16] for r in self.authority.roots),
        })

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
            self._parked.clear()  # from the old signer: never handed out again
            # Every identity's certificate comes from the new signer now, in batches.
            self.schedule.mark_due()
            log.info("the signing certificate changed: re-issuing every workload certificate",
                     extra={**describe(self.authority.state.signing_cert),
                            "identities": len(self._identities)})
        self._wake_up()

    # Root rotation ---------------------------------------------------------------------------

    async def start_root_rotation(self) -> dict[str, Any]:
        """Step 1 (the admin call): publish a new root, generated in a worker thread.
        Raises RotationError."""
        rotation = self.rotation
        if rotation is None:
            raise RotationError("root rotation is not enabled on this server")
        self._stepping = True
        try:
            # The slow half (key, certificate, files) in a thread; the phase is recorded here.
            await asyncio.to_thread(rotation.prepare_next_root)
            rotation.start_root_rotation()
        finally:
            self._stepping = False
        self._ca_changed()
        return self.rotation_status()

    def rotation_status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.rotation.status() if self.rotation is not None else {
            "phase": RotationPhase.IDLE.value}
        status.update({
            "bundle_roots": [fingerprint(r) for r in self.authority.roots],
            "signing_root": self.authority.state.root_fingerprint,
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
            if not self.bundle_delivered():
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

    def wake(self) -> None:
        """Look at renewals and the rotation again now (an ACK, a stream gone, a test)."""
        if self._wake is not None:
            self._wake.set()

    _wake_up = wake

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
