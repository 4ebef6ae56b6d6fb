"""Kubernetes objects (wire-shaped dicts) to mesh model objects, and the errors users see."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
import yaml

from xds_server.model.mesh import (
    AppProtocol,
    Endpoint,
    EndpointCondition,
    EndpointPort,
    EndpointSlice,
    Namespace,
    Service,
    ServiceKey,
    ServicePort,
    TcpUpstream,
    Workload,
)
from xds_server.model.policy import TrafficPolicy
from xds_server.model.routes import (
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
from xds_server.sources.k8s_objects import ObjectError, convert


def obj(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


def error_of(data: Any) -> ObjectError:
    with pytest.raises(ObjectError) as info:
        convert(data)
    return info.value


def with_(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with `path` set to `value` (removed if None). Steps are separated by
    "/", list indexes are numbers, and "~" stands for a "/" inside a key (annotation names)."""
    data = copy.deepcopy(data)
    steps = [int(p) if p.isdigit() else p.replace("~", "/") for p in path.split("/")]
    *parents, last = steps
    node: Any = data
    for step in parents:
        node = node[step]
    if value is None and isinstance(node, dict):
        node.pop(last, None)
    else:
        node[last] = value
    return data


# Namespace and Service ------------------------------------------------------------------------


def test_namespace_keeps_its_labels() -> None:
    ns = convert(obj("""
        apiVersion: v1
        kind: Namespace
        metadata: {name: shop, labels: {tenant: retail}}
    """))
    assert ns == Namespace("shop", (("tenant", "retail"),))


SERVICE = obj("""
    apiVersion: v1
    kind: Service
    metadata:
      name: api
      namespace: shop
      labels: {app: api}
      annotations: {xds-server.io/export-to: "shop, ., billing"}
    spec:
      clusterIP: 10.96.0.10
      ports:
        - {name: http-web, port: 80, targetPort: 8080}
        - {name: admin, port: 81, targetPort: admin, appProtocol: kubernetes.io/h2c}
        - {name: grpc, port: 9090}
        - {name: db, port: 5432, appProtocol: postgresql}
        - {name: dns, port: 53, protocol: UDP}
""")


def test_service_ports_protocols_and_export() -> None:
    assert convert(SERVICE) == Service(
        namespace="shop",
        name="api",
        ports=(
            ServicePort(80, "http-web", 8080, AppProtocol.HTTP),  # Istio port-name convention
            ServicePort(81, "admin", "admin", AppProtocol.HTTP2),  # appProtocol wins
            ServicePort(9090, "grpc", None, AppProtocol.GRPC),
            ServicePort(5432, "db", None, AppProtocol.TCP),
        ),  # UDP is not proxied by the sidecar
        cluster_ip="10.96.0.10",
        labels=(("app", "api"),),
        export_to=(".", "billing", "shop"),
    )


def test_service_defaults() -> None:
    service = convert(obj("""
        apiVersion: v1
        kind: Service
        metadata: {name: api}
        spec: {clusterIP: None, ports: [{port: 80}]}
    """))
    # No appProtocol, no protocol in the port name: proxied as TCP, HTTP sniffed (Istio).
    assert service == Service("default", "api", (ServicePort(80, "", None, AppProtocol.TCP, sniffed=True),),
                              headless=True)
    assert service.export_to is None  # the mesh default, not "nobody"


@pytest.mark.parametrize(("app_protocol", "name", "protocol", "sniffed"), [
    (None, "", AppProtocol.TCP, True),
    (None, "web", AppProtocol.TCP, True),
    (None, "http-web", AppProtocol.HTTP, False),
    (None, "tcp-db", AppProtocol.TCP, False),
    (None, "postgres", AppProtocol.TCP, False),
    ("kubernetes.io/h2c", "", AppProtocol.HTTP2, False),
    ("example.com/custom", "http", AppProtocol.TCP, False),  # declared, not one we route
])
def test_a_port_that_does_not_declare_its_protocol_is_sniffed(
    app_protocol: str | None, name: str, protocol: AppProtocol, sniffed: bool
) -> None:
    port: dict[str, Any] = {"port": 80, "name": name}
    if app_protocol:
        port["appProtocol"] = app_protocol
    service = convert({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                       "spec": {"ports": [port]}})
    assert (service.ports[0].app_protocol, service.ports[0].sniffed) == (protocol, sniffed)


