"""Kubernetes objects (plain dicts in the API server's JSON shape) to mesh model objects.

Pure functions shared by every Kubernetes-shaped source: the directory of YAML files and the
real API server. No I/O here. Invalid input raises `ObjectError` naming the object and the
field in the user's own (camelCase) spelling, e.g. `spec.rules[0].backendRefs[1].weight`, and
map keys in brackets as Kubernetes itself does: `metadata.annotations[xds-server.io/export-to]`.

Unknown fields are ignored, as the API server's pruning would; what *is* read is checked as
strictly as the API server (or the Gateway API CRDs' validation) would, so a file that loads
here also applies to a real cluster.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from pydantic import ValidationError

from ..model.mesh import (
    INBOUND_PORT,
    OUTBOUND_PORT,
    AppProtocol,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Namespace,
    Service,
    ServiceKey,
    ServicePort,
    TcpUpstream,
    Workload,
)
from ..api.v1alpha1 import API_VERSION as POLICY_API_VERSION
from ..api.v1alpha1 import AuthorizationPolicySpec, MTLSPolicySpec, TrafficPolicySpec, parse_duration
from ..model.policy import TrafficPolicy
from ..model.security import AuthorizationPolicy, MTLSPolicy
from ..model.routes import (
    BackendRef,
    HeaderModifier,
    MatchType,
    Mirror,
    ParentRef,
    PathMatch,
    PathModifier,
    PathModifierType,
    Redirect,
    Retry,
    Rewrite,
    Route,
    RouteMatch,
    RouteRule,
    ValueMatch,
)
from ..model.store import MeshObject
from . import policies

EXPORT_TO_ANNOTATION = "xds-server.io/export-to"
INJECT_ANNOTATION = "sidecar.xds-server.io/inject"
INBOUND_PORT_ANNOTATION = "xds-server.io/inbound-port"
OUTBOUND_PORT_ANNOTATION = "xds-server.io/outbound-port"
TCP_UPSTREAMS_ANNOTATION = "xds-server.io/tcp-upstreams"
# A workload that is its own xDS client (gRPC with xDS credentials): no sidecar, but mTLS.
PROXYLESS_ANNOTATION = "xds-server.io/proxyless"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Containers that are the mesh sidecar: names operators already use for an Envoy sidecar.
SIDECAR_CONTAINERS = frozenset({"envoy", "envoy-proxy", "envoy-sidecar", "istio-proxy"})

GATEWAY_GROUP = "gateway.networking.k8s.io"
# Older Gateway API versions have the same shape for the fields read here.
_ROUTE_VERSIONS = {
    "HTTPRoute": ("v1", "v1beta1"),
    "GRPCRoute": ("v1", "v1alpha2"),
}
_API_VERSIONS: dict[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "Service": ("v1",),
    "Pod": ("v1",),
    "EndpointSlice": ("discovery.k8s.io/v1",),
    "HTTPRoute": tuple(f"{GATEWAY_GROUP}/{v}" for v in _ROUTE_VERSIONS["HTTPRoute"]),
    "GRPCRoute": tuple(f"{GATEWAY_GROUP}/{v}" for v in _ROUTE_VERSIONS["GRPCRoute"]),
    "TrafficPolicy": (POLICY_API_VERSION,),
    "MTLSPolicy": (POLICY_API_VERSION,),
    "AuthorizationPolicy": (POLICY_API_VERSION,),
}

_PROTOCOLS = ("TCP", "UDP", "SCTP")
_PATH_TYPES = tuple(t.value for t in MatchType)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # IANA_SVC_NAME, plus "a letter"
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$")  # Gateway API HTTPHeaderName
_GRPC_SERVICE = re.compile(r"^\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$", re.IGNORECASE)
_GRPC_METHOD = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")
_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
_TCP_UPSTREAM = re.compile(
    r"^(?P<local>\d+)=(?P<svc>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
    r"(?:\.(?P<ns>[a-z0-9]([-a-z0-9]*[a-z0-9])?))?:(?P<port>\d+)$"
)


class ObjectError(Exception):
    """An object that cannot be used, and where in it the problem is.

    `warning` marks objects that are skipped on purpose (kinds the mesh does not read), not
    broken. `more` holds further (field_path, message) problems of the same object.
    """

    def __init__(
        self,
        kind: str,
        namespace: str,
        name: str,
        field_path: str,
        message: str,
        *,
        warning: bool = False,
        more: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(kind, namespace, name, field_path, message)
        self.kind = kind
        self.namespace = namespace
        self.name = name
        self.field_path = field_path
        self.message = message
        self.warning = warning
        self.more = tuple(more)

    @property
    def problems(self) -> list[tuple[str, str]]:
        """Every (field_path, message) of this object, the first one first."""
        return [(self.field_path, self.message), *self.more]

    @property
    def object(self) -> str:
        """'Kind namespace/name' as far as known."""
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return " ".join(part for part in (self.kind, where) if part)

    def __str__(self) -> str:
        return ": ".join(p for p in (self.object, self.field_path, self.message) if p)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _key(path: str, key: str) -> str:
    """A map key (label, annotation) in Kubernetes' field-path spelling."""
    return f"{path}[{key}]"


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


