"""TrafficPolicy (`mesh.xds-server.io/v1alpha1`): resilience for traffic to one Service.

Field names follow Istio's DestinationRule and VirtualService where they overlap, so users
carry their knowledge over; attachment uses a Gateway API style `targetRef` to a Service.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .common import Duration, Percent, PositiveDuration, Spec


class TargetRef(Spec):
    group: Literal[""] = ""
    kind: Literal["Service"] = "Service"
    name: str = Field(min_length=1)


class ConsistentHash(Spec):
    """Ring-hash load balancing: requests with the same key go to the same endpoint."""

    http_header_name: str | None = None
    http_cookie: str | None = None
    use_source_ip: bool = False
    minimum_ring_size: int = Field(default=1024, ge=1, le=8_388_608)

    @model_validator(mode="after")
    def _one_key(self) -> ConsistentHash:
        keys = [self.http_header_name is not None, self.http_cookie is not None, self.use_source_ip]
        if sum(keys) != 1:
            raise ValueError("set exactly one of httpHeaderName, httpCookie, useSourceIp")
        return self


class LoadBalancer(Spec):
    simple: Literal["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"] | None = None
    consistent_hash: ConsistentHash | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> LoadBalancer:
        if self.simple is not None and self.consistent_hash is not None:
            raise ValueError("set simple or consistentHash, not both")
        return self


class TcpSettings(Spec):
    max_connections: int | None = Field(default=None, ge=1)
    connect_timeout: PositiveDuration | None = None


class HttpSettings(Spec):
    http1_max_pending_requests: int | None = Field(default=None, ge=1)
    http2_max_requests: int | None = Field(default=None, ge=1)
    max_requests_per_connection: int | None = Field(default=None, ge=1)
    max_retries: int | None = Field(default=None, ge=0)


class ConnectionPool(Spec):
    """Circuit breaking: overflowing any limit fails fast with 503 (x-envoy-overloaded)."""

    tcp: TcpSettings | None = None
    http: HttpSettings | None = None


class OutlierDetection(Spec):
    """Ejection of failing endpoints. consecutive5xxErrors/consecutiveGatewayErrors follow
    Istio; the success-rate and failure-percentage fields follow Envoy's OutlierDetection
    (the only kinds proxyless gRPC clients implement, gRFC A50). Setting any field of a kind
    turns that kind on; its enforcing percentage then defaults to 100.
    successRateStdevFactor is in thousandths, as in Envoy (1900 = 1.9)."""

    consecutive_5xx_errors: int | None = Field(default=5, ge=0, alias="consecutive5xxErrors")
    consecutive_gateway_errors: int | None = Field(default=None, ge=0)
    interval: PositiveDuration = 10.0
    base_ejection_time: PositiveDuration = 30.0
    max_ejection_percent: int = Field(default=10, ge=0, le=100)
    success_rate_minimum_hosts: int | None = Field(default=None, ge=0)
    success_rate_request_volume: int | None = Field(default=None, ge=0)
    success_rate_stdev_factor: int | None = Field(default=None, ge=0)
    enforcing_success_rate: int | None = Field(default=None, ge=0, le=100)
    failure_percentage_threshold: int | None = Field(default=None, ge=0, le=100)
    failure_percentage_minimum_hosts: int | None = Field(default=None, ge=0)
    failure_percentage_request_volume: int | None = Field(default=None, ge=0)
    enforcing_failure_percentage: int | None = Field(default=None, ge=0, le=100)


class Retries(Spec):
    attempts: int = Field(ge=0, le=100)
    per_try_timeout: Duration | None = None
    retry_on: str = "connect-failure,refused-stream,unavailable,cancelled,5xx"

    @field_validator("retry_on")
    @classmethod
    def _known_conditions(cls, value: str) -> str:
        known = {
            "5xx", "gateway-error", "reset", "connect-failure", "envoy-ratelimited", "retriable-4xx",
            "refused-stream", "retriable-status-codes", "retriable-headers", "http3-post-connect-failure",
            "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable",
        }
        for condition in filter(None, (c.strip() for c in value.split(","))):
            if condition not in known and not condition.isdigit():
                raise ValueError(f"unknown retry condition {condition!r}")
        return value


class FaultDelay(Spec):
    percentage: Percent
    fixed_delay: PositiveDuration


# gRPC status codes by name (Istio's fault.abort.grpcStatus takes these names).
GRPC_STATUS_CODES = {
    "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


class FaultAbort(Spec):
    """Abort a share of requests with an HTTP status, or (Istio's `grpcStatus`) a gRPC
    status by name: exactly one of the two."""

    percentage: Percent
    http_status: int | None = Field(default=None, ge=200, le=599)
    grpc_status: Literal[
        "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
        "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
        "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
        "UNAUTHENTICATED",
    ] | None = None

    @model_validator(mode="after")
    def _one_status(self) -> FaultAbort:
        if (self.http_status is None) == (self.grpc_status is None):
            raise ValueError("set exactly one of httpStatus, grpcStatus")
        return self


class Fault(Spec):
    delay: FaultDelay | None = None
    abort: FaultAbort | None = None


class LocalRateLimit(Spec):
    """A token bucket per sidecar: `requests` per `per`, bursts up to `burst`; excess gets 429."""

    requests: int = Field(ge=1)
    per: Duration = 1.0
    burst: int | None = Field(default=None, ge=1)

    @field_validator("per")
    @classmethod
    def _at_least_a_millisecond(cls, value: float) -> float:
        if value < 0.001:
            raise ValueError("per must be at least 1ms")
        return value


class HealthCheck(Spec):
    """Active health checks: HTTP GET `path` when set, else a TCP connect."""

    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 1.0
    unhealthy_threshold: int = Field(default=2, ge=1)
    healthy_threshold: int = Field(default=1, ge=1)
    path: str | None = None
    expected_statuses: tuple[int, ...] = (200,)


class TrafficPolicySpec(Spec):
    """Resilience for traffic *to* one Service, applied by every client sidecar."""

    target_ref: TargetRef
    load_balancer: LoadBalancer | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    retries: Retries | None = None
    timeout: Duration | None = None
    fault: Fault | None = None
    rate_limit: LocalRateLimit | None = None
    health_check: HealthCheck | None = None