def test_service_with_a_duplicate_port_or_a_malformed_cluster_ip_names_the_field() -> None:
    service = obj("""
        apiVersion: v1
        kind: Service
        metadata: {name: api, namespace: shop}
        spec: {clusterIP: 10.96.0.10, ports: [{port: 80, name: a}, {port: 81, name: b}]}
    """)
    assert convert(service).cluster_ip == "10.96.0.10"
    error = error_of(with_(service, "spec/ports/1/port", 80))
    assert error.field_path == "spec.ports[1].port"
    assert "duplicate port 80" in error.message
    error = error_of(with_(service, "spec/clusterIP", "10.96.0"))
    assert error.field_path == "spec.clusterIP"
    assert "not an IP address" in error.message
    assert convert(with_(service, "spec/clusterIP", "fd00::10")).cluster_ip == "fd00::10"


@pytest.mark.parametrize("value, expected", [("*", ("*",)), (".", (".",))])
def test_service_export_to_everyone_or_own_namespace(value: str, expected: tuple[str, ...]) -> None:
    data = with_(SERVICE, "metadata/annotations/xds-server.io~export-to", value)
    assert convert(data).export_to == expected


# EndpointSlice --------------------------------------------------------------------------------


SLICE = obj("""
    apiVersion: discovery.k8s.io/v1
    kind: EndpointSlice
    metadata:
      name: api-abc12
      namespace: shop
      labels: {kubernetes.io/service-name: api}
    addressType: IPv4
    ports:
      - {name: http, port: 8080, appProtocol: http}
      - {name: grpc, port: 9090}
    endpoints:
      - addresses: [10.0.0.1, 10.0.0.9]
        conditions: {ready: true, serving: true, terminating: false}
        zone: zone-a
        nodeName: node-1
        targetRef: {kind: Pod, name: api-0, namespace: shop}
      - addresses: [10.0.0.2]
        conditions: {ready: false, serving: true, terminating: true}
      - addresses: [10.0.0.3]
""")


def test_endpoint_slice() -> None:
    slice_ = convert(SLICE)
    assert slice_ == EndpointSlice(
        namespace="shop",
        name="api-abc12",
        service="api",
        ports=(
            EndpointPort("http", 8080, AppProtocol.HTTP),
            EndpointPort("grpc", 9090, AppProtocol.GRPC),
        ),
        endpoints=(
            Endpoint("10.0.0.1", True, True, False, "zone-a", "node-1", "api-0"),
            Endpoint("10.0.0.2", False, True, True),
            Endpoint("10.0.0.3"),
        ),
    )
    assert [e.condition for e in slice_.endpoints] == [
        EndpointCondition.READY,
        EndpointCondition.SERVING_TERMINATING,
        EndpointCondition.READY,  # unset conditions mean ready, per the EndpointSlice API
    ]


# Pod ------------------------------------------------------------------------------------------


POD = obj("""
    apiVersion: v1
    kind: Pod
    metadata:
      name: web-0
      namespace: shop
      labels: {app: web}
      annotations:
        xds-server.io/inbound-port: "16006"
        xds-server.io/outbound-port: "16001"
        xds-server.io/tcp-upstreams: "15432=db.data:5432, 16379=cache:6379"
    spec:
      serviceAccountName: web
      containers:
        - name: app
          ports: [{name: http, containerPort: 8080}, {containerPort: 9000}]
        - name: istio-proxy
          ports: [{name: admin, containerPort: 15000}]
    status: {podIP: 10.0.0.5}
""")


