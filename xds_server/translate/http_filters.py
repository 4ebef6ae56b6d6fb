"""HTTP filter chains of the sidecar's connection managers, and their per-route overrides.

Outbound (client side) runs the fault filter: TrafficPolicy.fault is injected by the client
sidecar, so the destination's own code and its inbound limits see the delayed/aborted traffic
exactly as a real failure would look to the caller. Inbound (destination side) runs the local
rate limit: a destination protects itself, whatever client sends the request, so the bucket
lives where the requests converge.

Both filters are installed with a do-nothing base config and switched on per route through
`typed_per_filter_config` (see routes.py), so routes without a policy pay nothing and a policy
change only touches the route configuration, never the listener (no drain).

Pure functions; no I/O, no globals, no clock.
"""

from __future__ import annotations

import math

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.type.v3 import http_status_pb2, percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from ..model.policy import Fault, LocalRateLimit
from . import names

__all__ = [
    "LOCAL_RATE_LIMIT_STAT_PREFIX",
    "MIN_FILL_INTERVAL",
    "fault_per_route",
    "fractional_percent",
    "inbound_http_filters",
    "outbound_http_filters",
    "rate_limit_per_route",
    "seconds",
]

LOCAL_RATE_LIMIT_STAT_PREFIX = "local_rate_limit"
# Envoy's local rate limit refuses token buckets refilled more often than every 50 ms.
MIN_FILL_INTERVAL = 0.05


# ---------------------------------------------------------------------------------- helpers


def seconds(value: float) -> duration_pb2.Duration:
    """A protobuf Duration from seconds (nanosecond precision, no float drift in the output)."""
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(value * 1_000_000_000))
    return out


def fractional_percent(percent: float) -> percent_pb2.FractionalPercent:
    """A percentage as Envoy's FractionalPercent: per hundred when whole, else per million."""
    value = min(max(float(percent), 0.0), 100.0)
    if value == int(value):
        return percent_pb2.FractionalPercent(
            numerator=int(value), denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    return percent_pb2.FractionalPercent(
        numerator=round(value * 10_000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def _pack(message: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def _http_filter(name: str, config: Message) -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=name, typed_config=_pack(config))


# ---------------------------------------------------------------------------------- chains


def outbound_http_filters() -> list[hcm_pb2.HttpFilter]:
    """fault (no fault unless a route overrides it), then the router."""
    return [
        _http_filter(names.FAULT_FILTER, fault_pb2.HTTPFault()),
        _http_filter(names.ROUTER_FILTER, router_pb2.Router()),
    ]


def inbound_http_filters() -> list[hcm_pb2.HttpFilter]:
    """local_ratelimit (disabled: no bucket, filter_enabled 0 % unless a route overrides it),
    then the router. Callers insert their own filters (authorization, ...) before the router."""
    return [
        _http_filter(
            names.LOCAL_RATE_LIMIT_FILTER,
            local_rate_limit_pb2.LocalRateLimit(stat_prefix=LOCAL_RATE_LIMIT_STAT_PREFIX),
        ),
        _http_filter(names.ROUTER_FILTER, router_pb2.Router()),
    ]


# -------------------------------------------------------------------------------- per route


def fault_per_route(fault: Fault) -> any_pb2.Any:
    """The packed HTTPFault for `typed_per_filter_config[names.FAULT_FILTER]` of a route."""
    config = fault_pb2.HTTPFault()
    if fault.delay is not None:
        config.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=seconds(fault.delay.fixed_delay),
                percentage=fractional_percent(fault.delay.percentage),
            )
        )
    if fault.abort is not None:
        # A gRPC status (gRFC A33; Envoy answers gRPC requests with it too), else HTTP's
        # (gRPC clients map it to a gRPC status as gRPC's HTTP mapping says).
        abort = fault_pb2.FaultAbort(percentage=fractional_percent(fault.abort.percentage))
        if fault.abort.grpc_status is not None:
            abort.grpc_status = fault.abort.grpc_status
        else:
            abort.http_status = fault.abort.http_status or 500
        config.abort.CopyFrom(abort)
    return _pack(config)


def _token_bucket(limit: LocalRateLimit) -> token_bucket_pb2.TokenBucket:
    """`requests` per `per`, bursts up to `burst` (default: `requests`).

    The plain bucket is max_tokens = burst or requests, tokens_per_fill = requests,
    fill_interval = per. Two corrections keep the *rate* the user asked for:
    - Envoy needs fill_interval >= 50 ms: a shorter `per` is scaled up with the tokens
      (10 per 10 ms becomes 50 per 50 ms).
    - With burst < requests, a bucket refilled with `requests` at once would be clipped to
      `burst` and the rate would silently drop to burst/per. The refill is split into the
      fewest equal steps that fit the burst (100/s, burst 10 -> 10 every 100 ms) with a step
      of at least 50 ms; when no step fits, the burst is raised to the smallest refill.
    """
    requests, per = limit.requests, float(limit.per)
    if per < MIN_FILL_INTERVAL:
        scale = math.ceil(MIN_FILL_INTERVAL / per - 1e-9)
        requests, per = requests * scale, per * scale
    max_tokens = limit.burst if limit.burst is not None else requests
    tokens_per_fill, fill_interval = requests, per
    if max_tokens < requests:
        max_steps = max(1, int(per / MIN_FILL_INTERVAL + 1e-9))
        steps_options = [s for s in range(1, min(requests, max_steps) + 1) if requests % s == 0]
        fitting = [s for s in steps_options if requests // s <= max_tokens]
        steps = fitting[0] if fitting else steps_options[-1]
        tokens_per_fill, fill_interval = requests // steps, per / steps
        max_tokens = max(max_tokens, tokens_per_fill)
    bucket = token_bucket_pb2.TokenBucket(max_tokens=max_tokens, fill_interval=seconds(fill_interval))
    bucket.tokens_per_fill.value = tokens_per_fill
    return bucket


def rate_limit_per_route(limit: LocalRateLimit) -> any_pb2.Any:
    """The packed LocalRateLimit for `typed_per_filter_config[names.LOCAL_RATE_LIMIT_FILTER]`.

    One token bucket per route (shared by all worker threads of the sidecar), enabled and
    enforced for 100 % of requests; excess requests get 429 (gRPC: RESOURCE_EXHAUSTED) and
    every answer carries the draft-03 `x-ratelimit-*` headers so clients can back off.
    """
    full = percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED)
    config = local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=LOCAL_RATE_LIMIT_STAT_PREFIX,
        status=http_status_pb2.HttpStatus(code=http_status_pb2.TooManyRequests),
        token_bucket=_token_bucket(limit),
        enable_x_ratelimit_headers=ratelimit_pb2.DRAFT_VERSION_03,
        rate_limited_as_resource_exhausted=True,
    )
    config.filter_enabled.default_value.CopyFrom(full)
    config.filter_enforced.default_value.CopyFrom(full)
    return _pack(config)
