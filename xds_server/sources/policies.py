"""The project's own kinds, from their user-facing API types to the model (the IR).

The API types (`xds_server/api/v1alpha1`) validate what users write and generate the CRDs;
the translators read only the model. Conversion is one function per spec, field by field:
defaults are already applied by the API types, durations are already seconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api.v1alpha1 import security as api_security
from ..api.v1alpha1 import traffic as api
from ..model import policy as ir
from ..model import security as ir_security
from ..model.security import MtlsMode


def traffic_policy_spec(spec: api.TrafficPolicySpec) -> ir.TrafficPolicySpec:
    target = spec.target_ref
    return ir.TrafficPolicySpec(
        target_ref=ir.TargetRef(name=target.name, group=target.group, kind=target.kind),
        load_balancer=_load_balancer(spec.load_balancer),
        connection_pool=_connection_pool(spec.connection_pool),
        outlier_detection=_outlier_detection(spec.outlier_detection),
        retries=_retries(spec.retries),
        timeout=spec.timeout,
        fault=_fault(spec.fault),
        rate_limit=_rate_limit(spec.rate_limit),
        health_check=_health_check(spec.health_check),
    )


def _load_balancer(value: api.LoadBalancer | None) -> ir.LoadBalancer | None:
    if value is None:
        return None
    ring = value.consistent_hash
    return ir.LoadBalancer(
        simple=value.simple,
        consistent_hash=None if ring is None else ir.ConsistentHash(
            http_header_name=ring.http_header_name,
            http_cookie=ring.http_cookie,
            use_source_ip=ring.use_source_ip,
            minimum_ring_size=ring.minimum_ring_size,
        ),
    )


def _connection_pool(value: api.ConnectionPool | None) -> ir.ConnectionPool | None:
    if value is None:
        return None
    tcp, http = value.tcp, value.http
    return ir.ConnectionPool(
        tcp=None if tcp is None else ir.TcpSettings(
            max_connections=tcp.max_connections, connect_timeout=tcp.connect_timeout
        ),
        http=None if http is None else ir.HttpSettings(
            http1_max_pending_requests=http.http1_max_pending_requests,
            http2_max_requests=http.http2_max_requests,
            max_requests_per_connection=http.max_requests_per_connection,
            max_retries=http.max_retries,
        ),
    )


def _outlier_detection(value: api.OutlierDetection | None) -> ir.OutlierDetection | None:
    if value is None:
        return None
    return ir.OutlierDetection(
        consecutive_5xx_errors=value.consecutive_5xx_errors,
        consecutive_gateway_errors=value.consecutive_gateway_errors,
        interval=value.interval,
        base_ejection_time=value.base_ejection_time,
        max_ejection_percent=value.max_ejection_percent,
        success_rate_minimum_hosts=value.success_rate_minimum_hosts,
        success_rate_request_volume=value.success_rate_request_volume,
        success_rate_stdev_factor=value.success_rate_stdev_factor,
        enforcing_success_rate=value.enforcing_success_rate,
        failure_percentage_threshold=value.failure_percentage_threshold,
        failure_percentage_minimum_hosts=value.failure_percentage_minimum_hosts,
        failure_percentage_request_volume=value.failure_percentage_request_volume,
        enforcing_failure_percentage=value.enforcing_failure_percentage,
    )


def _retries(value: api.Retries | None) -> ir.Retries | None:
    if value is None:
        return None
    return ir.Retries(
        attempts=value.attempts, per_try_timeout=value.per_try_timeout, retry_on=value.retry_on
    )


def _fault(value: api.Fault | None) -> ir.Fault | None:
    if value is None:
        return None
    delay, abort = value.delay, value.abort
    return ir.Fault(
        delay=None if delay is None else ir.FaultDelay(delay.percentage, delay.fixed_delay),
        abort=None if abort is None else ir.FaultAbort(
            abort.percentage, abort.http_status,
            None if abort.grpc_status is None else api.GRPC_STATUS_CODES[abort.grpc_status],
        ),
    )


def _rate_limit(value: api.LocalRateLimit | None) -> ir.LocalRateLimit | None:
    if value is None:
        return None
    return ir.LocalRateLimit(requests=value.requests, per=value.per, burst=value.burst)


def _health_check(value: api.HealthCheck | None) -> ir.HealthCheck | None:
    if value is None:
        return None
    return ir.HealthCheck(
        interval=value.interval,
        timeout=value.timeout,
        unhealthy_threshold=value.unhealthy_threshold,
        healthy_threshold=value.healthy_threshold,
        path=value.path,
        expected_statuses=tuple(value.expected_statuses),
    )


# Security ----------------------------------------------------------------------------------


def _mode(name: str | None) -> MtlsMode | None:
    return None if name in (None, "UNSET") else MtlsMode(name)


def _selector(value: api_security.WorkloadSelector | None) -> ir_security.WorkloadSelector | None:
    if value is None:
        return None
    return ir_security.WorkloadSelector(tuple(sorted(value.match_labels.items())))


def mtls_policy_spec(spec: api_security.MTLSPolicySpec) -> ir_security.MTLSPolicySpec:
    ports = sorted((port, mode) for port, name in spec.port_level_mtls.items()
                   if (mode := _mode(name)) is not None)
    return ir_security.MTLSPolicySpec(
        selector=_selector(spec.selector), mode=_mode(spec.mode), port_level_mtls=tuple(ports)
    )


def authorization_policy_spec(
    spec: api_security.AuthorizationPolicySpec,
) -> ir_security.AuthorizationPolicySpec:
    return ir_security.AuthorizationPolicySpec(
        selector=_selector(spec.selector),
        action=spec.action,
        rules=tuple(_rule(rule) for rule in spec.rules),
    )


def _rule(rule: api_security.Rule) -> ir_security.Rule:
    return ir_security.Rule(
        from_=tuple(ir_security.From(_source(f.source)) for f in rule.from_),
        to=tuple(ir_security.To(_operation(t.operation)) for t in rule.to),
        when=tuple(_condition(c) for c in rule.when),
    )


def _source(s: api_security.Source) -> ir_security.Source:
    return ir_security.Source(
        principals=s.principals,
        not_principals=s.not_principals,
        namespaces=s.namespaces,
        not_namespaces=s.not_namespaces,
        service_accounts=s.service_accounts,
        not_service_accounts=s.not_service_accounts,
        ip_blocks=s.ip_blocks,
        not_ip_blocks=s.not_ip_blocks,
    )


def _operation(op: api_security.Operation) -> ir_security.Operation:
    return ir_security.Operation(
        hosts=op.hosts,
        not_hosts=op.not_hosts,
        ports=op.ports,
        not_ports=op.not_ports,
        methods=op.methods,
        not_methods=op.not_methods,
        paths=op.paths,
        not_paths=op.not_paths,
    )


def _condition(c: api_security.Condition) -> ir_security.Condition:
    header = api_security.HEADER_KEY.match(c.key)
    return ir_security.Condition(
        key=c.key,
        values=c.values,
        not_values=c.not_values,
        header=header.group(1) if header else None,
    )


# From what users write (a spec's mapping, camelCase) straight to the model -----------------


def parse_traffic_policy_spec(data: Mapping[str, Any]) -> ir.TrafficPolicySpec:
    """Raises pydantic.ValidationError."""
    return traffic_policy_spec(api.TrafficPolicySpec.model_validate(data))


def parse_mtls_policy_spec(data: Mapping[str, Any]) -> ir_security.MTLSPolicySpec:
    """Raises pydantic.ValidationError."""
    return mtls_policy_spec(api_security.MTLSPolicySpec.model_validate(data))


def parse_authorization_policy_spec(data: Mapping[str, Any]) -> ir_security.AuthorizationPolicySpec:
    """Raises pydantic.ValidationError."""
    return authorization_policy_spec(api_security.AuthorizationPolicySpec.model_validate(data))
