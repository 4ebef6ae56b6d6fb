"""TrafficPolicy in the model: resilience for traffic *to* one Service, as the translators
read it. Produced by the sources from the user-facing API (`xds_server/api/v1alpha1`), with
its defaults applied; durations are seconds. Immutable values with structural equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class TargetRef:
    name: str
    group: str = ""
    kind: str = "Service"


@dataclass(frozen=True, slots=True)
class ConsistentHash:
    """Ring-hash load balancing on exactly one key (a header, a cookie or the source IP)."""

    http_header_name: str | None = None
    http_cookie: str | None = None
    use_source_ip: bool = False
    minimum_ring_size: int = 1024


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    simple: Literal["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"] | None = None
    consistent_hash: ConsistentHash | None = None


@dataclass(frozen=True, slots=True)
class TcpSettings:
    max_connections: int | None = None
    connect_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class HttpSettings:
    http1_max_pending_requests: int | None = None
    http2_max_requests: int | None = None
    max_requests_per_connection: int | None = None
    max_retries: int | None = None


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    tcp: TcpSettings | None = None
    http: HttpSettings | None = None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_5xx_errors: int | None = 5
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class Retries:
    attempts: int
    per_try_timeout: float | None = None
    retry_on: str = "connect-failure,refused-stream,unavailable,cancelled,5xx"


@dataclass(frozen=True, slots=True)
class FaultDelay:
    percentage: float
    fixed_delay: float


@dataclass(frozen=True, slots=True)
class FaultAbort:
    percentage: float
    http_status: int


@dataclass(frozen=True, slots=True)
class Fault:
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


@dataclass(frozen=True, slots=True)
class LocalRateLimit:
    """A token bucket per sidecar: `requests` per `per` seconds, bursts up to `burst`."""

    requests: int
    per: float = 1.0
    burst: int | None = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health checks: HTTP GET `path` when set, else a TCP connect."""

    interval: float = 5.0
    timeout: float = 1.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    path: str | None = None
    expected_statuses: tuple[int, ...] = (200,)


@dataclass(frozen=True, slots=True)
class TrafficPolicySpec:
    """Resilience for traffic *to* one Service, applied by every client sidecar."""

    target_ref: TargetRef
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    retries: Retries | None = None
    timeout: float | None = None
    fault: Fault | None = None
    rate_limit: LocalRateLimit | None = None
    health_check: HealthCheck | None = None


@dataclass(frozen=True, slots=True)
class TrafficPolicy:
    """A valid TrafficPolicy object: where it lives and what it says."""

    namespace: str
    name: str
    spec: TrafficPolicySpec
    created: str = ""
