"""Route translation: Gateway API (GAMMA) routes + TrafficPolicy -> Envoy route configuration.

Three layers:
- goldens: the `route-*` and `policy-*` cases of tests/testdata/in/ (the YAML users write) go
  through the real controller into tests/testdata/out/ (tests/unit/test_goldens.py); the
  CASES here are the builders' own inputs for the assertions below;
- focused assertions on the rules (precedence, weights, prefix semantics, redirects,
  rewrites, mirrors, timeouts/retries, fault, rate limit, domains);
- real Envoy: every case of CASES plus generated cases pass `envoy --mode validate` (one Envoy
  run for all of them), and one live Envoy shows the configs do what they say on real requests.
"""

from __future__ import annotations

import re

import http.client
import json
import random
from collections.abc import Callable, Iterable
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from tests.support.envoy import (
    CLUSTER_TYPE,
    LISTENER_TYPE,
    EnvoyProcess,
    static_bootstrap,
    validate_static,
)
from tests.support.net import free_ports, wait_for_port
from xds_server.model.mesh import AppProtocol, Service, ServiceKey, ServicePort
from xds_server.model.policy import TrafficPolicySpec
from xds_server.sources.policies import parse_traffic_policy_spec
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
from xds_server.translate import names
from xds_server.translate.http_filters import (
    fault_per_route,
    inbound_http_filters,
    outbound_http_filters,
    rate_limit_per_route,
)
from xds_server.translate.routes import (
    DEFAULT_ROUTE_TIMEOUT,
    INVALID_BACKEND_CLUSTER,
    inbound_route_configuration,
    outbound_route_configuration,
    service_domains,
    service_virtual_host,
)

HTTP = AppProtocol.HTTP

# ------------------------------------------------------------------------------ model kit


def svc(name: str, *ports: int, ns: str = "shop", ip: str | None = "auto", protocol: AppProtocol = HTTP,
        targets: dict[int, int | str] | None = None) -> Service:
    targets = targets or {}
    if ip == "auto":
        ip = f"10.96.0.{sum(map(ord, name + ns)) % 250 + 1}"
    return Service(
        namespace=ns,
        name=name,
        ports=tuple(ServicePort(p, f"http-{p}", targets.get(p), protocol) for p in (ports or (8080,))),
        cluster_ip=ip,
    )


API = svc("api", 8080, 9090, ip="10.96.0.10")
API_V2 = svc("api-v2", 8080, ip="10.96.0.11")
API_V3 = svc("api-v3", 8080, ip="10.96.0.12")
SHADOW = svc("shadow", 8080, ip="10.96.0.13")
WEB = svc("web", 80, ns="front", ip="10.96.1.1")
SERVICES = {s.key: s for s in (API, API_V2, API_V3, SHADOW, WEB)}
MISSING = ServiceKey("shop", "does-not-exist")


def policy(**spec: Any) -> TrafficPolicySpec:
    return parse_traffic_policy_spec({"targetRef": {"name": "api"}, **spec})


def route(name: str, *rules: RouteRule, ns: str = "shop", parent: ServiceKey = API.key, port: int | None = None,
          kind: str = "HTTPRoute", created: str = "2024-01-01T00:00:00Z") -> Route:
    return Route(kind=kind, namespace=ns, name=name, parents=(ParentRef(parent, port),), rules=rules, created=created)


def prefix(value: str, **kw: Any) -> RouteMatch:
    return RouteMatch(path=PathMatch(MatchType.PREFIX, value), **kw)


def exact(value: str, **kw: Any) -> RouteMatch:
    return RouteMatch(path=PathMatch(MatchType.EXACT, value), **kw)


def regex(value: str, **kw: Any) -> RouteMatch:
    return RouteMatch(path=PathMatch(MatchType.REGEX, value), **kw)


def to(*keys: ServiceKey | tuple[ServiceKey, int], port: int | None = None) -> tuple[BackendRef, ...]:
    """backendRefs: `to(A)`, or with weights `to((A, 90), (B, 10))`."""
    out = []
    for k in keys:
        key, weight = (k if isinstance(k, tuple) else (k, 1))
        out.append(BackendRef(key, port, weight))
    return tuple(out)


def rule(*matches: RouteMatch, backends: tuple[BackendRef, ...] | None = None, **kw: Any) -> RouteRule:
    """A rule (default: PathPrefix "/", backend api); redirect rules get no backends."""
    if backends is None:
        backends = () if kw.get("redirect") else to(API.key)
    return RouteRule(matches=matches or (prefix("/"),), backends=backends, **kw)


def vhost(routes: Iterable[Route] = (), pol: TrafficPolicySpec | None = None, service: Service = API, port: int = 8080,
          *, local: bool = True, default_port: bool = False) -> rc.VirtualHost:
    sp = service.port(port)
    assert sp is not None
    return service_virtual_host(service, sp, list(routes), pol, SERVICES, local=local, default_port=default_port)


def outbound(*vhosts: rc.VirtualHost, name: str = "outbound|http|shop") -> route_pb2.RouteConfiguration:
    return outbound_route_configuration(name, list(vhosts))


def as_dict(message: Message) -> dict[str, Any]:
    return json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))


def route_named(vh: rc.VirtualHost, suffix: str) -> rc.Route:
    return next(r for r in vh.routes if r.name.endswith(suffix))


# --------------------------------------------------------------------------------- cases


def _case_default() -> route_pb2.RouteConfiguration:
    """No route: one default route per service port; domains per local/default_port."""
    return outbound(
        vhost(local=True, default_port=True),
        vhost(port=9090, local=True, default_port=False),
        vhost(service=WEB, port=80, local=False, default_port=True),
    )


def _case_default_with_policy() -> route_pb2.RouteConfiguration:
    pol = policy(
        timeout="3s",
        retries={"attempts": 3, "perTryTimeout": "1s", "retryOn": "gateway-error,503"},
        fault={"delay": {"percentage": 10, "fixedDelay": "250ms"}, "abort": {"percentage": 0.5, "httpStatus": 503}},
    )
    return outbound(vhost(pol=pol))


def _case_precedence() -> route_pb2.RouteConfiguration:
    older = route(
        "older",
        rule(prefix("/"), backends=to(API.key)),
        rule(prefix("/api"), backends=to(API_V2.key)),
        rule(prefix("/api", headers=(ValueMatch("x-canary", "yes"),)), backends=to(API_V3.key)),
        rule(regex("/api/v[0-9]+/.*"), backends=to(API_V3.key)),
        created="2024-01-01T00:00:00Z",
    )
    newer = route(
        "newer",
        rule(exact("/api/health"), backends=to(API_V2.key)),
        rule(prefix("/api/items/", method="POST"), backends=to(API_V3.key)),
        rule(prefix("/api/items"), backends=to(API_V2.key)),
        rule(prefix("/api", query=(ValueMatch("debug", "1"),)), backends=to(API_V3.key)),
        rule(prefix("/api", headers=(ValueMatch("x-canary", "y.*", MatchType.REGEX),
                                     ValueMatch("X-Canary", "ignored"))), backends=to(API_V2.key)),
        created="2024-06-01T00:00:00Z",
    )
    return outbound(vhost([newer, older]))


