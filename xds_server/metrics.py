"""Prometheus metrics: what the server, the sources and the CA are doing, for `/metrics`.

One `Metrics` object per server, with its own `CollectorRegistry` (several servers in one test
process never share counters). It keeps no second copy of the truth: events are counted
through the hooks the server, the store, the cache and the CA registry offer, and gauges
(connected proxies, queue depth, source errors, certificate expiry) are read from the live
objects when Prometheus scrapes.

Names follow Prometheus conventions (`_total` counters, `_seconds` and `_bytes` units) under
the `xds_server_` prefix. No label carries a proxy id: with thousands of proxies a per-proxy
series set would cost the monitoring system more than the control plane. Per-proxy detail is
what the admin API (`/api/v1/proxies`) is for.

Convergence (`xds_server_convergence_seconds`) is measured as Istio's
`pilot_proxy_convergence_time` is: from the first cache change of a debounced burst to the
moment the last stream that change concerned has acknowledged (or rejected) everything it was
sent for it. The debounce wait is included on purpose: it is part of what an operator waits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .xds import types

from .xds.hooks import StreamHooks

if TYPE_CHECKING:  # imported for annotations only: metrics must not import the server
    from .xds.connection import Connection
    from .xds.server import XdsServer
    from .xds.stream import Ack, Push

log = logging.getLogger("xds_server.metrics")

NAMESPACE = "xds_server"
# Every bound a stream can hit (`stream_limit_refusals_total`), exported at 0 before the first.
STREAM_LIMITS = ("streams-per-identity", "streams-unverified-pods", "request-rate",
                 "names-per-request", "names-per-stream", "first-request-timeout")

# Seconds: a push to a local Envoy takes well under a millisecond; a stuck client seconds.
PUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Seconds: debounce (100 ms quiet by default) plus pushes and ACKs of every concerned stream.
CONVERGENCE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Seconds from a stream's admission to its first full config (ACKed): milliseconds when idle,
# seconds in a reconnect storm.
FIRST_CONFIG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
DEBOUNCE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SIZE_BUCKETS = tuple(float(4 ** k) * 256 for k in range(10))  # 256 B .. 64 MiB

# A change whose streams never all settle (a client that stopped reading) is given up after
# this long, so the tracker cannot grow without bound; `..._abandoned_total` counts them.
CONVERGENCE_GIVE_UP = 600.0
MAX_OPEN_CHANGES = 1000
# Streams that ACK are settled by their ACK. A sweep finds the others (nothing to send for
# the change, or closed): first after SWEEP_INTERVAL, then backing off to SWEEP_MAX, checking
# at most SWEEP_BATCH streams per loop turn so a change to thousands of streams never stalls
# the event loop. Late sweeps do not skew the timing: a stream with nothing to send adds no
# time to its change.
SWEEP_INTERVAL = 0.05
SWEEP_MAX = 1.0
SWEEP_BATCH = 500


def type_label(type_url: str) -> str:
    """CDS, EDS, LDS, RDS, SDS, or the message name of any other type."""
    return types.short_name(type_url)


def settled(conn: Connection) -> bool:
    """Nothing this stream should be sent is waiting, and nothing sent is unanswered."""
    return all(t.pending_nonce is None and not t.dirty for t in conn.state.types.values())


@dataclass
class _OpenChange:
    started: float  # monotonic time of the first change of the burst
    waiting: set = field(default_factory=set)  # connections not yet settled for it
    last: float = 0.0  # when the latest settled stream settled


class ConvergenceTracker:
    """Times each flushed change until every stream it concerned has settled."""

    def __init__(self, observe: Callable[[float], None], abandoned: Callable[[], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._observe = observe
        self._abandoned = abandoned
        self._clock = clock
        self._open: list[_OpenChange] = []
        self._by_conn: dict[Any, list[_OpenChange]] = {}
        self._last_answer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._timer: Any = None
        self._interval = SWEEP_INTERVAL
        self._pending_sweep: list[Any] = []
        self._live: Callable[[], Any] | None = None

    @property
    def open_changes(self) -> int:
        return len(self._open)

    def started(self, waited: float, conns: Iterable[Any], live: Callable[[], Any]) -> None:
        """A debounced burst was flushed now; `conns` are the streams it marked for a push."""
        self._live = live
        now = self._clock()
        change = _OpenChange(started=now - waited, last=now)
        for conn in conns:
            change.waiting.add(conn)
            self._by_conn.setdefault(conn, []).append(change)
        if not change.waiting:
            return  # concerned no stream: nothing converges, nothing to time
        self._open.append(change)
        while len(self._open) > MAX_OPEN_CHANGES:
            self._drop(self._open[0], abandoned=True)
        self._interval = SWEEP_INTERVAL
        self._schedule()

    def answered(self, conn: Any) -> None:
        """The stream ACKed or NACKed something: it may have settled."""
        self._last_answer[conn] = self._clock()
        if conn in self._by_conn and settled(conn):
            self._settle(conn, self._clock())

    def sweep(self) -> None:
        """Settle streams that had nothing to send, forget closed ones, give up on stuck ones
        (all of them at once; the event loop uses `_sweep_step`, a batch at a time)."""
        self._pending_sweep = list(self._by_conn)
        while self._pending_sweep:
            self._sweep_batch(len(self._pending_sweep))
        self._expire()

    def _sweep_step(self) -> None:
        self._timer = None
        if not self._pending_sweep:
            self._pending_sweep = list(self._by_conn)
        self._sweep_batch(SWEEP_BATCH)
        if self._pending_sweep:  # more to check: continue on the next loop turn
            self._timer = asyncio.get_running_loop().call_soon(self._sweep_step)
            return
        self._expire()
        self._interval = min(self._interval * 2, SWEEP_MAX)
        self._schedule()

    def _sweep_batch(self, count: int) -> None:
        batch, self._pending_sweep = self._pending_sweep[:count], self._pending_sweep[count:]
        live = self._live() if self._live is not None else None
        for conn in batch:
            if conn not in self._by_conn:
                continue  # settled by an ACK meanwhile
            if live is not None and conn not in live:
                self._settle(conn, None)  # gone: it no longer holds the change up
            elif settled(conn):
                self._settle(conn, self._last_answer.get(conn, 0.0))

    def _expire(self) -> None:
        now = self._clock()
        for change in list(self._open):
            if now - change.started > CONVERGENCE_GIVE_UP:
                self._drop(change, abandoned=True)

    def _settle(self, conn: Any, at: float | None) -> None:
        for change in self._by_conn.pop(conn, ()):
            change.waiting.discard(conn)
            if at is not None:
                change.last = max(change.last, at)
            if not change.waiting and change in self._open:
                self._open.remove(change)
                self._observe(max(0.0, change.last - change.started))

    def _drop(self, change: _OpenChange, *, abandoned: bool) -> None:
        if change in self._open:
            self._open.remove(change)
        for conn in change.waiting:
            changes = self._by_conn.get(conn)
            if changes is not None and change in changes:
                changes.remove(change)
                if not changes:
                    del self._by_conn[conn]
        change.waiting.clear()
        if abandoned:
            self._abandoned()

    def _schedule(self) -> None:
        if self._open and self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self._interval, self._sweep_step)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class Metrics:
    """Every metric of one server process. Feed it with `attach_*`; scrape `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        self.pushes = Counter("pushes", "xDS responses written, by type.", ["type"],
                              namespace=ns, registry=r)
        self.push_duration = Histogram(
            "push_duration_seconds", "Time to write one xDS response to its stream, by type.",
            ["type"], namespace=ns, registry=r, buckets=PUSH_BUCKETS)
        self.config_size = Histogram(
            "config_size_bytes",
            "Size of each xDS response sent to a proxy, by type (SotW LDS/CDS: the proxy's "
            "complete set of that type).", ["type"], namespace=ns, registry=r,
            buckets=SIZE_BUCKETS)
        self.acks = Counter("acks", "xDS responses acknowledged, by type.", ["type"],
                            namespace=ns, registry=r)
        self.nacks = Counter("nacks", "xDS responses rejected by the proxy (NACK), by type.",
                             ["type"], namespace=ns, registry=r)
        self.convergence = Histogram(
            "convergence_seconds",
            "From a config change to the last ACK of it across the streams it concerned "
            "(debounce included).", namespace=ns, registry=r, buckets=CONVERGENCE_BUCKETS)
        self.convergence_abandoned = Counter(
            "convergence_abandoned", "Changes never acknowledged by every concerned stream "
            f"within {int(CONVERGENCE_GIVE_UP)} s (stuck clients).", namespace=ns, registry=r)
        self.first_config = Histogram(
            "first_config_seconds",
            "From a stream's admission to its first full config (everything it asked for sent "
            "and answered).", namespace=ns, registry=r, buckets=FIRST_CONFIG_BUCKETS)
        self.debounce = Histogram(
            "debounce_seconds", "How long changes waited in the debouncer before a push.",
            namespace=ns, registry=r, buckets=DEBOUNCE_BUCKETS)
        # Admin API refusals, counted here; the xDS server's are read from its stream guard.
        self._auth_failures: collections.Counter[tuple[str, str]] = collections.Counter()
        self.source_events = Counter(
            "source_events", "Mesh objects added, updated or deleted by the sources, by kind.",
            ["kind", "op"], namespace=ns, registry=r)
        self.resource_changes = Counter(
            "resource_changes", "Resources changed or removed in the xDS cache, by type.",
            ["type"], namespace=ns, registry=r)
        self.certificates_issued = Counter(
            "certificates_issued", "Workload certificates issued, by kind (sds: key made here; "
            "csr: signed for a caller's key).", ["kind"], namespace=ns, registry=r)
        self.admin_requests = Counter(
            "admin_requests", "Admin API requests, by method, route and status code.",
            ["method", "route", "code"], namespace=ns, registry=r)
        self.convergence_tracker = ConvergenceTracker(
            self.convergence.observe, self.convergence_abandoned.inc)
        self._live = _LiveCollector(self._auth_failures)
        r.register(self._live)
        self._detach: list[Callable[[], None]] = []

    # Feeding ------------------------------------------------------------------------------

    def attach_server(self, server: XdsServer) -> None:
        """Count pushes, ACKs and NACKs; time convergence; expose live stream gauges."""
        self._detach.append(server.hooks.add(_ServerHooks(self, server)))
        self._live.server = server
        self._detach.append(self.convergence_tracker.close)

    def attach_guard(self, guard: Any) -> None:
        """Read the xDS stream guard's authentication failures (xds/auth.py `StreamGuard`)."""
        self._live.guard = guard

    def attach_refusals(self, surface: str, counts: Any) -> None:
        """Read another refusal counter (a `Counter` by reason) under `surface`: the SDS
        glue's refused secret requests (`sds`), the CSR service's refused requests (`ca`)."""
        self._live.refusals[surface] = counts

    def attach_cache(self, cache: Any) -> None:
        def on_change(change: Any) -> None:
            self.resource_changes.labels(type_label(change.type_url)).inc(
                len(change.changed) + len(change.removed))

        self._detach.append(cache.add_listener(on_change))

    def attach_store(self, store: Any) -> None:
        def on_changes(changes: list) -> None:
            for change in changes:
                op = "added" if change.old is None else "deleted" if change.new is None else "updated"
                self.source_events.labels(change.kind, op).inc()

        self._detach.append(store.add_listener(on_changes))

    def attach_sources(self, sources: Mapping[str, Any]) -> None:
        """Sources with an `errors` list (mesh files, raw resources, Kubernetes)."""
        self._live.sources = sources

    def attach_ca(self, authority: Any = None, registry: Any = None) -> None:
        self._live.authority = authority
        self._live.registry = registry
        listeners = getattr(registry, "listeners", None)
        if listeners is not None:
            def on_issued(record: Any) -> None:
                self.certificates_issued.labels(getattr(record, "kind", "") or "unknown").inc()

            listeners.append(on_issued)

    def attach_webhook(self, results: Mapping[str, int]) -> None:
        """Read the admission webhook's answers by result (inject/webhook.py `stats`)."""
        self._live.webhook = results

    def attach_load(self, load: Any) -> None:
        """Read the load-report aggregation (load_reports.py `LoadAggregator.collect`)."""
        self._live.load = load

    def attach_shared(self, store: Any) -> None:
        """Read the shared-state store (shared/store.py): Redis up, entries refused."""
        self._live.shared = store

    def auth_failure(self, surface: str, reason: str) -> None:
        """Count a refused request (`surface`: admin, xds, ca; `reason`: a short fixed word)."""
        self._auth_failures[(surface, reason)] += 1

    def close(self) -> None:
        for detach in self._detach:
            try:
                detach()
            except Exception:
                pass
        self._detach.clear()


class _ServerHooks(StreamHooks):
    """What metrics follow of the server's streams."""

    def __init__(self, metrics: Metrics, server: XdsServer) -> None:
        self.metrics = metrics
        self.server = server

    def pushed(self, conn: Connection, push: Push) -> None:
        m = self.metrics
        label = type_label(push.type_url)
        m.pushes.labels(label).inc()
        m.config_size.labels(label).observe(len(push.data))
        if conn.write_started:  # loop time when the write began (XdsServer._write_loop)
            elapsed = asyncio.get_running_loop().time() - conn.write_started
            m.push_duration.labels(label).observe(max(0.0, elapsed))

    def acked(self, conn: Connection, ack: Ack) -> None:
        m = self.metrics
        label = type_label(ack.type_url)
        (m.acks if ack.nack is None else m.nacks).labels(label).inc()
        m.convergence_tracker.answered(conn)

    def initialized(self, conn: Connection, seconds: float) -> None:
        self.metrics.first_config.observe(seconds)

    def flushed(self, pending: Mapping[str, set[str]], waited: float,
                touched: set[Connection]) -> None:
        self.metrics.debounce.observe(waited)
        server = self.server
        self.metrics.convergence_tracker.started(waited, touched, lambda: server.connections)


class _LiveCollector(Collector):
    """Gauges read from the live objects at scrape time."""

    def __init__(self, auth_failures: collections.Counter) -> None:
        self.auth_failures = auth_failures
        self.server: Any = None
        self.guard: Any = None
        self.refusals: dict[str, Any] = {}  # surface -> Counter by reason
        self.sources: Mapping[str, Any] = {}
        self.authority: Any = None
        self.registry: Any = None
        self.webhook: Mapping[str, int] | None = None
        self.load: Any = None
        self.shared: Any = None

    def describe(self) -> list:
        return []  # dynamic: describing would mean collecting at registration

    def collect(self) -> Iterable:
        ns = NAMESPACE
        proxies = GaugeMetricFamily(
            f"{ns}_connected_proxies", "Connected xDS streams subscribed to each type, by "
            "type and protocol variant (sotw, delta).", labels=["type", "variant"])
        streams = GaugeMetricFamily(f"{ns}_streams", "Open xDS streams, by protocol variant.",
                                    labels=["variant"])
        queue = GaugeMetricFamily(
            f"{ns}_push_queue_depth", "Streams with changes waiting to be pushed (not yet "
            "written, or waiting for the ACK of the previous response of that type).")
        in_flight = GaugeMetricFamily(f"{ns}_pushes_in_flight", "Responses being written now.")
        pending = GaugeMetricFamily(f"{ns}_debounce_pending_changes",
                                    "Changed resource names waiting in the debouncer.")
        server = self.server
        if server is not None:
            by_type: dict[tuple[str, str], int] = {}
            by_variant: dict[str, int] = {"sotw": 0, "delta": 0}
            waiting = 0
            for conn in list(server.connections):
                state = conn.state
                variant = state.variant.value
                by_variant[variant] = by_variant.get(variant, 0) + 1
                dirty = False
                for type_url, type_state in list(state.types.items()):
                    key = (type_label(type_url), variant)
                    by_type[key] = by_type.get(key, 0) + 1
                    dirty = dirty or type_state.dirty
                waiting += dirty
            for (label, variant), count in sorted(by_type.items()):
                proxies.add_metric([label, variant], count)
            for variant, count in sorted(by_variant.items()):
                streams.add_metric([variant], count)
            queue.add_metric([], waiting)
            in_flight.add_metric([], getattr(server, "writes_in_flight", 0))
            pending.add_metric([], getattr(server, "pending_changes", 0))
        yield from (proxies, streams, queue, in_flight, pending)
        overload = server.overload() if server is not None and hasattr(server, "overload") else None
        if overload is not None:
            initializing = GaugeMetricFamily(
                f"{ns}_initializing_streams", "Streams admitted and not yet holding their first "
                "full config (new streams are refused at --max-initializing-streams).")
            initializing.add_metric([], overload["initializing_streams"])
            waiters = GaugeMetricFamily(
                f"{ns}_push_slot_waiters", "Streams waiting for a push slot, by queue (first: "
                "bringing a stream to its first config, served first; incremental).",
                labels=["queue"])
            waiters.add_metric(["first"], overload["pushes_waiting_first_config"])
            waiters.add_metric(["incremental"], overload["pushes_waiting_incremental"])
            refused = CounterMetricFamily(
                f"{ns}_stream_admission_refusals", "Stream opens refused with UNAVAILABLE "
                "because the server is overloaded, by reason (rate: over "
                "--max-stream-opens-per-second; initializing: --max-initializing-streams "
                "reached).", labels=["reason"])
            refused.add_metric(["rate"], overload["refused_open_rate"])
            refused.add_metric(["initializing"], overload["refused_initializing"])
            yield from (initializing, waiters, refused)

        failures = CounterMetricFamily(
            f"{ns}_auth_failures", "Requests refused for authentication or authorization, by "
            "surface (admin: the admin API; xds: xDS streams; sds: secret requests for another "
            "identity or without a proven one; ca: CSR requests) and reason.",
            labels=["surface", "reason"])
        counts = collections.Counter(self.auth_failures)
        stats = getattr(self.guard, "stats", None)
        for reason, count in dict(getattr(stats, "auth_failures", None) or {}).items():
            counts[("xds", str(reason))] += count
        for surface, refused in self.refusals.items():
            for reason, count in dict(refused).items():
                counts[(surface, str(reason))] += count
        for (surface, reason), count in sorted(counts.items()):
            failures.add_metric([surface, reason], count)
        yield failures

        limits = CounterMetricFamily(
            f"{ns}_stream_limit_refusals", "xDS streams and requests refused or ended for a "
            "bound, by limit (streams-per-identity: a pod's streams of one identity, "
            "--max-streams-per-identity; streams-unverified-pods: an identity's streams from "
            "pods it does not prove; request-rate; names-per-request; names-per-stream; "
            "first-request-timeout).", labels=["limit"])
        by_limit: collections.Counter[str] = collections.Counter(
            {name: 0 for name in STREAM_LIMITS})
        by_limit.update(dict(getattr(stats, "limited", None) or {}))
        server_stats = getattr(server, "stats", None)
        if server_stats is not None:
            by_limit.update(dict(getattr(server_stats, "limits", None) or {}))
            by_limit["first-request-timeout"] += getattr(server_stats, "first_request_timeouts", 0)
        for name, count in sorted(by_limit.items()):
            limits.add_metric([name], count)
        yield limits

        front = getattr(server, "tls_front", None) if server is not None else None
        if front is not None:
            handshakes = CounterMetricFamily(
                f"{ns}_tls_handshake_refusals", "TLS handshakes refused on the xDS mutual-TLS "
                "port (--xds-tls-frontend python), by port and reason (unknown_ca, expired, "
                "not_yet_valid, bad_certificate, no_certificate, no_spiffe_id, timeout, "
                "protocol).", labels=["port", "reason"])
            for reason, count in sorted(dict(front.refusals).items()):
                handshakes.add_metric([front.port_label, reason], count)
            yield handshakes

        errors = GaugeMetricFamily(f"{ns}_source_errors",
                                   "Current problems in each source's input (invalid objects, "
                                   "unparsable files); the last good state is served.",
                                   labels=["source"])
        synced = GaugeMetricFamily(f"{ns}_source_synced",
                                   "1 once a source has delivered its first complete state.",
                                   labels=["source"])
        for name, source in sorted(self.sources.items()):
            try:
                errors.add_metric([name], len(source.errors))
            except Exception:
                continue
            synced.add_metric([name], 1.0 if getattr(source, "synced", True) else 0.0)
        yield errors
        yield synced
        refused_files = CounterMetricFamily(
            f"{ns}_source_files_refused", "Source files not read, by source and reason "
            "(too-large: over --max-source-file-bytes; link-outside: a symbolic link out of "
            "the directory), counted at each read attempt.", labels=["source", "reason"])
        for name, source in sorted(self.sources.items()):
            reader = getattr(source, "reader", None)
            if reader is None:
                continue
            for reason in ("link-outside", "too-large"):
                refused_files.add_metric([name, reason], reader.refused.get(reason, 0))
        yield refused_files

        if self.registry is not None:
            records = self.registry.records()
            valid = GaugeMetricFamily(f"{ns}_certificates_valid",
                                      "Issued workload certificates not yet expired.")
            valid.add_metric([], len(records))
            yield valid
            earliest = GaugeMetricFamily(
                f"{ns}_certificate_earliest_expiry_timestamp_seconds",
                "Unix time the soonest-expiring issued certificate expires (absent: none).")
            if records:
                earliest.add_metric([], records[0].not_after.timestamp())
            yield earliest
        if self.webhook is not None:
            answers = CounterMetricFamily(
                f"{ns}_webhook_requests", "Sidecar-injection admission requests, by result "
                "(injected, skipped, denied: a bad annotation, allowed: not a CREATE, "
                "bad-request: not an AdmissionReview for a Pod, or over 1 MiB).",
                labels=["result"])
            for result, count in sorted(dict(self.webhook).items()):
                answers.add_metric([result], count)
            yield answers
        if self.shared is not None:
            up = GaugeMetricFamily(f"{ns}_redis_up", "1 while the shared-state Redis answers; 0: "
                                   "degraded (xDS keeps serving, sharing resumes on return).")
            up.add_metric([], 1.0 if self.shared.up else 0.0)
            refused = CounterMetricFamily(
                f"{ns}_shared_state_refused", "Shared-state entries refused, never trusted, by "
                "reason (malformed; other-key: sealed with another state key; forged: failed "
                "authentication).", labels=["reason"])
            for reason in ("malformed", "other-key", "forged"):
                refused.add_metric([reason], self.shared.refused.get(reason, 0))
            ops = CounterMetricFamily(f"{ns}_redis_operations", "Redis commands sent.")
            ops.add_metric([], self.shared.ops)
            yield from (up, refused, ops)
        if self.authority is not None:
            root = GaugeMetricFamily(f"{ns}_ca_expiry_timestamp_seconds",
                                     "Unix time the CA certificate that signs expires.")
            root.add_metric([], self.authority.state.not_after.timestamp())
            yield root
        if self.load is not None:
            yield from self.load.collect()


def counter_value(registry: CollectorRegistry, name: str, labels: Mapping[str, str] | None = None) -> float:
    """A sample's value (0 when absent): for tests and the CLI."""
    value = registry.get_sample_value(name, dict(labels or {}))
    return 0.0 if value is None else value


