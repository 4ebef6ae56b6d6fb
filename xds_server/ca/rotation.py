"""When certificates renew, and how the root CA is replaced without breaking a handshake.

Workload certificates (`RenewalSchedule`)
    Each proxy's certificate is due at half its lifetime, moved by a random jitter of up to
    +-10 % of the lifetime, so a fleet issued at the same moment (a server restart) does not
    come back at the same moment either. Half-life leaves the other half to survive a
    control-plane outage. The schedule is pure bookkeeping: the server asks `next_due()` to
    arm one timer and `pop_due()` for the proxies to re-issue.

Root rotation (`RootRotation`), three steps, each safe to stop after:

    IDLE --start_root_rotation()--> PUBLISHING
        A new root is generated and added to the trust bundle; signing stays on the old one.
        The server pushes the new bundle (SDS `ROOTCA`) to every proxy.
    PUBLISHING --bundle_delivered_to_all()--> RETIRING
        The caller reports that every proxy has the bundle with both roots. Only now does
        signing switch: a leaf from the new root is trusted everywhere it is presented.
    RETIRING --tick() once the old root's last certificate expired--> IDLE
        The old root leaves the bundle when no unexpired certificate chains to it any more.

The state is persisted next to the CA files (`root-rotation.json`) so a restart resumes the
rotation. After a restart the in-memory certificate registry no longer knows every certificate
the old root signed, so the old root then stays until the worst case: switch time + the
maximum certificate TTL.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path

from cryptography import x509

from .authority import CLOCK_SKEW, CAError, CertificateAuthority, Clock, fingerprint, utcnow
from .files import write_atomic
from .svid import MAX_TTL, CertificateRegistry, IssuedCertificate

log = logging.getLogger("xds_server.ca")

DEFAULT_JITTER = 0.10
STATE_FILE = "root-rotation.json"


class RotationError(Exception):
    """A rotation step was asked for in the wrong phase (message says which)."""


def renewal_time(
    issued_at: datetime,
    not_after: datetime,
    *,
    jitter: float = DEFAULT_JITTER,
    rng: random.Random | None = None,
) -> datetime:
    """When a certificate valid from `issued_at` to `not_after` should be renewed: at half its
    lifetime plus a uniform offset in [-jitter, +jitter] x lifetime."""
    if not 0 <= jitter < 0.5:
        raise ValueError("jitter must be in [0, 0.5)")
    lifetime = not_after - issued_at
    if lifetime <= timedelta(0):
        return issued_at
    offset = (rng or random).uniform(-jitter, jitter)
    return issued_at + lifetime * (0.5 + offset)


class RenewalSchedule:
    """Per-proxy renewal times. Not thread-safe: driven from the event loop."""

    def __init__(
        self,
        *,
        jitter: float = DEFAULT_JITTER,
        rng: random.Random | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not 0 <= jitter < 0.5:
            raise ValueError("jitter must be in [0, 0.5)")
        self.jitter = jitter
        self.rng = rng or random.Random()
        self.clock = clock or utcnow
        self._due: dict[str, tuple[datetime, int]] = {}
        self._heap: list[tuple[datetime, int, str]] = []
        self._seq = itertools.count()

    def track(self, proxy: str, cert: IssuedCertificate) -> datetime:
        """Record a freshly issued certificate for `proxy`; returns when it is due."""
        return self.track_validity(proxy, cert.issued_at, cert.not_after)

    def track_validity(self, proxy: str, issued_at: datetime, not_after: datetime) -> datetime:
        due = renewal_time(issued_at, not_after, jitter=self.jitter, rng=self.rng)
        self._set(proxy, due)
        return due

    def _set(self, proxy: str, due: datetime) -> None:
        seq = next(self._seq)
        self._due[proxy] = (due, seq)
        heapq.heappush(self._heap, (due, seq, proxy))

    def schedule_at(self, proxy: str, due: datetime) -> None:
        """Make `proxy` due at `due` (a retry after a failed issuance)."""
        self._set(proxy, due)

    def forget(self, proxy: str) -> None:
        """The proxy disconnected: nothing to renew (its heap entry is dropped lazily)."""
        self._due.pop(proxy, None)

    def due_at(self, proxy: str) -> datetime | None:
        entry = self._due.get(proxy)
        return entry[0] if entry else None

    def _clean(self) -> None:
        while self._heap:
            due, seq, proxy = self._heap[0]
            if self._due.get(proxy) == (due, seq):
                return
            heapq.heappop(self._heap)

    def next_due(self) -> datetime | None:
        """The earliest renewal time: when the server's timer should fire next."""
        self._clean()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: datetime | None = None, limit: int | None = None) -> list[str]:
        """Proxies due at `now`, earliest first (at most `limit`: a storm is taken in
        slices). They leave the schedule until re-tracked with their new certificate."""
        now = now or self.clock()
        due: list[str] = []
        while limit is None or len(due) < limit:
            self._clean()
            if not self._heap or self._heap[0][0] > now:
                return due
            _, _, proxy = heapq.heappop(self._heap)
            del self._due[proxy]
            due.append(proxy)
        return due

    def mark_due(self, proxies: Iterable[str] | None = None, now: datetime | None = None) -> None:
        """Make proxies (all tracked ones by default) due now, e.g. to re-issue everything
        after the CA was replaced."""
        now = now or self.clock()
        if proxies is None:
            # Everything: one heap built in linear time rather than a push per proxy (a root
            # switch marks thousands at once, on the event loop).
            self._due = {proxy: (now, next(self._seq)) for proxy in self._due}
            self._heap = [(due, seq, proxy) for proxy, (due, seq) in self._due.items()]
            heapq.heapify(self._heap)
            return
        for proxy in list(proxies):
            if proxy in self._due:
                self._set(proxy, now)

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, proxy: object) -> bool:
        return proxy in self._due