def test_pod_with_sidecar_container() -> None:
    assert convert(POD) == Workload(
        namespace="shop",
        name="web-0",
        ip="10.0.0.5",
        service_account="web",
        labels=(("app", "web"),),
        meshed=True,
        inbound_port=16006,
        outbound_port=16001,
        container_ports=(("http", 8080), ("", 9000)),  # the proxy's own ports are not the app's
        tcp_upstreams=(
            TcpUpstream(15432, ServiceKey("data", "db"), 5432),
            TcpUpstream(16379, ServiceKey("shop", "cache"), 6379),
        ),
    )


def test_pod_defaults_and_inject_annotation() -> None:
    pod = obj("""
        apiVersion: v1
        kind: Pod
        metadata: {name: p, annotations: {sidecar.xds-server.io/inject: "true"}}
        spec: {containers: [{name: app}]}
    """)
    workload = convert(pod)
    assert workload == Workload("default", "p", meshed=True)
    assert (workload.service_account, workload.inbound_port, workload.outbound_port) == (
        "default", 15006, 15001
    )
    assert convert(with_(pod, "metadata/annotations", {})).meshed is False


def test_pod_interception_mode_is_capture_unless_explicit() -> None:
    pod = obj("""
        apiVersion: v1
        kind: Pod
        metadata: {name: p, annotations: {sidecar.xds-server.io/inject: "true"}}
        spec: {containers: [{name: app}]}
    """)
    assert convert(pod).capture is True
    explicit = with_(pod, "metadata/annotations/sidecar.xds-server.io~interception", "explicit")
    assert convert(explicit).capture is False
    error = error_of(with_(pod, "metadata/annotations/sidecar.xds-server.io~interception", "tproxy"))
    assert error.field_path == "metadata.annotations[sidecar.xds-server.io/interception]"
    assert "capture, explicit" in error.message


def test_pod_native_sidecar_and_opt_out() -> None:
    pod = obj("""
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        spec:
          initContainers: [{name: envoy, restartPolicy: Always}]
          containers: [{name: app}]
        status: {podIPs: [{ip: 10.0.0.7}]}
    """)
    assert convert(pod).meshed is True
    assert convert(pod).ip == "10.0.0.7"
    opted_out = with_(pod, "metadata/annotations", {"sidecar.xds-server.io/inject": "false"})
    assert convert(opted_out).meshed is False


def test_finished_pod_has_no_ip() -> None:
    assert convert(with_(POD, "status/phase", "Succeeded")).ip == ""


# HTTPRoute ------------------------------------------------------------------------------------


HTTP_ROUTE = obj("""
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata:
      name: api
      namespace: shop
      creationTimestamp: "2024-05-01T10:00:00Z"
    spec:
      parentRefs:
        - {group: "", kind: Service, name: api, port: 80}
        - {name: public-gateway}
        - {group: core, kind: Service, name: api-admin, namespace: ops}
      hostnames: [api.example.com]
      rules:
        - name: canary
          matches:
            - path: {type: Exact, value: /v1/items}
              headers: [{name: x-user, value: alice}, {type: RegularExpression, name: x-id, value: "[0-9]+"}]
              queryParams: [{name: debug, value: "1"}]
              method: GET
            - path: {type: RegularExpression, value: "/v[12]/.*"}
            - headers: [{name: x-canary, value: "yes"}]
          filters:
            - type: RequestHeaderModifier
              requestHeaderModifier:
                set: [{name: x-route, value: canary}]
                add: [{name: x-seen, value: "1"}]
                remove: [x-debug]
            - type: ResponseHeaderModifier
              responseHeaderModifier: {remove: [server]}
            - type: RequestMirror
              requestMirror: {backendRef: {name: shadow, port: 80}, percent: 5}
            - type: RequestMirror
              requestMirror:
                backendRef: {name: audit, namespace: ops, port: 8080}
                fraction: {numerator: 1, denominator: 1000}
          backendRefs:
            - {name: api-v1, port: 80, weight: 90}
            - {name: api-v2, port: 80, weight: 10}
            - {name: api-v3, namespace: next, port: 80, weight: 0}
            - {name: api-v4}
          timeouts: {request: 10s, backendRequest: 1500ms}
          retry: {attempts: 3, codes: [502, 503], backoff: 100ms}
        - matches: [{path: {type: PathPrefix, value: /old}}]
          filters:
            - type: RequestRedirect
              requestRedirect:
                scheme: https
                hostname: new.example.com
                path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
                port: 8443
                statusCode: 301
        - matches: [{path: {value: /legacy}}]
          filters:
            - type: URLRewrite
              urlRewrite:
                hostname: legacy.internal
                path: {type: ReplacePrefixMatch, replacePrefixMatch: /}
          backendRefs: [{name: legacy, port: 80}]
        - filters:
            - type: URLRewrite
              urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /index.html}}
          backendRefs: [{name: static, port: 80}]
""")


