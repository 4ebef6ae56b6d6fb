"""Load reports (LRS, xds/lrs.py) aggregated per destination Service, for autoscaling and the
live mesh page.

Each accepted report (it covers every cluster the proxy was asked for) replaces that proxy's
windows: per destination Service with traffic, requests completed and errors per second over
the proxy's interval, and requests in flight at its end. A Service's rate is the sum of the
latest windows of every proxy that reported it within
`STALE_INTERVALS` intervals (a proxy that stops reporting drops out instead of freezing the
rate). Counters (`..._requests_total`) add every accepted report's counts, so a window of
time can be compared with the traffic sent, whatever the reporting phase.

Replicas: each replica aggregates what its own proxies report, so every exported number is a
sum over proxies and adds up across replicas (`sum by (namespace, service)`), except the
error ratio, a convenience per replica: across replicas divide the summed errors-per-second
by the summed requests-per-second.

Memory: per connected proxy, one window per Service it sends traffic to, among the clusters it
was sent (xds/lrs.py refuses the rest), forgotten when its last LRS stream closes; per Service of the mesh, two counters,
dropped when the Service is. Nothing a proxy sends can grow it beyond that.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .model.identity import ProxyClaim
from .model.mesh import EndpointSlice, ServiceKey
from .model.store import ENDPOINT_SLICE, SERVICE, MeshStore
from .translate.names import service_of_cluster
from .xds.lrs import IGNORE_REASONS, ClusterLoad, LrsStats

STALE_INTERVALS = 3.0  # a window older than this many intervals no longer counts
NAMESPACE = "xds_server"


@dataclass(frozen=True, slots=True)
class Source:
    """Who reported: the proxy's namespace, pod and service account (from its proven node)."""

    namespace: str
    pod: str
    service_account: str


@dataclass
class ServiceLoad:
    requests_per_second: float = 0.0
    errors_per_second: float = 0.0
    in_flight: int = 0
    reporters: int = 0  # proxies with a live window for it

    @property
    def error_ratio(self) -> float:
        return self.errors_per_second / self.requests_per_second if self.requests_per_second else 0.0


@functools.lru_cache(maxsize=65536)
def _service_of(cluster: str) -> tuple[str, str] | None:
    """(namespace, name) of an outbound cluster. Cached: only clusters a proxy was asked to
    report get here (xds/lrs.py refuses others), so the cache holds the mesh's clusters."""
    parsed = service_of_cluster(cluster)
    return None if parsed is None else (parsed[0].namespace, parsed[0].name)


# One proxy's latest report: (when, who, {(namespace, service): (rps, eps, in flight)}), only
# Services with traffic (every proxy reports every cluster it has, mostly idle). Plain tuples:
# this is the hot path of every report and of every page update.
_ProxyLoad = tuple[float, Source, dict[tuple[str, str], tuple[float, float, int]]]