def _case_weights() -> route_pb2.RouteConfiguration:
    return outbound(
        vhost([
            route(
                "split",
                rule(prefix("/split"), backends=to((API.key, 90), (API_V2.key, 10), (API_V3.key, 0))),
                rule(prefix("/partly-broken"), backends=to((API_V2.key, 75), (MISSING, 25))),
                rule(prefix("/wrong-port"),
                     backends=(BackendRef(API_V2.key, 1234, 1), BackendRef(API_V3.key, None, 1))),
                rule(prefix("/all-zero"), backends=to((API_V2.key, 0), (API_V3.key, 0))),
                rule(prefix("/all-broken"), backends=to(MISSING)),
                rule(prefix("/no-backends"), backends=()),
                rule(prefix("/other-port"), backends=(BackendRef(API.key, 9090),)),
            )
        ])
    )


def _case_filters() -> route_pb2.RouteConfiguration:
    return outbound(
        vhost([
            route(
                "filters",
                rule(prefix("/headers"), request_headers=HeaderModifier(set=(("x-env", "prod"),), add=(("x-tag", "a"),),
                                                                        remove=("x-debug",)),
                     response_headers=HeaderModifier(set=(("cache-control", "no-store"),), remove=("server",))),
                rule(exact("/old"),
                     redirect=Redirect(path=PathModifier(PathModifierType.FULL, "/new"), status_code=301)),
                rule(prefix("/secure"), redirect=Redirect(scheme="https")),
                rule(prefix("/elsewhere"), redirect=Redirect(hostname="web.front", status_code=307)),
                rule(prefix("/moved"), redirect=Redirect(path=PathModifier(PathModifierType.PREFIX, "/relocated"),
                                                         port=8443, status_code=308)),
                rule(prefix("/strip/"), rewrite=Rewrite(path=PathModifier(PathModifierType.PREFIX, "/"))),
                rule(prefix("/v1"), rewrite=Rewrite(hostname="api-v1.internal",
                                                    path=PathModifier(PathModifierType.PREFIX, "/v2/"))),
                rule(prefix("/full"), rewrite=Rewrite(path=PathModifier(PathModifierType.FULL, "/replaced"))),
                rule(prefix("/mirror"), mirrors=(Mirror(BackendRef(SHADOW.key), 100),
                                                 Mirror(BackendRef(API_V2.key), 12.5),
                                                 Mirror(BackendRef(MISSING), 50))),
            )
        ])
    )


def _case_timeouts_retries() -> route_pb2.RouteConfiguration:
    pol = policy(timeout="7s", retries={"attempts": 2, "perTryTimeout": "2s"})
    return outbound(
        vhost([
            route(
                "timeouts",
                rule(prefix("/request"), request_timeout=5.0),
                rule(prefix("/backend"), backend_timeout=1.5),
                rule(prefix("/both"), request_timeout=10.0, backend_timeout=2.5),
                rule(prefix("/disabled"), request_timeout=0.0),
                rule(prefix("/route-retry"), retry=Retry(attempts=4, codes=(503, 502), backoff=0.05)),
                rule(prefix("/no-retry"), retry=Retry(attempts=0)),
                rule(prefix("/policy")),
            )
        ], pol)
    )


def _case_grpc_over_http() -> route_pb2.RouteConfiguration:
    """A GRPCRoute and an HTTPRoute on one service port: only the GRPCRoute applies."""
    grpc = route("grpc", rule(exact("/shop.Catalog/Get"), backends=(BackendRef(API_V2.key, 8080),)),
                 rule(prefix("/shop.Catalog/"), backends=to(API.key)), kind="GRPCRoute", port=9090)
    http_ = route("http", rule(prefix("/"), backends=to(API_V3.key)), port=9090)
    return outbound(vhost([http_, grpc], port=9090))


def _case_consumer_routes() -> route_pb2.RouteConfiguration:
    """A consumer route (in the client's namespace) replaces the producer routes for
    non-local clients; local clients only see producer routes."""
    producer = route("producer", rule(backends=(BackendRef(API_V2.key, 8080),)))
    consumer = route("consumer", rule(backends=to(API_V3.key)), ns="front")
    return outbound(
        vhost([producer, consumer], local=False, default_port=True),
        vhost([producer, consumer], port=9090, local=True),
    )


def _case_inbound() -> route_pb2.RouteConfiguration:
    limited = svc("limited", 80, targets={80: 8080}, ip="10.96.0.20")
    other = svc("other", 81, targets={81: 8080}, ip="10.96.0.21")
    admin = svc("admin", 9000, 9001, targets={9000: 9000, 9001: 9001}, ip="fd00::21")
    pols = {limited.key: policy(rateLimit={"requests": 100, "per": "1s", "burst": 20}),
            admin.key: policy(timeout="1s")}
    return inbound_route_configuration(
        "inbound|http|shop/pod-1",
        [(8080, HTTP), (9000, AppProtocol.HTTP2), (9001, HTTP), (5432, AppProtocol.TCP)],
        [(limited, limited.ports[0]), (other, other.ports[0]), (admin, admin.ports[0]), (admin, admin.ports[1])],
        pols,
    )


def _case_inbound_no_services() -> route_pb2.RouteConfiguration:
    return inbound_route_configuration("inbound|http|shop/bare", [(5432, AppProtocol.TCP), (3000, HTTP)], [], {})


CASES: dict[str, Callable[[], route_pb2.RouteConfiguration]] = {
    "default": _case_default,
    "default_with_policy": _case_default_with_policy,
    "precedence": _case_precedence,
    "weights": _case_weights,
    "filters": _case_filters,
    "timeouts_retries": _case_timeouts_retries,
    "grpc_over_http": _case_grpc_over_http,
    "consumer_routes": _case_consumer_routes,
    "inbound": _case_inbound,
    "inbound_no_services": _case_inbound_no_services,
}
INBOUND_CASES = {"inbound", "inbound_no_services"}


def test_translation_is_deterministic() -> None:
    for build in CASES.values():
        assert build().SerializeToString(deterministic=True) == build().SerializeToString(deterministic=True)


# -------------------------------------------------------------------------------- domains


def test_domains_follow_dns_search_path_and_default_port() -> None:
    port = API.port(8080)
    assert port is not None
    assert service_domains(API, port, local=False, default_port=False) == [
        "api.shop:8080", "api.shop.svc:8080", "api.shop.svc.cluster.local:8080", "10.96.0.10:8080",
    ]
    local_default = service_domains(API, port, local=True, default_port=True)
    assert local_default[:2] == ["api:8080", "api"]
    assert {"api.shop", "api.shop.svc.cluster.local", "10.96.0.10"} <= set(local_default)
    assert not any("*" in d for d in local_default)


