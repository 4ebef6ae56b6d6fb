"""Kubernetes objects (plain dicts in the API server's JSON shape) to mesh model objects.

Pure functions shared by every Kubernetes-shaped source: the directory of YAML files and the
real API server. No I/O here. Each object is validated by its typed model (`kube_types/` for
the Kubernetes and Gateway API kinds, `api/v1alpha1/` for the project's own), then converted
to the model (the IR). Invalid input raises `ObjectError` naming the object and the field in
the user's own (camelCase) spelling, e.g. `spec.rules[0].backendRefs[1].weight`, and map keys
in brackets as Kubernetes itself does: `metadata.annotations[xds-server.io/export-to]`.

Unknown fields are ignored, as the API server's pruning would; what *is* read is checked as
strictly as the API server (or the Gateway API CRDs' validation) would, so a file that loads
here also applies to a real cluster.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError

from ..api.v1alpha1 import API_VERSION as POLICY_API_VERSION
from ..api.v1alpha1 import AuthorizationPolicySpec, MTLSPolicySpec, TrafficPolicySpec
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
from ..model.policy import TrafficPolicy
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
from ..model import netpol
from ..model.security import AuthorizationPolicy, MTLSPolicy
from ..model.store import MeshObject
from . import kube_types as k8s
from . import policies
from .kube_types import discovery, gateway, networking
from .kube_types.base import describe, is_dns_label
from .kube_types.meta import _timestamp
from .kube_types.discovery import SERVICE_NAME_LABEL
from .kube_types.gateway import GATEWAY_GROUP

EXPORT_TO_ANNOTATION = "xds-server.io/export-to"
INJECT_ANNOTATION = "sidecar.xds-server.io/inject"
INBOUND_PORT_ANNOTATION = "xds-server.io/inbound-port"
OUTBOUND_PORT_ANNOTATION = "xds-server.io/outbound-port"
TCP_UPSTREAMS_ANNOTATION = "xds-server.io/tcp-upstreams"
# A workload that is its own xDS client (gRPC with xDS credentials): no sidecar, but mTLS.
PROXYLESS_ANNOTATION = "xds-server.io/proxyless"
# How traffic reaches the sidecar: "capture" (iptables; the default) or "explicit" (the app
# sends to 127.0.0.1:15001 with the destination in Host, for hosts where capture is impossible).
INTERCEPTION_ANNOTATION = "sidecar.xds-server.io/interception"
INTERCEPTION_MODES = ("capture", "explicit")
# Containers that are the mesh sidecar: names operators already use for an Envoy sidecar.
SIDECAR_CONTAINERS = frozenset({"envoy", "envoy-proxy", "envoy-sidecar", "istio-proxy"})

__all__ = [
    "EXPORT_TO_ANNOTATION", "GATEWAY_GROUP", "INBOUND_PORT_ANNOTATION", "INJECT_ANNOTATION",
    "INTERCEPTION_ANNOTATION",
    "OUTBOUND_PORT_ANNOTATION", "PROXYLESS_ANNOTATION", "SERVICE_NAME_LABEL",
    "SIDECAR_CONTAINERS", "TCP_UPSTREAMS_ANNOTATION", "ObjectError", "convert",
]

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
    "NetworkPolicy": ("networking.k8s.io/v1",),
}

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


def _key(path: str, key: str) -> str:
    """A map key (label, annotation) in Kubernetes' field-path spelling."""
    return f"{path}[{key}]"


class _Object:
    """The identity of the object being converted; every failure names it."""

    def __init__(self, kind: str, namespace: str = "", name: str = "") -> None:
        self.kind, self.namespace, self.name = kind, namespace, name

    def fail(self, path: str, message: str) -> NoReturn:
        raise ObjectError(self.kind, self.namespace, self.name, path, message)

    def fail_annotation(self, key: str, message: str) -> NoReturn:
        self.fail(_key("metadata.annotations", key), message)


M = TypeVar("M", bound=BaseModel)


def _validate(o: _Object, model: type[M], data: dict[str, Any]) -> M:
    """`data` as `model`; a ValidationError becomes an ObjectError naming every field.
    The metadata is checked first and alone: the rest is about an object that exists."""
    meta_model = model.model_fields["metadata"].annotation
    assert isinstance(meta_model, type) and issubclass(meta_model, BaseModel)
    _checked(o, meta_model, data.get("metadata") or {}, "metadata")
    return _checked(o, model, data, "")


