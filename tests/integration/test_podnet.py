"""The pods-as-network-namespaces harness (tests/support/podnet.py) does what capture-mode
end-to-end tests rely on: pods reach each other by pod IP, service names resolve per pod
namespace from the pod's own hosts file, a ClusterIP is reachable only through a sidecar, a
sidecar inside a captured pod reaches the server over its Unix socket and goes LIVE, an
app's loopback traffic is not captured, and everything the harness made is gone afterwards,
also after a failure.

As root with iproute2, iptables and setpriv (make setup installs them); elsewhere these tests
fail saying what is missing (PodNetUnavailable), never skip.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import podnet
from tests.support.podnet import CaptureMesh, PodNetError, PodNetUnavailable, PodNetwork


@pytest.fixture
def network() -> Iterator[PodNetwork]:
    with PodNetwork() as made:
        yield made


def netns_names() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def etc_netns() -> set[str]:
    return set(os.listdir("/etc/netns")) if os.path.isdir("/etc/netns") else set()


def test_pods_reach_each_other_by_pod_ip(network: PodNetwork) -> None:
    server = network.add_pod("server", "shop")
    client = network.add_pod("client", "web")
    assert server.ip != client.ip and server.ip.startswith("10.77.")
    server.http_echo(8080)
    server.tcp_echo(9000)
    grpc = server.grpc_backend(9100)

    app = client.client()
    reply = app.http(f"http://{server.ip}:8080/hello", headers={"x-test": "1"})
    assert reply.status == 200 and reply.json["name"] == "server"
    assert reply.json["headers"]["host"] == f"{server.ip}:8080"
    assert ("x-upstream-name", "server") in reply.header_list
    assert app.tcp(server.ip, 9000, b"ping") == b"server:ping"
    local, peer = app.connect(server.ip, grpc.port)  # the gRPC server listens in the pod
    assert local.startswith(client.ip + ":") and peer == f"{server.ip}:9100"
    # A stock client too.
    curled = client.curl(f"http://{server.ip}:8080/curl", "-o", "/dev/null", "-w", "%{http_code}")
    assert curled.stdout == "200", curled.stderr
    # Nothing listens there: a clear error at once, not a hang.
    with pytest.raises(PodNetError) as refused:
        app.http(f"http://{server.ip}:8081/", timeout=2)
    assert refused.value.kind == "refused"


def test_service_names_resolve_per_pod_namespace(network: PodNetwork) -> None:
    shop = network.add_pod("shop-client", "shop")
    web = network.add_pod("web-client", "web")
    api_ip = network.allocate_cluster_ip()
    assert api_ip.startswith("10.96.")
    in_shop, in_web = shop.client(), web.client()  # started before the names exist

    network.set_hosts({"direct": shop.ip}, services=[("api", "shop", api_ip)])

    for name in ("api", "api.shop", "api.shop.svc", "api.shop.svc.cluster.local"):
        assert in_shop.resolve(name) == [api_ip], name
    for name in ("api.shop", "api.shop.svc.cluster.local"):
        assert in_web.resolve(name) == [api_ip], name
    with pytest.raises(PodNetError) as unknown:
        in_web.resolve("api")  # a short name is the pod's own namespace's only
    assert unknown.value.kind == "resolve"
    # An app's request uses the name as it is (getaddrinfo, Host header).
    shop.http_echo(8080)
    reply = in_web.http("http://direct:8080/")
    assert reply.status == 200 and reply.json["headers"]["host"] == "direct:8080"


def test_a_cluster_ip_is_not_reachable_without_a_sidecar(network: PodNetwork) -> None:
    backend = network.add_pod("api-1", "shop")
    backend.http_echo(80)
    client = network.add_pod("client", "shop")
    api_ip = network.allocate_cluster_ip()
    network.set_hosts(services=[("api", "shop", api_ip)])

    with pytest.raises(PodNetError) as by_ip:
        client.http(f"http://{api_ip}/", timeout=2)
    assert by_ip.value.kind == "unreachable"
    with pytest.raises(PodNetError) as by_name:
        client.http("http://api/", timeout=2)
    assert by_name.value.kind == "unreachable"
    assert client.curl("http://api/", timeout=2).returncode != 0
    assert client.http(f"http://{backend.ip}/").status == 200  # the pod itself is there


def test_everything_is_removed_after_close_also_after_a_failure() -> None:
    made: list[str] = []
    with pytest.raises(RuntimeError, match="a failing test"), PodNetwork() as network:
        pod = network.add_pod("a", "shop")
        network.add_pod("b", "shop").http_echo(8080)
        app = pod.client()
        made += network.namespaces
        assert set(made) <= netns_names()
        assert {p.netns for p in network.pods} <= etc_netns()
        raise RuntimeError("a failing test")
    assert len(made) == 3  # the node and two pods
    assert not set(made) & netns_names()
    assert not set(made) & etc_netns()
    assert not app.alive


def test_a_machine_that_cannot_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(podnet.netns, "missing", lambda: "iptables not found: install iptables")
    with pytest.raises(PodNetUnavailable, match="iptables not found"):
        PodNetwork()
    with pytest.raises(PodNetUnavailable, match="iptables not found"):
        CaptureMesh(Path("/nonexistent"))


@pytest.mark.envoy
async def test_a_sidecar_in_a_captured_pod_goes_live_over_the_unix_socket(tmp_path: Path) -> None:
    async with CaptureMesh(tmp_path / "mesh") as mesh:
        api = mesh.pod("shop", "api-1", sidecar=False)
        client = mesh.pod("shop", "client")
        mesh.service("shop", "api", 80, pods=[api])
        db = mesh.service("shop", "db", ports=[{"name": "tcp-db", "port": 5432, "targetPort": 8080}], pods=[api])
        assert client.app.resolve("db") == [db.cluster_ip] and client.app.resolve(db.host) == [db.cluster_ip]
        assert any("REDIRECT" in rule for rule in client.capture_rules())

        await mesh.sidecar(client)
        envoy = client.envoy
        assert envoy is not None and envoy.server_state() == "LIVE"
        # Inside the pod, as the proxy UID, its stream on the server's Unix socket.
        status = Path(f"/proc/{envoy.pid}/status").read_text()
        assert f"\nUid:\t{podnet.PROXY_UID}\t" in status
        assert os.stat(f"/proc/{envoy.pid}/ns/net").st_ino == os.stat(f"/var/run/netns/{client.netns}").st_ino
        assert all(peer.startswith("unix:") for peer in mesh.connection_peers(client))
        # What the server sent is what Envoy has.
        sent = await mesh.until(lambda: mesh.sent(client), message="listeners sent")
        names = {entry["name"] for entry in envoy.listeners()["listener_statuses"]}
        assert names == set(sent)
        workdir = envoy.workdir
    assert not workdir.exists() and not envoy.running
    assert not mesh.socket_dir.exists()
    assert not set(mesh.network.namespaces) & netns_names()


@pytest.mark.envoy
async def test_an_app_reaching_its_own_pod_over_loopback_is_not_captured(tmp_path: Path) -> None:
    async with CaptureMesh(tmp_path / "mesh") as mesh:
        pod = mesh.pod("shop", "api-1")
        await mesh.sidecar(pod)
        assert pod.capture_rules() and pod.envoy is not None
        envoy = pod.envoy

        def accepted() -> int:
            counted = envoy.counters(r"^listener\..*downstream_cx_total$")
            return sum(v for name, v in counted.items() if not name.startswith("listener.admin."))

        before = accepted()
        reply = pod.http("http://127.0.0.1:8080/self")
        assert reply.status == 200 and reply.json["name"] == "api-1" and reply.json["path"] == "/self"
        assert not any(h.startswith(("x-envoy-", "x-request-id")) for h in reply.json["headers"])
        assert pod.tcp("127.0.0.1", 8080, b"GET /tcp HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
        assert accepted() == before  # no sidecar listener saw these connections