def test_domains_ipv6_and_headless() -> None:
    v6 = svc("v6", 80, ip="fd00::1")
    headless = svc("headless", 80, ip="None")
    assert service_domains(v6, v6.ports[0], local=False, default_port=True)[-2:] == ["[fd00::1]:80", "[fd00::1]"]
    assert all("None" not in d for d in service_domains(headless, headless.ports[0], local=True, default_port=True))


def test_outbound_configuration_drops_duplicate_domains_first_wins() -> None:
    twin = Service("shop", "twin", API.ports, cluster_ip=API.cluster_ip)  # same cluster IP (bad input)
    cfg = outbound(vhost(), vhost(service=twin), vhost())  # the third is a duplicate name too
    assert [v.name for v in cfg.virtual_hosts] == [
        "api.shop.svc.cluster.local:8080", "twin.shop.svc.cluster.local:8080"]
    assert "10.96.0.10:8080" in cfg.virtual_hosts[0].domains
    assert "10.96.0.10:8080" not in cfg.virtual_hosts[1].domains
    all_domains = [d for v in cfg.virtual_hosts for d in v.domains]
    assert len(all_domains) == len(set(all_domains))
    assert cfg.validate_clusters.value is False and cfg.HasField("validate_clusters")


# ------------------------------------------------------------------------------ matching


def test_no_route_is_default_route_to_own_cluster_with_explicit_timeout() -> None:
    vh = vhost()
    assert len(vh.routes) == 1
    r = vh.routes[0]
    assert r.match.prefix == "/"
    assert r.route.cluster == names.cluster_name(API.key, 8080)
    assert r.route.timeout.ToMilliseconds() == DEFAULT_ROUTE_TIMEOUT * 1000
    assert not r.route.HasField("retry_policy")


def test_routes_for_other_ports_or_services_do_not_attach() -> None:
    other_port = route("p9090", rule(backends=to(API_V2.key)), port=9090)
    other_service = route("web", rule(backends=to(API_V2.key)), parent=WEB.key)
    assert [r.name for r in vhost([other_port, other_service]).routes] == ["default"]
    assert [r.name for r in vhost([other_port], port=9090).routes] == ["httproute/shop/p9090/rule/0/match/0"]


def test_precedence_order() -> None:
    vh = _case_precedence().virtual_hosts[0]
    order = [(r.name.split("/")[2], int(r.name.split("/")[4])) for r in vh.routes]
    assert order == [
        ("newer", 0),  # exact path
        ("newer", 1),  # longest prefix (/api/items/ counts as /api/items) + method
        ("newer", 2),  # same prefix, no method
        ("older", 2),  # /api + 1 header, older route...
        ("newer", 4),  # ...before the newer one (its duplicate header name counts once)
        ("newer", 3),  # /api + 1 query
        ("older", 1),  # /api
        ("older", 0),  # "/"
        ("older", 3),  # regex last
    ]
    # Ties on everything but the route: the older route wins.
    assert order.index(("older", 2)) < order.index(("newer", 4))
    # More header matches beat query matches; query matches beat nothing.
    assert order.index(("newer", 4)) < order.index(("newer", 3)) < order.index(("older", 1))
    # The duplicate header name is dropped (first one counts).
    dup = route_named(vh, "newer/rule/4/match/0")
    assert [h.name for h in dup.match.headers] == ["x-canary"]
    assert dup.match.headers[0].string_match.safe_regex.regex == "y.*"
    post = route_named(vh, "newer/rule/1/match/0")
    assert post.match.headers[0].name == ":method" and post.match.headers[0].string_match.exact == "POST"


def test_precedence_ties_by_name_then_rule_order() -> None:
    a = route("a", rule(prefix("/x"), backends=to(API_V2.key)), rule(prefix("/x"), backends=to(API_V3.key)),
              created="2024-01-01T00:00:00Z")
    b = route("b", rule(prefix("/x"), backends=to(API.key)), created="2024-01-01T00:00:00Z")
    unknown_age = route("0-no-timestamp", rule(prefix("/x"), backends=to(API.key)), created="")
    names_in_order = [r.name for r in vhost([unknown_age, b, a]).routes]
    assert names_in_order == [
        "httproute/shop/a/rule/0/match/0",
        "httproute/shop/a/rule/1/match/0",
        "httproute/shop/b/rule/0/match/0",
        "httproute/shop/0-no-timestamp/rule/0/match/0",
    ]


def test_path_prefix_is_element_wise() -> None:
    vh = vhost([route("p", rule(prefix("/foo")), rule(prefix("/bar/")), rule(prefix("/")), rule(exact("/exact/")))])
    matches = {r.name[-len("rule/0/match/0"):]: r.match for r in vh.routes}
    assert matches["rule/0/match/0"].path_separated_prefix == "/foo"
    assert matches["rule/1/match/0"].path_separated_prefix == "/bar"  # trailing "/" ignored
    assert matches["rule/2/match/0"].prefix == "/"
    assert matches["rule/3/match/0"].path == "/exact/"


def test_query_and_header_matches() -> None:
    m = vhost([route("q", rule(prefix("/", query=(ValueMatch("v", "2"), ValueMatch("re", "a+", MatchType.REGEX)),
                                      headers=(ValueMatch("X-User", "bob"),))))]).routes[0].match
    assert [(q.name, q.string_match.exact or q.string_match.safe_regex.regex) for q in m.query_parameters] == [
        ("v", "2"), ("re", "a+")]
    assert m.headers[0].name == "x-user" and m.headers[0].string_match.exact == "bob"
    host = vhost([route("h", rule(prefix("/", headers=(ValueMatch("Host", "api.shop:8080"),))))]).routes[0].match
    assert host.headers[0].name == ":authority"  # Envoy's name for Host


def test_regex_substitutions_escape_user_backslashes() -> None:
    r = vhost([route("b", rule(rewrite=Rewrite(path=PathModifier(PathModifierType.FULL, "/a\\1"))))]).routes[0]
    assert r.route.regex_rewrite.substitution == "/a\\\\1"


def test_invalid_regex_match_is_dropped_not_sent_to_envoy() -> None:
    vh = vhost([route("bad", rule(regex("(?=lookahead)/x")), rule(regex("/(unclosed")), rule(prefix("/ok")),
                      rule(regex("/end\\z")))])  # \z: RE2-only escape, left to Envoy
    assert [r.name for r in vh.routes] == ["httproute/shop/bad/rule/2/match/0", "httproute/shop/bad/rule/3/match/0"]


# ------------------------------------------------------------------------------- backends


