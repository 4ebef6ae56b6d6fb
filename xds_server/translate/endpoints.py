"""Endpoints: one ClusterLoadAssignment per service port, from the service's EndpointSlices."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from ..model.mesh import Endpoint, EndpointCondition, EndpointSlice, Service, ServicePort, Workload
from ..model.mesh import slice_port as slice_port  # its home is the model; builders import it here
from .names import cluster_name
from .tls import mark_mtls

WorkloadLookup = Callable[[str, str, str], Workload | None]  # (namespace, pod, ip)
MtlsLookup = Callable[[Workload, int], bool]  # (workload, app port) -> clients use mTLS


def load_assignment(
    service: Service,
    port: ServicePort,
    slices: Iterable[EndpointSlice],
    workload: WorkloadLookup,
    mtls: MtlsLookup | None = None,
) -> endpoint_pb2.ClusterLoadAssignment:
    """Endpoints grouped by zone (locality). Explicit-mode sidecars are reached at their
    inbound port; others directly at the target port.

    Readiness follows Kubernetes: ready endpoints take traffic; terminating-but-serving ones
    only when nothing is ready (graceful drain, as kube-proxy does); the rest are listed as
    UNHEALTHY so operators still see them.

    `mtls(workload, app_port)`: whether clients originate mTLS to an endpoint (a sidecar or
    proxyless gRPC that accepts it); those endpoints are marked for the cluster's mTLS transport socket (translate/tls.py).
    """
    entries: dict[str, tuple[Endpoint, int]] = {}
    for endpoint_slice in sorted(slices, key=lambda s: s.name):
        target = slice_port(port, endpoint_slice)
        if target is None:
            continue
        for endpoint in endpoint_slice.endpoints:
            entries.setdefault(endpoint.address, (endpoint, target))
    any_ready = any(e.condition is EndpointCondition.READY for e, _ in entries.values())

    by_zone: dict[str, list[tuple[str, int, int, bool]]] = {}  # zone -> (address, port, health, mTLS)
    for address in sorted(entries):
        endpoint, target = entries[address]
        condition = endpoint.condition
        if condition is EndpointCondition.READY or (condition is EndpointCondition.SERVING_TERMINATING and not any_ready):
            health = health_check_pb2.HEALTHY
        else:
            health = health_check_pb2.UNHEALTHY
        owner = workload(service.namespace, endpoint.pod, address)
        # An explicit-mode sidecar is reached at its inbound port (Host picks the app port);
        # a captured pod at the app port itself: its iptables send it to the sidecar.
        explicit = owner is not None and owner.meshed and not owner.capture
        port_value = owner.inbound_port if explicit and owner is not None else target
        secure = owner is not None and mtls is not None and mtls(owner, target)
        by_zone.setdefault(endpoint.zone, []).append((address, port_value, health, secure))
    # Filled in place (`add()` and field sets) rather than from nested constructors: half the
    # CPU, and this runs for every endpoint of a full build.
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(service.key, port.port))
    for zone in sorted(by_zone):
        # Locality and weight on every group: proxyless gRPC rejects either missing.
        group = assignment.endpoints.add()
        group.locality.SetInParent()
        group.locality.zone = zone
        group.load_balancing_weight.value = 1
        for address, port_value, health, secure in by_zone[zone]:
            lb_endpoint = group.lb_endpoints.add()
            lb_endpoint.health_status = health
            socket_address = lb_endpoint.endpoint.address.socket_address
            socket_address.address = address
            socket_address.port_value = port_value
            if secure:
                mark_mtls(lb_endpoint)
    return assignment
