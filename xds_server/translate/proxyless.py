"""Proxyless gRPC: what the stock grpcio xDS client and xDS-enabled gRPC servers receive.

How the server knows: gRPC's node says so (`user_agent_name` "gRPC Python", "gRPC C-core",
"grpc-go", "grpc-java"...; Envoy says "envoy"), and gRPC announces the client feature
`envoy.lb.does_not_support_overprovisioning`, which Envoy never sends (xds/node.py reads it
into the proxy's claim).

What differs from a sidecar (see FIELD-NOTES "The stock grpcio xDS client"):

- Client LDS: gRPC asks for the listener named like its target (`xds:///api.shop:8080` asks
  for `api.shop:8080`): an `api_listener` whose connection manager takes the client
  namespace's gRPC route configuration over RDS (below), so routes, retries, timeouts and the
  namespace's visibility apply as for the namespace's sidecars. Built for
  whatever name is asked (it only names the route configuration; a host no virtual host
  matches fails the RPC at once rather than after gRPC's 15 s does-not-exist timer).
- Client RDS: the namespace's gRPC route configuration `outbound|grpc|<ns>`, the same join
  of per-service virtual hosts as the sidecars' `outbound|http|<ns>`, each translated for
  gRPC (translate/routes.py `grpc`, model/client_kinds.py): an Envoy-only field in one route
  cannot make gRPC reject every route of the namespace.
- Client CDS: the same clusters, reshaped on the way out (`client_cluster`): outlier
  detection as gRPC implements it (`grpc_outlier_detection`), and gRPC supports
  neither `transport_socket_matches` nor SDS in TLS contexts, so mTLS is a plain
  `transport_socket` whose certificates come from certificate provider instances of gRPC's
  bootstrap (`file_watcher` over the files `xds-server agent` writes, instance
  `default`). mTLS is used when every mTLS-capable endpoint of the service accepts it (the
  cluster carries that decision in its metadata, computed with the endpoints' modes).
- Server LDS: `grpc.server(..., xds=True)` asks for
  `grpc/server?xds.resource.listening_address=IP:PORT`: one listener per app port of the
  workload, terminating mTLS unless the port is DISABLE (gRPC cannot sniff TLS, so PERMISSIVE
  means mTLS here), with the workload's authorization as gRPC's RBAC filter (gRFC A41).

Pure functions: the orchestrator builds the reshaped clusters and the server listeners like
any other output (translate/service_outputs.py, translate/proxies.py); `ProxylessView`
(translate/views.py) serves them.
"""

from __future__ import annotations

import functools

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from ..model.security import MtlsMode
from ..xds.resource import Resource
from . import names, rbac
from . import tls as tls_contexts
from .clusters import ads_config_source, pack
from .listeners import socket
from .rbac import PortAuthz

SERVER_LISTENER_PREFIX = "grpc/server?xds.resource.listening_address="
CLUSTER_METADATA = "xds-server.io"
PROXYLESS_MTLS = "proxyless_mtls"  # cluster metadata: gRPC clients originate mTLS


