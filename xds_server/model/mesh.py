"""The mesh model: services, endpoints, workloads and namespaces.

The intermediate representation between sources (Kubernetes, files) and translators (Envoy):
it knows neither. Every value is immutable with structural equality, so "did it change?" is
`==`, and a snapshot can be shared freely between the event loop and worker threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

CLUSTER_DOMAIN = "cluster.local"

# Port defaults of the sidecar (ARCHITECTURE.md "Ports"): operators know them from Istio.
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ENVOY_ADMIN_PORT = 15000


class AppProtocol(str, Enum):
    """What speaks on a port; decides HTTP routing vs TCP proxying and the upstream protocol."""

    HTTP = "http"
    HTTP2 = "http2"  # also gRPC: HTTP/2 to the upstream
    GRPC = "grpc"
    TCP = "tcp"

    @property
    def is_http(self) -> bool:
        return self is not AppProtocol.TCP

    @property
    def needs_http2(self) -> bool:
        return self in (AppProtocol.HTTP2, AppProtocol.GRPC)

    @classmethod
    def parse(cls, app_protocol: str | None, port_name: str = "") -> AppProtocol:
        """Kubernetes `appProtocol`, else the Istio port-name convention (`http-web`, `grpc`)."""
        text = (app_protocol or "").lower()
        text = text.removeprefix("kubernetes.io/").split("/")[-1]
        text = _ALIASES.get(text, text)
        if not text and port_name:
            text = port_name.lower().split("-")[0]
            text = _ALIASES.get(text, text)
        try:
            return cls(text)
        except ValueError:
            return cls.TCP

    @classmethod
    def declared(cls, app_protocol: str | None, port_name: str = "") -> bool:
        """Whether the port says what it speaks (an `appProtocol`, or a port name with a
        protocol prefix). Istio sniffs the others: capture-mode sidecars detect HTTP."""
        if app_protocol:
            return True
        prefix = port_name.lower().split("-")[0]
        return prefix in _ALIASES or prefix in {p.value for p in cls}


_ALIASES = {"h2c": "http2", "https": "tcp", "tls": "tcp", "mongo": "tcp", "redis": "tcp",
            "mysql": "tcp", "postgres": "tcp", "postgresql": "tcp"}


@dataclass(frozen=True, slots=True, order=True)
class ServiceKey:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    port: int
    name: str = ""
    target_port: int | str | None = None  # a number, a container port name, or None (= port)
    app_protocol: AppProtocol = AppProtocol.TCP
    # Undeclared (no appProtocol, no protocol-named port): proxied as TCP, and capture-mode
    # sidecars route it as HTTP when the HTTP inspector sees HTTP (Istio's sniffing).
    sniffed: bool = False

    @property
    def routes_http(self) -> bool:
        """Whether clients may route it as HTTP (declared HTTP, or sniffed)."""
        return self.app_protocol.is_http or self.sniffed


@dataclass(frozen=True, slots=True)
class Service:
    namespace: str
    name: str
    ports: tuple[ServicePort, ...] = ()
    cluster_ip: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    # Namespaces this service is exported to: None = the mesh default; "*" = everyone;
    # "." = its own namespace only (Istio's exportTo values).
    export_to: tuple[str, ...] | None = None
    headless: bool = False  # clusterIP: None (a missing clusterIP is no ClusterIP yet)

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.name)

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.port == number), None)


class EndpointCondition(str, Enum):
    READY = "ready"  # receives traffic
    SERVING_TERMINATING = "draining"  # terminating but still serving: used only if none ready
    NOT_READY = "not-ready"


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    zone: str = ""
    node: str = ""
    pod: str = ""  # the backing Pod's name, from targetRef

    @property
    def condition(self) -> EndpointCondition:
        if self.ready and not self.terminating:
            return EndpointCondition.READY
        if self.serving and self.terminating:
            return EndpointCondition.SERVING_TERMINATING
        return EndpointCondition.NOT_READY


@dataclass(frozen=True, slots=True)
class EndpointPort:
    name: str
    port: int
    app_protocol: AppProtocol = AppProtocol.TCP


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """One discovery.k8s.io/v1 EndpointSlice; a service's endpoints are the union of its slices."""

    namespace: str
    name: str
    service: str
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def service_key(self) -> ServiceKey:
        return ServiceKey(self.namespace, self.service)


def slice_port(service_port: ServicePort, endpoint_slice: EndpointSlice) -> int | None:
    """The endpoint port a service port maps to: matched by name, as kube-proxy does."""
    for port in endpoint_slice.ports:
        if port.name == service_port.name:
            return port.port
    if len(endpoint_slice.ports) == 1 and not service_port.name:
        return endpoint_slice.ports[0].port
    return None


@dataclass(frozen=True, slots=True)
class TcpUpstream:
    """An explicit local TCP binding: the sidecar listens on `local_port` and proxies to the
    service port (TCP upstreams are not reached through the HTTP outbound listener)."""

    local_port: int
    service: ServiceKey
    port: int


@dataclass(frozen=True, slots=True)
class Workload:
    """A Pod as the mesh sees it. `meshed` workloads run a sidecar and are reached through it;
    `proxyless` ones (gRPC with xDS credentials) are reached directly but speak mTLS."""

    namespace: str
    name: str
    ip: str = ""
    service_account: str = "default"
    labels: tuple[tuple[str, str], ...] = ()
    meshed: bool = False
    inbound_port: int = INBOUND_PORT
    outbound_port: int = OUTBOUND_PORT
    container_ports: tuple[tuple[str, int], ...] = ()  # (name, port) for named targetPorts
    tcp_upstreams: tuple[TcpUpstream, ...] = ()
    proxyless: bool = False
    # Traffic reaches the sidecar by capture (iptables, routed by original destination), the
    # default; False: the explicit mode (the app sends to the outbound port, Host picks).
    capture: bool = True

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def mtls_capable(self) -> bool:
        """Whether it can terminate the mesh's mTLS (a sidecar, or proxyless gRPC)."""
        return self.meshed or self.proxyless


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """Who a connected proxy is, from its node (and, once the CA lands, what it proved)."""

    namespace: str
    service_account: str = "default"
    pod: str = ""
    ip: str = ""
    labels: tuple[tuple[str, str], ...] = field(default=())