def test_weights_zero_invalid_and_all_zero() -> None:
    vh = _case_weights().virtual_hosts[0]
    split = route_named(vh, "rule/0/match/0").route
    assert [(c.name, c.weight.value) for c in split.weighted_clusters.clusters] == [
        (names.cluster_name(API.key, 8080), 90), (names.cluster_name(API_V2.key, 8080), 10),
        (names.cluster_name(API_V3.key, 8080), 0)]
    assert split.cluster_not_found_response_code == rc.RouteAction.SERVICE_UNAVAILABLE  # the default: no invalid share

    broken = route_named(vh, "rule/1/match/0").route
    assert [(c.name, c.weight.value) for c in broken.weighted_clusters.clusters] == [
        (names.cluster_name(API_V2.key, 8080), 75), (INVALID_BACKEND_CLUSTER, 25)]
    assert broken.cluster_not_found_response_code == rc.RouteAction.INTERNAL_SERVER_ERROR

    wrong_port = route_named(vh, "rule/2/match/0").route
    assert [(c.name, c.weight.value) for c in wrong_port.weighted_clusters.clusters] == [
        (names.cluster_name(API_V3.key, 8080), 1), (INVALID_BACKEND_CLUSTER, 1)]

    for index in (3, 4, 5):  # all weights 0, only invalid backends, no backendRefs
        r = route_named(vh, f"rule/{index}/match/0")
        assert r.WhichOneof("action") == "direct_response" and r.direct_response.status == 500

    assert route_named(vh, "rule/6/match/0").route.cluster == names.cluster_name(API.key, 9090)