def server_listener_name(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"{SERVER_LISTENER_PREFIX}{host}:{port}"


# Clients ------------------------------------------------------------------------------------


def mark_proxyless_mtls(cluster: cluster_pb2.Cluster, enabled: bool) -> None:
    """Record on a service cluster whether gRPC clients originate mTLS to it."""
    if enabled:
        cluster.metadata.filter_metadata[CLUSTER_METADATA].fields[PROXYLESS_MTLS].bool_value = True


def client_cluster(cluster: cluster_pb2.Cluster) -> cluster_pb2.Cluster:
    """A sidecar's service cluster reshaped for gRPC (see module doc)."""
    out = cluster_pb2.Cluster()
    out.CopyFrom(cluster)
    match = next((m for m in cluster.transport_socket_matches
                  if m.name == tls_contexts.MTLS_MATCH_NAME), None)
    meta = cluster.metadata.filter_metadata.get(CLUSTER_METADATA)
    mtls = match is not None and meta is not None and meta.fields[PROXYLESS_MTLS].bool_value
    out.ClearField("transport_socket_matches")
    out.ClearField("health_checks")  # gRPC does not health-check (and ignores them)
    out.ClearField("typed_extension_protocol_options")  # always HTTP/2
    out.ClearField("metadata")
    if out.lb_policy in (cluster_pb2.Cluster.LEAST_REQUEST, cluster_pb2.Cluster.RANDOM):
        out.lb_policy = cluster_pb2.Cluster.ROUND_ROBIN  # gRPC NACKs RANDOM
    if cluster.HasField("outlier_detection"):
        detection = grpc_outlier_detection(cluster.outlier_detection)
        if detection is None:
            out.ClearField("outlier_detection")
        else:
            out.outlier_detection.CopyFrom(detection)
    if mtls and match is not None:
        envoy_context = tls_pb2.UpstreamTlsContext()
        match.transport_socket.typed_config.Unpack(envoy_context)
        validation = envoy_context.common_tls_context.combined_validation_context.default_validation_context
        ids = [m.matcher.exact for m in validation.match_typed_subject_alt_names]
        context = tls_contexts.upstream_tls_context(
            envoy_context.sni, ids, source=tls_contexts.CertificateSource.provider_instance()
        )
        out.transport_socket.CopyFrom(tls_contexts.transport_socket(context))
    return out


def grpc_outlier_detection(
    envoy: outlier_detection_pb2.OutlierDetection,
) -> outlier_detection_pb2.OutlierDetection | None:
    """Outlier detection as gRPC implements it (gRFC A50): success-rate and failure-percentage
    ejection only. Consecutive-error ejection, which gRPC lacks, becomes failure-percentage
    ejection at 100 % with the consecutive count as request volume (an endpoint all of whose
    requests failed in an interval), unless failure percentage is already on. None when no
    kind is left (model/client_kinds.py reports what changed)."""
    out = outlier_detection_pb2.OutlierDetection()
    for name in ("interval", "base_ejection_time", "max_ejection_time", "max_ejection_percent",
                 "success_rate_minimum_hosts", "success_rate_request_volume",
                 "success_rate_stdev_factor", "enforcing_success_rate",
                 "failure_percentage_threshold", "failure_percentage_minimum_hosts",
                 "failure_percentage_request_volume", "enforcing_failure_percentage"):
        if envoy.HasField(name):
            getattr(out, name).CopyFrom(getattr(envoy, name))
    # Envoy's defaults, as gRPC reads them: success rate on (100) unless set, failure off.
    success_rate = not envoy.HasField("enforcing_success_rate") or envoy.enforcing_success_rate.value > 0
    failure_percentage = envoy.enforcing_failure_percentage.value > 0
    if not failure_percentage:
        counts = [
            getattr(envoy, name).value for name in ("consecutive_5xx", "consecutive_gateway_failure")
            if getattr(envoy, name).value and (
                # Envoy enforces 100 % when unset
                not envoy.HasField(f"enforcing_{name}") or getattr(envoy, f"enforcing_{name}").value > 0)
        ]
        if counts:
            out.failure_percentage_threshold.value = 100
            out.failure_percentage_request_volume.value = min(counts)
            out.failure_percentage_minimum_hosts.value = 1
            out.enforcing_failure_percentage.value = 100
            failure_percentage = True
    if not success_rate and not failure_percentage:
        return None
    return out


def client_listener(name: str, route_config_name: str) -> listener_pb2.Listener:
    """The api_listener gRPC asks for by its target name."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix="proxyless",
        rds=hcm_pb2.Rds(route_config_name=route_config_name, config_source=ads_config_source()),
        http_filters=[
            # Route-level faults of TrafficPolicies apply to gRPC clients too (gRFC A33).
            hcm_pb2.HttpFilter(name=names.FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())),
            hcm_pb2.HttpFilter(name=names.ROUTER_FILTER, typed_config=pack(router_pb2.Router())),
        ],
    )
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(manager))
    )


def is_client_target(name: str) -> bool:
    """A name gRPC may ask for as a target: `host` or `host:port`, no scheme or path."""
    return bool(name) and not name.startswith(SERVER_LISTENER_PREFIX) and "/" not in name and \
        "|" not in name


# Servers ------------------------------------------------------------------------------------


def server_listener(
    ip: str, port: int, mode: MtlsMode, authz: PortAuthz, trust_domain: str
) -> listener_pb2.Listener:
    """An xDS-enabled gRPC server's listener for one port (see module doc)."""
    config = route_pb2.RouteConfiguration(name=f"proxyless-server|{ip}:{port}")
    vhost = config.virtual_hosts.add(name=f"inbound|{port}", domains=["*"])
    route = vhost.routes.add(name=f"inbound|{port}")
    route.match.prefix = ""
    route.non_forwarding_action.SetInParent()
    for filter_name, packed in rbac.http_per_route(authz).items():
        vhost.typed_per_filter_config[filter_name].CopyFrom(packed)
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"proxyless_inbound_{port}",
        route_config=config,
        http_filters=[
            *rbac.http_filters(),
            hcm_pb2.HttpFilter(name=names.ROUTER_FILTER, typed_config=pack(router_pb2.Router())),
        ],
    )
    chain = listener_components_pb2.FilterChain(
        name=f"inbound-{port}",
        filters=[listener_components_pb2.Filter(
            name="envoy.filters.network.http_connection_manager", typed_config=pack(manager)
        )],
    )
    if mode.accepts_tls:
        context = tls_contexts.downstream_tls_context(
            trust_domain, tls_contexts.CertificateSource.provider_instance(), alpn=()
        )
        chain.transport_socket.CopyFrom(tls_contexts.transport_socket(context))
    return listener_pb2.Listener(
        name=server_listener_name(ip, port),
        address=socket(ip, port),
        filter_chains=[chain],
        traffic_direction=base_pb2.INBOUND,
    )


# Client listeners ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=10_000)  # names are client-chosen: bound what they make us keep
def client_listener_resource(name: str, route_config_name: str) -> Resource:
    """The serialized `client_listener`: a pure function of its two names, memoized."""
    return Resource.from_message(client_listener(name, route_config_name))
