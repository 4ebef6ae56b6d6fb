"""Pod-scoped config goes only to the pod that was proven (issue 13, hostile-client review):
a stream whose credential proves service account `sa-a` and that claims a pod of `sa-b`
gets its namespace's shared config and nothing of that pod's (no listener, route or cluster
of it), and cannot take the pod's place from the proxy that proves it."""

from __future__ import annotations

from xds_server.model.identity import Proof, ProxyClaim, VerifiedProxy, proves_pod
from xds_server.model.mesh import (
    AppProtocol,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePort,
    Workload,
)
from xds_server.model.store import MeshStore
from xds_server.translate import names
from xds_server.translate.controller import MeshController, proxy_resources
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache

NS = "shop"


def mesh() -> tuple[MeshStore, MeshController]:
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache)
    store.sync("test", [
        Service(NS, "payments", (ServicePort(80, "http", 8080, AppProtocol.HTTP),), cluster_ip="10.96.0.9"),
        Workload(NS, "payments-0", "10.0.0.9", service_account="sa-b", meshed=True),
        EndpointSlice(NS, "payments-1", "payments", (EndpointPort("http", 8080, AppProtocol.HTTP),),
                      (Endpoint("10.0.0.9", pod="payments-0"),)),
    ])
    return store, controller


def stream(service_account: str, pod: str = "payments-0", ip: str = "10.0.0.9", bound: str = "") -> VerifiedProxy:
    claim = ProxyClaim(node_id=f"{pod}.{NS}", namespace=NS, service_account=service_account, pod=pod, ip=ip)
    return VerifiedProxy(claim, Proof(NS, service_account, "workload-token", pod=bound))


def names_of(controller: MeshController, verified: VerifiedProxy) -> set[str]:
    view = controller.view_for(verified)
    return {r.name for resources in proxy_resources(view).values() for r in resources}


def test_a_stream_that_does_not_prove_the_pod_gets_nothing_of_it() -> None:
    _, controller = mesh()
    pod_scoped = names.inbound_listener_name(NS, "payments-0")
    stranger = stream("sa-a")
    seen = names_of(controller, stranger)
    assert pod_scoped not in seen
    assert not [n for n in seen if n.endswith(names.proxy_names_prefix(NS, "payments-0"))]
    assert names.cluster_name(Service(NS, "payments").key, 80) in seen  # its namespace's share
    # The pod's own proxy, connecting after it, still gets its pod.
    assert pod_scoped in names_of(controller, stream("sa-b"))
    controller.release(stranger)
    assert pod_scoped in {r.name for r in proxy_resources(controller.view_for(stream("sa-b")))[types.LISTENER]}


def test_the_proven_pod_keeps_its_key_when_a_stranger_claims_it_afterwards() -> None:
    _, controller = mesh()
    owner = stream("sa-b")
    assert names.inbound_listener_name(NS, "payments-0") in names_of(controller, owner)
    intruder = stream("sa-a")
    assert names.inbound_listener_name(NS, "payments-0") not in names_of(controller, intruder)
    controller.release(intruder)  # its own key: the owner's proxy stays
    assert ((NS, "payments-0")) in controller.registry.proxies


def test_what_proves_a_pod() -> None:
    claim = ProxyClaim(node_id="p.shop", namespace=NS, service_account="sa-b", pod="p", ip="10.0.0.9")
    assert proves_pod(None, claim, "sa-x")  # --auth none: no identity to check
    assert proves_pod(Proof(NS, "sa-b", "workload-token"), claim, "sa-b", "10.0.0.9")
    assert not proves_pod(Proof(NS, "sa-a", "workload-token"), claim, "sa-b", "10.0.0.9")
    assert not proves_pod(Proof(NS, "sa-b", "workload-token"), claim, "sa-b", "10.0.0.7")  # another IP
    assert proves_pod(Proof(NS, "sa-b", "workload-token"), claim, None)  # not known yet
    assert proves_pod(Proof(NS, "sa-b", "kubernetes-token", pod="p"), claim, "sa-b")
    assert not proves_pod(Proof(NS, "sa-b", "kubernetes-token", pod="q"), claim, "sa-b")


def test_a_strangers_stream_releases_its_own_key_even_after_the_model_changed() -> None:
    store, controller = mesh()
    stranger = stream("sa-a")
    controller.view_for(stranger)
    held = [k for k in controller.registry.proxies if k != (NS, "payments-0")]
    assert held and controller.registry.proxies[held[0]].streams == 1
    # The pod now belongs to sa-a: a new sa-a stream proves it and takes the pod's own key...
    store.put("test", Workload(NS, "payments-0", "10.0.0.9", service_account="sa-a", meshed=True))
    proven = stream("sa-a")
    controller.view_for(proven)
    assert (NS, "payments-0") in controller.registry.proxies
    # ...and each stream's end releases the key it was given, whichever ends first.
    controller.release(proven)
    assert (NS, "payments-0") not in controller.registry.proxies and held[0] in controller.registry.proxies
    controller.release(stranger)
    assert held[0] not in controller.registry.proxies
