"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does.

Every replica serves xDS; only the leader writes status back to the cluster, so two replicas
never fight over the same condition. The algorithm and its safety argument are client-go's:

- A candidate takes the Lease when it does not exist, when it names nobody, or when its
  record has not changed for `lease_duration` *as observed on the candidate's own clock* (no
  clock comparison between machines: only elapsed local time is trusted).
- The leader renews every `retry_period`. It counts itself leader only until `renew_deadline`
  after the start of its last successful renewal, and `renew_deadline < lease_duration`, so it
  stops writing before any other replica can have decided that the lease expired.
- Writes use the Lease's resourceVersion: of two racing candidates exactly one wins (409).
- On a clean stop the leader releases the Lease (empty holder, 1 s duration) so another
  replica takes over at once instead of after `lease_duration`.

Why not `kubernetes.leaderelection`: it cannot be stopped or released, builds its own API
client from the global configuration, and exits the process on bad settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .kube_api import LEASE, ApiException, KubeApi, default_identity, status_message

log = logging.getLogger(__name__)
_random = random.Random()  # private: jitter must not disturb (or depend on) the global one


@dataclass(frozen=True, slots=True)
class LeaderSettings:
    namespace: str = "default"
    name: str = "xds-server"
    identity: str = field(default_factory=default_identity)
    lease_duration: float = 15.0  # client-go defaults
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not self.lease_duration > self.renew_deadline > 1.2 * self.retry_period > 0:
            raise ValueError(
                "leader election needs lease_duration > renew_deadline > 1.2 * retry_period > 0"
            )


def _microtime(now: dt.datetime | None = None) -> str:
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    """Campaigns for, holds and releases one Lease. `is_leader` may be read from any thread."""

    def __init__(
        self,
        api: KubeApi,
        settings: LeaderSettings | None = None,
        *,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self.settings = settings or LeaderSettings()
        self._on_change = on_change
        self._clock = clock
        self._leading_until = 0.0  # our clock: leader until then, unless renewed
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._announced = False
        self._failures = 0
        self.holder: str | None = None  # who holds the lease, as last seen

    @property
    def identity(self) -> str:
        return self.settings.identity

    @property
    def is_leader(self) -> bool:
        return self._clock() < self._leading_until

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Campaign and renew until `stop` is set or the task is cancelled; then release."""
        stop = stop or asyncio.Event()
        s = self.settings
        try:
            while not stop.is_set():
                started = self._clock()
                try:
                    won = await asyncio.to_thread(self._try_acquire_or_renew)
                    self._failures = 0
                except Exception as e:  # the API is unreachable: keep what the deadline allows
                    self._failures += 1
                    log.log(logging.WARNING if self._failures == 1 else logging.DEBUG,
                            "leader election: cannot reach the lease (%s)", status_message(e),
                            extra={"lease": f"{s.namespace}/{s.name}",
                                   "failures": self._failures})
                    won = None
                if won:
                    self._leading_until = started + s.renew_deadline
                elif won is False:
                    self._leading_until = 0.0  # somebody else holds it: stop now
                self._announce()
                delay = s.retry_period if self.is_leader else s.retry_period * (
                    1 + 0.2 * _random.random())
                if self.is_leader:  # wake up in time to notice a missed deadline
                    delay = min(delay, max(0.0, self._leading_until - self._clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=max(delay, 0.01))
        finally:
            if self.is_leader or self._announced:
                self._leading_until = 0.0
                self._announce()
                with contextlib.suppress(Exception):
                    await asyncio.shield(asyncio.to_thread(self._release))

    def _announce(self) -> None:
        leading = self.is_leader
        if leading == self._announced:
            return
        self._announced = leading
        s = self.settings
        if leading:
            log.info("leader election: became the leader",
                     extra={"lease": f"{s.namespace}/{s.name}", "identity": s.identity})
        else:
            log.info("leader election: no longer the leader; status writes stop",
                     extra={"lease": f"{s.namespace}/{s.name}", "identity": s.identity,
                            "holder": self.holder})
        if self._on_change is not None:
            try:
                self._on_change(leading)
            except Exception:
                log.exception("leader election: on_change callback failed")

    # Blocking parts (threads) ----------------------------------------------------------------

    def _try_acquire_or_renew(self) -> bool:
        """True: we hold the lease now. False: somebody else does. Raises on API errors."""
        s = self.settings
        now = _microtime()
        duration = max(1, math.ceil(s.lease_duration))
        try:
            lease = self._api.get(LEASE, s.namespace, s.name)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {
                "apiVersion": LEASE.api_version, "kind": LEASE.kind,
                "metadata": {"name": s.name, "namespace": s.namespace},
                "spec": {"holderIdentity": s.identity, "leaseDurationSeconds": duration,
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
            }
            try:
                self._api.create(LEASE, s.namespace, body)
            except ApiException as e2:
                if e2.status == 409:  # another candidate created it first
                    return False
                raise
            self.holder = s.identity
            return True
        spec = dict(lease.get("spec") or {})
        holder = spec.get("holderIdentity") or ""
        self.holder = holder or None
        record = (holder, spec.get("renewTime"), spec.get("acquireTime"),
                  spec.get("leaseTransitions"), spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        held_for = spec.get("leaseDurationSeconds") or s.lease_duration
        if holder and holder != s.identity and self._clock() < self._observed_at + held_for:
            return False
        spec.update(holderIdentity=s.identity, leaseDurationSeconds=duration, renewTime=now)
        if holder != s.identity:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = spec
        try:
            updated = self._api.replace(LEASE, s.namespace, s.name, lease)
        except ApiException as e:
            if e.status == 409:  # somebody wrote it since we read it
                return False
            raise
        new_spec = updated.get("spec") or {}
        self._observed = (s.identity, new_spec.get("renewTime"), new_spec.get("acquireTime"),
                          new_spec.get("leaseTransitions"), new_spec.get("leaseDurationSeconds"))
        self._observed_at = self._clock()
        self.holder = s.identity
        return True

    def _release(self) -> None:
        s = self.settings
        path = LEASE.path(s.namespace, s.name)
        quick = (2.0, 5.0)  # shutting down: do not hang on an unreachable API server
        lease = self._api.request("GET", path, timeout=quick)
        spec = dict(lease.get("spec") or {})
        if spec.get("holderIdentity") != s.identity:
            return
        now = _microtime()
        spec.pop("holderIdentity", None)
        spec.update(leaseDurationSeconds=1, renewTime=now, acquireTime=now)
        lease["spec"] = spec
        self._api.request("PUT", path, body=lease, timeout=quick)
        log.info("leader election: released the lease",
                 extra={"lease": f"{s.namespace}/{s.name}", "identity": s.identity})