def _invalid_share(vh: rc.VirtualHost, suffix: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    action = route_named(vh, suffix).route
    shares = [(c.name, c.weight.value) for c in action.weighted_clusters.clusters]
    failing = action.weighted_clusters.clusters[-1]
    fault = fault_pb2.HTTPFault()
    failing.typed_per_filter_config[names.FAULT_FILTER].Unpack(fault)
    return shares, as_dict(fault.abort)


@pytest.mark.parametrize("kind", ["HTTPRoute", "GRPCRoute"])
def test_a_missing_backend_answers_what_gateway_api_says_in_both_forms(kind: str) -> None:
    """HTTPRoute: 500 (gRPC reads it as UNKNOWN); GRPCRoute: UNAVAILABLE (Envoy's 503 local
    reply is UNAVAILABLE to a gRPC client). The gRPC form never names a cluster that does not
    exist: the invalid share goes to the parent's own cluster and is aborted before it."""
    own = names.cluster_name(API.key, 8080)
    routes = [route("r", rule(backends=to((API_V2.key, 3), (MISSING, 1))),
                    rule(prefix("/gone"), backends=to(MISSING)), kind=kind)]
    envoy = vhost(routes)
    split = route_named(envoy, "rule/0/match/0").route
    assert [(c.name, c.weight.value) for c in split.weighted_clusters.clusters] == [
        (names.cluster_name(API_V2.key, 8080), 3), (INVALID_BACKEND_CLUSTER, 1)]
    expected = rc.RouteAction.SERVICE_UNAVAILABLE if kind == "GRPCRoute" else rc.RouteAction.INTERNAL_SERVER_ERROR
    assert split.cluster_not_found_response_code == expected
    assert route_named(envoy, "rule/1/match/0").direct_response.status == (503 if kind == "GRPCRoute" else 500)

    sp = API.port(8080)
    assert sp is not None
    grpc_form = service_virtual_host(API, sp, routes, None, SERVICES, local=True, default_port=False, grpc=True)
    abort = {"grpc_status": 14} if kind == "GRPCRoute" else {"http_status": 500}
    shares, got = _invalid_share(grpc_form, "rule/0/match/0")
    assert shares == [(names.cluster_name(API_V2.key, 8080), 3), (own, 1)]
    assert got == {**abort, "percentage": {"numerator": 100}}
    shares, got = _invalid_share(grpc_form, "rule/1/match/0")
    assert shares == [(own, 1)] and got == {**abort, "percentage": {"numerator": 100}}
    assert INVALID_BACKEND_CLUSTER not in json.dumps(as_dict(grpc_form))


def test_backend_port_defaults_to_parent_port() -> None:
    vh = vhost([route("p", rule(backends=to(API.key)), port=9090)], port=9090)
    assert vh.routes[0].route.cluster == names.cluster_name(API.key, 9090)


# -------------------------------------------------------------------------------- filters


def test_header_modifiers() -> None:
    r = route_named(_case_filters().virtual_hosts[0], "rule/0/match/0")
    added = [(h.header.key, h.header.value, h.append_action) for h in r.request_headers_to_add]
    assert added == [("x-env", "prod", 2), ("x-tag", "a", 0)]  # OVERWRITE_IF_EXISTS_OR_ADD, APPEND_IF_EXISTS_OR_ADD
    assert list(r.request_headers_to_remove) == ["x-debug"]
    assert [(h.header.key, h.append_action) for h in r.response_headers_to_add] == [("cache-control", 2)]
    assert list(r.response_headers_to_remove) == ["server"]


def test_host_and_pseudo_headers_are_not_modified_by_header_filters() -> None:
    mod = HeaderModifier(set=(("Host", "x"), (":path", "/y"), ("ok", "1")), remove=(":authority", "host", "gone"))
    r = vhost([route("h", rule(request_headers=mod))]).routes[0]
    assert [h.header.key for h in r.request_headers_to_add] == ["ok"]
    assert list(r.request_headers_to_remove) == ["gone"]


def test_redirects() -> None:
    vh = _case_filters().virtual_hosts[0]
    full = route_named(vh, "rule/1/match/0").redirect
    assert full.path_redirect == "/new" and full.response_code == rc.RedirectAction.MOVED_PERMANENTLY
    # Gateway API: scheme without port -> the scheme's well-known port, not the request's, and
    # the default port SHOULD be left out of Location. A request naming no port (or :80) keeps
    # its host and Envoy writes no port; one naming the service by one of its names with the
    # port is redirected to the bare name (no port); any other naming another port gets :443.
    secure = route_named(vh, "rule/2/match/0").redirect
    assert secure.scheme_redirect == "https" and secure.port_redirect == 0
    assert secure.response_code == rc.RedirectAction.FOUND
    forms = ["api", "api.shop", "api.shop.svc", "api.shop.svc.cluster.local", API.cluster_ip]
    for index, form in enumerate(forms):
        named = route_named(vh, f"rule/2/match/0|host|{index}")
        [authority] = named.match.headers
        assert authority.name == ":authority" and authority.string_match.exact == f"{form}:8080"
        assert authority.string_match.ignore_case
        assert named.redirect.host_redirect == form and named.redirect.port_redirect == 0
        assert named.redirect.scheme_redirect == "https"
    explicit = route_named(vh, "rule/2/match/0|port")
    assert explicit.redirect.scheme_redirect == "https" and explicit.redirect.port_redirect == 443
    [authority] = explicit.match.headers
    pattern = re.compile(authority.string_match.safe_regex.regex)
    assert authority.name == ":authority"
    for host, named_port in [("api:8080", True), ("api:8", True), ("api:800", True), ("api:443", True),
                             ("api:80", False), ("api", False), ("[fd00::1]", False), ("[fd00::1]:81", True)]:
        assert bool(pattern.fullmatch(host)) is named_port, host
    names_in_order = [r.name for r in vh.routes]  # the service's names, any port, then none
    start = names_in_order.index("httproute/shop/filters/rule/2/match/0|host|0")
    assert names_in_order[start:start + len(forms) + 2] == [
        *(f"httproute/shop/filters/rule/2/match/0|host|{i}" for i in range(len(forms))),
        explicit.name, "httproute/shop/filters/rule/2/match/0",
    ]
    elsewhere = route_named(vh, "rule/3/match/0").redirect
    # hostname without port -> the listener (service) port; Envoy drops the request's port.
    assert elsewhere.host_redirect == "web.front" and elsewhere.port_redirect == 8080
    assert elsewhere.response_code == rc.RedirectAction.TEMPORARY_REDIRECT
    moved = route_named(vh, "rule/4/match/0").redirect
    assert moved.prefix_rewrite == "/relocated" and moved.port_redirect == 8443
    assert moved.response_code == rc.RedirectAction.PERMANENT_REDIRECT


@pytest.mark.parametrize("redirect", [Redirect(port=80), Redirect(scheme="http", port=80),
                                      Redirect(scheme="https", port=443)], ids=["80", "http-80", "https-443"])
def test_redirect_to_the_default_port_leaves_it_out(redirect: Redirect) -> None:
    """A port that is the (redirect's or the request's) scheme's default is handled as a
    scheme change is: no port_redirect unless another authority named another port."""
    vh = vhost([route("r", rule(redirect=redirect))])
    plain = route_named(vh, "rule/0/match/0")
    assert not plain.match.headers and plain.redirect.port_redirect == 0
    named = route_named(vh, "rule/0/match/0|host|0")
    assert named.redirect.host_redirect == "api" and named.redirect.port_redirect == 0
    explicit = route_named(vh, "rule/0/match/0|port")
    assert explicit.redirect.port_redirect == redirect.port


def test_redirect_to_another_port_is_one_route() -> None:
    [r] = vhost([route("r", rule(redirect=Redirect(scheme="https", port=80)))]).routes
    assert r.redirect.port_redirect == 80 and not r.match.headers


def test_redirect_to_https_host_leaves_default_port_out() -> None:
    r = vhost([route("r", rule(redirect=Redirect(scheme="https", hostname="example.com")))]).routes[0]
    assert r.redirect.host_redirect == "example.com" and r.redirect.port_redirect == 0


@pytest.mark.parametrize(
    ("match", "replacement", "expected"),
    [
        (prefix("/foo"), "/xyz", {"prefix_rewrite": "/xyz"}),
        (prefix("/foo/"), "/xyz/", {"prefix_rewrite": "/xyz"}),
        (prefix("/foo"), "/", {"regex_rewrite": {"pattern": {"regex": "^/foo/?"}, "substitution": "/"}}),
        (prefix("/foo"), "", {"regex_rewrite": {"pattern": {"regex": "^/foo/?"}, "substitution": "/"}}),
        (prefix("/a.b"), "/", {"regex_rewrite": {"pattern": {"regex": "^/a\\.b/?"}, "substitution": "/"}}),
        (prefix("/"), "/xyz", {"regex_rewrite": {"pattern": {"regex": "^/"}, "substitution": "/xyz/"}}),
        (prefix("/"), "/", {}),
        (exact("/foo"), "/xyz", {"prefix_rewrite": "/xyz"}),
        (exact("/foo"), "/", {"prefix_rewrite": "/"}),
        (regex("/f.*"), "/xyz", {}),
    ],
)
def test_replace_prefix_match_semantics(match: RouteMatch, replacement: str, expected: dict[str, Any]) -> None:
    r = vhost([route("rw", rule(match, rewrite=Rewrite(path=PathModifier(PathModifierType.PREFIX, replacement))))])
    action = as_dict(r.routes[0].route)
    got = {k: action[k] for k in ("prefix_rewrite", "regex_rewrite") if k in action}
    assert got == expected


def test_url_rewrite_full_path_and_hostname() -> None:
    vh = _case_filters().virtual_hosts[0]
    full = route_named(vh, "rule/7/match/0").route
    assert (full.regex_rewrite.pattern.regex, full.regex_rewrite.substitution) == ("^.*$", "/replaced")
    assert route_named(vh, "rule/6/match/0").route.host_rewrite_literal == "api-v1.internal"


def test_mirror_percent_and_missing_mirror() -> None:
    mirrors = route_named(_case_filters().virtual_hosts[0], "rule/8/match/0").route.request_mirror_policies
    assert [m.cluster for m in mirrors] == [names.cluster_name(SHADOW.key, 8080), names.cluster_name(API_V2.key, 8080)]
    assert not mirrors[0].HasField("runtime_fraction")  # 100 %: every request
    fraction = mirrors[1].runtime_fraction.default_value
    assert (fraction.numerator, fraction.denominator) == (125_000, fraction.MILLION)


# ----------------------------------------------------------------------- timeouts/retries


def test_timeouts_precedence() -> None:
    vh = _case_timeouts_retries().virtual_hosts[0]
    t = {r.name.split("/")[4]: r.route for r in vh.routes}
    assert t["0"].timeout.ToMilliseconds() == 5000  # request
    assert t["1"].timeout.ToMilliseconds() == 1500  # backendRequest only: also the route timeout
    assert t["1"].retry_policy.per_try_timeout.ToMilliseconds() == 1500
    assert t["2"].timeout.ToMilliseconds() == 10_000 and t["2"].retry_policy.per_try_timeout.ToMilliseconds() == 2500
    assert t["3"].HasField("timeout") and t["3"].timeout.ToMilliseconds() == 0  # 0 = disabled
    assert t["6"].timeout.ToMilliseconds() == 7000  # the policy's timeout


def test_retry_precedence() -> None:
    vh = _case_timeouts_retries().virtual_hosts[0]
    t = {r.name.split("/")[4]: r.route for r in vh.routes}
    route_retry = t["4"].retry_policy
    assert route_retry.num_retries.value == 4
    assert route_retry.retry_on == "connect-failure,refused-stream,retriable-status-codes"
    assert list(route_retry.retriable_status_codes) == [502, 503]
    assert route_retry.retry_back_off.base_interval.ToMilliseconds() == 50
    assert not route_retry.HasField("per_try_timeout")  # the policy's perTryTimeout does not mix in
    assert route_retry.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"
    assert route_retry.host_selection_retry_max_attempts > 1

    assert not t["5"].HasField("retry_policy")  # attempts 0, no backendRequest: nothing to say

    pol_retry = t["6"].retry_policy
    assert pol_retry.num_retries.value == 2 and pol_retry.per_try_timeout.ToMilliseconds() == 2000
    assert pol_retry.retry_on == "connect-failure,refused-stream,unavailable,cancelled,5xx"

    # backendRequest with the policy's retries: the route's per-try timeout wins.
    assert t["1"].retry_policy.num_retries.value == 2


def test_policy_retry_on_status_codes_and_zero_attempts() -> None:
    r = vhost(pol=policy(retries={"attempts": 1, "retryOn": "gateway-error, 409"})).routes[0].route.retry_policy
    assert r.retry_on == "gateway-error,retriable-status-codes" and list(r.retriable_status_codes) == [409]
    none = vhost(pol=policy(retries={"attempts": 0})).routes[0].route
    assert not none.HasField("retry_policy")
    # No retries but a per-try timeout: never `num_retries: 0` (gRPC rejects it, Envoy gains
    # nothing from it); the only try's timeout bounds the request instead.
    with_per_try = vhost(pol=policy(retries={"attempts": 0, "perTryTimeout": "1s"})).routes[0].route
    assert not with_per_try.HasField("retry_policy")
    assert with_per_try.timeout.ToMilliseconds() == 1000
    capped = vhost(pol=policy(timeout="500ms", retries={"attempts": 0, "perTryTimeout": "1s"})).routes[0].route
    assert not capped.HasField("retry_policy") and capped.timeout.ToMilliseconds() == 500


# ------------------------------------------------------------------------- fault, limits


def test_fault_on_every_route_of_the_vhost() -> None:
    pol = policy(fault={"delay": {"percentage": 50, "fixedDelay": "2s"},
                        "abort": {"percentage": 12.5, "httpStatus": 418}})
    vh = vhost([route("r", rule(prefix("/a")), rule(prefix("/b"), redirect=Redirect(scheme="https")))], pol)
    assert len(vh.routes) == 8  # the scheme redirect is 7 routes (see test_redirects)
    for r in vh.routes:
        fault = fault_pb2.HTTPFault()
        assert r.typed_per_filter_config[names.FAULT_FILTER].Unpack(fault)
        assert fault.delay.fixed_delay.ToMilliseconds() == 2000
        assert (fault.delay.percentage.numerator, fault.delay.percentage.denominator) == (50, 0)
        assert fault.abort.http_status == 418 and fault.abort.percentage.numerator == 125_000
    assert not vhost(pol=policy(fault={})).routes[0].typed_per_filter_config


def _bucket(spec: dict[str, Any]) -> tuple[int, int, int]:
    config = local_rate_limit_pb2.LocalRateLimit()
    assert rate_limit_per_route(policy(rateLimit=spec).rate_limit).Unpack(config)  # type: ignore[arg-type]
    b = config.token_bucket
    return b.max_tokens, b.tokens_per_fill.value, b.fill_interval.ToMilliseconds()


def test_rate_limit_token_bucket() -> None:
    assert _bucket({"requests": 100}) == (100, 100, 1000)
    assert _bucket({"requests": 100, "per": "1m", "burst": 150}) == (150, 100, 60_000)
    # burst < requests keeps the rate: refill in steps that fit the burst.
    assert _bucket({"requests": 100, "per": "1s", "burst": 10}) == (10, 10, 100)
    # Envoy needs fill_interval >= 50 ms: scale short periods up.
    assert _bucket({"requests": 1, "per": "10ms"}) == (5, 5, 50)
    assert _bucket({"requests": 1000, "per": "1s", "burst": 1}) == (50, 50, 50)
    config = local_rate_limit_pb2.LocalRateLimit()
    rate_limit_per_route(policy(rateLimit={"requests": 5}).rate_limit).Unpack(config)  # type: ignore[arg-type]
    assert config.status.code == 429
    assert config.filter_enabled.default_value.numerator == 100
    assert config.filter_enforced.default_value.numerator == 100


def test_http_filter_chains() -> None:
    assert [f.name for f in outbound_http_filters()] == [names.FAULT_FILTER, names.ROUTER_FILTER]
    assert [f.name for f in inbound_http_filters()] == [names.LOCAL_RATE_LIMIT_FILTER, names.ROUTER_FILTER]
    base = local_rate_limit_pb2.LocalRateLimit()
    inbound_http_filters()[0].typed_config.Unpack(base)
    assert not base.HasField("token_bucket") and not base.HasField("filter_enabled")  # disabled by default
    fault = fault_pb2.HTTPFault()
    outbound_http_filters()[0].typed_config.Unpack(fault)
    assert not fault.HasField("delay") and not fault.HasField("abort")


def test_fault_per_route_packs_http_fault() -> None:
    fault = policy(fault={"abort": {"percentage": 100, "httpStatus": 503}}).fault
    assert fault is not None
    packed = fault_per_route(fault)
    assert packed.type_url.endswith("envoy.extensions.filters.http.fault.v3.HTTPFault")


# -------------------------------------------------------------------------------- inbound


def test_inbound_routes_by_host_and_port() -> None:
    cfg = _case_inbound()
    by_domain = {d: v for v in cfg.virtual_hosts for d in v.domains}
    cluster = {d: v.routes[0].route.cluster for d, v in by_domain.items()}
    assert cluster["limited:80"] == cluster["other.shop.svc.cluster.local:81"] == names.inbound_cluster_name(8080)
    assert cluster["admin:9000"] == names.inbound_cluster_name(9000)
    assert cluster["[fd00::21]:9001"] == names.inbound_cluster_name(9001)
    assert cluster["*"] == names.inbound_cluster_name(8080)  # first HTTP app port
    assert "limited" in cluster and "admin" not in cluster  # portless only when unambiguous
    for v in cfg.virtual_hosts:
        assert v.routes[0].route.timeout.ToMilliseconds() == 0 and v.routes[0].route.HasField("timeout")
    # The rate-limited service has its own virtual host (own bucket) and catches `*`.
    assert by_domain["limited:80"] is by_domain["*"]
    assert names.LOCAL_RATE_LIMIT_FILTER in by_domain["limited:80"].routes[0].typed_per_filter_config
    assert names.LOCAL_RATE_LIMIT_FILTER not in by_domain["other:81"].routes[0].typed_per_filter_config
    assert by_domain["other:81"] is not by_domain["limited:80"]
    all_domains = [d for v in cfg.virtual_hosts for d in v.domains]
    assert len(all_domains) == len(set(all_domains))


def test_inbound_equal_limits_of_two_services_are_two_buckets() -> None:
    one, two = svc("one", 80, targets={80: 8080}), svc("two", 80, targets={80: 8080})
    limit = policy(rateLimit={"requests": 10})
    cfg = inbound_route_configuration("x", [(8080, HTTP)], [(one, one.ports[0]), (two, two.ports[0])],
                                      {one.key: limit, two.key: limit})
    assert [(v.name, v.domains[0]) for v in cfg.virtual_hosts] == [("inbound|8080", "one:80"), ("inbound|8080|1", "two:80")]
    assert all(names.LOCAL_RATE_LIMIT_FILTER in v.routes[0].typed_per_filter_config for v in cfg.virtual_hosts)


def test_inbound_without_services_or_http_ports() -> None:
    cfg = _case_inbound_no_services()
    assert [(list(v.domains), v.routes[0].route.cluster) for v in cfg.virtual_hosts] == [
        (["*"], names.inbound_cluster_name(3000))]
    tcp_only = inbound_route_configuration("x", [(5432, AppProtocol.TCP)], [], {})
    assert not tcp_only.virtual_hosts


# ----------------------------------------------------------------------- generated cases


def _generated_routes(rng: random.Random, count: int) -> list[Route]:
    """Random but valid combinations of every feature, for the Envoy validation sweep."""
    paths = ["/", "/a", "/a/b/", "/items", "/x.y", "/with-dash_und~"]
    out = []
    for n in range(count):
        rules = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choice([MatchType.EXACT, MatchType.PREFIX, MatchType.REGEX])
            value = rng.choice(paths) if kind is not MatchType.REGEX else rng.choice(["/a/[0-9]+", ".*", "/(x|y)/?"])
            match = RouteMatch(
                path=PathMatch(kind, value),
                headers=tuple(ValueMatch(f"x-h{i}", "v", rng.choice([MatchType.EXACT, MatchType.REGEX]))
                              for i in range(rng.randint(0, 2))),
                query=tuple(ValueMatch(f"q{i}", "1") for i in range(rng.randint(0, 2))),
                method=rng.choice([None, "GET", "post"]),
            )
            redirect = rewrite = None
            if rng.random() < 0.2:
                redirect = Redirect(
                    scheme=rng.choice([None, "http", "https"]), hostname=rng.choice([None, "h.example"]),
                    port=rng.choice([None, 80, 443, 8443]), status_code=rng.choice([301, 302, 303, 307, 308]),
                    path=rng.choice([None, PathModifier(PathModifierType.FULL, "/f"),
                                     PathModifier(PathModifierType.PREFIX, rng.choice(["/", "/p", "/p/"]))]),
                )
            elif rng.random() < 0.4:
                path_modifier = rng.choice([
                    None, PathModifier(PathModifierType.FULL, "/full"),
                    PathModifier(PathModifierType.PREFIX, rng.choice(["/", "", "/z", "/z/"]))])
                rewrite = Rewrite(hostname=rng.choice([None, "rw.example"]), path=path_modifier)
            backends = tuple(
                BackendRef(rng.choice([API.key, API_V2.key, API_V3.key, MISSING]), rng.choice([None, 8080, 1]),
                           rng.choice([0, 1, 5, 100]))
                for _ in range(rng.randint(0, 3))
            )
            rules.append(RouteRule(
                matches=(match,), backends=() if redirect else backends, redirect=redirect, rewrite=rewrite,
                request_headers=HeaderModifier(set=(("x-s", "1"),), add=(("x-a", "2"),), remove=("x-r",))
                if rng.random() < 0.3 else None,
                response_headers=HeaderModifier(add=(("x-resp", "1"),)) if rng.random() < 0.3 else None,
                mirrors=(Mirror(BackendRef(SHADOW.key), rng.choice([1, 33.3, 100])),) if rng.random() < 0.2 else (),
                request_timeout=rng.choice([None, 0.0, 2.0]), backend_timeout=rng.choice([None, 0.5]),
                retry=rng.choice([None, Retry(attempts=rng.randint(0, 3), codes=rng.choice([(), (503,)]),
                                              backoff=rng.choice([None, 0.025]))]),
            ))
        out.append(route(f"gen-{n}", *rules, kind=rng.choice(["HTTPRoute", "HTTPRoute", "GRPCRoute"]),
                         created=f"2024-01-{n % 28 + 1:02d}T00:00:00Z"))
    return out


def _generated_configs() -> list[route_pb2.RouteConfiguration]:
    rng = random.Random(1731)
    policies = [
        None,
        policy(timeout="1s", retries={"attempts": 2, "retryOn": "5xx,429"}),
        policy(fault={"delay": {"percentage": 33.3, "fixedDelay": "10ms"}},
               retries={"attempts": 1, "perTryTimeout": "100ms"}),
        policy(fault={"abort": {"percentage": 100, "httpStatus": 500}}),
    ]
    configs = []
    for i in range(12):
        vhosts = [vhost(_generated_routes(rng, rng.randint(1, 3)), policies[i % len(policies)],
                        local=bool(i % 2), default_port=bool(i % 3))]
        vhosts.append(vhost(service=API_V2, pol=policies[(i + 1) % len(policies)], default_port=True))
        vhosts.append(vhost(service=WEB, port=80, local=False, default_port=True))
        configs.append(outbound(*vhosts, name=f"generated-{i}"))
    limits: list[dict[str, Any]] = [{"requests": 1}, {"requests": 10, "per": "10ms"},
                                    {"requests": 7, "per": "1s", "burst": 2},
                                    {"requests": 1000, "per": "1h", "burst": 5000}]
    for i, spec in enumerate(limits):
        s = svc(f"rl{i}", 80, targets={80: 8080})
        configs.append(inbound_route_configuration(
            f"generated-inbound-{i}", [(8080, HTTP), (9090, AppProtocol.GRPC)],
            [(s, s.ports[0]), (API, API.ports[1])], {s.key: policy(rateLimit=spec)}))
    return configs


def test_generated_configs_keep_invariants() -> None:
    for cfg in _generated_configs():
        domains = [d for v in cfg.virtual_hosts for d in v.domains]
        assert len(domains) == len(set(domains)), cfg.name
        for v in cfg.virtual_hosts:
            for r in v.routes:
                assert r.WhichOneof("action") in {"route", "redirect", "direct_response"}
                if r.HasField("route"):
                    assert r.route.HasField("timeout")
                    action = r.route
                    if action.HasField("weighted_clusters"):
                        assert sum(c.weight.value for c in action.weighted_clusters.clusters) > 0


# ------------------------------------------------------------------------------ real Envoy


def _referenced_clusters(config: route_pb2.RouteConfiguration) -> set[str]:
    out = set()
    for v in config.virtual_hosts:
        for r in v.routes:
            if r.HasField("route"):
                if r.route.cluster:
                    out.add(r.route.cluster)
                out.update(c.name for c in r.route.weighted_clusters.clusters)
                out.update(m.cluster for m in r.route.request_mirror_policies)
    out.discard(INVALID_BACKEND_CLUSTER)
    return out


def _listener(name: str, port: int, hcm: hcm_pb2.HttpConnectionManager) -> listener_pb2.Listener:
    listener = listener_pb2.Listener(name=name)
    listener.address.socket_address.address = "127.0.0.1"
    listener.address.socket_address.port_value = port
    chain = listener.filter_chains.add()
    chain.filters.add(name="envoy.filters.network.http_connection_manager").typed_config.Pack(hcm)
    return listener


def _hcm_listener(
    name: str, port: int, config: route_pb2.RouteConfiguration, *, inbound: bool
) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=name.replace("|", "_"))
    hcm.route_config.CopyFrom(config)
    hcm.http_filters.extend(inbound_http_filters() if inbound else outbound_http_filters())
    return _listener(name, port, hcm)


