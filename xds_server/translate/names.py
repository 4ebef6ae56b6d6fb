"""Envoy resource names the translators agree on. Istio-shaped, so operators recognise them."""

from __future__ import annotations

from ..model.mesh import CLUSTER_DOMAIN, ServiceKey


def cluster_name(service: ServiceKey, port: int) -> str:
    """The outbound cluster for one service port, e.g. `outbound|8080||api.shop.svc.cluster.local`."""
    return f"outbound|{port}||{service.fqdn}"


def service_of_cluster(name: str) -> tuple[ServiceKey, int] | None:
    """The service and port of an outbound cluster name (`cluster_name`'s inverse), or None
    for any other cluster (inbound, passthrough, raw resources)."""
    kind, _, rest = name.partition("|")
    port, _, rest = rest.partition("|")
    _subset, _, fqdn = rest.partition("|")
    suffix = f".svc.{CLUSTER_DOMAIN}"
    if kind != "outbound" or not port.isdigit() or not fqdn.endswith(suffix):
        return None
    service, _, namespace = fqdn.removesuffix(suffix).partition(".")
    if not service or not namespace or "." in namespace:
        return None
    return ServiceKey(namespace, service), int(port)


def inbound_cluster_name(port: int, namespace: str = "", pod: str = "") -> str:
    """The sidecar's local cluster to its own app port. Named per proxy (the cache holds every
    proxy's resources side by side), e.g. `inbound|8080||shop/api-7d9f`."""
    return f"inbound|{port}||{namespace}/{pod}" if pod else f"inbound|{port}||"


def outbound_route_name(scope: str) -> str:
    """The route configuration every proxy of one scope (namespace view) shares."""
    return f"outbound|http|{scope}"


def proxyless_route_name(scope: str) -> str:
    """The same, translated for proxyless gRPC clients (translate/proxyless.py)."""
    return f"outbound|grpc|{scope}"


def inbound_route_name(namespace: str, pod: str) -> str:
    return f"inbound|http|{namespace}/{pod}"


def inbound_port_route_name(port: int, namespace: str, pod: str) -> str:
    """A capture-mode sidecar's route configuration of one HTTP app port."""
    return f"inbound|http|{port}|{namespace}/{pod}"


def capture_outbound_listener_name(namespace: str) -> str:
    """The outbound capture listener every capture-mode sidecar of a namespace shares."""
    return f"outbound|capture|{namespace}"


def outbound_listener_name(namespace: str, pod: str) -> str:
    return f"outbound|{namespace}/{pod}"


def inbound_listener_name(namespace: str, pod: str) -> str:
    return f"inbound|{namespace}/{pod}"


def tcp_listener_name(namespace: str, pod: str, local_port: int) -> str:
    return f"outbound|tcp|{local_port}|{namespace}/{pod}"


def proxy_names_prefix(namespace: str, pod: str) -> str:
    """Every per-proxy resource name ends with this suffix."""
    return f"|{namespace}/{pod}"


# HTTP filter names used in the HCMs and in per-route overrides.
FAULT_FILTER = "envoy.filters.http.fault"
LOCAL_RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
ROUTER_FILTER = "envoy.filters.http.router"
