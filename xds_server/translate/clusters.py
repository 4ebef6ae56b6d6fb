"""Clusters: one EDS cluster per service port, shaped by the destination's TrafficPolicy."""

from __future__ import annotations

from collections.abc import Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    health_check_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import range_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from ..model.mesh import AppProtocol, Service, ServicePort
from ..model.policy import TrafficPolicySpec
from . import tls
from .names import cluster_name, inbound_cluster_name

DEFAULT_CONNECT_TIMEOUT = 5.0
# Envoy's built-in circuit-breaker defaults (1024 connections/requests, 3 concurrent retries)
# trip under ordinary load and surprise users; like Istio, limits are off unless set.
UNLIMITED = 2**32 - 1

_LB = {
    "LEAST_REQUEST": cluster_pb2.Cluster.LEAST_REQUEST,
    "ROUND_ROBIN": cluster_pb2.Cluster.ROUND_ROBIN,
    "RANDOM": cluster_pb2.Cluster.RANDOM,
}


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def ads_config_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
    )


def http_protocol_options(app_protocol: AppProtocol) -> dict[str, any_pb2.Any]:
    """HTTP/2 to upstreams of http2/grpc ports; HTTP/1.1 otherwise."""
    options = http_protocol_options_pb2.HttpProtocolOptions()
    if app_protocol.needs_http2:
        options.explicit_http_config.http2_protocol_options.SetInParent()
    else:
        options.explicit_http_config.http_protocol_options.SetInParent()
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": pack(options)}


def service_cluster(
    service: Service,
    port: ServicePort,
    policy: TrafficPolicySpec | None,
    *,
    mtls_ids: Sequence[str] = (),
) -> cluster_pb2.Cluster:
    """`mtls_ids`: the SPIFFE IDs of the service's mTLS-capable workloads; when given,
    endpoints that EDS marks for mTLS are reached with mTLS checking them (translate/tls.py)."""
    cluster = cluster_pb2.Cluster(
        name=cluster_name(service.key, port.port),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads_config_source()),
        connect_timeout=duration(DEFAULT_CONNECT_TIMEOUT),
        lb_policy=cluster_pb2.Cluster.LEAST_REQUEST,
        circuit_breakers=_circuit_breakers(policy),
    )
    if port.app_protocol.is_http:
        for key, value in http_protocol_options(port.app_protocol).items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    if mtls_ids:
        cluster.transport_socket_matches.append(
            tls.upstream_mtls_match(service.key.fqdn, mtls_ids, tls.alpn_for(port.app_protocol))
        )
    if policy is None:
        return cluster
    _apply_load_balancer(cluster, policy)
    pool = policy.connection_pool
    if pool is not None and pool.tcp is not None and pool.tcp.connect_timeout is not None:
        cluster.connect_timeout.CopyFrom(duration(pool.tcp.connect_timeout))
    # An HTTP setting: a TCP port's cluster has no HTTP protocol options to put it in (and
    # Envoy rejects HttpProtocolOptions without an upstream protocol).
    if (
        port.app_protocol.is_http
        and pool is not None and pool.http is not None and pool.http.max_requests_per_connection
    ):
        options = http_protocol_options_pb2.HttpProtocolOptions()
        key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        if key in cluster.typed_extension_protocol_options:
            cluster.typed_extension_protocol_options[key].Unpack(options)
        options.common_http_protocol_options.max_requests_per_connection.value = (
            pool.http.max_requests_per_connection
        )
        cluster.typed_extension_protocol_options[key].CopyFrom(pack(options))
    if policy.outlier_detection is not None:
        cluster.outlier_detection.CopyFrom(_outlier_detection(policy))
    if policy.health_check is not None:
        cluster.health_checks.append(_health_check(policy, f"{service.key.fqdn}:{port.port}"))
    return cluster


def _apply_load_balancer(cluster: cluster_pb2.Cluster, policy: TrafficPolicySpec) -> None:
    balancer = policy.load_balancer
    if balancer is None:
        return
    if balancer.consistent_hash is not None:
        # The hash key itself is a route-level hash_policy (see translate/routes.py).
        cluster.lb_policy = cluster_pb2.Cluster.RING_HASH
        cluster.ring_hash_lb_config.minimum_ring_size.value = balancer.consistent_hash.minimum_ring_size
    elif balancer.simple is not None:
        cluster.lb_policy = _LB[balancer.simple]