def _static_cluster(name: str, port: int) -> cluster_pb2.Cluster:
    return json_format.ParseDict({
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]},
    }, cluster_pb2.Cluster())


def _validate(named: dict[str, tuple[route_pb2.RouteConfiguration, bool]]) -> tuple[bool, str]:
    listeners, clusters = [], set()
    for i, (name, (config, inbound)) in enumerate(sorted(named.items())):
        listeners.append(_hcm_listener(name, 20_000 + i, config, inbound=inbound))  # validate binds nothing
        clusters |= _referenced_clusters(config)
    return validate_static(
        {LISTENER_TYPE: listeners, CLUSTER_TYPE: [_static_cluster(c, 1) for c in sorted(clusters)]},
        inline_dynamic=False,
    )


@pytest.mark.envoy
def test_envoy_accepts_cases_and_generated_configs() -> None:
    named = {f"case-{k}": (build(), k in INBOUND_CASES) for k, build in CASES.items()}
    for config in _generated_configs():
        named[config.name] = (config, config.name.startswith("generated-inbound"))
    ok, output = _validate(named)
    assert ok, output[-4000:]


@pytest.mark.envoy
def test_envoy_validation_really_checks_route_configs() -> None:
    """The harness itself: a duplicate domain (which outbound_route_configuration prevents)
    is rejected, so a green validation above means something."""
    bad = outbound_route_configuration("bad", [vhost()])
    bad.virtual_hosts.add().CopyFrom(bad.virtual_hosts[0])
    bad.virtual_hosts[1].name = "copy"
    ok, output = _validate({"bad": (bad, False)})
    assert not ok and "domain" in output.lower()