class LoadAggregator:
    """The `LoadSink` of xds/lrs.py: each proxy's latest report as rates, counters per Service."""

    def __init__(self, store: MeshStore | None, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.interval = interval
        self._clock = clock
        self._proxies: dict[str, _ProxyLoad] = {}
        self._totals: dict[tuple[str, str], list[int]] = {}  # service -> [completed, errors]
        self.lrs_stats: LrsStats | None = None  # the service's counters, for metrics

    @staticmethod
    def reportable(cluster: str) -> bool:
        """The clusters proxies are asked to report: outbound clusters of mesh Services."""
        return _service_of(cluster) is not None

    @property
    def totals(self) -> dict[ServiceKey, list[int]]:
        """Completed and failed requests per Service, summed over every accepted report."""
        return {ServiceKey(*key): list(total) for key, total in self._totals.items()}

    # LoadSink ------------------------------------------------------------------------------

    def report(self, proxy: ProxyClaim, loads: Sequence[ClusterLoad]) -> None:
        windows: dict[tuple[str, str], tuple[float, float, int]] = {}
        totals = self._totals
        for load in loads:
            key = _service_of(load.cluster)
            if key is None:
                continue
            completed = load.successful + load.errors
            if completed or load.in_flight:
                rps, eps, in_flight = windows.get(key, (0.0, 0.0, 0))  # a service's ports add up
                windows[key] = (rps + completed / load.interval, eps + load.errors / load.interval,
                                in_flight + load.in_flight)
                total = totals.get(key)
                if total is None:
                    total = totals[key] = [0, 0]
                total[0] += completed
                total[1] += load.errors
        self._proxies[proxy.node_id] = (
            self._clock(), Source(proxy.namespace, proxy.pod, proxy.service_account), windows)

    def forget(self, proxy_id: str) -> None:
        self._proxies.pop(proxy_id, None)

    def forget_all(self) -> None:
        """Drop every window and counter (a benchmark's fresh start)."""
        self._proxies.clear()
        self._totals.clear()

    # Reading --------------------------------------------------------------------------------

    def _live(self) -> Iterable[_ProxyLoad]:
        oldest = self._clock() - self.interval * STALE_INTERVALS
        return [entry for entry in self._proxies.values() if entry[0] >= oldest]

    def services(self) -> dict[ServiceKey, ServiceLoad]:
        sums: dict[tuple[str, str], list[float]] = {}
        for _at, _source, windows in self._live():
            for key, (rps, eps, in_flight) in windows.items():
                acc = sums.get(key)
                if acc is None:
                    sums[key] = [rps, eps, in_flight, 1]
                else:
                    acc[0] += rps
                    acc[1] += eps
                    acc[2] += in_flight
                    acc[3] += 1
        return {ServiceKey(*key): ServiceLoad(a[0], a[1], int(a[2]), int(a[3]))
                for key, a in sums.items()}

    def edges(self, callers_of: Callable[[Source], Sequence[str]]
              ) -> dict[tuple[str, tuple[str, str]], list[float]]:
        """Load per (caller, destination (namespace, service)): [rps, eps, in flight], each
        reporting proxy's windows added to the callers `callers_of` names for it (the page:
        the Services its pod backs)."""
        sums: dict[tuple[str, tuple[str, str]], list[float]] = {}
        for _at, source, windows in self._live():
            for caller in callers_of(source):
                for key, (rps, eps, in_flight) in windows.items():
                    acc = sums.get((caller, key))
                    if acc is None:
                        sums[(caller, key)] = [rps, eps, in_flight]
                    else:
                        acc[0] += rps
                        acc[1] += eps
                        acc[2] += in_flight
        return sums

    def reporting_proxies(self) -> int:
        return len(self._proxies)

    def prune(self, services: Mapping[tuple[str, str], Any]) -> None:
        """Drop counters of Services that left the mesh (bounded by the mesh, not by time)."""
        for key in [k for k in self._totals if k not in services]:
            del self._totals[key]

    # Metrics --------------------------------------------------------------------------------

    def collect(self) -> Iterable[Any]:
        """Prometheus families, read at scrape time (metrics.py registers them)."""
        ns = NAMESPACE
        labels = ["namespace", "service"]
        rps = GaugeMetricFamily(
            f"{ns}_service_requests_per_second", "Requests to a Service completed per second, "
            "as the client sidecars connected to this replica report them (LRS); sum over "
            "replicas.", labels=labels)
        eps = GaugeMetricFamily(
            f"{ns}_service_errors_per_second", "Requests to a Service that failed (5xx, reset, "
            "timeout) per second, reported by client sidecars; sum over replicas.", labels=labels)
        ratio = GaugeMetricFamily(
            f"{ns}_service_error_ratio", "errors_per_second / requests_per_second of a Service "
            "on this replica (0 without requests); across replicas divide the sums instead.",
            labels=labels)
        in_flight = GaugeMetricFamily(
            f"{ns}_service_requests_in_flight", "Requests to a Service in flight at the end of "
            "the client sidecars' latest reports; sum over replicas.", labels=labels)
        per_endpoint = GaugeMetricFamily(
            f"{ns}_service_requests_in_flight_per_endpoint", "requests_in_flight divided by the "
            "Service's ready endpoints (the autoscaling signal for concurrency); sum over "
            "replicas.", labels=labels)
        endpoints = GaugeMetricFamily(
            f"{ns}_service_ready_endpoints", "Ready endpoints of a Service (the divisor of "
            "..._in_flight_per_endpoint).", labels=labels)
        requests = CounterMetricFamily(
            f"{ns}_service_requests", "Requests to a Service completed, summed from every "
            "accepted load report since this replica started.", labels=labels)
        errors = CounterMetricFamily(
            f"{ns}_service_request_errors", "Requests to a Service that failed, summed from "
            "every accepted load report.", labels=labels)
        loads = self.services()
        ready = self.ready_endpoints()
        if self.store is not None:
            self.prune(self.store.all(SERVICE))
        totals = self.totals
        for key in sorted(set(loads) | set(totals)):
            label = [key.namespace, key.name]
            load = loads.get(key, ServiceLoad())
            count = ready.get(key, 0)
            rps.add_metric(label, load.requests_per_second)
            eps.add_metric(label, load.errors_per_second)
            ratio.add_metric(label, load.error_ratio)
            in_flight.add_metric(label, load.in_flight)
            per_endpoint.add_metric(label, load.in_flight / count if count else float(load.in_flight))
            endpoints.add_metric(label, count)
            completed, failed = totals.get(key, (0, 0))
            requests.add_metric(label, completed)
            errors.add_metric(label, failed)
        yield from (rps, eps, ratio, in_flight, per_endpoint, endpoints, requests, errors)
        proxies = GaugeMetricFamily(f"{ns}_load_reporting_proxies",
                                    "Proxies with an open load-report (LRS) stream here.")
        proxies.add_metric([], self.reporting_proxies())
        yield proxies
        stats = self.lrs_stats
        if stats is not None:
            reports = CounterMetricFamily(
                f"{ns}_load_reports", "Load reports received, by result: accepted, or the "
                "reason one was ignored (unknown_proxy, unknown_cluster, invalid_counts, "
                "invalid_interval, too_frequent).", labels=["result"])
            reports.add_metric(["accepted"], stats.reports)
            for reason in IGNORE_REASONS:
                reports.add_metric([reason], stats.ignored.get(reason, 0))
            yield reports

    def ready_endpoints(self) -> dict[ServiceKey, int]:
        """Ready endpoints per Service, from the store (counted when read: scrapes and the
        page, not per report)."""
        out: dict[ServiceKey, int] = {}
        if self.store is None:
            return out
        for obj in self.store.all(ENDPOINT_SLICE).values():
            if not isinstance(obj, EndpointSlice):
                continue
            ready = sum(1 for e in obj.endpoints if e.ready and not e.terminating)
            key = obj.service_key
            out[key] = out.get(key, 0) + ready
        return out