class RotationPhase(str, Enum):
    IDLE = "idle"
    PUBLISHING = "publishing"  # new root in the bundle, old root still signing
    RETIRING = "retiring"  # new root signing, old root in the bundle until its leaves expire


@dataclass
class RotationState:
    phase: RotationPhase = RotationPhase.IDLE
    new_root: str = ""  # fingerprints
    old_root: str = ""
    started_at: datetime | None = None
    switched_at: datetime | None = None
    retire_by: datetime | None = None  # worst case: switch + max TTL (+ clock skew)
    # The registry saw every certificate the old root signed (false after a restart).
    registry_complete: bool = False

    def to_json(self) -> dict:
        data = asdict(self)
        data["phase"] = self.phase.value
        for name in ("started_at", "switched_at", "retire_by"):
            value = data[name]
            data[name] = value.isoformat() if value else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> RotationState:
        def when(name: str) -> datetime | None:
            value = data.get(name)
            return datetime.fromisoformat(value) if value else None

        return cls(
            phase=RotationPhase(data.get("phase", "idle")),
            new_root=data.get("new_root", ""),
            old_root=data.get("old_root", ""),
            started_at=when("started_at"),
            switched_at=when("switched_at"),
            retire_by=when("retire_by"),
            registry_complete=False,  # a loaded state means a restart: the registry is new
        )


