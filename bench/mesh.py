"""The benchmark mesh: N services, each a Cluster (EDS over ADS) and a ClusterLoadAssignment.

Both servers (the real one in `server_proc.py` and the floor in `floor_server.py`) build
their resources here, so the same load client sees the same resources from both. This module
only depends on the protobufs, never on `xds_server`, so the floor stays a bare server.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import duration_pb2, wrappers_pb2

PREFIX = "type.googleapis.com/"
CLUSTER_TYPE = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"

DEFAULT_SERVICES = 100
ENDPOINTS_PER_SERVICE = 3


def service_name(index: int) -> str:
    return f"outbound|8080||svc-{index:03d}.bench.svc.cluster.local"


def cluster(index: int) -> cluster_pb2.Cluster:
    name = service_name(index)
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(seconds=1),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    c.eds_cluster_config.service_name = name
    c.eds_cluster_config.eds_config.ads.SetInParent()
    c.eds_cluster_config.eds_config.resource_api_version = config_source_pb2.ApiVersion.V3
    c.circuit_breakers.thresholds.add(
        max_connections=wrappers_pb2.UInt32Value(value=4096),
        max_requests=wrappers_pb2.UInt32Value(value=4096),
    )
    hc = c.health_checks.add(
        timeout=duration_pb2.Duration(seconds=1),
        interval=duration_pb2.Duration(seconds=10),
    )
    hc.unhealthy_threshold.value = 3
    hc.healthy_threshold.value = 1
    hc.tcp_health_check.CopyFrom(health_check_pb2.HealthCheck.TcpHealthCheck())
    return c


def cla(index: int, generation: int = 0) -> endpoint_pb2.ClusterLoadAssignment:
    """The endpoints of service `index`; `generation` changes them (a push)."""
    a = endpoint_pb2.ClusterLoadAssignment(cluster_name=service_name(index))
    loc = a.endpoints.add()
    loc.locality.region = "bench-region"
    loc.locality.zone = "bench-zone-a"
    loc.load_balancing_weight.value = 1
    for e in range(ENDPOINTS_PER_SERVICE):
        lb = loc.lb_endpoints.add()
        sa = lb.endpoint.address.socket_address
        sa.address = f"10.{index // 250}.{index % 250}.{10 + e}"
        sa.port_value = 8080
        lb.health_status = health_check_pb2.HEALTHY
        # The generation makes every push a real content change (a new version).
        lb.load_balancing_weight.value = 1 + (generation if e == 0 else 0)
    return a


def clusters(n: int = DEFAULT_SERVICES) -> list[cluster_pb2.Cluster]:
    return [cluster(i) for i in range(n)]


def clas(n: int = DEFAULT_SERVICES) -> list[endpoint_pb2.ClusterLoadAssignment]:
    return [cla(i) for i in range(n)]


def push_target(round_no: int, n: int = DEFAULT_SERVICES) -> tuple[int, str]:
    """Which service push number `round_no` (1-based) changes: (index, resource name)."""
    index = (round_no - 1) % n
    return index, service_name(index)



def generation_of(a: endpoint_pb2.ClusterLoadAssignment) -> int:
    """The generation `cla` wrote into an assignment (0 for one it did not make)."""
    for loc in a.endpoints:
        for lb in loc.lb_endpoints:
            return max(0, lb.load_balancing_weight.value - 1)
    return 0
