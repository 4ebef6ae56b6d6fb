"""mTLS and authorization translation: model rules, goldens, and Envoy's own validation.

- goldens: the `mtls-*` and `authz-*` cases of tests/testdata/in/ (the mesh users write and the
  proxy shown) and their outputs in tests/testdata/out/, checked and passed through
  `envoy --mode validate` by tests/unit/test_goldens.py (tests/testdata/README.md);
- the precedence of modes, the meaning of policy fields and the incremental controller are
  pinned by small tests. tests/e2e/test_mtls_authz.py proves the goldens with real traffic.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from tests.support import goldens
from tests.support.envoy import validate_static
from tests.support.proxies import verified
from tests.support.static_secrets import with_static_secrets
from xds_server.model.mesh import Workload
from xds_server.model.security import (
    AuthorizationPolicy,
    MtlsMode,
    MTLSPolicy,
    SecuritySettings,
    authorization_policies,
    mtls_policy_chain,
    resolve_mode,
)
from xds_server.model.store import MeshStore
from xds_server.sources.k8s_objects import ObjectError, convert
from xds_server.sources.policies import parse_authorization_policy_spec, parse_mtls_policy_spec
from xds_server.translate import rbac, tls
from xds_server.translate.controller import MeshController, proxy_resources
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache

MESSAGES: dict[str, type[Message]] = {
    types.LISTENER: listener_pb2.Listener,
    types.ROUTE: route_pb2.RouteConfiguration,
    types.CLUSTER: cluster_pb2.Cluster,
    types.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
}
SETTINGS = SecuritySettings(mtls=True)


# ------------------------------------------------------------------------------- helpers




def node(namespace: str, pod: str, service_account: str = "default", ip: str = "") -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "pod": pod, "service_account": service_account, "pod_ip": ip})
    return base_pb2.Node(id=f"{pod}.{namespace}", metadata=metadata)


def load(text_or_objects: Any, settings: SecuritySettings = SETTINGS) -> tuple[MeshStore, MeshController]:
    docs = yaml.safe_load_all(text_or_objects) if isinstance(text_or_objects, str) else text_or_objects
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache, security=settings)
    store.sync("test", [convert(d) for d in docs if d])
    return store, controller


def resources_of(controller: MeshController, store: MeshStore, proxy: str) -> dict[str, dict[str, Message]]:
    namespace, pod = proxy.split("/")
    workload = store.get("Pod", namespace, pod)
    view = controller.view_for(verified(node(namespace, pod, workload.service_account, workload.ip)))
    out: dict[str, dict[str, Message]] = {}
    for type_url, resources in proxy_resources(view).items():
        out[type_url] = {r.name: r.unpack(MESSAGES[type_url]) for r in resources}
    return out


@pytest.mark.envoy
def test_envoy_validation_really_checks_the_tls_contexts() -> None:
    """The harness of the goldens' Envoy validation (tests/unit/test_goldens.py): a TLS
    context Envoy must refuse (a client certificate required but no validation context)
    fails validation, so green there means something."""
    _, resources = goldens.translate_case("mtls-strict")
    listener = next(m for m in resources["listeners"] if m.name == "inbound|shop/api-1")
    context = tls_pb2.DownstreamTlsContext()
    listener.filter_chains[0].transport_socket.typed_config.Unpack(context)
    context.common_tls_context.ClearField("combined_validation_context")
    listener.filter_chains[0].transport_socket.typed_config.Pack(context)
    by_type = {goldens.OUTPUT_TYPES[s][0]: list(ms) for s, ms in resources.items() if s != "secrets"}
    ok, output = validate_static(with_static_secrets(by_type))
    assert not ok and "validation" in output.lower(), output[-2000:]


# --------------------------------------------------------------------------- mode rules


def _mtls(namespace: str, name: str, created: str = "", **spec: Any) -> MTLSPolicy:
    return MTLSPolicy(namespace=namespace, name=name, spec=parse_mtls_policy_spec(spec), created=created)


def _mode(policies: list[MTLSPolicy], labels: dict[str, str], port: int | None = None,
          settings: SecuritySettings = SETTINGS, namespace: str = "shop") -> MtlsMode:
    return resolve_mode(mtls_policy_chain(namespace, labels, policies, settings), port, settings)


def test_mode_precedence_workload_namespace_mesh_default() -> None:
    mesh = _mtls("xds-system", "mesh", mode="STRICT")
    namespace = _mtls("shop", "ns", mode="PERMISSIVE")
    workload = _mtls("shop", "api", selector={"matchLabels": {"app": "api"}}, mode="DISABLE")
    assert _mode([], {}) is MtlsMode.PERMISSIVE  # the setting's default
    assert _mode([], {}, settings=SecuritySettings(mtls=True, default_mode=MtlsMode.STRICT)) is MtlsMode.STRICT
    assert _mode([mesh], {}) is MtlsMode.STRICT
    assert _mode([mesh, namespace], {}) is MtlsMode.PERMISSIVE
    assert _mode([mesh, namespace, workload], {"app": "api"}) is MtlsMode.DISABLE
    assert _mode([mesh, namespace, workload], {"app": "web"}) is MtlsMode.PERMISSIVE
    # Another namespace's policies never apply; the root namespace's own workloads use its
    # policies as namespace policies.
    assert _mode([namespace, workload], {"app": "api"}, namespace="other") is MtlsMode.PERMISSIVE
    assert _mode([mesh], {}, namespace="xds-system") is MtlsMode.STRICT


def test_mode_unset_inherits_and_port_overrides_win_at_their_level() -> None:
    namespace = _mtls("shop", "ns", mode="STRICT", portLevelMtls={9090: "DISABLE"})
    workload = _mtls("shop", "api", selector={"matchLabels": {"app": "api"}}, mode="UNSET",
                     portLevelMtls={"8080": "PERMISSIVE"})
    labels = {"app": "api"}
    assert _mode([namespace, workload], labels, 8080) is MtlsMode.PERMISSIVE
    assert _mode([namespace, workload], labels, 9090) is MtlsMode.DISABLE  # namespace's override
    assert _mode([namespace, workload], labels, 7070) is MtlsMode.STRICT  # inherited
    assert _mode([namespace, workload], labels) is MtlsMode.STRICT


def test_oldest_policy_of_a_level_wins() -> None:
    old = _mtls("shop", "b-old", created="2024-01-01T00:00:00Z", mode="STRICT")
    new = _mtls("shop", "a-new", created="2025-01-01T00:00:00Z", mode="DISABLE")
    assert _mode([new, old], {}) is MtlsMode.STRICT


def test_without_certificates_every_mode_is_disable() -> None:
    strict = _mtls("shop", "ns", mode="STRICT")
    assert _mode([strict], {}, settings=SecuritySettings(mtls=False)) is MtlsMode.DISABLE


def test_authorization_policies_that_apply() -> None:
    def policy(namespace: str, name: str, **spec: Any) -> AuthorizationPolicy:
        return AuthorizationPolicy(namespace=namespace, name=name,
                                   spec=parse_authorization_policy_spec(spec))

    everyone = policy("shop", "all")
    api_only = policy("shop", "api", selector={"matchLabels": {"app": "api"}})
    mesh = policy("xds-system", "mesh")
    mesh_api = policy("xds-system", "mesh-api", selector={"matchLabels": {"app": "api"}})
    elsewhere = policy("other", "x")
    found = authorization_policies("shop", {"app": "api"}, [everyone, api_only, mesh, mesh_api, elsewhere], SETTINGS)
    assert [p.name for p in found] == ["all", "api", "mesh", "mesh-api"]
    found = authorization_policies("shop", {"app": "web"}, [everyone, api_only, mesh, mesh_api, elsewhere], SETTINGS)
    assert [p.name for p in found] == ["all", "mesh"]


# ------------------------------------------------------------------------------ rbac rules


def _authz(spec: dict[str, Any], *, port: int = 8080, http: bool = True,
           settings: SecuritySettings = SETTINGS) -> rbac.PortAuthz:
    policy = AuthorizationPolicy(namespace="shop", name="p", spec=parse_authorization_policy_spec(spec))
    return rbac.authorize([policy], settings, port, http=http)


def test_no_policy_no_filter_and_allow_nothing() -> None:
    assert rbac.authorize([], SETTINGS, 8080, http=True).empty
    nothing = _authz({})  # Istio's allow-nothing
    assert nothing.deny is None and nothing.allow is not None and not nothing.allow.policies
    assert _authz({"action": "DENY"}).empty  # a DENY policy without rules denies nothing
    assert rbac.authorize([], SecuritySettings(default_deny=True), 8080, http=True).allow.policies == {}


def test_empty_rule_matches_everything() -> None:
    allow = _authz({"rules": [{}]}).allow
    (policy,) = allow.policies.values()
    assert policy.permissions[0].any and policy.principals[0].any


def test_principal_spellings() -> None:
    compiler = rbac._Compiler("cluster.local", 8080, True)
    name = lambda v: compiler.principal(v).authenticated.principal_name  # noqa: E731
    assert name("cluster.local/ns/a/sa/b").exact == "spiffe://cluster.local/ns/a/sa/b"
    assert name("spiffe://cluster.local/ns/a/sa/b").exact == "spiffe://cluster.local/ns/a/sa/b"
    assert name("cluster.local/ns/a/*").prefix == "spiffe://cluster.local/ns/a/"
    assert name("*/sa/b").suffix == "/sa/b"
    assert not compiler.principal("*").authenticated.HasField("principal_name")  # any mTLS peer
    assert compiler.namespace("shop").authenticated.principal_name.prefix == "spiffe://cluster.local/ns/shop/sa/"
    assert compiler.namespace("team-*").authenticated.principal_name.safe_regex.regex == \
        r"spiffe://cluster\.local/ns/team-[^/]*/sa/[^/]+"
    assert compiler.service_account("ops/admin").authenticated.principal_name.exact == \
        "spiffe://cluster.local/ns/ops/sa/admin"


def test_ports_are_resolved_per_app_port() -> None:
    spec = {"rules": [{"to": [{"operation": {"ports": ["8080"], "methods": ["GET"]}}]}]}
    assert len(_authz(spec, port=8080).allow.policies) == 1
    assert len(_authz(spec, port=9090).allow.policies) == 0  # ALLOW present, rule absent: deny
    spec = {"rules": [{"to": [{"operation": {"notPorts": ["8080"]}}]}]}
    assert len(_authz(spec, port=8080).allow.policies) == 0
    assert len(_authz(spec, port=9090).allow.policies) == 1
    spec = {"rules": [{"when": [{"key": "destination.port", "values": ["9090"]}]}]}
    assert len(_authz(spec, port=8080).allow.policies) == 0
    assert len(_authz(spec, port=9090).allow.policies) == 1


def test_http_only_fields_on_tcp_fail_closed() -> None:
    http_rule = {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}
    assert _authz(http_rule, http=False).allow.policies == {}  # ALLOW: matches nothing
    deny = _authz({"action": "DENY", **http_rule}, http=False).deny
    (policy,) = deny.policies.values()
    assert policy.permissions[0].any  # DENY: HTTP fields dropped, denies the whole port
    header_rule = {"rules": [{"when": [{"key": "request.headers[x]", "values": ["1"]}]}]}
    assert _authz(header_rule, http=False).allow.policies == {}
    assert len(_authz({"action": "DENY", **header_rule}, http=False).deny.policies) == 1


def test_paths_hosts_and_headers() -> None:
    spec = {"rules": [{"to": [{"operation": {"paths": ["/a", "/b/*", "*.png", "*"], "hosts": ["api.shop"]}}],
                       "when": [{"key": "request.headers[x-v]", "values": ["*"], "notValues": ["bad*"]}]}]}
    (policy,) = _authz(spec).allow.policies.values()
    text = json_format.MessageToJson(policy)
    for fragment in ('"exact": "/a"', '"prefix": "/b/"', '"suffix": ".png"', '"any": true',
                     r'(?i)api\\.shop(:[0-9]+)?', '"presentMatch": true', '"prefix": "bad"', '"notRule"'):
        assert fragment in text, fragment


@pytest.mark.parametrize(("spec", "field", "message"), [
    ({"rules": [{"from": [{"source": {}}]}]}, "spec.rules[0].from[0].source", "at least one field"),
    ({"rules": [{"from": [{"source": {"principals": ["a*b"]}}]}]}, "spec.rules[0].from[0].source.principals", "'*'"),
    ({"rules": [{"from": [{"source": {"principals": ["web"]}}]}]}, "spec.rules[0].from[0].source.principals", "SPIFFE"),
    ({"rules": [{"from": [{"source": {"serviceAccounts": ["web"]}}]}]}, "spec.rules[0].from[0].source.serviceAccounts", "NAMESPACE/"),
    ({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.300"]}}]}]}, "spec.rules[0].from[0].source.ipBlocks", "CIDR"),
    ({"rules": [{"to": [{"operation": {"ports": ["70000"]}}]}]}, "spec.rules[0].to[0].operation.ports", "out of range"),
    ({"rules": [{"to": [{"operation": {"methods": ["get"]}}]}]}, "spec.rules[0].to[0].operation.methods[0]", "pattern"),
    ({"rules": [{"to": [{"operation": {"paths": ["api"]}}]}]}, "spec.rules[0].to[0].operation.paths", "starts with"),
    ({"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}, "spec.rules[0].when[0]", "unsupported key"),
    ({"rules": [{"when": [{"key": "source.ip"}]}]}, "spec.rules[0].when[0]", "values or notValues"),
    ({"action": "AUDIT"}, "spec.action", "'ALLOW' or 'DENY'"),
])
def test_invalid_authorization_policies_name_the_field(spec: dict, field: str, message: str) -> None:
    with pytest.raises(ObjectError) as err:
        convert({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "AuthorizationPolicy",
                 "metadata": {"name": "p", "namespace": "shop"}, "spec": spec})
    assert err.value.field_path == field and message in err.value.message, str(err.value)


@pytest.mark.parametrize(("spec", "field"), [
    ({"mode": "strict"}, "spec.mode"),
    ({"portLevelMtls": {"0": "STRICT"}}, "spec.portLevelMtls[0]"),
    ({"portLevelMtls": {8080: "OFF"}}, "spec.portLevelMtls[8080]"),
    ({"selector": {"app": "x"}}, "spec.selector.app"),
])
def test_invalid_mtls_policies_name_the_field(spec: dict, field: str) -> None:
    with pytest.raises(ObjectError) as err:
        convert({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "MTLSPolicy",
                 "metadata": {"name": "p", "namespace": "shop"}, "spec": spec})
    assert err.value.field_path == field, str(err.value)


# ------------------------------------------------------------------------ controller


def _mesh_docs(case: str = "mtls-strict") -> list[dict[str, Any]]:
    """A golden case's mesh (tests/testdata/in/<case>.yaml) as documents."""
    return goldens.mesh_documents(case)


