"""NetworkPolicy translation, incrementally: what a pod's sidecar enforces follows the pods a
policy's peers match (labels, service accounts, sidecars), and a change that no peer can see
rebuilds nothing. Every step is compared with a fresh build of the same store."""

from __future__ import annotations

import dataclasses

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2

from tests.support.proxies import verified
from xds_server.model.mesh import Namespace, Workload
from xds_server.model.netpol import LabelSelector, NetworkPolicy, Peer, PolicyRule, resolve_ingress, view_of
from xds_server.model.security import SecuritySettings
from xds_server.model.store import KINDS, MeshStore
from xds_server.translate.controller import MeshController
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache

NS = "shop"
SOURCE = "test"
MTLS = SecuritySettings(mtls=True)
INBOUND = f"inbound|{NS}/api-1"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


def pod(name: str, ip: str, app: str, account: str, meshed: bool = True) -> Workload:
    return Workload(NS, name, ip=ip, service_account=account, labels=(("app", app),), meshed=meshed)


def node(name: str, ip: str) -> base_pb2.Node:
    n = base_pb2.Node(id=f"{name}.{NS}")
    n.metadata.update({"namespace": NS, "pod": name, "pod_ip": ip})
    return n


ALLOW_FRONTEND = NetworkPolicy(
    NS, "api-from-frontend", LabelSelector((("app", "api"),)), frozenset({"Ingress"}),
    ingress=(PolicyRule(peers=(Peer(pod_selector=LabelSelector((("app", "frontend"),))),)),),
)


class Mesh:
    def __init__(self) -> None:
        self.store, self.cache = MeshStore(), ResourceCache()
        self.controller = MeshController(self.store, self.cache, security=MTLS)
        self.store.put(SOURCE, Namespace(NS))
        for obj in (pod("api-1", "10.0.0.5", "api", "api"), pod("frontend-1", "10.0.0.6", "frontend", "frontend"),
                    pod("frontend-2", "10.0.0.7", "frontend", "frontend"), ALLOW_FRONTEND):
            self.store.put(SOURCE, obj)
        self.controller.view_for(verified(node("api-1", "10.0.0.5")))

    def inbound(self) -> tuple[str, network_rbac_pb2.RBAC]:
        """The api sidecar's inbound listener: its version, and the NetworkPolicy filter."""
        resource = self.cache.get(types.LISTENER, INBOUND)
        assert resource is not None
        listener = resource.unpack(listener_pb2.Listener)
        guard = listener.default_filter_chain.filters[0]
        assert guard.name == "envoy.filters.network.rbac"
        config = network_rbac_pb2.RBAC()
        guard.typed_config.Unpack(config)
        return resource.version, config

    def assert_fresh(self) -> None:
        store, cache = MeshStore(), ResourceCache()
        store.sync(SOURCE, [o for kind in KINDS for o in self.store.all(kind).values()])
        fresh = MeshController(store, cache, security=MTLS)
        fresh.view_for(verified(node("api-1", "10.0.0.5")))
        assert cache.get(types.LISTENER, INBOUND).body == self.cache.get(types.LISTENER, INBOUND).body


def principals(config: network_rbac_pb2.RBAC) -> list[str]:
    return [str(p).replace("\n", " ") for policy in config.rules.policies.values() for p in policy.principals]


def test_peers_follow_labels_and_service_accounts_and_unrelated_pods_rebuild_nothing() -> None:
    mesh = Mesh()
    version, config = mesh.inbound()
    assert config.stat_prefix == "netpol_ingress."
    [only] = principals(config)
    assert FRONTEND in only and "direct_remote_ip" not in only  # every frontend pod: identity
    mesh.assert_fresh()

    # frontend-2 loses the label: the policy now matches 1 of the 2 pods of the account, so
    # the principal is only good from frontend-1's address.
    mesh.store.put(SOURCE, dataclasses.replace(mesh.store.get("Pod", NS, "frontend-2"), labels=(("app", "x"),)))
    version2, config = mesh.inbound()
    assert version2 != version
    [only] = principals(config)
    assert FRONTEND in only and "10.0.0.6" in only and "10.0.0.7" not in only
    mesh.assert_fresh()

    # A new pod of the account with the label joins the allowed addresses.
    mesh.store.put(SOURCE, pod("frontend-3", "10.0.0.8", "frontend", "frontend"))
    _, config = mesh.inbound()
    assert all(ip in " ".join(principals(config)) for ip in ("10.0.0.6", "10.0.0.8"))
    mesh.assert_fresh()
    version3, _ = mesh.inbound()

    # A pod no peer matches, of another account: api's listener is not rebuilt.
    mesh.store.put(SOURCE, pod("batch-1", "10.0.0.9", "batch", "batch"))
    assert mesh.inbound()[0] == version3
    # The policy removed: no NetworkPolicy filter any more.
    mesh.store.remove(SOURCE, ("NetworkPolicy", NS, "api-from-frontend"))
    listener = mesh.cache.get(types.LISTENER, INBOUND).unpack(listener_pb2.Listener)
    assert all(f.name != "envoy.filters.network.rbac" for f in listener.default_filter_chain.filters)
    mesh.assert_fresh()


