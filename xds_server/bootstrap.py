"""The Envoy bootstrap for a sidecar: ADS to the server, node identity, admin on loopback.

With `cert_dir` (`xds-server bootstrap --tls --cert-dir DIR`), the xDS cluster is mutual TLS
with the X.509-SVID the workload agent (`xds-server agent --cert-dir DIR`) keeps in DIR: the
client certificate and the roots that verify the server are file-based SDS resources
(`path_config_source` with DIR as `watched_directory`), so each renewal applies to new
connections without a restart, and a reconnect after the pod's token expired still
authenticates (the certificate is the credential; the bootstrap holds no secret). The server's
certificate must name `server_name` (SNI and SAN check). This is the way off the host.

Several xDS addresses (replicas; `--xds-address A --xds-address B` or `A,B`) become the
endpoints of the one `xds-server` cluster: ADS and LRS stay one stream each, to one replica at
a time; when that replica goes away the stream fails, Envoy retries with backoff and the
round-robin load balancer picks the next endpoint, so the proxy fails over without a restart.
Envoy's own two-server failover (`ApiConfigSource` with two gRPC services) is behind a restart
feature flag and limited to a primary and one fallback, hence one cluster. With TLS every
replica must present a certificate for the one `server_name`.

With a token, the ADS gRPC service sends `authorization: Bearer <token>` as initial metadata
on every stream: the credential the server checks before it sends anything (xds/auth.py).
Envoy sends the literal value it was given, so the bootstrap must be written again when the
token is replaced (a workload token from `xds-server token create` lives as long as asked; a
projected Kubernetes token about an hour). The bootstrap then holds a secret: keep it 0600.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .config import parse_address
from .model.mesh import ENVOY_ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT

HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass
class SidecarSpec:
    namespace: str
    service_account: str
    pod: str
    pod_ip: str
    xds_address: str = "127.0.0.1:15010"  # one HOST:PORT, several comma-separated, or unix:/path
    admin_address: str = f"127.0.0.1:{ENVOY_ADMIN_PORT}"
    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    labels: dict[str, str] = field(default_factory=dict)
    delta: bool = True  # incremental xDS: only changes travel
    # "capture" (iptables send the pod's traffic to the sidecar) or "explicit" (the app sends
    # to the outbound port with the destination in Host): must match the pod's annotation.
    interception: str = "capture"
    token: str | None = field(default=None, repr=False)  # bearer token for the xDS server
    # A port (0: none) where Envoy answers `GET /healthz/ready` from outside the pod: its admin
    # `/ready` (200 once the first config is in place, 503 before), for the kubelet's probes,
    # without exposing the admin interface. Istio's sidecars use 15021 for the same.
    readiness_port: int = 0
    # Send load reports (LRS) to the server over the same cluster and credential as ADS:
    # requests, errors and in-flight per upstream cluster, at the interval the server sets.
    load_reports: bool = True
    # Mutual TLS to the server with the agent's files in this directory (see module doc),
    # the server's certificate checked for `server_name` (default: the xDS address's host).
    cert_dir: str | None = None
    server_name: str | None = None


MAX_XDS_ADDRESSES = 16  # replicas a bootstrap lists; a Service name covers larger fleets


def xds_addresses(value: str) -> list[str]:
    """The xDS endpoints in `value` (comma-separated), in order, without repeats."""
    out: list[str] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"--xds-address: an empty address in {value!r}")
        if item not in out:
            out.append(item)
    if len(out) > MAX_XDS_ADDRESSES:
        raise ValueError(f"--xds-address: at most {MAX_XDS_ADDRESSES} addresses, got {len(out)}")
    if len(out) > 1 and any(a.startswith("unix:") for a in out):
        raise ValueError("--xds-address: a Unix socket cannot be listed with other addresses")
    return out


def _socket(address: str, setting: str) -> dict[str, Any]:
    """HOST:PORT, or `unix:/path` for a Unix socket (Envoy's `pipe` address)."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{setting}: a Unix socket needs an absolute path, got {address!r}")
        return {"pipe": {"path": path}}
    host, port = parse_address(address, setting)
    return {"socket_address": {"address": host, "port_value": port}}


READINESS_PATH = "/healthz/ready"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "envoy.extensions.filters.http.router.v3.Router"


def _readiness(spec: SidecarSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """A static listener on all addresses of the pod answering only READINESS_PATH, with the
    admin interface's `/ready`, and the cluster that reaches the admin address."""
    if not 1 <= spec.readiness_port <= 65535:
        raise ValueError(f"--readiness-port: {spec.readiness_port} is not a port (1-65535)")
    taken = {spec.inbound_port, spec.outbound_port}
    if not spec.admin_address.startswith("unix:"):
        taken.add(parse_address(spec.admin_address, "--admin-address")[1])
    if spec.readiness_port in taken:
        raise ValueError(f"--readiness-port: {spec.readiness_port} is already a sidecar port")
    routes = [
        {"match": {"path": READINESS_PATH, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
         "route": {"cluster": "envoy-admin", "prefix_rewrite": "/ready", "timeout": "2s"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    listener = {
        "name": "readiness",
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": spec.readiness_port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": f"type.googleapis.com/{HCM}",
                "stat_prefix": "readiness",
                "route_config": {"name": "readiness", "virtual_hosts": [
                    {"name": "readiness", "domains": ["*"], "routes": routes}]},
                "http_filters": [{"name": "envoy.filters.http.router",
                                  "typed_config": {"@type": f"type.googleapis.com/{ROUTER}"}}],
            },
        }]}],
    }
    cluster = {
        "name": "envoy-admin",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "envoy-admin", "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _socket(spec.admin_address, "--admin-address")}}]}]},
    }
    return listener, cluster


TLS_SOCKET = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _file_sds(name: str, cert_dir: str, file_name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {
        "path_config_source": {"path": f"{cert_dir}/{file_name}",
                               "watched_directory": {"path": cert_dir}},
        "resource_api_version": "V3"}}


def xds_tls_socket(cert_dir: str, server_name: str) -> dict[str, Any]:
    """The xDS cluster's transport socket: the agent's certificate and roots through
    file-based SDS (ca/certdir.py names the files), the server checked for `server_name`."""
    from .ca.certdir import SDS_CA_FILE, SDS_CA_NAME, SDS_CERT_FILE, SDS_CERT_NAME

    if not cert_dir.startswith("/"):
        raise ValueError(f"--cert-dir: Envoy needs an absolute path, got {cert_dir!r}")
    cert_dir = cert_dir.rstrip("/") or "/"
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"type.googleapis.com/{TLS_SOCKET}",
            "sni": server_name,
            "common_tls_context": {
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [
                    _file_sds(SDS_CERT_NAME, cert_dir, SDS_CERT_FILE)],
                "combined_validation_context": {
                    "default_validation_context": {"match_typed_subject_alt_names": [
                        {"san_type": "IP_ADDRESS" if _is_ip(server_name) else "DNS",
                         "matcher": {"exact": server_name}}]},
                    "validation_context_sds_secret_config": _file_sds(SDS_CA_NAME, cert_dir, SDS_CA_FILE),
                },
            },
        },
    }


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def sidecar_bootstrap(spec: SidecarSpec) -> dict[str, Any]:
    """A bootstrap dict (write it as YAML or JSON). The node metadata is what the server uses
    to know the proxy: namespace, service account, pod, pod IP, sidecar ports, labels."""
    addresses = xds_addresses(spec.xds_address)
    unix = addresses[0].startswith("unix:")
    grpc_service: dict[str, Any] = {"envoy_grpc": {"cluster_name": "xds-server"}}
    if spec.token:
        token = spec.token.strip()
        if not token or any(c.isspace() for c in token):
            raise ValueError("the token must be one word (no spaces or newlines inside)")
        grpc_service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {token}"}]
    ads = {"ads": {}, "resource_api_version": "V3"}
    bootstrap: dict[str, Any] = {
        "node": {
            "id": f"{spec.pod}.{spec.namespace}",
            "cluster": f"{spec.service_account}.{spec.namespace}",
            "metadata": {
                "namespace": spec.namespace,
                "service_account": spec.service_account,
                "pod": spec.pod,
                "pod_ip": spec.pod_ip,
                "inbound_port": str(spec.inbound_port),
                "outbound_port": str(spec.outbound_port),
                "interception": spec.interception,
                "labels": dict(spec.labels),
            },
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if spec.delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": True,
            },
            "cds_config": copy.deepcopy(ads),  # separate objects: no YAML anchors in output
            "lds_config": copy.deepcopy(ads),
        },
        "static_resources": {
            "clusters": [
                {
                    "name": "xds-server",
                    "type": "STATIC" if unix else "STRICT_DNS",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "xds-server",
                        "endpoints": [{"lb_endpoints": [
                            {"endpoint": {"address": _socket(a, "--xds-address")}} for a in addresses]}],
                    },
                    "typed_extension_protocol_options": {
                        HTTP_PROTOCOL_OPTIONS: {
                            "@type": f"type.googleapis.com/{HTTP_PROTOCOL_OPTIONS}",
                            "explicit_http_config": {
                                "http2_protocol_options": {
                                    "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                                }
                            },
                        }
                    },
                }
            ]
        },
        "admin": {"address": _socket(spec.admin_address, "--admin-address")},
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {
                        # Route regexes from users can exceed RE2's default program size of
                        # 100, which would make Envoy reject the whole route configuration.
                        "re2.max_program_size.error_level": 32768,
                        "re2.max_program_size.warn_level": 1024,
                    },
                },
                {"name": "admin", "admin_layer": {}},
            ]
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                        "downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 50000,
                    },
                }
            ]
        },
    }
    if spec.load_reports:
        bootstrap["cluster_manager"] = {"load_stats_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [copy.deepcopy(grpc_service)],
        }}
    if spec.cert_dir is not None:
        if unix:
            raise ValueError("--tls: a Unix socket xDS address stays on the host; TLS is for HOST:PORT")
        hosts = {parse_address(a, "--xds-address")[0].strip("[]") for a in addresses}
        if spec.server_name is None and len(hosts) > 1:
            raise ValueError("--tls: the xDS addresses name different hosts; give --server-name, "
                             "the one name every replica's certificate carries")
        xds_cluster = bootstrap["static_resources"]["clusters"][0]
        xds_cluster["transport_socket"] = xds_tls_socket(spec.cert_dir, spec.server_name or hosts.pop())
    if spec.readiness_port:
        listener, cluster = _readiness(spec)
        bootstrap["static_resources"]["listeners"] = [listener]
        bootstrap["static_resources"]["clusters"].append(cluster)
    return bootstrap