def test_policy_change_rebuilds_only_the_proxies_it_may_select() -> None:
    store, controller = load(_mesh_docs())
    for proxy in ("shop/api-1", "shop/web-1"):
        resources_of(controller, store, proxy)
    controller.view_for(verified(node("other", "x-1", "x", "10.0.9.9")))
    rebuilt: list[tuple[str, str]] = []
    builder = controller.proxy_builder
    original = builder.build

    def spy(key, *args):
        rebuilt.append(key)
        return original(key, *args)

    builder.build = spy
    store.put("test", convert({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "AuthorizationPolicy",
                               "metadata": {"name": "p", "namespace": "shop"}, "spec": {}}))
    assert sorted(rebuilt) == [("shop", "api-1"), ("shop", "web-1")]
    rebuilt.clear()
    store.put("test", convert({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "MTLSPolicy",
                               "metadata": {"name": "mesh", "namespace": "xds-system"}, "spec": {"mode": "STRICT"}}))
    assert sorted(rebuilt) == [("other", "x-1"), ("shop", "api-1"), ("shop", "web-1")]


def test_authorization_change_is_a_route_update_not_a_listener_update() -> None:
    store, controller = load(_mesh_docs())
    before = resources_of(controller, store, "shop/api-1")
    store.put("test", convert({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "AuthorizationPolicy",
                               "metadata": {"name": "p", "namespace": "shop"},
                               "spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}}))
    after = resources_of(controller, store, "shop/api-1")
    assert after[types.LISTENER] == before[types.LISTENER]  # no drain of open connections
    assert after[types.ROUTE] != before[types.ROUTE]


def test_mode_change_remarks_endpoints_and_new_identity_updates_the_cluster() -> None:
    store, controller = load(_mesh_docs())
    cla = "outbound|80||api.shop.svc.cluster.local"

    def marked() -> list[bool]:
        per_type = resources_of(controller, store, "shop/web-1")
        return [tls.is_marked_mtls(e) for g in per_type[types.ENDPOINT][cla].endpoints for e in g.lb_endpoints]

    def sans() -> list[str]:
        cluster = resources_of(controller, store, "shop/web-1")[types.CLUSTER][cla]
        context = tls_pb2.UpstreamTlsContext()
        cluster.transport_socket_matches[0].transport_socket.typed_config.Unpack(context)
        matchers = context.common_tls_context.combined_validation_context.default_validation_context
        return [m.matcher.exact for m in matchers.match_typed_subject_alt_names]

    assert marked() == [True] and sans() == ["spiffe://cluster.local/ns/shop/sa/api"]
    store.put("test", convert({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "MTLSPolicy",
                               "metadata": {"name": "strict", "namespace": "shop"}, "spec": {"mode": "DISABLE"}}))
    assert marked() == [False]
    # A second pod with another service account joins the service: its SPIFFE ID is accepted.
    docs = _mesh_docs()
    pod = next(d for d in docs if d["kind"] == "Pod" and d["metadata"]["name"] == "api-1")
    pod2 = json.loads(json.dumps(pod))
    pod2["metadata"]["name"], pod2["spec"]["serviceAccountName"], pod2["status"]["podIP"] = "api-2", "api-v2", "10.0.0.9"
    slice_ = next(d for d in docs if d["kind"] == "EndpointSlice")
    slice_["endpoints"].append({"addresses": ["10.0.0.9"], "targetRef": {"kind": "Pod", "name": "api-2"}})
    store.put("test", convert(pod2))
    store.put("test", convert(slice_))
    assert sans() == ["spiffe://cluster.local/ns/shop/sa/api", "spiffe://cluster.local/ns/shop/sa/api-v2"]


def test_every_inbound_virtual_host_is_tied_to_an_app_port() -> None:
    """Authorization is attached per virtual host by its app port: a virtual host whose port
    could not be read would silently have none."""
    for case in goldens.cases():
        _, resources = goldens.translate_case(case)
        for config in resources["routes"]:
            if config.name.startswith("inbound|"):
                for vhost in config.virtual_hosts:  # type: ignore[attr-defined]
                    assert rbac_port(vhost.name) is not None, (case, config.name, vhost.name)


def rbac_port(name: str) -> int | None:
    parts = name.split("|")
    return int(parts[1]) if len(parts) >= 2 and parts[0] == "inbound" and parts[1].isdigit() else None


def test_rbac_messages_are_valid_protos() -> None:
    # Sanity: what authorize() builds serializes deterministically (the cache versions by it).
    authz = _authz({"rules": [{"from": [{"source": {"namespaces": ["a", "b*"]}}]}]})
    assert isinstance(authz.allow, rbac_pb2.RBAC)
    assert authz.allow.SerializeToString(deterministic=True) == \
        _authz({"rules": [{"from": [{"source": {"namespaces": ["a", "b*"]}}]}]}).allow.SerializeToString(deterministic=True)


def test_workload_endpoint_mtls_needs_a_sidecar() -> None:
    from xds_server.translate.security import SecurityIndex

    index = SecurityIndex(SETTINGS)
    assert index.endpoint_mtls(Workload("shop", "a", meshed=True), 8080)
    assert not index.endpoint_mtls(Workload("shop", "a", meshed=False), 8080)


# --------------------------------------------------------- incremental == from scratch


class SecureWorld:
    """A random mesh with mTLS and authorization policies changing one object at a time."""

    NAMESPACES = ("a", "b", "xds-system")

    def __init__(self, seed: int) -> None:
        import random

        self.rng = random.Random(seed)
        self.store, self.cache = MeshStore(), ResourceCache()
        self.controller = MeshController(self.store, self.cache, security=SETTINGS)
        for i in range(6):
            self.add_service(i)
        self.nodes = [node(ns, name, w.service_account, w.ip)
                      for (ns, name), w in sorted(self.store.all("Pod").items())][:6]
        self.nodes.append(node("a", "grpc-1", "grpc", "10.7.0.1"))
        self.nodes[-1].user_agent_name = "gRPC Python"
        for n in self.nodes:
            self.controller.view_for(verified(n))

    def add_service(self, i: int) -> None:
        from xds_server.model.mesh import (
            AppProtocol,
            Endpoint,
            EndpointPort,
            EndpointSlice,
            Service,
            ServicePort,
        )

        ns = self.rng.choice(self.NAMESPACES[:2])
        ports = (ServicePort(80, "http", 8080, AppProtocol.HTTP), ServicePort(5432, "db", 5432, AppProtocol.TCP))
        self.store.put("t", Service(ns, f"svc-{i}", ports))
        pods = [Workload(ns, f"svc-{i}-{j}", ip=f"10.1.{i}.{j}", meshed=self.rng.random() < 0.8,
                         service_account=self.rng.choice(["x", "y"]), labels=(("app", f"svc-{i}"),))
                for j in range(2)]
        for pod in pods:
            self.store.put("t", pod)
        self.store.put("t", EndpointSlice(
            ns, f"svc-{i}-x", f"svc-{i}",
            (EndpointPort("http", 8080, AppProtocol.HTTP), EndpointPort("db", 5432, AppProtocol.TCP)),
            tuple(Endpoint(p.ip, pod=p.name) for p in pods),
        ))

    def step(self, i: int) -> str:
        import dataclasses

        rng = self.rng
        action = rng.choice(["mtls", "mtls", "unmtls", "authz", "authz", "unauthz", "account", "sidecar"])
        ns = rng.choice(self.NAMESPACES)
        if action == "mtls":
            spec: dict[str, Any] = {"mode": rng.choice(["STRICT", "PERMISSIVE", "DISABLE", "UNSET"])}
            if rng.random() < 0.5:
                spec["selector"] = {"matchLabels": {"app": f"svc-{rng.randint(0, 5)}"}}
            if rng.random() < 0.4:
                spec["portLevelMtls"] = {rng.choice([8080, 5432]): rng.choice(["STRICT", "DISABLE"])}
            self.store.put("t", MTLSPolicy(namespace=ns, name=f"m{rng.randint(0, 2)}",
                                           spec=parse_mtls_policy_spec(spec)))
        elif action == "unmtls" and self.store.all("MTLSPolicy"):
            key = rng.choice(sorted(self.store.all("MTLSPolicy")))
            self.store.remove("t", ("MTLSPolicy", *key))
        elif action == "authz":
            rule = rng.choice([
                {}, {"from": [{"source": {"namespaces": ["a"]}}]},
                {"to": [{"operation": {"methods": ["GET"], "ports": [rng.choice(["8080", "5432"])]}}]},
                {"from": [{"source": {"serviceAccounts": ["b/y"]}}]},
            ])
            spec = {"action": rng.choice(["ALLOW", "DENY"]), "rules": [rule] if rng.random() < 0.8 else []}
            self.store.put("t", AuthorizationPolicy(namespace=ns, name=f"z{rng.randint(0, 2)}",
                                                    spec=parse_authorization_policy_spec(spec)))
        elif action == "unauthz" and self.store.all("AuthorizationPolicy"):
            key = rng.choice(sorted(self.store.all("AuthorizationPolicy")))
            self.store.remove("t", ("AuthorizationPolicy", *key))
        elif action in ("account", "sidecar"):
            key = rng.choice(sorted(self.store.all("Pod")))
            pod = self.store.get("Pod", *key)
            if action == "account":
                pod = dataclasses.replace(pod, service_account=rng.choice(["x", "y", "z"]))
            else:
                pod = dataclasses.replace(pod, meshed=not pod.meshed)
            self.store.put("t", pod)
        return action


def _snapshot(controller: MeshController, cache: ResourceCache, nodes: list[base_pb2.Node]) -> tuple:
    everything = {(t, n): r.body for t in cache.type_urls() for n, r in cache.resources(t).items()}
    views = {}
    for n in nodes:
        view = controller.view_for(verified(n))
        views[n.id] = {t: sorted((r.name, r.version) for r in rs) for t, rs in proxy_resources(view).items()}
        controller.release(verified(n))
    return everything, views


@pytest.mark.parametrize("seed", range(4))
def test_incremental_security_updates_equal_a_fresh_build(seed: int) -> None:
    from xds_server.model.store import KINDS

    world = SecureWorld(seed)
    for i in range(50):
        action = world.step(i)
        fresh_store, fresh_cache = MeshStore(), ResourceCache()
        fresh_store.sync("t", [o for kind in KINDS for o in world.store.all(kind).values()])
        fresh = MeshController(fresh_store, fresh_cache, security=SETTINGS)
        for n in world.nodes:
            fresh.view_for(verified(n))
        got = _snapshot(world.controller, world.cache, world.nodes)
        want = _snapshot(fresh, fresh_cache, world.nodes)
        assert got[1] == want[1], f"seed {seed}, step {i} ({action}): views differ"
        diff = sorted(k for k in set(got[0]) | set(want[0]) if got[0].get(k) != want[0].get(k))
        assert not diff, f"seed {seed}, step {i} ({action}): content differs for {diff[:5]}"


# ------------------------------------------------------------- random policies in Envoy

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.sampled_from(["shop", "web", "a-b", "x.y", "front"])
_wild = st.one_of(_names, _names.map(lambda n: n + "*"), _names.map(lambda n: "*" + n), st.just("*"))
_principal = st.one_of(
    st.just("*"),
    st.builds(lambda ns, sa: f"cluster.local/ns/{ns}/sa/{sa}", _names, _names),
    st.builds(lambda ns: f"spiffe://cluster.local/ns/{ns}/*", _names),
    _names.map(lambda sa: f"*/sa/{sa}"),
)
_account = st.builds(lambda ns, sa: f"{ns}/{sa}", _names, _names)
_cidr = st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1", "192.168.1.0/24"])
_path = st.one_of(st.sampled_from(["/", "/api", "/a.b+c(d)"]), _names.map(lambda n: f"/{n}/*"),
                  _names.map(lambda n: f"*.{n}"), st.just("*"))
_port = st.sampled_from(["8080", "5432", "9999"])
_some = lambda s: st.lists(s, min_size=1, max_size=3)  # noqa: E731


def _nonempty(fields: dict) -> dict:
    return {k: v for k, v in fields.items() if v} or {"namespaces": ["shop"]}


_source = st.fixed_dictionaries({}, optional={
    "principals": _some(_principal), "notPrincipals": _some(_principal),
    "namespaces": _some(_wild), "notNamespaces": _some(_wild),
    "serviceAccounts": _some(_account), "notServiceAccounts": _some(_account),
    "ipBlocks": _some(_cidr), "notIpBlocks": _some(_cidr),
}).map(_nonempty)
_operation = st.fixed_dictionaries({}, optional={
    "hosts": _some(_wild), "notHosts": _some(_wild), "ports": _some(_port), "notPorts": _some(_port),
    "methods": _some(st.sampled_from(["GET", "POST", "DELETE"])), "notMethods": _some(st.just("PUT")),
    "paths": _some(_path), "notPaths": _some(_path),
}).map(lambda f: {k: v for k, v in f.items() if v} or {"methods": ["GET"]})
_condition = st.one_of(
    st.builds(lambda h, v: {"key": f"request.headers[{h}]", "values": v}, _names, _some(_wild)),
    st.builds(lambda v: {"key": "source.ip", "notValues": v}, _some(_cidr)),
    st.builds(lambda v: {"key": "source.namespace", "values": v}, _some(_wild)),
    st.builds(lambda v: {"key": "source.principal", "values": v}, _some(_principal)),
    st.builds(lambda v: {"key": "destination.port", "values": v}, _some(_port)),
)
_rule = st.fixed_dictionaries({}, optional={
    "from": st.lists(_source.map(lambda s: {"source": s}), max_size=2),
    "to": st.lists(_operation.map(lambda o: {"operation": o}), max_size=2),
    "when": st.lists(_condition, max_size=2),
})
_policy = st.fixed_dictionaries({
    "action": st.sampled_from(["ALLOW", "DENY"]),
    "rules": st.lists(_rule, max_size=3),
})


@pytest.mark.envoy
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies=st.lists(_policy, min_size=1, max_size=3), mode=st.sampled_from(["STRICT", "PERMISSIVE"]))
def test_envoy_accepts_random_authorization_policies(policies: list[dict], mode: str) -> None:
    docs = _mesh_docs("mtls-permissive-http-tcp")
    docs.append({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "MTLSPolicy",
                 "metadata": {"name": "m", "namespace": "shop"}, "spec": {"mode": mode}})
    for i, spec in enumerate(policies):
        docs.append({"apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": f"p{i}", "namespace": "shop"}, "spec": spec})
    store, controller = load(docs)
    per_type = resources_of(controller, store, "shop/api-1")
    ok, output = validate_static(with_static_secrets({t: list(m.values()) for t, m in per_type.items()}))
    assert ok, f"{policies}\n{output[-3000:]}"
