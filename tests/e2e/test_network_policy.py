"""Kubernetes NetworkPolicy enforced by the sidecars, by identity, in capture mode.

Pods are network namespaces with the real `xds-server iptables` rules and real Envoy
sidecars with SPIFFE certificates from the server's CA (tests/support/podnet.py); apps are
unmodified and dial names or addresses. One mesh serves the module's cases (one worker);
each case has its own pods and policies, so they do not see each other's.

What is asserted is what the apps observe and what the backends saw: a refused connection
never reaches the backend app.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.e2e.test_capture import secure_mesh
from tests.support.podnet import CaptureMesh, NetPod, PodNetError, traversable_tempdir
from tests.support.upstreams import HttpUpstream
from xds_server.model.security import SecuritySettings

pytestmark = [
    pytest.mark.envoy,
    pytest.mark.slow,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.xdist_group("network-policy"),  # one mesh per module: one worker
]

NS = "shop"
LOCKED = "locked"
PORT = 80  # Service ports; apps listen on 8080


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh() -> AsyncIterator[CaptureMesh]:
    directory = traversable_tempdir("netpol-")
    try:
        async with secure_mesh(directory / "mesh", directory / "ca", SecuritySettings(mtls=True)) as made:
            yield made
    finally:
        subprocess.run(["rm", "-rf", str(directory)], check=False)


def network_policy(mesh: CaptureMesh, namespace: str, name: str, spec: dict[str, Any]) -> None:
    mesh.write(f"netpol-{namespace}-{name}.yaml", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace}, "spec": spec,
    })


def served(pod: NetPod) -> int:
    assert isinstance(pod.backend, HttpUpstream), pod.backend
    return pod.backend.requests_total


def status(pod: NetPod, url: str) -> int:
    """The HTTP status `pod`'s app gets; 0 when its connection failed."""
    try:
        return pod.http(url, timeout=3).status
    except PodNetError:
        return 0


async def until_status(mesh: CaptureMesh, pod: NetPod, url: str, ok: bool) -> None:
    """Wait until `pod`'s app is answered 200 by `url` (ok) or refused (not ok)."""
    await mesh.until(lambda: (status(pod, url) == 200) == ok, timeout=20,
                     message=f"{pod.namespace}/{pod.name} -> {url} {'answered' if ok else 'refused'}")


async def refused(mesh: CaptureMesh, client: NetPod, url: str, backend: NetPod) -> None:
    """`client`'s app is refused at `url` and `backend`'s app sees nothing of it."""
    await until_status(mesh, client, url, ok=False)
    before = served(backend)
    for _ in range(3):
        assert await asyncio.to_thread(status, client, url) != 200
    assert served(backend) == before, "a refused request reached the app"


def counter(pod: NetPod, pattern: str) -> int:
    assert pod.envoy is not None
    return sum(int(v) for v in pod.envoy.stats(pattern).values() if isinstance(v, int))


def take_address(pod: NetPod, ip: str) -> None:
    """Give `pod` the address `ip` (its only one): an attacker reusing another pod's IP."""
    network = pod.network
    for argv in (["addr", "flush", "dev", "eth0"], ["addr", "add", f"{ip}/16", "dev", "eth0"],
                 ["route", "add", "default", "via", network.bridge_ip]):
        subprocess.run(["ip", "-n", pod.netns, *argv], check=True, capture_output=True)
    pod.ip = ip


