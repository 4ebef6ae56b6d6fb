"""LRS, the load reporting service (`envoy.service.load_stats.v3.LoadReportingService`).

Sidecars stream what they sent to each upstream cluster, per locality: requests completed
successfully, failed (5xx, resets), issued and in flight, over an interval this server sets.
This module speaks the protocol and checks every report; what the counts mean for a Service
is the sink's business (load_reports.py).

A stream works like this: the proxy's first request carries its node; the stream proves the
same identity as the xDS stream of that node (same credential rules as ADS: a token or a
client certificate; the node alone only in the modes where ADS trusts it), and the server
answers with the clusters it wants reports for (the proxy's outbound mesh clusters, as its
CDS subscription holds them now) and `load_reporting_interval`. The cluster list is sent
again when the proxy's clusters change. Every report is checked before it counts; one that
fails is ignored as a whole and counted by reason (`LrsStats.ignored`):

  * `unknown_proxy`: no xDS stream of that node (with that identity) is connected here;
  * `unknown_cluster`: a cluster the proxy was not sent (or not asked to report);
  * `invalid_counts`: a count above what a sidecar can do in the interval (a uint64 from a
    negative number, a runaway counter), more in flight than `max_in_flight`;
  * `invalid_interval`: a reported interval that is not positive or far from the one set;
  * `too_frequent`: sooner than half the interval after the proxy's previous report (per
    node, whatever the number of LRS streams it opens).

What is kept per stream is bounded by the clusters the mesh gives that proxy; nothing a
proxy sends can grow it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc import aio

from envoy.config.endpoint.v3 import load_report_pb2
from envoy.service.load_stats.v3 import lrs_pb2

from ..model.identity import AuthError, Proof, ProxyClaim
from . import types
from .connection import Connection
from .node import proxy_claim
from .tls import PeerCertificate, peer_certificate

log = logging.getLogger("xds_server.lrs")

SERVICE_NAME = "envoy.service.load_stats.v3.LoadReportingService"
METHOD = f"/{SERVICE_NAME}/StreamLoadStats"

IGNORE_REASONS = ("unknown_proxy", "unknown_cluster", "invalid_counts", "invalid_interval",
                  "too_frequent")


@dataclass(frozen=True)
class LrsSettings:
    interval: float = 10.0  # seconds between a proxy's reports (load_reporting_interval)
    # The most requests a sidecar can complete per second to one cluster (Envoy does well
    # under 100k/s per core): more is a broken or lying reporter.
    max_requests_per_second: float = 1_000_000.0
    max_in_flight: int = 1_000_000  # requests in flight to one cluster
    first_request_timeout: float = 10.0  # a stream that never says who it is is closed


@dataclass(frozen=True, slots=True)
class ClusterLoad:
    """One checked report of one cluster: counts over `interval` seconds, summed over its
    localities (in flight is the count at the end of the interval)."""

    cluster: str
    interval: float
    successful: int
    errors: int
    issued: int
    in_flight: int
    dropped: int = 0


class LoadSink(Protocol):
    """Where checked reports go (load_reports.LoadAggregator)."""

    def report(self, proxy: ProxyClaim, loads: Sequence[ClusterLoad]) -> None: ...

    def forget(self, proxy_id: str) -> None: ...


# (metadata, claim, peer, client certificate) -> what the credential proved (None: nothing
# to prove in `--auth none`); raises AuthError. The stream guard's authenticator.
Authenticate = Callable[[Any, ProxyClaim, str, PeerCertificate | None], Awaitable[Proof | None]]


@dataclass
class LrsStats:
    streams: int = 0  # open LRS streams
    reports: int = 0  # reports accepted
    ignored: collections.Counter[str] = field(default_factory=collections.Counter)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)  # streams


def _same_proxy(conn: Connection, proof: Proof | None) -> bool:
    """Whether an xDS stream proved what the LRS stream proved (anything, when nothing is
    proven: `--auth none`, where the node is believed on both)."""
    if proof is None:
        return True
    if conn.identity != proof.identity:
        return False
    return not (proof.pod and conn.claim is not None and conn.claim.pod != proof.pod)


@dataclass(slots=True)
class _Reporter:
    """One LRS stream: who it proved to be and what it was asked to report."""

    claim: ProxyClaim
    proof: Proof | None
    entry: list[float]  # the proxy's [open streams, time of its last accepted report]
    asked: frozenset[str] | None = None
    clusters_key: tuple[int, str, int] | None = None


class LoadReportingService:
    def __init__(
        self,
        connections: Callable[[], Iterable[Connection]],
        sink: LoadSink,
        settings: LrsSettings | None = None,
        *,
        authenticate: Authenticate | None = None,
        reportable: Callable[[str], bool] = lambda name: True,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._connections = connections
        self.sink = sink
        self.settings = settings or LrsSettings()
        self._authenticate = authenticate
        # Which of a proxy's clusters it is asked to report (the composition root passes
        # "an outbound cluster of a mesh Service").
        self._reportable = reportable
        self._clock = clock
        self.stats = LrsStats()
        # node id -> (open streams, loop time of its last accepted report): the rate bound
        # is per proxy, so opening more streams does not buy more reports.
        self._proxies: dict[str, list[float]] = {}
        self._conns: dict[str, Connection] = {}  # node id -> its xDS stream last found

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "StreamLoadStats": grpc.stream_stream_rpc_method_handler(
                self.stream,
                request_deserializer=lrs_pb2.LoadStatsRequest.FromString,
                response_serializer=lrs_pb2.LoadStatsResponse.SerializeToString,
            ),
        })

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # The stream --------------------------------------------------------------------------

    async def stream(self, requests: AsyncIterator[lrs_pb2.LoadStatsRequest],
                     context: aio.ServicerContext[Any, Any]) -> None:
        peer = context.peer()
        try:
            first = await asyncio.wait_for(anext(requests), self.settings.first_request_timeout)
        except (TimeoutError, StopAsyncIteration):
            self.stats.refused["no_request"] += 1
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no LoadStatsRequest in time")
            return
        if not first.node.id:
            self.stats.refused["no_node"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "the first LoadStatsRequest must carry the node (with its id)")
            return
        claim = proxy_claim(first.node)
        proof = await self._prove(context, claim, peer)
        node_id = claim.node_id
        entry = self._proxies.setdefault(node_id, [0, float("-inf")])
        entry[0] += 1
        self.stats.streams += 1
        reporter = _Reporter(claim, proof, entry)
        try:
            await self._ask(context, reporter)
            if first.cluster_stats:  # a report in the first message counts like any other
                await self.take(context, reporter, first)
            async for request in requests:
                await self.take(context, reporter, request)
        finally:
            self.stats.streams -= 1
            entry[0] -= 1
            if entry[0] <= 0:
                del self._proxies[node_id]
                self._conns.pop(node_id, None)
                self.sink.forget(node_id)

    async def _prove(self, context: aio.ServicerContext[Any, Any], claim: ProxyClaim,
                     peer: str) -> Proof | None:
        if self._authenticate is None:
            return None
        try:
            return await self._authenticate(context.invocation_metadata(), claim, peer,
                                            peer_certificate(context.auth_context(), peer))
        except AuthError as err:
            self.stats.refused["unauthenticated"] += 1
            log.warning("load report stream refused: %s", err.reason,
                        extra={"proxy": claim.node_id, "peer": peer})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, err.reason)
            raise  # abort raises; for the type checker

    def _connection(self, reporter: _Reporter) -> Connection | None:
        """The proxy's newest xDS stream holding clusters, proven as the same identity. The
        last one found is kept while it stays open: a lookup per report costs no scan."""
        node_id = reporter.claim.node_id
        live = self._connections()
        proof = reporter.proof
        known = self._conns.get(node_id)
        if known is not None and not known.closing and known in live and _same_proxy(known, proof):
            return known
        found = None
        for conn in live:
            if conn.proxy_id != node_id or types.CLUSTER not in conn.state.types \
                    or not _same_proxy(conn, proof):
                continue
            if found is None or conn.state.connected_at >= found.state.connected_at:
                found = conn
        if found is not None:
            self._conns[node_id] = found
        return found

    def _clusters_of(self, conn: Connection, reporter: _Reporter) -> frozenset[str]:
        """The proxy's reportable clusters, recomputed only when it was sent other clusters."""
        state = conn.state
        type_state = state.types.get(types.CLUSTER)
        view = state.view
        if type_state is None or view is None:
            return frozenset()
        key = (state.id, type_state.sent_version, len(type_state.names))
        if key == reporter.clusters_key and reporter.asked is not None:
            return reporter.asked
        names = set(type_state.names)
        if type_state.wildcard:
            names.update(r.name for r in view.visible(types.CLUSTER))
        reportable = self._reportable
        reporter.clusters_key = key
        return frozenset(n for n in names if reportable(n) and view.get(types.CLUSTER, n) is not None)

    async def _ask(self, context: aio.ServicerContext[Any, Any], reporter: _Reporter) -> None:
        """Tell the proxy which clusters to report, when that changed (or first)."""
        conn = self._connection(reporter)
        clusters = self._clusters_of(conn, reporter) if conn is not None else frozenset()
        if clusters == reporter.asked:
            return
        reporter.asked = clusters
        response = lrs_pb2.LoadStatsResponse(clusters=sorted(clusters))
        response.load_reporting_interval.FromNanoseconds(int(self.settings.interval * 1e9))
        await context.write(response)

    async def take(self, context: aio.ServicerContext[Any, Any], reporter: _Reporter,
                   request: lrs_pb2.LoadStatsRequest) -> None:
        """One request of an open stream: a report checked and handed on, or ignored."""
        if request.cluster_stats:
            now = self._now()
            loads: list[ClusterLoad] = []
            if now - reporter.entry[1] < self.settings.interval / 2:
                reason: str | None = "too_frequent"
            elif self._connection(reporter) is None:
                reason = "unknown_proxy"
            else:
                reason = self._check(request.cluster_stats, reporter.asked or frozenset(), loads)
            if reason is not None:
                self.stats.ignored[reason] += 1
                log.debug("load report ignored",
                          extra={"proxy": reporter.claim.node_id, "reason": reason})
            else:
                reporter.entry[1] = now
                self.stats.reports += 1
                self.sink.report(reporter.claim, loads)
        await self._ask(context, reporter)

    def _check(self, stats: Sequence[load_report_pb2.ClusterStats], asked: frozenset[str],
               out: list[ClusterLoad]) -> str | None:
        """The reason to ignore the report, or None with its loads in `out`."""
        settings = self.settings
        for cluster in stats:
            if cluster.cluster_name not in asked:
                return "unknown_cluster"
            interval = cluster.load_report_interval.ToNanoseconds() / 1e9
            # Envoy measures the interval itself; late timers stretch it, never by 10x.
            if not 0 < interval <= settings.interval * 10:
                return "invalid_interval"
            limit = settings.max_requests_per_second * interval
            successful = errors = issued = in_flight = 0
            for locality in cluster.upstream_locality_stats:
                successful += locality.total_successful_requests
                errors += locality.total_error_requests
                issued += locality.total_issued_requests
                in_flight += locality.total_requests_in_progress
            if max(successful, errors, issued, cluster.total_dropped_requests) > limit \
                    or successful + errors > limit or in_flight > settings.max_in_flight:
                return "invalid_counts"
            out.append(ClusterLoad(cluster.cluster_name, interval, successful, errors, issued,
                                   in_flight, cluster.total_dropped_requests))
        return None
