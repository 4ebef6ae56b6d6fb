"""What TrafficPolicy fields mean to each client kind: Envoy sidecars and proxyless gRPC.

Translation (translate/routes.py, translate/proxyless.py) gives proxyless gRPC clients a
form of each setting gRPC implements; what gRPC cannot do is listed by `grpc_notes`, which
`xds-server validate`, `xds-server translate` and the TrafficPolicy's `Accepted` condition
report, so nothing is dropped silently. The facts, from the gRFCs:

- Timeouts (A31): gRPC ignores `RouteAction.timeout` and applies `max_stream_duration`
  (capped by `grpc_timeout_header_max`): the proxyless form carries the timeout there.
- Retries (A44): retry only on the gRPC status codes below; no `per_try_timeout`; at most
  5 attempts; `num_retries` must be > 0 (a whole RouteConfiguration is NACKed otherwise).
  Without retries the only try's timeout bounds the call, so it becomes the call's timeout.
- Outlier detection (A50): success-rate and failure-percentage ejection only; no
  consecutive-error ejection. The consecutive form is approximated by failure-percentage
  ejection at 100 % (an endpoint all of whose requests failed in an interval, with at least
  as many requests as the consecutive count), when the policy sets no failure percentage.
- Fault injection (A33): delays and aborts with an HTTP or a gRPC status.
- Load balancing: round robin and ring hash (A42: hashing on headers only); least request
  and random become round robin.
- Circuit breaking (A32): only the concurrent-request limit (`http2MaxRequests`).
- No active health checks; rate limits are enforced by a destination sidecar.

Pure functions over the model.
"""

from __future__ import annotations

from .policy import TrafficPolicySpec

# Envoy's x-envoy-retry-grpc-on conditions: the only retry_on values gRPC reads (gRFC A44).
GRPC_RETRY_ON = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
# gRPC makes at most 5 attempts (gRFC A6): more retries than this are capped.
GRPC_MAX_RETRIES = 4

PROXYLESS = "proxyless gRPC clients"


def grpc_retry_conditions(conditions: list[str]) -> list[str]:
    """The retry conditions gRPC applies, in the given order."""
    return [c for c in conditions if c in GRPC_RETRY_ON]


def _retry_conditions(retry_on: str) -> list[str]:
    return [c for c in (item.strip() for item in retry_on.split(",")) if c]


def grpc_notes(spec: TrafficPolicySpec) -> list[tuple[str, str]]:
    """(field, message) for each setting of the policy that proxyless gRPC clients cannot
    apply as Envoy does (empty when the policy means the same to both)."""
    notes: list[tuple[str, str]] = []
    retries = spec.retries
    if retries is not None and retries.attempts > 0:
        conditions = _retry_conditions(retries.retry_on)
        kept = grpc_retry_conditions(conditions)
        dropped = [c for c in conditions if c not in GRPC_RETRY_ON]
        if not kept:
            notes.append(("spec.retries.retryOn",
                          f"{PROXYLESS} retry only on gRPC status codes ({', '.join(GRPC_RETRY_ON)}): "
                          "none is listed, so they do not retry (gRFC A44)"))
        elif dropped:
            notes.append(("spec.retries.retryOn",
                          f"{', '.join(dropped)}: not applied by {PROXYLESS}, which retry only on "
                          f"gRPC status codes (gRFC A44); they retry on {', '.join(kept)}"))
        if kept and retries.per_try_timeout is not None:
            notes.append(("spec.retries.perTryTimeout",
                          f"not applied by {PROXYLESS} when they retry (gRFC A44 has no per-try "
                          "timeout): the policy's timeout bounds all attempts together"))
        if kept and retries.attempts > GRPC_MAX_RETRIES:
            notes.append(("spec.retries.attempts",
                          f"{PROXYLESS} make at most {GRPC_MAX_RETRIES} retries (5 attempts)"))
    detection = spec.outlier_detection
    if detection is not None:
        consecutive = [
            (name, value) for name, value in (
                ("consecutive5xxErrors", detection.consecutive_5xx_errors),
                ("consecutiveGatewayErrors", detection.consecutive_gateway_errors),
            ) if value
        ]
        for name, value in consecutive:
            if detection.failure_percentage:
                message = (f"not applied by {PROXYLESS}, which have no consecutive-error ejection "
                           "(gRFC A50): they use the failure-percentage settings")
            else:
                message = (f"{PROXYLESS} have no consecutive-error ejection (gRFC A50): they eject "
                           f"an endpoint all of whose requests failed in an interval with at least "
                           f"{value} requests (failure percentage 100 %)")
            notes.append((f"spec.outlierDetection.{name}", message))
    balancer = spec.load_balancer
    if balancer is not None:
        if balancer.simple in ("LEAST_REQUEST", "RANDOM"):
            notes.append(("spec.loadBalancer.simple",
                          f"{balancer.simple}: {PROXYLESS} use ROUND_ROBIN instead"))
        ring = balancer.consistent_hash
        if ring is not None and ring.http_header_name is None:
            field = "httpCookie" if ring.http_cookie is not None else "useSourceIp"
            notes.append((f"spec.loadBalancer.consistentHash.{field}",
                          f"{PROXYLESS} hash only on headers (gRFC A42): each of their requests "
                          "picks a random point of the ring"))
    pool = spec.connection_pool
    if pool is not None:
        unsupported = []
        if pool.tcp is not None:
            unsupported += [f"tcp.{n}" for n, v in (("maxConnections", pool.tcp.max_connections),
                                                     ("connectTimeout", pool.tcp.connect_timeout))
                            if v is not None]
        if pool.http is not None:
            http = pool.http
            unsupported += [f"http.{n}" for n, v in (
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
            ) if v is not None]
        for name in unsupported:
            notes.append((f"spec.connectionPool.{name}",
                          f"not applied by {PROXYLESS} (gRFC A32 limits concurrent requests only: "
                          "http.http2MaxRequests)"))
    if spec.health_check is not None:
        notes.append(("spec.healthCheck", f"{PROXYLESS} do no active health checks"))
    if spec.rate_limit is not None:
        notes.append(("spec.rateLimit", "enforced by the destination's sidecar: a proxyless gRPC "
                                        "server does not enforce it"))
    return notes


def format_notes(notes: list[tuple[str, str]]) -> str:
    return "; ".join(f"{field}: {message}" for field, message in notes)