def test_http_route_converts_every_documented_field() -> None:
    route = convert(HTTP_ROUTE)
    canary, redirect, prefix_rewrite, full_rewrite = route.rules
    assert (route.kind, route.namespace, route.name) == ("HTTPRoute", "shop", "api")
    # Only Service parents count (GAMMA); the Gateway parent is some gateway's business.
    assert route.parents == (
        ParentRef(ServiceKey("shop", "api"), 80),
        ParentRef(ServiceKey("ops", "api-admin"), None),
    )
    assert route.hostnames == ("api.example.com",)
    assert route.created == "2024-05-01T10:00:00Z"

    assert canary.name == "canary"
    assert canary.matches == (
        RouteMatch(
            path=PathMatch(MatchType.EXACT, "/v1/items"),
            headers=(
                ValueMatch("x-user", "alice"),
                ValueMatch("x-id", "[0-9]+", MatchType.REGEX),
            ),
            query=(ValueMatch("debug", "1"),),
            method="GET",
        ),
        RouteMatch(path=PathMatch(MatchType.REGEX, "/v[12]/.*")),
        RouteMatch(path=PathMatch(MatchType.PREFIX, "/"), headers=(ValueMatch("x-canary", "yes"),)),
    )
    assert canary.request_headers == HeaderModifier(
        set=(("x-route", "canary"),), add=(("x-seen", "1"),), remove=("x-debug",)
    )
    assert canary.response_headers == HeaderModifier(remove=("server",))
    assert canary.mirrors == (
        Mirror(BackendRef(ServiceKey("shop", "shadow"), 80), 5.0),
        Mirror(BackendRef(ServiceKey("ops", "audit"), 8080), 0.1),
    )
    assert canary.backends == (
        BackendRef(ServiceKey("shop", "api-v1"), 80, 90),
        BackendRef(ServiceKey("shop", "api-v2"), 80, 10),
        BackendRef(ServiceKey("next", "api-v3"), 80, 0),  # weight 0: no traffic, but valid
        BackendRef(ServiceKey("shop", "api-v4"), None, 1),  # defaults: weight 1, parent's port
    )
    assert (canary.request_timeout, canary.backend_timeout) == (10.0, 1.5)
    assert canary.retry == Retry(attempts=3, codes=(502, 503), backoff=0.1)

    assert redirect.redirect == Redirect(
        scheme="https",
        hostname="new.example.com",
        path=PathModifier(PathModifierType.PREFIX, "/new"),
        port=8443,
        status_code=301,
    )
    assert redirect.backends == ()
    assert prefix_rewrite.matches == (RouteMatch(path=PathMatch(MatchType.PREFIX, "/legacy")),)
    assert prefix_rewrite.rewrite == Rewrite(
        hostname="legacy.internal", path=PathModifier(PathModifierType.PREFIX, "/")
    )
    assert full_rewrite.matches == (RouteMatch(path=PathMatch()),)  # the API's default match
    assert full_rewrite.rewrite == Rewrite(path=PathModifier(PathModifierType.FULL, "/index.html"))