def test_a_peer_without_a_sidecar_is_matched_by_address_and_said_so() -> None:
    workloads = [pod("api-1", "10.0.0.5", "api", "api"), pod("frontend-1", "10.0.0.6", "frontend", "frontend", meshed=False)]
    enforcement = resolve_ingress(workloads[0], [ALLOW_FRONTEND], view_of(workloads, {}, [], []))
    assert enforcement.isolated
    [allowed] = enforcement.allowed
    assert allowed.principals == () and [c.cidr for c in allowed.cidrs] == ["10.0.0.6/32"]
    [note] = enforcement.notes
    assert note.field == "spec.ingress[0].from[0]" and "has no sidecar" in note.message


def test_an_isolating_policy_without_rules_allows_nothing() -> None:
    deny = NetworkPolicy(NS, "deny", LabelSelector(), frozenset({"Ingress", "Egress"}))
    workloads = [pod("api-1", "10.0.0.5", "api", "api")]
    view = view_of(workloads, {}, [], [])
    enforcement = resolve_ingress(workloads[0], [deny], view)
    assert enforcement.isolated and enforcement.allowed == ()
    # A pod in another namespace is not selected.
    other = dataclasses.replace(workloads[0], namespace="other")
    assert not resolve_ingress(other, [deny], view).isolated


def test_namespace_selectors_see_the_implicit_name_label_and_the_namespaces_own() -> None:
    """Kubernetes labels every Namespace `kubernetes.io/metadata.name`; a namespace the mesh
    has no object for still has that one."""
    api = pod("api-1", "10.0.0.5", "api", "api")
    jobs = Workload("data", "jobs-0", ip="10.0.1.10", service_account="jobs", meshed=True)
    web = Workload("web", "web-0", ip="10.0.2.10", service_account="web", meshed=True)
    by_name = NetworkPolicy(NS, "from-data", LabelSelector((("app", "api"),)), frozenset({"Ingress"}), ingress=(
        PolicyRule(peers=(Peer(namespace_selector=LabelSelector((("kubernetes.io/metadata.name", "data"),))),)),
    ))
    by_team = dataclasses.replace(by_name, ingress=(
        PolicyRule(peers=(Peer(namespace_selector=LabelSelector((("team", "blue"),))),)),
    ))
    namespaces = {"web": Namespace("web", (("team", "blue"),))}
    view = view_of([api, jobs, web], namespaces, [], [])
    [allowed] = resolve_ingress(api, [by_name], view).allowed
    assert allowed.principals == ("spiffe://cluster.local/ns/data/sa/jobs",)
    [allowed] = resolve_ingress(api, [by_team], view).allowed
    assert allowed.principals == ("spiffe://cluster.local/ns/web/sa/web",)


def test_an_egress_isolated_pod_leaves_the_shared_outbound_listener_and_returns_to_it() -> None:
    """Isolated for egress, a pod gets its own guarded outbound listener instead of its
    namespace's shared one; when the policy goes, it shares again (and its own is gone)."""
    from xds_server.translate.controller import proxy_resources

    mesh = Mesh()
    view = mesh.controller.view_for(verified(node("api-1", "10.0.0.5")))

    def outbound() -> list[str]:
        return [r.name for r in proxy_resources(view)[types.LISTENER] if r.name.startswith("outbound|")]

    assert outbound() == [f"outbound|capture|{NS}"]
    egress = NetworkPolicy(NS, "api-egress", LabelSelector((("app", "api"),)), frozenset({"Egress"}),
                           egress=(PolicyRule(peers=(Peer(pod_selector=LabelSelector((("app", "frontend"),))),)),))
    mesh.store.put(SOURCE, egress)
    assert outbound() == [f"outbound|{NS}/api-1"]
    own = mesh.cache.get(types.LISTENER, f"outbound|{NS}/api-1").unpack(listener_pb2.Listener)
    assert own.default_filter_chain.filters[0].name == "envoy.filters.network.rbac"
    assert own.default_filter_chain.filters[0].typed_config.value.find(b"netpol_egress.") >= 0
    mesh.store.remove(SOURCE, ("NetworkPolicy", NS, "api-egress"))
    assert outbound() == [f"outbound|capture|{NS}"]
    assert mesh.cache.get(types.LISTENER, f"outbound|{NS}/api-1") is None