def _circuit_breakers(policy: TrafficPolicySpec | None) -> circuit_breaker_pb2.CircuitBreakers:
    threshold = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.DEFAULT,
        max_connections=wrappers_pb2.UInt32Value(value=UNLIMITED),
        max_pending_requests=wrappers_pb2.UInt32Value(value=UNLIMITED),
        max_requests=wrappers_pb2.UInt32Value(value=UNLIMITED),
        max_retries=wrappers_pb2.UInt32Value(value=UNLIMITED),
        track_remaining=True,
    )
    pool = policy.connection_pool if policy is not None else None
    if pool is not None and pool.tcp is not None and pool.tcp.max_connections is not None:
        threshold.max_connections.value = pool.tcp.max_connections
    if pool is not None and pool.http is not None:
        http = pool.http
        if http.http1_max_pending_requests is not None:
            threshold.max_pending_requests.value = http.http1_max_pending_requests
        if http.http2_max_requests is not None:
            threshold.max_requests.value = http.http2_max_requests
        if http.max_retries is not None:
            threshold.max_retries.value = http.max_retries
    return circuit_breaker_pb2.CircuitBreakers(thresholds=[threshold])


def _outlier_detection(policy: TrafficPolicySpec) -> outlier_detection_pb2.OutlierDetection:
    spec = policy.outlier_detection
    assert spec is not None
    detection = outlier_detection_pb2.OutlierDetection(
        interval=duration(spec.interval),
        base_ejection_time=duration(spec.base_ejection_time),
        max_ejection_percent=wrappers_pb2.UInt32Value(value=spec.max_ejection_percent),
    )
    # Success-rate ejection needs statistics a small mesh does not have: off (as Istio has it)
    # unless the policy asks for it. Failure percentage is Envoy's default off.
    detection.enforcing_success_rate.value = (
        (100 if spec.enforcing_success_rate is None else spec.enforcing_success_rate)
        if spec.success_rate else 0
    )
    for field, value in (
        ("success_rate_minimum_hosts", spec.success_rate_minimum_hosts),
        ("success_rate_request_volume", spec.success_rate_request_volume),
        ("success_rate_stdev_factor", spec.success_rate_stdev_factor),
        ("failure_percentage_threshold", spec.failure_percentage_threshold),
        ("failure_percentage_minimum_hosts", spec.failure_percentage_minimum_hosts),
        ("failure_percentage_request_volume", spec.failure_percentage_request_volume),
    ):
        if value is not None:
            getattr(detection, field).value = value
    if spec.failure_percentage:
        detection.enforcing_failure_percentage.value = (
            100 if spec.enforcing_failure_percentage is None else spec.enforcing_failure_percentage
        )
    if spec.consecutive_5xx_errors:
        detection.consecutive_5xx.value = spec.consecutive_5xx_errors
        detection.enforcing_consecutive_5xx.value = 100
    else:
        detection.enforcing_consecutive_5xx.value = 0
    if spec.consecutive_gateway_errors:
        detection.consecutive_gateway_failure.value = spec.consecutive_gateway_errors
        detection.enforcing_consecutive_gateway_failure.value = 100
    return detection


def _health_check(policy: TrafficPolicySpec, host: str) -> health_check_pb2.HealthCheck:
    """`host` is the Host header of HTTP checks: the service's FQDN with the port, which the
    destination's inbound routes map to the right app port (Envoy's default, the cluster
    name `outbound|...`, is not a valid Host: the sidecar would answer 400 to every check)."""
    spec = policy.health_check
    assert spec is not None
    check = health_check_pb2.HealthCheck(
        interval=duration(spec.interval),
        timeout=duration(spec.timeout),
        unhealthy_threshold=wrappers_pb2.UInt32Value(value=spec.unhealthy_threshold),
        healthy_threshold=wrappers_pb2.UInt32Value(value=spec.healthy_threshold),
        # Without this a new endpoint would wait a full interval before its first check.
        no_traffic_interval=duration(min(spec.interval, 5.0)),
    )
    if spec.path is not None:
        check.http_health_check.path = spec.path
        check.http_health_check.host = host
        for status in spec.expected_statuses:
            check.http_health_check.expected_statuses.append(
                range_pb2.Int64Range(start=status, end=status + 1)
            )
    else:
        check.tcp_health_check.SetInParent()
    return check


def inbound_cluster(
    namespace: str, pod: str, app_ip: str, app_port: int, app_protocol: AppProtocol
) -> cluster_pb2.Cluster:
    """The sidecar's cluster to its own application port."""
    name = inbound_cluster_name(app_port, namespace, pod)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration(DEFAULT_CONNECT_TIMEOUT),
        circuit_breakers=_circuit_breakers(None),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(
                                        address=app_ip, port_value=app_port
                                    )
                                )
                            )
                        )
                    ]
                )
            ],
        ),
    )
    if app_protocol.is_http:
        for key, value in http_protocol_options(app_protocol).items():
            cluster.typed_extension_protocol_options[key].CopyFrom(value)
    return cluster