def test_http_route_defaults() -> None:
    route = convert(obj("""
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          parentRefs: [{kind: Service, group: "", name: api}]
          rules: [{backendRefs: [{name: api, port: 80}], retry: {codes: [503]}}]
    """))
    [rule] = route.rules
    assert route.namespace == "default"
    assert rule.matches == (RouteMatch(path=PathMatch(MatchType.PREFIX, "/")),)
    assert rule.retry == Retry(attempts=Retry().attempts, codes=(503,))
    assert rule.redirect is None and rule.mirrors == () and rule.request_timeout is None


def test_http_route_without_rules_matches_everything() -> None:
    route = convert(with_(HTTP_ROUTE, "spec/rules", None))
    assert route.rules == (RouteRule(),)


def test_route_to_gateways_only_has_no_mesh_parents() -> None:
    route = convert(with_(HTTP_ROUTE, "spec/parentRefs", [{"name": "public-gateway"}]))
    assert route.parents == ()


def test_unquoted_creation_timestamp() -> None:
    stamp = dt.datetime(2024, 5, 1, 10, 0, tzinfo=dt.UTC)
    route = convert(with_(HTTP_ROUTE, "metadata/creationTimestamp", stamp))
    assert route.created == "2024-05-01T10:00:00Z"


# GRPCRoute ------------------------------------------------------------------------------------


def test_grpc_route_method_matches_become_path_matches() -> None:
    route = convert(obj("""
        apiVersion: gateway.networking.k8s.io/v1
        kind: GRPCRoute
        metadata: {name: payments, namespace: pay}
        spec:
          parentRefs: [{group: "", kind: Service, name: payments, port: 9090}]
          rules:
            - matches:
                - method: {service: pay.Payments, method: Charge}
                  headers: [{name: x-tenant, value: a}]
                - method: {service: pay.Payments}
                - method: {method: Refund}
                - method: {type: RegularExpression, service: "pay\\\\..*", method: "Get.*"}
                - method: {type: RegularExpression, method: "List.*"}
              filters:
                - type: RequestHeaderModifier
                  requestHeaderModifier: {set: [{name: x-grpc, value: "1"}]}
              backendRefs: [{name: payments, port: 9090}]
            - backendRefs: [{name: payments, port: 9090}]
    """))
    assert isinstance(route, Route) and route.kind == "GRPCRoute"
    first, catch_all = route.rules
    assert [m.path for m in first.matches] == [
        PathMatch(MatchType.EXACT, "/pay.Payments/Charge"),
        PathMatch(MatchType.PREFIX, "/pay.Payments/"),
        PathMatch(MatchType.REGEX, "/[^/]+/Refund"),
        PathMatch(MatchType.REGEX, "/pay\\..*/Get.*"),
        PathMatch(MatchType.REGEX, "/[^/]+/List.*"),
    ]
    assert first.matches[0].headers == (ValueMatch("x-tenant", "a"),)
    assert first.request_headers == HeaderModifier(set=(("x-grpc", "1"),))
    assert catch_all.matches == (RouteMatch(path=PathMatch()),)


# TrafficPolicy --------------------------------------------------------------------------------


POLICY = obj("""
    apiVersion: mesh.xds-server.io/v1alpha1
    kind: TrafficPolicy
    metadata: {name: api-resilience, namespace: shop}
    spec:
      targetRef: {kind: Service, name: api}
      retries: {attempts: 3, perTryTimeout: 250ms}
      outlierDetection: {consecutive5xxErrors: 3}
""")


def test_traffic_policy() -> None:
    policy = convert(POLICY)
    assert isinstance(policy, TrafficPolicy)
    assert (policy.namespace, policy.name) == ("shop", "api-resilience")
    assert policy.spec.target_ref.name == "api"
    assert policy.spec.retries is not None and policy.spec.retries.per_try_timeout == 0.25
    assert policy.spec.outlier_detection is not None
    assert policy.spec.outlier_detection.consecutive_5xx_errors == 3


