"""The CA's side of SDS (ca/workloads.py) keeps the event loop free: renewals are signed in
worker threads and applied in slices, RSA keys are never made on the loop, and what it
issues reaches its sink as plain data (the SDS glue turns it into Envoy secrets)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.rotation import RenewalSchedule
from xds_server.ca.svid import IssuedCertificate, SvidIssuer
from xds_server.ca.workloads import WorkloadCertificates
from xds_server.model.identity import Identity


class Sink:
    """Records what the CA reports, and on which thread."""

    def __init__(self) -> None:
        self.issued: list[IssuedCertificate] = []
        self.withdrawn: list[str] = []
        self.bundles: list[bytes] = []
        self.threads: set[int] = set()

    def certificates_issued(self, issued: Sequence[IssuedCertificate]) -> None:
        self.threads.add(threading.get_ident())
        self.issued.extend(issued)

    def certificate_withdrawn(self, spiffe_id: str) -> None:
        self.withdrawn.append(spiffe_id)

    def bundle_changed(self, bundle_pem: bytes) -> None:
        self.bundles.append(bundle_pem)


def signing_threads(issuer: SvidIssuer) -> set[int]:
    """Wrap the issuer so each key+certificate records the thread that made it."""
    seen: set[int] = set()
    issue = issuer.issue_for_identity

    def recording(*args, **kwargs):
        seen.add(threading.get_ident())
        return issue(*args, **kwargs)

    issuer.issue_for_identity = recording  # type: ignore[method-assign]
    return seen


async def test_a_renewal_storm_is_signed_off_the_loop_in_slices(tmp_path: Path) -> None:
    issuer = SvidIssuer(CertificateAuthority(tmp_path / "ca"), default_ttl=timedelta(hours=1))
    certs = WorkloadCertificates(issuer, batch_size=8)
    sink = Sink()
    certs.connect(sink)
    assert sink.bundles == [certs.authority.trust_bundle_pem]
    identities = [Identity("shop", f"sa-{i}") for i in range(40)]
    for identity in identities:
        certs.track(identity)
    assert certs.stats.issued == 40 and len(sink.issued) == 40  # cheap keys: at once

    loop_thread = threading.get_ident()
    threads = signing_threads(issuer)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    stop = asyncio.Event()
    ticker = asyncio.create_task(count_turns())
    runner = asyncio.create_task(certs.run(stop, watch_files=False))
    try:
        certs.schedule.mark_due()
        certs.wake()
        for _ in range(500):
            if certs.stats.renewed >= 40:
                break
            await asyncio.sleep(0.01)
        assert certs.stats.renewed == 40
        assert loop_thread not in threads  # every renewal signed in a worker thread
        assert sink.threads == {loop_thread}  # and applied on the loop
        assert turns > 40 // 8  # the loop ran between slices
        serials = {c.serial for c in sink.issued}
        assert len(serials) == 80  # 40 first certificates, 40 renewals
    finally:
        stop.set()
        ticker.cancel()
        await asyncio.wait_for(runner, 5)


async def test_rsa_keys_are_never_made_on_the_loop(tmp_path: Path) -> None:
    authority = await asyncio.to_thread(CertificateAuthority, tmp_path / "ca",
                                        key_algorithm="rsa-2048")
    issuer = SvidIssuer(authority, default_ttl=timedelta(hours=1), key_algorithm="rsa-2048")
    certs = WorkloadCertificates(issuer)
    sink = Sink()
    certs.connect(sink)
    threads = signing_threads(issuer)
    stop = asyncio.Event()
    runner = asyncio.create_task(certs.run(stop, watch_files=False))
    try:
        spiffe_id = certs.track(Identity("shop", "web"))
        assert sink.issued == []  # not on the loop: it follows from a worker thread
        for _ in range(1000):
            if sink.issued:
                break
            await asyncio.sleep(0.01)
        assert [c.spiffe_id for c in sink.issued] == [spiffe_id]
        assert certs.stats.issued == 1
        assert threading.get_ident() not in threads
    finally:
        stop.set()
        await asyncio.wait_for(runner, 5)


async def test_a_released_identity_is_withdrawn_and_not_renewed(tmp_path: Path) -> None:
    issuer = SvidIssuer(CertificateAuthority(tmp_path / "ca"), default_ttl=timedelta(hours=1))
    certs = WorkloadCertificates(issuer)
    sink = Sink()
    certs.connect(sink)
    spiffe_id = certs.track(Identity("shop", "web"))
    certs.forget(spiffe_id)
    assert sink.withdrawn == [spiffe_id] and certs.stats.released == 1
    assert spiffe_id not in certs.schedule and certs.current(Identity("shop", "web")) is None


async def test_a_returning_identity_gets_its_certificate_again_while_it_is_good(tmp_path: Path) -> None:
    """1,500 reconnects of one identity: one certificate, not 1,500 (issue 13)."""
    authority = CertificateAuthority(tmp_path / "ca")
    issuer = SvidIssuer(authority, default_ttl=timedelta(hours=1))
    certs = WorkloadCertificates(issuer, park_limit=2)
    sink = Sink()
    certs.connect(sink)
    web = Identity("shop", "web")
    for _ in range(1500):
        certs.forget(certs.track(web))
    spiffe_id = certs.track(web)
    assert certs.stats.issued == 1 and certs.stats.reused == 1500
    assert {c.serial for c in sink.issued} == {certs.current(web).serial}  # type: ignore[union-attr]
    assert len(issuer.registry.records(spiffe_id=spiffe_id)) == 1
    assert spiffe_id in certs.schedule  # renewed at its half-life as before

    # Bounded: the least recently released identities' certificates are dropped first.
    certs.forget(spiffe_id)
    for name in ("a", "b"):
        certs.forget(certs.track(Identity("shop", name)))
    certs.track(web)
    assert certs.stats.issued == 4  # web's was dropped for a and b: a new one

    # Past its renewal time, a parked certificate is not handed out again.
    certs.forget(certs.spiffe_id(web))
    clock = issuer.clock
    issuer.clock = lambda: clock() + timedelta(minutes=45)
    certs.schedule.clock = issuer.clock
    certs.track(web)
    assert certs.stats.issued == 5


def test_due_entries_are_taken_in_slices() -> None:
    schedule = RenewalSchedule(jitter=0.0)
    now = schedule.clock()
    for i in range(10):
        schedule.schedule_at(f"p{i}", now + timedelta(hours=1))
    schedule.mark_due(now=now)
    first = schedule.pop_due(now, limit=4)
    rest = schedule.pop_due(now)
    assert len(first) == 4 and len(rest) == 6 and set(first) | set(rest) == {f"p{i}" for i in range(10)}
    assert len(schedule) == 0 and schedule.next_due() is None