async def test_ingress_allows_only_frontend_by_identity_even_from_its_old_ip(mesh: CaptureMesh) -> None:
    """A policy allowing only `app=frontend` into `api`: frontend's pods (service account
    frontend) get through; a pod of another identity is refused, and still refused after it
    takes over the address a frontend pod used to have (its certificate, not its IP, is what
    the api sidecar checks)."""
    api = mesh.pod(NS, "api-1", service_account="api", labels={"app": "api"})
    frontend = mesh.pod(NS, "frontend-1", app=None, service_account="frontend", labels={"app": "frontend"})
    frontend2 = mesh.pod(NS, "frontend-2", app=None, service_account="frontend", labels={"app": "frontend"})
    other = mesh.pod(NS, "other-1", app=None, service_account="other", labels={"app": "other"})
    mesh.service(NS, "api", PORT, pods=[api])
    await asyncio.gather(*(mesh.sidecar(p) for p in (api, frontend, frontend2, other)))
    for client in (frontend, frontend2, other):
        await until_status(mesh, client, "http://api/", ok=True)  # not isolated yet: all pass

    network_policy(mesh, NS, "api-from-frontend", {
        "podSelector": {"matchLabels": {"app": "api"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "frontend"}}}]}],
    })
    await refused(mesh, other, "http://api/", api)
    assert counter(api, r"netpol_ingress\.rbac\.denied$") >= 1  # refused by api's sidecar
    before = served(api)
    for client in (frontend, frontend2):
        reply = await asyncio.to_thread(client.http, "http://api/")
        assert reply.status == 200 and reply.json["name"] == "api-1"
    assert served(api) == before + 2
    # By pod IP too: the policy is on api's inbound side, whatever address is dialled.
    await refused(mesh, other, f"http://{api.ip}:8080/", api)

    # frontend-1 goes away; a pod of identity `impostor` takes its address.
    old_ip = frontend.ip
    assert frontend.envoy is not None
    await asyncio.to_thread(frontend.envoy.stop)
    (mesh.directory / f"pod-{NS}-frontend-1.yaml").unlink()
    subprocess.run(["ip", "-n", frontend.netns, "addr", "flush", "dev", "eth0"], check=True)
    impostor = mesh.pod(NS, "impostor-1", app=None, service_account="impostor", labels={"app": "impostor"})
    take_address(impostor, old_ip)
    mesh.write(f"pod-{NS}-impostor-1.yaml", impostor.manifest())
    await mesh.sidecar(impostor)
    connected = await asyncio.to_thread(impostor.app.connect, api.ip, 8080)  # its app runs from the old IP
    assert connected[0].rpartition(":")[0] == old_ip, connected
    await refused(mesh, impostor, "http://api/", api)
    await refused(mesh, impostor, f"http://{api.ip}:8080/", api)
    # The remaining frontend pod still gets through.
    assert (await asyncio.to_thread(frontend2.http, "http://api/")).status == 200


async def test_a_selector_finer_than_a_service_account_falls_back_to_source_ip_and_ports_hold(
    mesh: CaptureMesh,
) -> None:
    """`teller` and `auditor` pods share the service account `bank`; the policy allows only
    `app=teller`, on port 8080. Identity cannot tell them apart, so the ledger's sidecar
    matches the principal AND teller's address: the auditor, same certificate, is refused.
    The teller is refused on another port of the ledger (a port no Service names)."""
    ledger = mesh.pod(NS, "ledger-1", service_account="ledger", labels={"app": "ledger"})
    side = ledger.http_echo(9090, "ledger-9090")
    teller = mesh.pod(NS, "teller-1", app=None, service_account="bank", labels={"app": "teller"})
    auditor = mesh.pod(NS, "auditor-1", app=None, service_account="bank", labels={"app": "auditor"})
    mesh.service(NS, "ledger", PORT, pods=[ledger])
    await asyncio.gather(*(mesh.sidecar(p) for p in (ledger, teller, auditor)))
    for client in (teller, auditor):
        await until_status(mesh, client, "http://ledger/", ok=True)
    await until_status(mesh, teller, f"http://{ledger.ip}:9090/", ok=True)

    network_policy(mesh, NS, "ledger-from-tellers", {
        "podSelector": {"matchLabels": {"app": "ledger"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "teller"}}}],
                     "ports": [{"protocol": "TCP", "port": 8080}]}],
    })
    await refused(mesh, auditor, "http://ledger/", ledger)
    before = side.requests_total
    await until_status(mesh, teller, f"http://{ledger.ip}:9090/", ok=False)
    assert side.requests_total == before, "a refused request reached the app on 9090"
    reply = await asyncio.to_thread(teller.http, "http://ledger/")
    assert reply.status == 200 and reply.json["name"] == "ledger-1"


async def test_authorization_policy_and_network_policy_must_both_allow(mesh: CaptureMesh) -> None:
    """The NetworkPolicy lets `app=clerk` in; an AuthorizationPolicy on the same pod allows
    only GET /public. A clerk's GET / passes the NetworkPolicy and gets the
    AuthorizationPolicy's 403; GET /public passes both; a pod the NetworkPolicy does not
    allow is refused on its connection, before any HTTP authorization."""
    archive = mesh.pod(NS, "archive-1", service_account="archive", labels={"app": "archive"})
    clerk = mesh.pod(NS, "clerk-1", app=None, service_account="clerk", labels={"app": "clerk"})
    guest = mesh.pod(NS, "guest-1", app=None, service_account="guest", labels={"app": "guest"})
    mesh.service(NS, "archive", PORT, pods=[archive])
    await asyncio.gather(*(mesh.sidecar(p) for p in (archive, clerk, guest)))
    for client in (clerk, guest):
        await until_status(mesh, client, "http://archive/", ok=True)
    network_policy(mesh, NS, "archive-from-clerks", {
        "podSelector": {"matchLabels": {"app": "archive"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "clerk"}}}]}],
    })
    mesh.write(f"authz-{NS}-archive.yaml", {
        "apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "archive-public", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"app": "archive"}},
                 "rules": [{"to": [{"operation": {"methods": ["GET"], "paths": ["/public"]}}]}]},
    })
    await mesh.until(lambda: status(clerk, "http://archive/") == 403, timeout=20, message="403 from authz")
    await refused(mesh, guest, "http://archive/public", archive)
    assert status(guest, "http://archive/public") != 403  # refused by the NetworkPolicy, not authz
    denied = await asyncio.to_thread(clerk.http, "http://archive/")
    assert denied.status == 403 and denied.body == b"RBAC: access denied"
    public = await asyncio.to_thread(clerk.http, "http://archive/public")
    assert public.status == 200 and public.json["name"] == "archive-1"