def _checked(o: _Object, model: type[M], data: Any, root: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        found = [(_under(root, path) if root else path, message)
                 for path, message in k8s.problems(model, e.errors())]
        (field, message), *more = found
        raise ObjectError(o.kind, o.namespace, o.name, field, message, more=more) from None


# Entry point ---------------------------------------------------------------------------------


def _text(o: _Object, value: Any, path: str, *, required: bool = False) -> str:
    if value is None or (required and value == ""):
        if required:
            o.fail(path, "required")
        return ""
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, (bool, int, float)) else ""
        o.fail(path, f"expected a string, got {describe(value)}{hint}")
    return value


def convert(obj: Any, *, default_namespace: str = "default") -> MeshObject:
    """One Kubernetes object to its model object. Raises ObjectError (`warning` set for kinds
    the mesh does not read)."""
    if not isinstance(obj, dict):
        raise ObjectError("", "", "", "", f"expected an object (a mapping), got {describe(obj)}")
    # Who the object is comes first, so that every later error can name it.
    o = _Object("")
    o.kind = _text(o, obj.get("kind"), "kind", required=True)
    api_version = _text(o, obj.get("apiVersion"), "apiVersion", required=True)
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        o.fail("metadata", f"expected a mapping, got {describe(meta)}")
    meta = meta or {}
    o.name = _text(o, meta.get("name"), "metadata.name")
    if o.kind != "Namespace":
        o.namespace = _text(o, meta.get("namespace"), "metadata.namespace") or default_namespace
    converter = _CONVERTERS.get(o.kind)
    if converter is None:
        message = f"{api_version} {o.kind} is not read by the mesh; skipped"
        raise ObjectError(o.kind, o.namespace, o.name, "kind", message, warning=True)
    if api_version not in _API_VERSIONS[o.kind]:
        expected = " or ".join(_API_VERSIONS[o.kind])
        o.fail("apiVersion", f"{o.kind} must be {expected}, not {api_version!r}")
    if not o.name:
        o.fail("metadata.name", "required")
    if o.kind != "Namespace" and not is_dns_label(o.namespace):
        o.fail("metadata.namespace", f"{o.namespace!r} is not a valid namespace name")
    return converter(o, obj)