def test_traffic_policy_error_names_the_field() -> None:
    error = error_of(with_(POLICY, "spec/retries/perTryTimeout", "25xs"))
    assert str(error) == (
        "TrafficPolicy shop/api-resilience: spec.retries.perTryTimeout: "
        "invalid duration '25xs': expected e.g. '2s', '150ms', '1m30s'"
    )
    error = error_of(with_(POLICY, "spec/targetRef/kind", "Pod"))
    assert (error.field_path, error.message) == (
        "spec.targetRef.kind", "input should be 'Service', got 'Pod'"
    )
    assert error_of(with_(POLICY, "spec", None)).field_path == "spec"


def test_traffic_policy_reports_every_field() -> None:
    bad = with_(POLICY, "spec/retries/perTryTimeout", "25xs")
    bad = with_(bad, "spec/outlierDetection/consecutive5xxErrors", -1)
    bad = with_(bad, "spec/bogus", True)
    error = error_of(bad)
    assert dict(error.problems) == {
        "spec.retries.perTryTimeout": "invalid duration '25xs': expected e.g. '2s', '150ms', '1m30s'",
        "spec.outlierDetection.consecutive5xxErrors": "input should be greater than or equal to 0",
        "spec.bogus": "unknown field",
    }


# Errors ---------------------------------------------------------------------------------------


def test_unknown_kinds_are_a_warning() -> None:
    error = error_of({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}})
    assert error.warning
    assert (error.kind, error.namespace, error.name, error.field_path) == (
        "Deployment", "default", "web", "kind"
    )


def test_errors_name_the_object() -> None:
    error = error_of(with_(SERVICE, "spec/ports/1/port", 0))
    assert (error.kind, error.namespace, error.name, error.warning) == ("Service", "shop", "api", False)
    assert str(error) == "Service shop/api: spec.ports[1].port: 0 is out of range [1, 65535]"


A = "metadata/annotations"
ROUTE_RULE = "spec/rules/0"