# A live Envoy: outbound + inbound listeners from our route configs, every cluster pointing
# at an echo listener in the same Envoy that names the backend and shows path and host.


def _echo_listener(name: str, port: int) -> listener_pb2.Listener:
    config = route_pb2.RouteConfiguration(name=f"echo-{name}")
    vh = config.virtual_hosts.add(name="echo", domains=["*"])
    r = vh.routes.add()
    r.match.prefix = "/"
    r.direct_response.status = 200
    for key, value in (("x-backend", name), ("x-path", "%REQ(:PATH)%"), ("x-host", "%REQ(:AUTHORITY)%")):
        r.response_headers_to_add.add(header={"key": key, "value": value})
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"echo_{name}", route_config=config)
    hcm.http_filters.add(name=names.ROUTER_FILTER).typed_config.Pack(router_pb2.Router())
    return _listener(f"echo-{name}", port, hcm)


def _get(port: int, host: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


@pytest.mark.envoy
def test_live_envoy_routes_as_the_configs_say() -> None:
    flaky = svc("flaky", 8080, ip="10.96.0.30")
    services = {**SERVICES, flaky.key: flaky}
    routes = [
        route("old", rule(prefix("/foo"), backends=to(API_V2.key)),
              rule(prefix("/", headers=(ValueMatch("x-canary", "yes"),)), backends=to(API_V3.key)),
              created="2024-01-01T00:00:00Z"),
        route("new", rule(exact("/foo/exact"), backends=to(API_V3.key)),
              rule(prefix("/strip"), rewrite=Rewrite(path=PathModifier(PathModifierType.PREFIX, "/"))),
              rule(prefix("/pre/"), rewrite=Rewrite(path=PathModifier(PathModifierType.PREFIX, "/new/"))),
              rule(exact("/moved"), redirect=Redirect(scheme="https", status_code=301)),
              rule(prefix("/split"), backends=to((API_V2.key, 1), (API_V3.key, 0))),
              rule(prefix("/broken"), backends=to(MISSING)),
              rule(prefix("/"), backends=to(API.key)),
              created="2024-02-01T00:00:00Z"),
    ]
    out_cfg = outbound_route_configuration("outbound", [
        service_virtual_host(API, API.ports[0], routes, None, services, local=True, default_port=False),
        service_virtual_host(flaky, flaky.ports[0], [], policy(fault={"abort": {"percentage": 100, "httpStatus": 418}}),
                             services, local=True, default_port=False),
    ])
    limited = svc("limited", 80, targets={80: 8080})
    in_cfg = inbound_route_configuration(
        "inbound", [(8080, HTTP), (9090, HTTP)], [(limited, limited.ports[0]), (API, API.ports[1])],
        {limited.key: policy(rateLimit={"requests": 2, "per": "1h"})})

    backends = sorted(_referenced_clusters(out_cfg) | _referenced_clusters(in_cfg))
    out_port, in_port, *echo_ports = free_ports(2 + len(backends))
    listeners = [_hcm_listener("outbound", out_port, out_cfg, inbound=False),
                 _hcm_listener("inbound", in_port, in_cfg, inbound=True)]
    listeners += [_echo_listener(b, p) for b, p in zip(backends, echo_ports, strict=True)]
    clusters = [_static_cluster(b, p) for b, p in zip(backends, echo_ports, strict=True)]
    bootstrap = static_bootstrap({LISTENER_TYPE: listeners, CLUSTER_TYPE: clusters}, inline_dynamic=False)

    api, v2, v3 = (names.cluster_name(k, 8080) for k in (API.key, API_V2.key, API_V3.key))
    with EnvoyProcess(bootstrap, name="routes-live"):
        wait_for_port("127.0.0.1", out_port)
        wait_for_port("127.0.0.1", in_port)

        def backend(path: str, host: str = "api:8080", **headers: str) -> tuple[int, str | None, str | None]:
            status, h = _get(out_port, host, path, headers)
            return status, h.get("x-backend"), h.get("x-path")

        assert backend("/foo/exact") == (200, v3, "/foo/exact")  # exact beats the older prefix
        assert backend("/foo/bar") == (200, v2, "/foo/bar")
        assert backend("/foo") == (200, v2, "/foo")
        assert backend("/foobar") == (200, api, "/foobar")  # PathPrefix is element-wise
        assert backend("/anything", **{"x-canary": "yes"}) == (200, v3, "/anything")  # headers beat plain "/"
        assert backend("/strip/a/b") == (200, api, "/a/b")
        assert backend("/strip") == (200, api, "/")
        assert backend("/pre/x?q=1") == (200, api, "/new/x?q=1")
        assert backend("/pre") == (200, api, "/new")
        assert {backend("/split")[1] for _ in range(20)} == {v2}  # weight 0 gets nothing
        assert backend("/broken")[0] == 500
        assert backend("/x", host="api.shop.svc.cluster.local:8080")[1] == api
        assert backend("/x", host="api")[0] == 404  # not the default port here: no such vhost
        status, headers = _get(out_port, "api.shop:8080", "/moved")
        assert status == 301 and headers["location"] == "https://api.shop/moved"
        assert _get(out_port, "flaky:8080", "/")[0] == 418  # the destination's fault, client side

        inbound_cluster = names.inbound_cluster_name
        assert _get(in_port, "api:9090", "/")[1]["x-backend"] == inbound_cluster(9090)
        assert _get(in_port, "api.shop.svc.cluster.local:9090", "/")[1]["x-backend"] == inbound_cluster(9090)
        assert [_get(in_port, "limited:80", "/")[0] for _ in range(2)] == [200, 200]
        status, headers = _get(in_port, "unknown-host", "/")  # catch-all shares the limited bucket
        assert status == 429 and "x-ratelimit-limit" in headers
        assert _get(in_port, "api:9090", "/")[0] == 200  # other port, no limit