def _labels(labels: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# Core kinds ----------------------------------------------------------------------------------


def _namespace(o: _Object, obj: dict[str, Any]) -> Namespace:
    ns = _validate(o, k8s.Namespace, obj)
    return Namespace(name=o.name, labels=_labels(ns.metadata.labels))


def _service(o: _Object, obj: dict[str, Any]) -> Service:
    service = _validate(o, k8s.Service, obj)
    ports = tuple(
        ServicePort(p.port, p.name, p.target_port, AppProtocol.parse(p.app_protocol or None, p.name),
                    sniffed=not AppProtocol.declared(p.app_protocol or None, p.name))
        for p in service.spec.ports
        if p.protocol == "TCP"  # the sidecar proxies TCP (and HTTP over it) only
    )
    cluster_ip = service.spec.cluster_ip
    if cluster_ip not in ("", "None"):
        try:
            ipaddress.ip_address(cluster_ip)
        except ValueError:
            o.fail("spec.clusterIP", f"{cluster_ip!r} is not an IP address (or None, for a headless service)")
    return Service(
        namespace=o.namespace,
        name=o.name,
        ports=ports,
        cluster_ip=None if cluster_ip in ("", "None") else cluster_ip,
        headless=cluster_ip == "None",
        labels=_labels(service.metadata.labels),
        export_to=_export_to(o, service.metadata.annotations),
    )


def _export_to(o: _Object, annotations: dict[str, str]) -> tuple[str, ...] | None:
    if EXPORT_TO_ANNOTATION not in annotations:
        return None
    entries = {e.strip() for e in annotations[EXPORT_TO_ANNOTATION].split(",") if e.strip()}
    if not entries:
        message = "empty: write '*', '.', or a comma-separated list of namespaces"
        o.fail_annotation(EXPORT_TO_ANNOTATION, message)
    for entry in sorted(entries):
        if entry not in ("*", ".") and not is_dns_label(entry):
            o.fail_annotation(EXPORT_TO_ANNOTATION, f"{entry!r} is not '*', '.' or a namespace name")
    return tuple(sorted(entries))  # sorted: the same set is the same value


def _endpoint_slice(o: _Object, obj: dict[str, Any]) -> EndpointSlice:
    slice_ = _validate(o, k8s.EndpointSlice, obj)
    if slice_.address_type == "FQDN":
        # Envoy's EDS takes IP addresses only: an FQDN endpoint would make every proxy reject
        # the whole ClusterLoadAssignment. Skipped on purpose, and said so.
        message = "FQDN EndpointSlices are not read by the mesh (endpoints must be IPs); skipped"
        raise ObjectError(o.kind, o.namespace, o.name, "addressType", message, warning=True)
    ports = tuple(
        EndpointPort(p.name, p.port, AppProtocol.parse(p.app_protocol or None, p.name))
        for p in slice_.ports
        # No port means "every port": nothing to route to by number.
        if p.port is not None and p.protocol == "TCP"
    )
    return EndpointSlice(
        o.namespace,
        o.name,
        slice_.metadata.labels[SERVICE_NAME_LABEL],
        ports,
        tuple(_endpoint(e) for e in slice_.endpoints),
    )


def _endpoint(endpoint: discovery.Endpoint) -> Endpoint:
    target = endpoint.target_ref
    return Endpoint(
        address=endpoint.addresses[0],
        ready=endpoint.conditions.ready,
        serving=endpoint.conditions.serving,
        terminating=endpoint.conditions.terminating,
        zone=endpoint.zone,
        node=endpoint.node_name,
        pod=target.name if target is not None and target.kind == "Pod" else "",
    )


def _pod(o: _Object, obj: dict[str, Any]) -> Workload:
    pod = _validate(o, k8s.Pod, obj)
    annotations = pod.metadata.annotations
    ip = pod.status.ip
    if pod.status.phase in ("Succeeded", "Failed"):
        ip = ""  # a finished pod's IP may already belong to a new pod
    account = pod.spec.service_account_name or pod.spec.service_account or "default"

    sidecar = False
    ports: dict[tuple[str, int], None] = {}
    # Native sidecars are init containers that keep running; other init containers end.
    running = [c for c in pod.spec.init_containers if c.restart_policy == "Always"]
    for container in running + pod.spec.containers:
        if container.name in SIDECAR_CONTAINERS:
            sidecar = True
            continue  # the proxy's own ports are not the app's
        for port in container.ports:
            if port.protocol == "TCP":
                ports[(port.name, port.container_port)] = None

    inject = _flag(o, annotations, INJECT_ANNOTATION)
    # An explicit "false" opts out even with a proxy container (e.g. while debugging it).
    meshed = inject is True or (inject is None and sidecar)
    proxyless = _flag(o, annotations, PROXYLESS_ANNOTATION) is True
    if proxyless and meshed:
        message = "a proxyless workload has no sidecar: remove the sidecar or this annotation"
        o.fail_annotation(PROXYLESS_ANNOTATION, message)
    inbound = _port_annotation(o, annotations, INBOUND_PORT_ANNOTATION) or INBOUND_PORT
    outbound = _port_annotation(o, annotations, OUTBOUND_PORT_ANNOTATION) or OUTBOUND_PORT
    if inbound == outbound:
        o.fail_annotation(OUTBOUND_PORT_ANNOTATION, f"the same port as the inbound port ({inbound})")
    interception = annotations.get(INTERCEPTION_ANNOTATION, "capture")
    if interception not in INTERCEPTION_MODES:
        o.fail_annotation(INTERCEPTION_ANNOTATION, f"must be one of {', '.join(INTERCEPTION_MODES)}, not {interception!r}")
    return Workload(
        namespace=o.namespace,
        name=o.name,
        ip=ip,
        service_account=account,
        labels=_labels(pod.metadata.labels),
        meshed=meshed,
        inbound_port=inbound,
        outbound_port=outbound,
        container_ports=tuple(ports),
        tcp_upstreams=_tcp_upstreams(o, annotations, (inbound, outbound)),
        proxyless=proxyless,
        capture=interception == "capture",
    )


def _flag(o: _Object, annotations: dict[str, str], key: str) -> bool | None:
    value = annotations.get(key)
    if value is None:
        return None
    if value not in ("true", "false"):
        o.fail_annotation(key, f'expected "true" or "false", got {value!r}')
    return value == "true"


def _port_annotation(o: _Object, annotations: dict[str, str], key: str) -> int | None:
    if key not in annotations:
        return None
    text = annotations[key].strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        o.fail_annotation(key, f"expected a port number, got {annotations[key]!r}")
    return int(text)


def _tcp_upstreams(
    o: _Object, annotations: dict[str, str], taken: tuple[int, int]
) -> tuple[TcpUpstream, ...]:
    if TCP_UPSTREAMS_ANNOTATION not in annotations:
        return ()
    upstreams: dict[int, TcpUpstream] = {}
    entries = annotations[TCP_UPSTREAMS_ANNOTATION].split(",")
    for entry in filter(None, (e.strip() for e in entries)):
        match = _TCP_UPSTREAM.match(entry)
        if not match:
            o.fail_annotation(TCP_UPSTREAMS_ANNOTATION, f"{entry!r} is not LOCALPORT=SERVICE[.NAMESPACE]:PORT")
        local, port = int(match["local"]), int(match["port"])
        if not (1 <= local <= 65535 and 1 <= port <= 65535):
            o.fail_annotation(TCP_UPSTREAMS_ANNOTATION, f"{entry!r}: ports must be 1-65535")
        if local in upstreams or local in taken:
            o.fail_annotation(TCP_UPSTREAMS_ANNOTATION, f"{entry!r}: local port {local} is already used")
        service = ServiceKey(match["ns"] or o.namespace, match["svc"])
        upstreams[local] = TcpUpstream(local, service, port)
    return tuple(upstreams[port] for port in sorted(upstreams))


# Gateway API routes (GAMMA) ------------------------------------------------------------------


def _route(o: _Object, obj: dict[str, Any]) -> Route:
    route: gateway.HTTPRoute | gateway.GRPCRoute
    if o.kind == "GRPCRoute":
        route = _validate(o, k8s.GRPCRoute, obj)
        rules = tuple(_grpc_rule(o, rule) for rule in route.spec.rules)
    else:
        route = _validate(o, k8s.HTTPRoute, obj)
        rules = tuple(_http_rule(o, rule) for rule in route.spec.rules)
    parents = (
        ParentRef(ServiceKey(ref.namespace or o.namespace, ref.name), ref.port)
        for ref in route.spec.parent_refs
        if ref.is_service
    )
    return Route(
        kind=o.kind,
        namespace=o.namespace,
        name=o.name,
        parents=tuple(dict.fromkeys(parents)),
        hostnames=tuple(route.spec.hostnames),
        rules=rules or (RouteRule(),),  # the API's default: one rule matching every request
        created=route.metadata.creation_timestamp,
    )


def _http_rule(o: _Object, rule: gateway.HTTPRouteRule) -> RouteRule:
    matches = tuple(_http_match(m) for m in rule.matches) or (RouteMatch(path=PathMatch()),)
    timeouts = rule.timeouts
    return _rule(
        o, rule, matches,
        request_timeout=timeouts.request,
        backend_timeout=timeouts.backend_request,
        retry=_retry(rule.retry),
    )


def _grpc_rule(o: _Object, rule: gateway.GRPCRouteRule) -> RouteRule:
    matches = tuple(_grpc_match(m) for m in rule.matches) or (RouteMatch(path=PathMatch()),)
    return _rule(o, rule, matches)


def _rule(
    o: _Object,
    rule: gateway.HTTPRouteRule | gateway.GRPCRouteRule,
    matches: tuple[RouteMatch, ...],
    *,
    request_timeout: float | None = None,
    backend_timeout: float | None = None,
    retry: Retry | None = None,
) -> RouteRule:
    found: dict[str, Any] = {}
    mirrors: list[Mirror] = []
    for item in rule.filters:
        settings = item.settings
        if isinstance(settings, gateway.RequestMirror):
            mirrors.append(Mirror(_backend(o, settings.backend_ref), settings.share))
        elif isinstance(settings, gateway.RequestRedirect):
            found[item.type] = _redirect(settings)
        elif isinstance(settings, gateway.URLRewrite):
            found[item.type] = Rewrite(hostname=settings.hostname, path=_path_modifier(settings.path))
        elif isinstance(settings, gateway.HeaderModifier):
            found[item.type] = _header_modifier(settings)
    return RouteRule(
        matches=matches,
        backends=tuple(_backend(o, ref, ref.weight) for ref in rule.backend_refs),
        request_headers=found.get("RequestHeaderModifier"),
        response_headers=found.get("ResponseHeaderModifier"),
        redirect=found.get("RequestRedirect"),
        rewrite=found.get("URLRewrite"),
        mirrors=tuple(mirrors),
        request_timeout=request_timeout,
        backend_timeout=backend_timeout,
        retry=retry,
        name=rule.name,
    )


def _http_match(match: gateway.HTTPRouteMatch) -> RouteMatch:
    return RouteMatch(
        path=PathMatch(MatchType(match.path.type), match.path.value),
        headers=_value_matches(match.headers),
        query=_value_matches(match.query_params),
        method=match.method,
    )


def _grpc_match(match: gateway.GRPCRouteMatch) -> RouteMatch:
    """A gRPC method match is a match on the HTTP/2 path `/package.Service/Method`."""
    headers = _value_matches(match.headers)
    method = match.method
    if method is None:
        return RouteMatch(path=PathMatch(), headers=headers)
    service, name = method.service, method.method
    if method.type == "Exact":
        if service and name:
            return RouteMatch(path=PathMatch(MatchType.EXACT, f"/{service}/{name}"), headers=headers)
        if service:
            return RouteMatch(path=PathMatch(MatchType.PREFIX, f"/{service}/"), headers=headers)
        regex = f"/[^/]+/{re.escape(name)}"
        return RouteMatch(path=PathMatch(MatchType.REGEX, regex), headers=headers)
    regex = f"/{service or '[^/]+'}/{name or '[^/]+'}"
    return RouteMatch(path=PathMatch(MatchType.REGEX, regex), headers=headers)


def _value_matches(matches: list[gateway.ValueMatch]) -> tuple[ValueMatch, ...]:
    return tuple(ValueMatch(m.name, m.value, MatchType(m.type)) for m in matches)


def _path_modifier(value: gateway.PathModifier | None) -> PathModifier | None:
    return None if value is None else PathModifier(PathModifierType(value.type), value.value)


def _redirect(value: gateway.RequestRedirect) -> Redirect:
    return Redirect(
        scheme=value.scheme,
        hostname=value.hostname or None,
        path=_path_modifier(value.path),
        port=value.port,
        status_code=value.status_code,
    )


def _header_modifier(settings: gateway.HeaderModifier) -> HeaderModifier:
    return HeaderModifier(
        set=tuple((h.name, h.value) for h in settings.set),
        add=tuple((h.name, h.value) for h in settings.add),
        remove=tuple(settings.remove),
    )


def _backend(o: _Object, ref: gateway.BackendObjectReference, weight: int = 1) -> BackendRef:
    headers: dict[str, HeaderModifier] = {}
    for item in getattr(ref, "filters", ()):  # a BackendRef's own filters (not a mirror's ref)
        if isinstance(item.settings, gateway.HeaderModifier):
            headers[item.type] = _header_modifier(item.settings)
    return BackendRef(
        ServiceKey(ref.namespace or o.namespace, ref.name), ref.port, weight,
        request_headers=headers.get("RequestHeaderModifier"),
        response_headers=headers.get("ResponseHeaderModifier"),
    )


def _retry(value: gateway.Retry | None) -> Retry | None:
    if value is None:
        return None
    return Retry(
        attempts=Retry().attempts if value.attempts is None else value.attempts,
        codes=tuple(dict.fromkeys(value.codes)),
        backoff=value.backoff,
    )


# The project's own policy kinds --------------------------------------------------------------


def _spec(o: _Object, obj: dict[str, Any], model: Any, *, required: bool = True) -> Any:
    """The pydantic spec of one of the project's kinds; errors name the user's fields."""
    if obj.get("spec") is None:
        if required:
            o.fail("spec", "required")
        obj = {**obj, "spec": {}}
    try:
        return model.model_validate(obj["spec"])
    except ValidationError as e:
        problems = [(_under("spec", k8s.field_path(model, err["loc"])), _pydantic_message(err))
                    for err in e.errors()]
        (field, message), *more = problems
        raise ObjectError(o.kind, o.namespace, o.name, field, message, more=more) from None


def _traffic_policy(o: _Object, obj: dict[str, Any]) -> TrafficPolicy:
    spec = policies.traffic_policy_spec(_spec(o, obj, TrafficPolicySpec))
    return TrafficPolicy(namespace=o.namespace, name=o.name, spec=spec, created=_created(obj))


def _mtls_policy(o: _Object, obj: dict[str, Any]) -> MTLSPolicy:
    spec = policies.mtls_policy_spec(_spec(o, obj, MTLSPolicySpec, required=False))
    return MTLSPolicy(namespace=o.namespace, name=o.name, spec=spec, created=_created(obj))


def _authorization_policy(o: _Object, obj: dict[str, Any]) -> AuthorizationPolicy:
    # `spec: {}` is meaningful (Istio's allow-nothing policy), so a missing spec is that too.
    spec = policies.authorization_policy_spec(_spec(o, obj, AuthorizationPolicySpec, required=False))
    return AuthorizationPolicy(namespace=o.namespace, name=o.name, spec=spec, created=_created(obj))


# NetworkPolicy (networking.k8s.io/v1) --------------------------------------------------------


def _network_policy(o: _Object, obj: dict[str, Any]) -> netpol.NetworkPolicy:
    policy = _validate(o, k8s.NetworkPolicy, obj)
    spec = policy.spec
    assert spec is not None and spec.pod_selector is not None  # validated

    def rules(items: list[networking.IngressRule] | list[networking.EgressRule]) -> tuple[netpol.PolicyRule, ...]:
        out = []
        for item in items:
            peers = item.from_ if isinstance(item, networking.IngressRule) else item.to
            out.append(netpol.PolicyRule(
                peers=tuple(_peer(p) for p in peers),
                ports=tuple(netpol.PolicyPort(p.protocol, p.port, p.end_port) for p in item.ports),
            ))
        return tuple(out)

    return netpol.NetworkPolicy(
        namespace=o.namespace,
        name=o.name,
        pod_selector=_selector(spec.pod_selector),
        policy_types=spec.types(),
        ingress=rules(spec.ingress),
        egress=rules(spec.egress),
        created=_created(obj),
    )


def _selector(selector: networking.LabelSelector) -> netpol.LabelSelector:
    return netpol.LabelSelector(
        match_labels=_labels(selector.match_labels),
        expressions=tuple(
            netpol.Requirement(r.key, r.operator or "Exists", tuple(r.values))
            for r in selector.match_expressions
        ),
    )


def _peer(peer: networking.Peer) -> netpol.Peer:
    if peer.ip_block is not None:
        assert peer.ip_block.cidr is not None  # validated
        return netpol.Peer(ip_block=netpol.IpBlock(peer.ip_block.cidr, tuple(peer.ip_block.except_)))
    return netpol.Peer(
        pod_selector=_selector(peer.pod_selector) if peer.pod_selector is not None else None,
        namespace_selector=_selector(peer.namespace_selector) if peer.namespace_selector is not None else None,
    )


def _under(root: str, path: str) -> str:
    return f"{root}.{path}" if path and not path.startswith("[") else root + path


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


def _created(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return _timestamp(meta.get("creationTimestamp"))


_CONVERTERS: dict[str, Callable[[_Object, dict[str, Any]], MeshObject]] = {
    "Namespace": _namespace,
    "Service": _service,
    "EndpointSlice": _endpoint_slice,
    "Pod": _pod,
    "HTTPRoute": _route,
    "GRPCRoute": _route,
    "TrafficPolicy": _traffic_policy,
    "MTLSPolicy": _mtls_policy,
    "AuthorizationPolicy": _authorization_policy,
    "NetworkPolicy": _network_policy,
}