@pytest.mark.parametrize(
    "base, path, value, field, message",
    [
        # Envelope
        (SERVICE, "kind", None, "kind", "required"),
        (SERVICE, "apiVersion", "v2", "apiVersion", "Service must be v1"),
        (SERVICE, "metadata/name", None, "metadata.name", "required"),
        (SERVICE, "metadata/namespace", "Shop", "metadata.namespace", "not a valid namespace"),
        (SERVICE, "metadata/name", "api.v1", "metadata.name", "not a DNS label"),
        (SLICE, "metadata/name", "Api_1", "metadata.name", "not a DNS name"),
        (SERVICE, "metadata/labels/app", True, "metadata.labels[app]", "expected a string"),
        # Service
        (SERVICE, "spec/ports/0/port", "80", "spec.ports[0].port", "expected an integer"),
        (SERVICE, "spec/ports/1/targetPort", "8080", "spec.ports[1].targetPort", "without quotes"),
        (SERVICE, "spec/ports/1/targetPort", "Admin_", "spec.ports[1].targetPort", "port name"),
        (SERVICE, "spec/ports/2/port", 80, "spec.ports[2].port", "duplicate port 80"),
        (SERVICE, "spec/ports/0/protocol", "HTTP", "spec.ports[0].protocol", "not one of"),
        (SERVICE, f"{A}/xds-server.io~export-to", " , ", "metadata.annotations[xds-server.io/export-to]", "empty"),
        (SERVICE, f"{A}/xds-server.io~export-to", "a,B_", "metadata.annotations[xds-server.io/export-to]", "'B_'"),
        (SERVICE, "spec/ports", {"port": 80}, "spec.ports", "expected a list"),
        # EndpointSlice
        (SLICE, "metadata/labels", {}, "metadata.labels[kubernetes.io/service-name]", "required"),
        (SLICE, "endpoints/1/addresses", [], "endpoints[1].addresses", "at least one"),
        (SLICE, "endpoints/0/conditions/ready", "yes", "endpoints[0].conditions.ready", "true or false"),
        (SLICE, "ports/0/port", 70000, "ports[0].port", "out of range"),
        (SLICE, "addressType", "IPv5", "addressType", "not one of"),
        # Pod
        (POD, f"{A}/xds-server.io~inbound-port", "x", "metadata.annotations[xds-server.io/inbound-port]", "port number"),
        (POD, f"{A}/xds-server.io~outbound-port", "16006", "metadata.annotations[xds-server.io/outbound-port]", "inbound port"),
        (POD, f"{A}/xds-server.io~tcp-upstreams", "5432:db", "metadata.annotations[xds-server.io/tcp-upstreams]", "LOCALPORT=SERVICE[.NAMESPACE]:PORT"),
        (POD, f"{A}/xds-server.io~tcp-upstreams", "1=a:1,1=b:2", "metadata.annotations[xds-server.io/tcp-upstreams]", "already used"),
        (POD, f"{A}/sidecar.xds-server.io~inject", "yes", "metadata.annotations[sidecar.xds-server.io/inject]", '"true" or "false"'),
        (POD, "spec/containers/0/ports/1/containerPort", None, "spec.containers[0].ports[1].containerPort", "required"),
        # HTTPRoute
        (HTTP_ROUTE, "spec/parentRefs", [], "spec.parentRefs", "required"),
        (HTTP_ROUTE, "spec/parentRefs/0/name", "", "spec.parentRefs[0].name", "required"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/backendRefs/1/weight", -1, "spec.rules[0].backendRefs[1].weight", "out of range"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/backendRefs/1/kind", "Pod", "spec.rules[0].backendRefs[1].kind", "only Services"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/backendRefs/1/filters", [{"type": "URLRewrite", "urlRewrite": {"hostname": "x"}}],
         "spec.rules[0].backendRefs[1].filters[0].type", "not supported"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/backendRefs/1/filters",
         [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "a", "value": "1"}]}}] * 2,
         "spec.rules[0].backendRefs[1].filters[1].type", "only once"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/0/path/type", "Prefix", "spec.rules[0].matches[0].path.type", "not one of"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/0/path/value", "v1", "spec.rules[0].matches[0].path.value", "start with '/'"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/1/path/value", "(", "spec.rules[0].matches[1].path.value", "regular expression"),
        # Python's engine accepts lookarounds and backreferences; RE2 (Envoy's) does not.
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/1/path/value", "/a(?=b)", "spec.rules[0].matches[1].path.value", "RE2"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/0/method", "FETCH", "spec.rules[0].matches[0].method", "not one of"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/0/headers/0/name", "x user", "spec.rules[0].matches[0].headers[0].name", "header name"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/0/headers/1/value", "[", "spec.rules[0].matches[0].headers[1].value", "regular expression"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/matches/0/queryParams/0/value", 1, "spec.rules[0].matches[0].queryParams[0].value", "quote it"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/filters/0/type", "ExtensionRef", "spec.rules[0].filters[0].type", "not supported"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/filters/0/requestHeaderModifier", None, "spec.rules[0].filters[0].requestHeaderModifier", "required for type"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/filters/0/requestHeaderModifier/set/0/value", None, "spec.rules[0].filters[0].requestHeaderModifier.set[0].value", "required"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/filters/2/requestMirror/percent", 101, "spec.rules[0].filters[2].requestMirror.percent", "out of range"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/filters/3/requestMirror/fraction/numerator", 2000, "spec.rules[0].filters[3].requestMirror.fraction.numerator", "out of range"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/filters/3/requestMirror/backendRef", None, "spec.rules[0].filters[3].requestMirror.backendRef", "required"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/timeouts/request", "10 seconds", "spec.rules[0].timeouts.request", "invalid duration"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/timeouts/backendRequest", "11s", "spec.rules[0].timeouts.backendRequest", "longer than"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/retry/codes/1", 200, "spec.rules[0].retry.codes[1]", "out of range"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/retry/attempts", "3", "spec.rules[0].retry.attempts", "expected an integer"),
        (HTTP_ROUTE, f"{ROUTE_RULE}/retry/backoff", "1d", "spec.rules[0].retry.backoff", "invalid duration"),
        (HTTP_ROUTE, "spec/rules/1/filters/0/requestRedirect/statusCode", 305, "spec.rules[1].filters[0].requestRedirect.statusCode", "not one of"),
        (HTTP_ROUTE, "spec/rules/1/filters/0/requestRedirect/scheme", "ftp", "spec.rules[1].filters[0].requestRedirect.scheme", "not one of"),
        (HTTP_ROUTE, "spec/rules/1/backendRefs", [{"name": "x"}], "spec.rules[1].backendRefs", "RequestRedirect"),
        (HTTP_ROUTE, "spec/rules/2/matches/0/path/type", "Exact", "spec.rules[2].filters[0].urlRewrite.path", "PathPrefix match"),
        (HTTP_ROUTE, "spec/rules/3/filters/0/urlRewrite/path/type", None, "spec.rules[3].filters[0].urlRewrite.path.type", "required"),
    ],
)
def test_every_error_names_the_field(
    base: dict[str, Any], path: str, value: Any, field: str, message: str
) -> None:
    error = error_of(with_(base, path, value))
    assert error.field_path == field
    assert message in error.message, error.message
    assert not error.warning