class _Reader:
    """Typed access to one object's fields; every failure names the object and the field."""

    def __init__(self, kind: str, namespace: str = "", name: str = "") -> None:
        self.kind, self.namespace, self.name = kind, namespace, name

    def fail(self, path: str, message: str) -> NoReturn:
        raise ObjectError(self.kind, self.namespace, self.name, path, message)

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {_describe(value)}")
        return value

    def items(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_describe(value)}")
        return value

    def string(self, value: Any, path: str, *, default: str = "", required: bool = False) -> str:
        if value is None or (required and value == ""):
            if required:
                self.fail(path, "required")
            return default
        if not isinstance(value, str):
            hint = " (quote it)" if isinstance(value, (bool, int, float)) else ""
            self.fail(path, f"expected a string, got {_describe(value)}{hint}")
        return value

    def integer(self, value: Any, path: str, *, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_describe(value)}")
        if not low <= value <= high:
            self.fail(path, f"{value} is out of range [{low}, {high}]")
        return value

    def optional_int(self, value: Any, path: str, *, low: int, high: int) -> int | None:
        return None if value is None else self.integer(value, path, low=low, high=high)

    def port(self, value: Any, path: str) -> int:
        if value is None:
            self.fail(path, "required")
        return self.integer(value, path, low=1, high=65535)

    def boolean(self, value: Any, path: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(path, f"expected true or false, got {_describe(value)}")
        return value

    def choice(self, value: Any, path: str, choices: Iterable[str], default: str | None) -> str:
        """One of `choices`; `default` when unset, or required when there is no default."""
        text = self.string(value, path, default=default or "", required=default is None)
        options = tuple(choices)
        if text not in options:
            self.fail(path, f"{text!r} is not one of {', '.join(options)}")
        return text

    def duration(self, value: Any, path: str) -> float | None:
        if value is None:
            return None
        try:
            return parse_duration(value)
        except ValueError as e:
            self.fail(path, str(e))

    def string_map(self, value: Any, path: str) -> dict[str, str]:
        result = {}
        for key, item in self.mapping(value, path).items():
            if not isinstance(key, str):  # YAML reads `1:` or `true:` as non-strings
                self.fail(_key(path, str(key)), f"a key must be a string, got {_describe(key)}")
            result[key] = self.string(item, _key(path, key), default="")
        return result


# Entry point ---------------------------------------------------------------------------------


def convert(obj: Any, *, default_namespace: str = "default") -> MeshObject:
    """One Kubernetes object to its model object. Raises ObjectError (`warning` set for kinds
    the mesh does not read)."""
    if not isinstance(obj, dict):
        raise ObjectError("", "", "", "", f"expected an object (a mapping), got {_describe(obj)}")
    top = _Reader("")
    kind = top.string(obj.get("kind"), "kind", required=True)
    top.kind = kind
    api_version = top.string(obj.get("apiVersion"), "apiVersion", required=True)
    meta = top.mapping(obj.get("metadata"), "metadata")
    top.name = top.string(meta.get("name"), "metadata.name", default="")
    if kind != "Namespace":
        ns = top.string(meta.get("namespace"), "metadata.namespace", default="")
        top.namespace = ns or default_namespace
    converter = _CONVERTERS.get(kind)
    if converter is None:
        message = f"{api_version} {kind} is not read by the mesh; skipped"
        raise ObjectError(kind, top.namespace, top.name, "kind", message, warning=True)
    if api_version not in _API_VERSIONS[kind]:
        expected = " or ".join(_API_VERSIONS[kind])
        top.fail("apiVersion", f"{kind} must be {expected}, not {api_version!r}")
    if not top.name:
        top.fail("metadata.name", "required")
    # The API server's name rules: these names become DNS names and Envoy resource names.
    if kind in ("Namespace", "Service"):
        if not _DNS_LABEL.match(top.name) or len(top.name) > 63:
            message = f"{top.name!r} is not a DNS label (a-z, 0-9, '-'; 63 at most)"
            top.fail("metadata.name", message)
    elif not _DNS_SUBDOMAIN.match(top.name) or len(top.name) > 253:
        top.fail("metadata.name", f"{top.name!r} is not a DNS name (a-z, 0-9, '-', '.')")
    if kind != "Namespace" and (not _DNS_LABEL.match(top.namespace) or len(top.namespace) > 63):
        top.fail("metadata.namespace", f"{top.namespace!r} is not a valid namespace name")
    return converter(top, obj, meta)


def _labels(r: _Reader, meta: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(r.string_map(meta.get("labels"), "metadata.labels").items()))


def _annotations(r: _Reader, meta: dict[str, Any]) -> dict[str, str]:
    return r.string_map(meta.get("annotations"), "metadata.annotations")


def _created(meta: dict[str, Any]) -> str:
    value = meta.get("creationTimestamp")
    # Unquoted timestamps in YAML arrive as datetimes; keep the API server's RFC 3339 spelling
    # so ordering by this string is ordering by time.
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return value if isinstance(value, str) else ""


# Core kinds ----------------------------------------------------------------------------------


def _namespace(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> Namespace:
    return Namespace(name=r.name, labels=_labels(r, meta))


def _service(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> Service:
    spec = r.mapping(obj.get("spec"), "spec")
    ports: list[ServicePort] = []
    seen: set[int] = set()
    for i, item in enumerate(r.items(spec.get("ports"), "spec.ports")):
        path = f"spec.ports[{i}]"
        item = r.mapping(item, path)
        number = r.port(item.get("port"), f"{path}.port")
        name = r.string(item.get("name"), f"{path}.name")
        protocol = r.choice(item.get("protocol"), f"{path}.protocol", _PROTOCOLS, "TCP")
        app = r.string(item.get("appProtocol"), f"{path}.appProtocol")
        target = _target_port(r, item.get("targetPort"), f"{path}.targetPort")
        if protocol != "TCP":
            continue  # the sidecar proxies TCP (and HTTP over it) only
        if number in seen:
            r.fail(f"{path}.port", f"duplicate port {number}")
        seen.add(number)
        ports.append(ServicePort(number, name, target, AppProtocol.parse(app or None, name)))
    cluster_ip = r.string(spec.get("clusterIP"), "spec.clusterIP")
    return Service(
        namespace=r.namespace,
        name=r.name,
        ports=tuple(ports),
        cluster_ip=None if cluster_ip in ("", "None") else cluster_ip,  # "None": headless
        labels=_labels(r, meta),
        export_to=_export_to(r, _annotations(r, meta)),
    )


def _target_port(r: _Reader, value: Any, path: str) -> int | str | None:
    if value is None or isinstance(value, (int, bool)):
        return None if value is None else r.port(value, path)
    name = r.string(value, path)
    if name.isdigit():  # the API server treats "8080" as a name and rejects it
        r.fail(path, f"{name!r} is a string: write the port number without quotes")
    if not _PORT_NAME.match(name) or len(name) > 15 or not re.search("[a-z]", name):
        r.fail(path, f"{name!r} is not a port name (lowercase letters, digits, '-'; 15 at most)")
    return name


def _export_to(r: _Reader, annotations: dict[str, str]) -> tuple[str, ...] | None:
    if EXPORT_TO_ANNOTATION not in annotations:
        return None
    path = _key("metadata.annotations", EXPORT_TO_ANNOTATION)
    entries = {e.strip() for e in annotations[EXPORT_TO_ANNOTATION].split(",") if e.strip()}
    if not entries:
        r.fail(path, "empty: write '*', '.', or a comma-separated list of namespaces")
    for entry in sorted(entries):
        if entry not in ("*", ".") and not _DNS_LABEL.match(entry):
            r.fail(path, f"{entry!r} is not '*', '.' or a namespace name")
    return tuple(sorted(entries))  # sorted: the same set is the same value


def _endpoint_slice(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> EndpointSlice:
    labels = dict(_labels(r, meta))
    service = labels.get(SERVICE_NAME_LABEL, "")
    if not service:
        path = _key("metadata.labels", SERVICE_NAME_LABEL)
        r.fail(path, "required: the name of the Service this slice belongs to")
    family = r.choice(obj.get("addressType"), "addressType", ("IPv4", "IPv6", "FQDN"), "IPv4")
    if family == "FQDN":
        # Envoy's EDS takes IP addresses only: an FQDN endpoint would make every proxy reject
        # the whole ClusterLoadAssignment. Skipped on purpose, and said so.
        message = "FQDN EndpointSlices are not read by the mesh (endpoints must be IPs); skipped"
        raise ObjectError(r.kind, r.namespace, r.name, "addressType", message, warning=True)
    ports: list[EndpointPort] = []
    for i, item in enumerate(r.items(obj.get("ports"), "ports")):
        path = f"ports[{i}]"
        item = r.mapping(item, path)
        name = r.string(item.get("name"), f"{path}.name")
        protocol = r.choice(item.get("protocol"), f"{path}.protocol", _PROTOCOLS, "TCP")
        app = r.string(item.get("appProtocol"), f"{path}.appProtocol")
        # No port means "every port" (rare, e.g. hand-made slices): nothing to route to by number.
        if item.get("port") is None or protocol != "TCP":
            continue
        number = r.port(item.get("port"), f"{path}.port")
        ports.append(EndpointPort(name, number, AppProtocol.parse(app or None, name)))
    endpoints = tuple(
        _endpoint(r, item, f"endpoints[{i}]", family)
        for i, item in enumerate(r.items(obj.get("endpoints"), "endpoints"))
    )
    return EndpointSlice(r.namespace, r.name, service, tuple(ports), endpoints)


def _endpoint(r: _Reader, item: Any, path: str, family: str = "IPv4") -> Endpoint:
    item = r.mapping(item, path)
    addresses = r.items(item.get("addresses"), f"{path}.addresses")
    if not addresses:
        r.fail(f"{path}.addresses", "required: at least one address")
    address = r.string(addresses[0], f"{path}.addresses[0]", required=True)
    # As the API server checks it: an address of the slice's family (Envoy would reject
    # anything else, for every proxy that sees the service).
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        parsed = None
    if parsed is None or parsed.version != (4 if family == "IPv4" else 6):
        r.fail(f"{path}.addresses[0]", f"{address!r} is not an {family} address")
    conditions = r.mapping(item.get("conditions"), f"{path}.conditions")
    # Per the EndpointSlice API: unset ready and serving mean true, unset terminating false.
    ready = r.boolean(conditions.get("ready"), f"{path}.conditions.ready", True)
    serving = r.boolean(conditions.get("serving"), f"{path}.conditions.serving", True)
    terminating = r.boolean(conditions.get("terminating"), f"{path}.conditions.terminating", False)
    target = r.mapping(item.get("targetRef"), f"{path}.targetRef")
    target_kind = r.string(target.get("kind"), f"{path}.targetRef.kind")
    pod = r.string(target.get("name"), f"{path}.targetRef.name") if target_kind == "Pod" else ""
    return Endpoint(
        address=address,
        ready=ready,
        serving=serving,
        terminating=terminating,
        zone=r.string(item.get("zone"), f"{path}.zone"),
        node=r.string(item.get("nodeName"), f"{path}.nodeName"),
        pod=pod,
    )


def _pod(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> Workload:
    spec = r.mapping(obj.get("spec"), "spec")
    status = r.mapping(obj.get("status"), "status")
    annotations = _annotations(r, meta)
    ip = r.string(status.get("podIP"), "status.podIP")
    ip_field = "status.podIP"
    if not ip:
        pod_ips = r.items(status.get("podIPs"), "status.podIPs")
        if pod_ips:
            first = r.mapping(pod_ips[0], "status.podIPs[0]")
            ip = r.string(first.get("ip"), "status.podIPs[0].ip")
            ip_field = "status.podIPs[0].ip"
    if ip:
        # The sidecar's listeners bind to it: Envoy would reject them all for a typo.
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            r.fail(ip_field, f"{ip!r} is not an IP address")
    if status.get("phase") in ("Succeeded", "Failed"):
        ip = ""  # a finished pod's IP may already belong to a new pod
    account = r.string(spec.get("serviceAccountName"), "spec.serviceAccountName")
    account = account or r.string(spec.get("serviceAccount"), "spec.serviceAccount") or "default"

    sidecar = False
    ports: dict[tuple[str, int], None] = {}
    for field in ("initContainers", "containers"):
        for i, container in enumerate(r.items(spec.get(field), f"spec.{field}")):
            path = f"spec.{field}[{i}]"
            container = r.mapping(container, path)
            name = r.string(container.get("name"), f"{path}.name")
            # Native sidecars are init containers that keep running; other init containers end.
            if field == "initContainers" and container.get("restartPolicy") != "Always":
                continue
            if name in SIDECAR_CONTAINERS:
                sidecar = True
                continue  # the proxy's own ports are not the app's
            for j, port in enumerate(r.items(container.get("ports"), f"{path}.ports")):
                ppath = f"{path}.ports[{j}]"
                port = r.mapping(port, ppath)
                number = r.port(port.get("containerPort"), f"{ppath}.containerPort")
                protocol = r.choice(port.get("protocol"), f"{ppath}.protocol", _PROTOCOLS, "TCP")
                if protocol == "TCP":
                    ports[(r.string(port.get("name"), f"{ppath}.name"), number)] = None

    inject = annotations.get(INJECT_ANNOTATION)
    if inject is not None and inject not in ("true", "false"):
        path = _key("metadata.annotations", INJECT_ANNOTATION)
        r.fail(path, f'expected "true" or "false", got {inject!r}')
    # An explicit "false" opts out even with a proxy container (e.g. while debugging it).
    meshed = inject == "true" or (inject is None and sidecar)
    proxyless = annotations.get(PROXYLESS_ANNOTATION)
    if proxyless is not None and proxyless not in ("true", "false"):
        path = _key("metadata.annotations", PROXYLESS_ANNOTATION)
        r.fail(path, f'expected "true" or "false", got {proxyless!r}')
    if proxyless == "true" and meshed:
        path = _key("metadata.annotations", PROXYLESS_ANNOTATION)
        r.fail(path, "a proxyless workload has no sidecar: remove the sidecar or this annotation")
    inbound = _port_annotation(r, annotations, INBOUND_PORT_ANNOTATION) or INBOUND_PORT
    outbound = _port_annotation(r, annotations, OUTBOUND_PORT_ANNOTATION) or OUTBOUND_PORT
    if inbound == outbound:
        path = _key("metadata.annotations", OUTBOUND_PORT_ANNOTATION)
        r.fail(path, f"the same port as the inbound port ({inbound})")
    return Workload(
        namespace=r.namespace,
        name=r.name,
        ip=ip,
        service_account=account,
        labels=_labels(r, meta),
        meshed=meshed,
        inbound_port=inbound,
        outbound_port=outbound,
        container_ports=tuple(ports),
        tcp_upstreams=_tcp_upstreams(r, annotations, (inbound, outbound)),
        proxyless=proxyless == "true",
    )


def _port_annotation(r: _Reader, annotations: dict[str, str], key: str) -> int | None:
    if key not in annotations:
        return None
    text = annotations[key].strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        path = _key("metadata.annotations", key)
        r.fail(path, f"expected a port number, got {annotations[key]!r}")
    return int(text)


def _tcp_upstreams(
    r: _Reader, annotations: dict[str, str], taken: tuple[int, int]
) -> tuple[TcpUpstream, ...]:
    if TCP_UPSTREAMS_ANNOTATION not in annotations:
        return ()
    path = _key("metadata.annotations", TCP_UPSTREAMS_ANNOTATION)
    upstreams: dict[int, TcpUpstream] = {}
    entries = annotations[TCP_UPSTREAMS_ANNOTATION].split(",")
    for entry in filter(None, (e.strip() for e in entries)):
        match = _TCP_UPSTREAM.match(entry)
        if not match:
            r.fail(path, f"{entry!r} is not LOCALPORT=SERVICE[.NAMESPACE]:PORT")
        local, port = int(match["local"]), int(match["port"])
        if not (1 <= local <= 65535 and 1 <= port <= 65535):
            r.fail(path, f"{entry!r}: ports must be 1-65535")
        if local in upstreams or local in taken:
            r.fail(path, f"{entry!r}: local port {local} is already used")
        service = ServiceKey(match["ns"] or r.namespace, match["svc"])
        upstreams[local] = TcpUpstream(local, service, port)
    return tuple(upstreams[port] for port in sorted(upstreams))


# Gateway API routes (GAMMA) ------------------------------------------------------------------


def _route(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> Route:
    grpc = r.kind == "GRPCRoute"
    spec = r.mapping(obj.get("spec"), "spec")
    refs = r.items(spec.get("parentRefs"), "spec.parentRefs")
    if not refs:
        r.fail("spec.parentRefs", "required: the Service this route applies to (kind: Service)")
    parents: list[ParentRef] = []
    for i, ref in enumerate(refs):
        path = f"spec.parentRefs[{i}]"
        ref = r.mapping(ref, path)
        group = r.string(ref.get("group"), f"{path}.group", default=GATEWAY_GROUP)
        kind = r.string(ref.get("kind"), f"{path}.kind", default="Gateway")
        name = r.string(ref.get("name"), f"{path}.name", required=True)
        namespace = r.string(ref.get("namespace"), f"{path}.namespace") or r.namespace
        port = r.optional_int(ref.get("port"), f"{path}.port", low=1, high=65535)
        if kind == "Service" and group in ("", "core"):  # GAMMA; a Gateway's routes are not ours
            parents.append(ParentRef(ServiceKey(namespace, name), port))
    hostnames = tuple(
        r.string(h, f"spec.hostnames[{i}]", required=True)
        for i, h in enumerate(r.items(spec.get("hostnames"), "spec.hostnames"))
    )
    rules = tuple(
        _rule(r, rule, f"spec.rules[{i}]", grpc)
        for i, rule in enumerate(r.items(spec.get("rules"), "spec.rules"))
    )
    return Route(
        kind=r.kind,
        namespace=r.namespace,
        name=r.name,
        parents=tuple(dict.fromkeys(parents)),
        hostnames=hostnames,
        rules=rules or (RouteRule(),),  # the API's default: one rule matching every request
        created=_created(meta),
    )


_HTTP_FILTERS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
    "RequestMirror": "requestMirror",
}
_GRPC_FILTERS = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")


def _rule(r: _Reader, rule: Any, path: str, grpc: bool) -> RouteRule:
    rule = r.mapping(rule, path)
    match_of = _grpc_match if grpc else _http_match
    matches = tuple(
        match_of(r, m, f"{path}.matches[{i}]")
        for i, m in enumerate(r.items(rule.get("matches"), f"{path}.matches"))
    ) or (RouteMatch(path=PathMatch()),)

    found: dict[str, Any] = {}
    mirrors: list[Mirror] = []
    for i, item in enumerate(r.items(rule.get("filters"), f"{path}.filters")):
        fpath = f"{path}.filters[{i}]"
        item = r.mapping(item, fpath)
        ftype = r.string(item.get("type"), f"{fpath}.type", required=True)
        supported = _GRPC_FILTERS if grpc else tuple(_HTTP_FILTERS)
        if ftype not in supported:
            r.fail(f"{fpath}.type", f"{ftype!r} is not supported; use {', '.join(supported)}")
        field = _HTTP_FILTERS[ftype]
        if item.get(field) is None:
            r.fail(f"{fpath}.{field}", f"required for type {ftype}")
        cpath = f"{fpath}.{field}"
        if ftype == "RequestMirror":
            mirrors.append(_mirror(r, item[field], cpath))
            continue
        if ftype in found:  # Gateway API allows each of these at most once per rule
            r.fail(f"{fpath}.type", f"{ftype} may appear only once in a rule")
        if ftype == "RequestRedirect":
            found[ftype] = _redirect(r, item[field], cpath)
        elif ftype == "URLRewrite":
            found[ftype] = _rewrite(r, item[field], cpath, matches, f"{path}.matches")
        else:
            found[ftype] = _header_modifier(r, item[field], cpath)
    if "RequestRedirect" in found and "URLRewrite" in found:
        r.fail(f"{path}.filters", "RequestRedirect and URLRewrite cannot be used together")

    backends = tuple(
        _backend(r, ref, f"{path}.backendRefs[{i}]", weighted=True)
        for i, ref in enumerate(r.items(rule.get("backendRefs"), f"{path}.backendRefs"))
    )
    if backends and "RequestRedirect" in found:
        r.fail(f"{path}.backendRefs", "a rule with a RequestRedirect filter has no backendRefs")

    request_timeout = backend_timeout = None
    retry = None
    if grpc:
        for field in ("timeouts", "retry"):
            if rule.get(field) is not None:
                r.fail(f"{path}.{field}", "GRPCRoute has no such field; use a TrafficPolicy")
    else:
        timeouts = r.mapping(rule.get("timeouts"), f"{path}.timeouts")
        request_timeout = r.duration(timeouts.get("request"), f"{path}.timeouts.request")
        backend_path = f"{path}.timeouts.backendRequest"
        backend_timeout = r.duration(timeouts.get("backendRequest"), backend_path)
        if request_timeout and backend_timeout and backend_timeout > request_timeout:
            r.fail(backend_path, "must not be longer than timeouts.request")
        retry = _retry(r, rule.get("retry"), f"{path}.retry")
    return RouteRule(
        matches=matches,
        backends=backends,
        request_headers=found.get("RequestHeaderModifier"),
        response_headers=found.get("ResponseHeaderModifier"),
        redirect=found.get("RequestRedirect"),
        rewrite=found.get("URLRewrite"),
        mirrors=tuple(mirrors),
        request_timeout=request_timeout,
        backend_timeout=backend_timeout,
        retry=retry,
        name=r.string(rule.get("name"), f"{path}.name"),
    )


def _http_match(r: _Reader, match: Any, path: str) -> RouteMatch:
    match = r.mapping(match, path)
    spec = r.mapping(match.get("path"), f"{path}.path")
    kind = r.choice(spec.get("type"), f"{path}.path.type", _PATH_TYPES, "PathPrefix")
    value = r.string(spec.get("value"), f"{path}.path.value", default="/")
    if kind == MatchType.REGEX.value:
        _check_regex(r, value, f"{path}.path.value")
    elif not value.startswith("/"):
        r.fail(f"{path}.path.value", f"{value!r} must start with '/'")
    method = match.get("method")
    if method is not None:
        method = r.choice(method, f"{path}.method", _HTTP_METHODS, "GET")
    return RouteMatch(
        path=PathMatch(MatchType(kind), value),
        headers=_value_matches(r, match.get("headers"), f"{path}.headers", header=True),
        query=_value_matches(r, match.get("queryParams"), f"{path}.queryParams", header=False),
        method=method,
    )


def _grpc_match(r: _Reader, match: Any, path: str) -> RouteMatch:
    """A gRPC method match is a match on the HTTP/2 path `/package.Service/Method`."""
    match = r.mapping(match, path)
    headers = _value_matches(r, match.get("headers"), f"{path}.headers", header=True)
    if match.get("method") is None:
        return RouteMatch(path=PathMatch(), headers=headers)
    method = r.mapping(match["method"], f"{path}.method")
    mpath = f"{path}.method"
    kind = r.choice(method.get("type"), f"{mpath}.type", ("Exact", "RegularExpression"), "Exact")
    service = r.string(method.get("service"), f"{mpath}.service")
    name = r.string(method.get("method"), f"{mpath}.method")
    if not service and not name:
        r.fail(mpath, "set service, method, or both")
    if kind == "Exact":
        if service and not _GRPC_SERVICE.match(service):
            r.fail(f"{mpath}.service", f"{service!r} is not a gRPC service name (package.Service)")
        if name and not _GRPC_METHOD.match(name):
            r.fail(f"{mpath}.method", f"{name!r} is not a gRPC method name")
        if service and name:
            exact = PathMatch(MatchType.EXACT, f"/{service}/{name}")
            return RouteMatch(path=exact, headers=headers)
        if service:
            return RouteMatch(path=PathMatch(MatchType.PREFIX, f"/{service}/"), headers=headers)
        regex = f"/[^/]+/{re.escape(name)}"
        return RouteMatch(path=PathMatch(MatchType.REGEX, regex), headers=headers)
    for value, field in ((service, "service"), (name, "method")):
        if value:
            _check_regex(r, value, f"{mpath}.{field}")
    regex = f"/{service or '[^/]+'}/{name or '[^/]+'}"
    return RouteMatch(path=PathMatch(MatchType.REGEX, regex), headers=headers)


def _value_matches(r: _Reader, value: Any, path: str, *, header: bool) -> tuple[ValueMatch, ...]:
    result: list[ValueMatch] = []
    for i, item in enumerate(r.items(value, path)):
        ipath = f"{path}[{i}]"
        item = r.mapping(item, ipath)
        kind = r.choice(item.get("type"), f"{ipath}.type", ("Exact", "RegularExpression"), "Exact")
        name = r.string(item.get("name"), f"{ipath}.name", required=True)
        if header and not _HEADER_NAME.match(name):
            r.fail(f"{ipath}.name", f"{name!r} is not a valid header name")
        text = r.string(item.get("value"), f"{ipath}.value", required=True)
        if kind == "RegularExpression":
            _check_regex(r, text, f"{ipath}.value")
        result.append(ValueMatch(name, text, MatchType(kind)))
    return tuple(result)


def _check_regex(r: _Reader, value: str, path: str) -> None:
    # Envoy uses RE2; Python's engine accepts nearly all of RE2's syntax, so a pattern Python
    # rejects would almost surely be NACKed by every proxy.
    if not value:
        r.fail(path, "required")
    try:
        re.compile(value)
    except re.error as e:
        r.fail(path, f"invalid regular expression {value!r}: {e}")


def _header_modifier(r: _Reader, value: Any, path: str) -> HeaderModifier:
    value = r.mapping(value, path)

    def pairs(field: str) -> tuple[tuple[str, str], ...]:
        seen: set[str] = set()
        result = []
        for i, item in enumerate(r.items(value.get(field), f"{path}.{field}")):
            ipath = f"{path}.{field}[{i}]"
            item = r.mapping(item, ipath)
            name = _header_name(r, item.get("name"), f"{ipath}.name")
            if name.lower() in seen:
                r.fail(f"{ipath}.name", f"header {name!r} appears twice")
            seen.add(name.lower())
            result.append((name, r.string(item.get("value"), f"{ipath}.value", required=True)))
        return tuple(result)

    remove = tuple(
        _header_name(r, name, f"{path}.remove[{i}]")
        for i, name in enumerate(r.items(value.get("remove"), f"{path}.remove"))
    )
    return HeaderModifier(set=pairs("set"), add=pairs("add"), remove=remove)


def _header_name(r: _Reader, value: Any, path: str) -> str:
    name = r.string(value, path, required=True)
    if not _HEADER_NAME.match(name):
        r.fail(path, f"{name!r} is not a valid header name")
    return name


def _path_modifier(r: _Reader, value: Any, path: str) -> PathModifier | None:
    if value is None:
        return None
    value = r.mapping(value, path)
    kind = r.choice(value.get("type"), f"{path}.type", [t.value for t in PathModifierType], None)
    field = "replaceFullPath" if kind == PathModifierType.FULL.value else "replacePrefixMatch"
    text = r.string(value.get(field), f"{path}.{field}", required=True)
    if not text.startswith("/"):
        r.fail(f"{path}.{field}", f"{text!r} must start with '/'")
    return PathModifier(PathModifierType(kind), text)


def _redirect(r: _Reader, value: Any, path: str) -> Redirect:
    value = r.mapping(value, path)
    scheme = value.get("scheme")
    if scheme is not None:
        scheme = r.choice(scheme, f"{path}.scheme", ("http", "https"), "http")
    hostname = r.string(value.get("hostname"), f"{path}.hostname") or None
    status = value.get("statusCode", 302)
    if status not in (301, 302, 303, 307, 308) or isinstance(status, bool):
        r.fail(f"{path}.statusCode", f"{status!r} is not one of 301, 302, 303, 307, 308")
    return Redirect(
        scheme=scheme,
        hostname=hostname,
        path=_path_modifier(r, value.get("path"), f"{path}.path"),
        port=r.optional_int(value.get("port"), f"{path}.port", low=1, high=65535),
        status_code=status,
    )


def _rewrite(
    r: _Reader, value: Any, path: str, matches: tuple[RouteMatch, ...], matches_path: str
) -> Rewrite:
    value = r.mapping(value, path)
    modifier = _path_modifier(r, value.get("path"), f"{path}.path")
    # Gateway API: replacing a prefix needs exactly one PathPrefix match to know the prefix.
    if modifier is not None and modifier.type is PathModifierType.PREFIX:
        match = matches[0].path if len(matches) == 1 else None
        if match is None or match.type is not MatchType.PREFIX:
            message = f"ReplacePrefixMatch needs exactly one PathPrefix match in {matches_path}"
            r.fail(f"{path}.path", message)
    hostname = r.string(value.get("hostname"), f"{path}.hostname") or None
    return Rewrite(hostname=hostname, path=modifier)


def _backend(r: _Reader, ref: Any, path: str, *, weighted: bool) -> BackendRef:
    ref = r.mapping(ref, path)
    group = r.string(ref.get("group"), f"{path}.group")
    kind = r.string(ref.get("kind"), f"{path}.kind", default="Service")
    if kind != "Service" or group not in ("", "core"):
        what = f"{group}/{kind}" if group else kind
        r.fail(f"{path}.kind", f"only Services can be backends, not {what}")
    name = r.string(ref.get("name"), f"{path}.name", required=True)
    namespace = r.string(ref.get("namespace"), f"{path}.namespace") or r.namespace
    port = r.optional_int(ref.get("port"), f"{path}.port", low=1, high=65535)
    weight = 1
    if weighted:
        if ref.get("weight") is not None:
            weight = r.integer(ref["weight"], f"{path}.weight", low=0, high=1_000_000)
        if r.items(ref.get("filters"), f"{path}.filters"):
            r.fail(f"{path}.filters", "not supported on a backendRef; put filters on the rule")
    return BackendRef(ServiceKey(namespace, name), port, weight)


def _mirror(r: _Reader, value: Any, path: str) -> Mirror:
    value = r.mapping(value, path)
    if value.get("backendRef") is None:
        r.fail(f"{path}.backendRef", "required")
    backend = _backend(r, value["backendRef"], f"{path}.backendRef", weighted=False)
    if value.get("percent") is not None and value.get("fraction") is not None:
        r.fail(path, "set percent or fraction, not both")
    percent = 100.0
    if value.get("percent") is not None:
        percent = float(r.integer(value["percent"], f"{path}.percent", low=0, high=100))
    elif value.get("fraction") is not None:
        fraction = r.mapping(value["fraction"], f"{path}.fraction")
        denominator = fraction.get("denominator", 100)
        denominator = r.integer(denominator, f"{path}.fraction.denominator", low=1, high=2**31 - 1)
        numerator = fraction.get("numerator")
        numerator = r.integer(numerator, f"{path}.fraction.numerator", low=0, high=denominator)
        percent = numerator * 100.0 / denominator
    return Mirror(backend, percent)


def _retry(r: _Reader, value: Any, path: str) -> Retry | None:
    if value is None:
        return None
    value = r.mapping(value, path)
    attempts = value.get("attempts")
    if attempts is not None:
        attempts = r.integer(attempts, f"{path}.attempts", low=0, high=100)
    codes = tuple(
        r.integer(code, f"{path}.codes[{i}]", low=400, high=599)
        for i, code in enumerate(r.items(value.get("codes"), f"{path}.codes"))
    )
    return Retry(
        attempts=Retry().attempts if attempts is None else attempts,
        codes=tuple(dict.fromkeys(codes)),
        backoff=r.duration(value.get("backoff"), f"{path}.backoff"),
    )


# The project's own policy kinds --------------------------------------------------------------


def _spec(r: _Reader, obj: dict[str, Any], model: Any, *, required: bool = True) -> Any:
    """The pydantic spec of one of the project's kinds; errors name the user's fields."""
    if obj.get("spec") is None:
        if required:
            r.fail("spec", "required")
        obj = {**obj, "spec": {}}
    try:
        return model.model_validate(obj["spec"])
    except ValidationError as e:
        problems = [(_loc_path("spec", err["loc"]), _pydantic_message(err)) for err in e.errors()]
        (field, message), *more = problems
        raise ObjectError(r.kind, r.namespace, r.name, field, message, more=more) from None


def _traffic_policy(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> TrafficPolicy:
    spec = policies.traffic_policy_spec(_spec(r, obj, TrafficPolicySpec))
    return TrafficPolicy(namespace=r.namespace, name=r.name, spec=spec, created=_created(meta))


def _mtls_policy(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> MTLSPolicy:
    spec = policies.mtls_policy_spec(_spec(r, obj, MTLSPolicySpec, required=False))
    return MTLSPolicy(namespace=r.namespace, name=r.name, spec=spec, created=_created(meta))


def _authorization_policy(r: _Reader, obj: dict[str, Any], meta: dict[str, Any]) -> AuthorizationPolicy:
    # `spec: {}` is meaningful (Istio's allow-nothing policy), so a missing spec is that too.
    spec = policies.authorization_policy_spec(_spec(r, obj, AuthorizationPolicySpec, required=False))
    return AuthorizationPolicy(namespace=r.namespace, name=r.name, spec=spec, created=_created(meta))


def _loc_path(root: str, loc: tuple[int | str, ...]) -> str:
    path = root
    for step in loc:
        # pydantic adds union-member tags such as "function-after[...]"; users never wrote them
        if isinstance(step, str) and ("[" in step or "(" in step):
            continue
        if isinstance(step, str) and not step.isidentifier():  # a map key (a port, a label)
            path = _key(path, step)
            continue
        path = _join(path, step)
    return path


def _pydantic_message(err: Any) -> str:
    kind, message = err["type"], err["msg"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        return "unknown field"
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind in ("literal_error", "enum"):
        message += f", got {err.get('input')!r}"
    return message[:1].lower() + message[1:]


_CONVERTERS: dict[str, Callable[[_Reader, dict[str, Any], dict[str, Any]], MeshObject]] = {
    "Namespace": _namespace,
    "Service": _service,
    "EndpointSlice": _endpoint_slice,
    "Pod": _pod,
    "HTTPRoute": _route,
    "GRPCRoute": _route,
    "TrafficPolicy": _traffic_policy,
    "MTLSPolicy": _mtls_policy,
    "AuthorizationPolicy": _authorization_policy,
}
