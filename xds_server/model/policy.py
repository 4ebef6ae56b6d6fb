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
    """Envoy's ejection kinds, with Envoy's field names. Success-rate ejection is on when any
    `success_rate_*` field (or `enforcing_success_rate`) is set, failure-percentage ejection
    when any `failure_percentage_*` field (or `enforcing_failure_percentage`) is; an unset
    enforcing percentage then means 100. `success_rate_stdev_factor` is in thousandths (1900
    = 1.9 standard deviations), as in Envoy. gRPC clients (gRFC A50) implement only these
    two kinds (see model/client_kinds.py for the consecutive-error forms)."""

    consecutive_5xx_errors: int | None = 5
    consecutive_gateway_errors: int | None = None
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_percent: int = 10
    success_rate_minimum_hosts: int | None = None
    success_rate_request_volume: int | None = None
    success_rate_stdev_factor: int | None = None
    enforcing_success_rate: int | None = None
    failure_percentage_threshold: int | None = None
    failure_percentage_minimum_hosts: int | None = None
    failure_percentage_request_volume: int | None = None
    enforcing_failure_percentage: int | None = None

    @property
    def success_rate(self) -> bool:
        return any(v is not None for v in (
            self.success_rate_minimum_hosts, self.success_rate_request_volume,
            self.success_rate_stdev_factor, self.enforcing_success_rate,
        ))

    @property
    def failure_percentage(self) -> bool:
        return any(v is not None for v in (
            self.failure_percentage_threshold, self.failure_percentage_minimum_hosts,
            self.failure_percentage_request_volume, self.enforcing_failure_percentage,
        ))


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
    """Exactly one of an HTTP status and a gRPC status code (its number, 1-16)."""

    percentage: float
    http_status: int | None = None
    grpc_status: int | None = None


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