class RootRotation:
    """The root rotation state machine, driven by the server.

    A root whose every certificate went through `registry` (one the authority generated in
    this process, or listed in `created_roots`) retires as soon as its last registered
    certificate expired; any other only at the worst-case bound.
    """

    def __init__(
        self,
        authority: CertificateAuthority,
        registry: CertificateRegistry,
        *,
        max_ttl: timedelta = MAX_TTL,
        clock: Clock | None = None,
        state_file: Path | None = None,
        created_roots: Iterable[str] = (),
        clock_skew: timedelta = CLOCK_SKEW,
    ) -> None:
        self.authority = authority
        self.registry = registry
        self.max_ttl = max_ttl
        # How far behind ours a peer's clock may be: a leaf stays trusted that much past its
        # NotAfter by such a peer, so its root stays in the bundle that much longer.
        self.clock_skew = clock_skew
        self.clock = clock or authority.clock
        self.state_file = Path(state_file) if state_file else authority.directory / STATE_FILE
        self.created_roots = set(created_roots)
        # The root `prepare_next_root()` made, until `start_root_rotation()` records it.
        self._prepared = ""
        self._state = self._load()

    # -- state ---------------------------------------------------------------------------

    @property
    def phase(self) -> RotationPhase:
        return self._state.phase

    @property
    def state(self) -> RotationState:
        return self._state

    def status(self) -> dict:
        """For the admin API."""
        data = self._state.to_json()
        retire = self.retire_after()
        data["retire_after"] = retire.isoformat() if retire else None
        return data

    def _load(self) -> RotationState:
        state = RotationState()
        if self.state_file.exists():
            try:
                state = RotationState.from_json(json.loads(self.state_file.read_text()))
            except (ValueError, KeyError, TypeError) as err:
                log.error("unreadable root rotation state, reconstructing it from the CA files: %s",
                          err, extra={"file": str(self.state_file)})
        return self._reconcile(state)

    def _reconcile(self, state: RotationState) -> RotationState:
        """Make the recorded phase agree with the CA files (a crash may sit between the two)."""
        ca = self.authority.state
        now = self.clock()
        if ca.pending_root is not None:
            if state.phase is not RotationPhase.PUBLISHING:
                state = RotationState(RotationPhase.PUBLISHING, new_root=fingerprint(ca.pending_root),
                                      old_root=ca.root_fingerprint, started_at=now)
            return state
        if state.phase is RotationPhase.PUBLISHING:
            if ca.root_fingerprint == state.new_root:
                # The switch happened but was not recorded: assume it just happened.
                return self._retiring(state.old_root, state.new_root, state.started_at, now,
                                      complete=False)
            return RotationState()
        if (state.phase is RotationPhase.RETIRING
                and state.old_root not in {fingerprint(r) for r in ca.roots}):
            return RotationState()
        return state

    def _retiring(self, old: str, new: str, started: datetime | None, switched: datetime,
                  *, complete: bool) -> RotationState:
        return RotationState(
            RotationPhase.RETIRING, new_root=new, old_root=old, started_at=started,
            switched_at=switched, retire_by=switched + self.max_ttl + self.clock_skew,
            registry_complete=complete,
        )

    def reconcile(self) -> RotationPhase:
        """Re-check the phase against the CA files after they changed: another process (the
        `xds-server ca rotate-root` command) may have started a rotation, or an operator
        replaced the files."""
        before = self._state
        self._state = self._reconcile(self._state)
        if self._state != before:
            log.info("root rotation state follows the CA files",
                     extra={"phase": self._state.phase.value})
            self._save()
        return self._state.phase

    def _save(self) -> None:
        write_atomic(self.state_file, json.dumps(self._state.to_json(), indent=2).encode())

    # -- steps ---------------------------------------------------------------------------

    def prepare_next_root(self) -> x509.Certificate:
        """The slow half of step 1, for a worker thread (the authority locks its files): the
        next root's key and certificate are generated and join the trust bundle on disk.
        `start_root_rotation()`, back on the caller's thread, then records the phase without
        generating another root. Raises RotationError."""
        if self._state.phase is not RotationPhase.IDLE:
            raise RotationError(f"a root rotation is already in progress ({self._state.phase.value})")
        try:
            new = self.authority.prepare_next_root()
        except CAError as err:
            raise RotationError(str(err)) from None
        self._prepared = fingerprint(new)
        return new

    def start_root_rotation(self) -> x509.Certificate:
        """Step 1: generate the next root (unless `prepare_next_root()` just did) and publish
        it in the trust bundle."""
        prepared, self._prepared = self._prepared, ""
        # The CA change a preparation causes may already have been reconciled into
        # PUBLISHING for that very root (the SDS provider reconciles on every CA change):
        # that is this rotation, not one started elsewhere.
        ours = bool(prepared) and self._state.phase is RotationPhase.PUBLISHING \
            and self._state.new_root == prepared
        if self._state.phase is not RotationPhase.IDLE and not ours:
            raise RotationError(f"a root rotation is already in progress ({self._state.phase.value})")
        pending = self.authority.state.pending_root
        if prepared and pending is not None and fingerprint(pending) == prepared:
            new = pending
        else:
            try:
                new = self.authority.prepare_next_root()
            except CAError as err:
                raise RotationError(str(err)) from None
        self._state = RotationState(
            RotationPhase.PUBLISHING, new_root=fingerprint(new),
            old_root=self.authority.state.root_fingerprint, started_at=self.clock(),
        )
        self._save()
        log.info("root rotation started: new root published in the trust bundle",
                 extra={"new_root": self._state.new_root[:16], "old_root": self._state.old_root[:16]})
        return new

    def bundle_delivered_to_all(self) -> x509.Certificate:
        """Step 2: every proxy has the bundle with both roots; sign with the new root.
        Returns the old root (still in the bundle)."""
        if self._state.phase is not RotationPhase.PUBLISHING:
            raise RotationError(
                f"no new root is waiting to sign (phase {self._state.phase.value}): "
                "call start_root_rotation() first"
            )
        old = self.authority.activate_next_root()
        old_fp = fingerprint(old)
        self._state = self._retiring(
            old_fp, self._state.new_root, self._state.started_at, self.clock(),
            complete=old_fp in self.created_roots or old_fp in self.authority.created_roots,
        )
        self._save()
        log.info("root rotation: signing with the new root; the old root stays in the bundle "
                 "until its last certificate expires",
                 extra={"new_root": self._state.new_root[:16], "old_root": old_fp[:16],
                        "retire_after": str(self.retire_after())})
        return old

    def retire_after(self) -> datetime | None:
        """When the old root may leave the bundle (None outside RETIRING)."""
        state = self._state
        if state.phase is not RotationPhase.RETIRING:
            return None
        assert state.retire_by is not None and state.switched_at is not None
        if not state.registry_complete:
            return state.retire_by
        last = self.registry.latest_not_after(state.old_root)
        return min(state.retire_by, (last or state.switched_at) + self.clock_skew)

    def tick(self, now: datetime | None = None) -> bool:
        """Step 3, when due: the old root leaves the bundle. Call it periodically (or at
        `retire_after()`). True when the rotation finished on this call."""
        when = self.retire_after()
        if when is None or (now or self.clock()) < when:
            return False
        old = self._state.old_root
        self.authority.remove_root(old)
        self._state = RotationState()
        self._save()
        log.info("root rotation finished: the old root left the trust bundle",
                 extra={"old_root": old[:16]})
        return True

    def cancel(self) -> None:
        """Abandon a rotation still in PUBLISHING: the new root leaves the bundle."""
        if self._state.phase is RotationPhase.RETIRING:
            raise RotationError("the new root already signs: let the rotation finish")
        self._prepared = ""
        self.authority.discard_next_root()
        self._state = RotationState()
        self._save()