async def test_egress_to_an_ip_block_only(mesh: CaptureMesh) -> None:
    """An egress policy on `crawler`: TCP 8080 to 10.77.0.0/16 except one address. Outside
    servers (pods without a sidecar, dialled by IP: the passthrough chain) inside the block
    are reached, the excepted one is refused, and so is a mesh Service's ClusterIP (outside
    the block); the crawler's own sidecar refuses, before anything leaves the pod."""
    crawler = mesh.pod(NS, "crawler-1", app=None, service_account="crawler", labels={"app": "crawler"})
    allowed = mesh.pod(NS, "site-a", sidecar=False, labels={"app": "site"})
    denied = mesh.pod(NS, "site-b", sidecar=False, labels={"app": "site"})
    echo = mesh.pod(NS, "echo-1", service_account="echo", labels={"app": "echo"})
    mesh.service(NS, "echo", PORT, pods=[echo])
    await asyncio.gather(mesh.sidecar(crawler), mesh.sidecar(echo))
    for url in (f"http://{allowed.ip}:8080/", f"http://{denied.ip}:8080/", "http://echo/"):
        await until_status(mesh, crawler, url, ok=True)

    network_policy(mesh, NS, "crawler-egress", {
        "podSelector": {"matchLabels": {"app": "crawler"}},
        "policyTypes": ["Egress"],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.77.0.0/16", "except": [f"{denied.ip}/32"]}}],
                    "ports": [{"protocol": "TCP", "port": 8080}]}],
    })
    await refused(mesh, crawler, f"http://{denied.ip}:8080/", denied)
    await refused(mesh, crawler, "http://echo/", echo)
    assert counter(crawler, r"netpol_egress\.rbac\.denied$") >= 1
    before = served(allowed)
    reply = await asyncio.to_thread(crawler.http, f"http://{allowed.ip}:8080/")
    assert reply.status == 200 and reply.json["name"] == "site-a"
    assert served(allowed) == before + 1


async def test_default_deny_in_a_namespace(mesh: CaptureMesh) -> None:
    """`podSelector: {}` with both policy types and no rules: nothing gets into the namespace's
    pods and nothing gets out of them; other namespaces are not affected."""
    vault = mesh.pod(LOCKED, "vault-1", service_account="vault", labels={"app": "vault"})
    teller = mesh.pod(LOCKED, "teller-1", app=None, service_account="teller", labels={"app": "teller"})
    visitor = mesh.pod(NS, "visitor-1", app=None, service_account="visitor", labels={"app": "visitor"})
    kiosk = mesh.pod(NS, "kiosk-1", service_account="kiosk", labels={"app": "kiosk"})
    mesh.service(LOCKED, "vault", PORT, pods=[vault])
    mesh.service(NS, "kiosk", PORT, pods=[kiosk])
    await asyncio.gather(*(mesh.sidecar(p) for p in (vault, teller, visitor, kiosk)))
    for client, url in ((visitor, "http://vault.locked/"), (teller, "http://vault/"), (teller, "http://kiosk.shop/")):
        await until_status(mesh, client, url, ok=True)

    network_policy(mesh, LOCKED, "default-deny", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})
    await refused(mesh, visitor, "http://vault.locked/", vault)  # into the namespace
    await refused(mesh, teller, "http://kiosk.shop/", kiosk)  # out of it
    await refused(mesh, teller, "http://vault/", vault)  # inside it, too
    assert counter(vault, r"netpol_ingress\.rbac\.denied$") >= 1
    assert counter(teller, r"netpol_egress\.rbac\.denied$") >= 1
    # The shop namespace has no policy: its pods still talk.
    assert (await asyncio.to_thread(visitor.http, "http://kiosk/")).status == 200