def test_a_redirect_and_a_rewrite_cannot_share_a_rule() -> None:
    rule = {
        "filters": [
            {"type": "RequestRedirect", "requestRedirect": {"hostname": "a"}},
            {"type": "URLRewrite", "urlRewrite": {"hostname": "b"}},
        ]
    }
    error = error_of(with_(HTTP_ROUTE, "spec/rules", [rule]))
    assert error.field_path == "spec.rules[0].filters"


def test_duplicate_filter_in_a_rule() -> None:
    modifier = {"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["a"]}}
    error = error_of(with_(HTTP_ROUTE, "spec/rules", [{"filters": [modifier, modifier]}]))
    assert (error.field_path, error.message) == (
        "spec.rules[0].filters[1].type", "ResponseHeaderModifier may appear only once in a rule"
    )


@pytest.mark.parametrize(
    "rule, field, message",
    [
        ({"matches": [{"method": {}}]}, "spec.rules[0].matches[0].method", "set service, method"),
        ({"matches": [{"method": {"service": "a b"}}]}, "spec.rules[0].matches[0].method.service", "not a gRPC service"),
        ({"matches": [{"method": {"method": "Get/x"}}]}, "spec.rules[0].matches[0].method.method", "not a gRPC method"),
        ({"matches": [{"method": {"type": "RegularExpression", "method": "("}}]}, "spec.rules[0].matches[0].method.method", "regular expression"),
        ({"filters": [{"type": "URLRewrite", "urlRewrite": {}}]}, "spec.rules[0].filters[0].type", "not supported"),
        ({"timeouts": {"request": "1s"}}, "spec.rules[0].timeouts", "GRPCRoute has no such field"),
    ],
)
def test_grpc_route_errors(rule: dict[str, Any], field: str, message: str) -> None:
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": "g"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "s"}], "rules": [rule]},
    }
    error = error_of(route)
    assert error.field_path == field
    assert message in error.message


def test_not_a_mapping() -> None:
    error = error_of(["a"])
    assert "expected an object" in str(error)


def test_a_pod_ip_that_is_not_an_ip_is_refused_naming_the_field() -> None:
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "api-1", "namespace": "shop"},
        "spec": {"containers": [{"name": "app"}]},
        "status": {"podIP": "10.0.0.300"},
    }
    with pytest.raises(ObjectError) as caught:
        convert(pod)
    assert caught.value.field_path == "status.podIP"
    assert "10.0.0.300" in str(caught.value)
    pod["status"]["podIP"] = "10.0.0.30"
    assert convert(pod).ip == "10.0.0.30"
