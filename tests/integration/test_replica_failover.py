"""Replicas act as one mesh, and a replica dies while its Envoys carry on: three real
`xds-server serve` processes with one real Redis, real Envoy sidecars whose bootstraps
(`xds-server bootstrap --xds-address A --xds-address B ...`) list every replica. Sidecars
served by different replicas talk STRICT mutual TLS to each other (one shared root). A replica killed with SIGKILL says no goodbye; its Envoys reconnect to a survivor,
keep the config they had (the survivor translates the same sources into the same content-hash
versions, so delta xDS sends nothing they already hold), show up in `xds-server status` on the
survivors, and go on receiving config changes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.envoy import EnvoyProcess
from tests.support.mesh import Pod
from tests.support.net import free_port, next_loopback_ip
from tests.support.replicas import ROOT, Replica, Replicas
from tests.support.upstreams import HttpUpstream, http_request

pytestmark = [pytest.mark.slow, pytest.mark.envoy, pytest.mark.xdist_group("replica-mesh")]

def bootstrap(addresses: list[str], token_file: Path, pod: Pod) -> dict[str, Any]:
    args = [sys.executable, "-m", "xds_server.cli", "bootstrap", "--namespace", pod.namespace,
            "--service-account", pod.service_account, "--pod", pod.name, "--pod-ip", pod.ip,
            "--admin-address", f"{pod.ip}:{free_port(pod.ip)}", "--interception", "explicit",
            "--label", f"app={pod.labels['app']}", "--token-file", str(token_file)]
    for address in addresses:
        args += ["--xds-address", address]
    out = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, check=True, timeout=60)
    return dict(yaml.safe_load(out.stdout))


def wait_for(predicate: Any, timeout: float = 60.0, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except (httpx.HTTPError, KeyError, ValueError) as err:
            last = err
        assert time.monotonic() < deadline, f"{message} not reached (last: {last!r})"
        time.sleep(0.2)


def updates(envoy: EnvoyProcess) -> list[str]:
    """Envoy's log lines for each CDS response it applied, in order."""
    return [line for line in envoy.log_path.read_text(errors="replace").splitlines()
            if "cds: response indicates " in line]


def serving(group: Replicas, asked: Replica) -> dict[str, str]:
    """{proxy id: replica serving it} as the given replica answers for the control plane."""
    answer = group.admin(asked, "GET", "/api/v1/proxies").json()
    return {p["id"]: p.get("replica") for p in answer["proxies"]}


API_CLUSTER = "outbound|80||api.shop.svc.cluster.local"
DB_CLUSTER = "outbound|80||db.shop.svc.cluster.local"


def write_mesh(directory: Path, web: Pod, api: Pod, *extra: str) -> None:
    """web and api pods, the Service api (backed by api), and Services named in `extra`
    (no endpoints: a config change every sidecar sees as one more cluster)."""
    services = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
                 "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                     "appProtocol": "http"}]}} for name in extra]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
               "spec": {"ports": [{"name": "http", "port": 80, "targetPort": api.app_port,
                                   "appProtocol": "http"}]}}
    endpoints = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                 "metadata": {"name": "api-1", "namespace": "shop",
                              "labels": {"kubernetes.io/service-name": "api"}},
                 "addressType": "IPv4",
                 "ports": [{"name": "http", "port": api.app_port, "appProtocol": "http"}],
                 "endpoints": [{"addresses": [api.ip], "conditions": {"ready": True},
                                "targetRef": {"kind": "Pod", "name": api.name, "namespace": "shop"}}]}
    documents = [web.manifest(), api.manifest(), service, endpoints, *services]
    (directory / "mesh.yaml").write_text(yaml.safe_dump_all(documents, sort_keys=False))


class Sidecars:
    """Each pod's Envoy, started from a bootstrap listing every replica (in a pod's own order)."""

    def __init__(self, group: Replicas, directory: Path) -> None:
        self.group = group
        self.directory = directory
        self.envoys: dict[str, EnvoyProcess] = {}

    def token_file(self, pod: Pod) -> Path:
        path = self.directory / f"{pod.name}.token"
        if not path.exists():
            made = self.group.admin(self.group.members[0], "POST", "/api/v1/tokens", json={
                "namespace": pod.namespace, "service_account": pod.service_account, "ttl": "1h"})
            assert made.status_code == 201, made.text
            path.write_text(made.json()["token"])
        return path

    def start(self, pod: Pod, addresses: list[str]) -> EnvoyProcess:
        # Info level: Envoy logs each CDS update ("cds: response indicates N added/updated
        # cluster(s), M removed cluster(s)").
        envoy = EnvoyProcess(bootstrap(addresses, self.token_file(pod), pod), name=pod.name,
                             log_level="info")
        self.envoys[pod.name] = pod.envoy = envoy
        envoy.start()
        envoy.wait_until(lambda: API_CLUSTER in envoy.cluster_hosts(), timeout=60, message="api cluster")
        return envoy

    def served_by(self, pod: Pod) -> str:
        pid = f"{pod.name}.{pod.namespace}"
        return str(wait_for(lambda: serving(self.group, self.group.members[0]).get(pid),
                            message=f"{pid} listed"))

    def stop(self) -> None:
        for envoy in self.envoys.values():
            envoy.stop()


def test_replicas_serve_one_mesh_and_envoys_fail_over(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    web = Pod("shop", "web", "web", next_loopback_ip(), 8080, {"app": "web"})
    api = Pod("shop", "api", "api", next_loopback_ip(), 8080, {"app": "api"})
    api.backend = HttpUpstream("api", api.ip, api.app_port).start()
    write_mesh(mesh, web, api)
    group = Replicas(tmp_path / "group", 3, ["--source", str(mesh),
                                             "--mtls-mode", "strict",
                                             "--revocation-check-interval", "600s"])
    sidecars = Sidecars(group, tmp_path)
    try:
        group.start()
        addresses = [r.xds_address for r in group.members]
        sidecars.start(web, addresses)
        web_replica = sidecars.served_by(web)
        # Envoy picks the replica (round robin over the listed endpoints); start api's sidecar
        # again until another replica serves it, so the two are served by different replicas.
        for attempt in range(12):
            sidecars.start(api, addresses[attempt % 3:] + addresses[:attempt % 3])
            if sidecars.served_by(api) != web_replica:
                break
            sidecars.envoys.pop(api.name).stop()
        else:
            raise AssertionError("api's sidecar was always served by web's replica")
        api_replica = sidecars.served_by(api)
        assert api_replica != web_replica

        # STRICT mTLS between sidecars of different replicas: the request flows, over TLS.
        def call() -> bool:
            return web.request("api.shop:80").status == 200

        wait_for(call, message="web -> api through both sidecars")
        api_envoy = sidecars.envoys[api.name]
        handshakes = api_envoy.counters(r"^listener\.inbound\.ssl\.handshake$")
        assert sum(handshakes.values()) >= 1, handshakes
        with pytest.raises(OSError):  # STRICT: a plaintext client gets no answer
            http_request(api.ip, 15006, headers={"Host": "api.shop"}, timeout=5)
        bundles = {group.admin(r, "GET", "/api/v1/ca/trust-bundle").json()["pem"] for r in group.members}
        assert len(bundles) == 1, "one trust bundle on every replica"

        # Kill web's replica: web's sidecar moves to a survivor.
        victim = next(r for r in group.members if r.name == web_replica)
        survivors = [r for r in group.members if r is not victim]
        web_envoy = sidecars.envoys[web.name]
        versions, seen = web_envoy.dynamic_versions(), len(updates(web_envoy))
        assert seen >= 1
        victim.stop(signal.SIGKILL)

        ids = {"web.shop", "api.shop"}
        wait_for(lambda: all(serving(group, survivors[0]).get(pid) in {r.name for r in survivors}
                             for pid in ids),
                 timeout=90, message="both sidecars served by survivors")
        for asked in survivors:
            shown = subprocess.run(
                [sys.executable, "-m", "xds_server.cli", "status", "--admin-address",
                 f"127.0.0.1:{asked.admin_port}", "--token", group.tokens.read],
                capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert all(pid in shown.stdout for pid in ids), shown.stdout
            assert victim.name not in shown.stdout, shown.stdout

        assert wait_for(lambda: web_envoy.stats(filter=r"^control_plane\.connected_state$")
                        .get("control_plane.connected_state") == 1, message="web reconnected")
        # Kept its config, and the survivor sent nothing it already had: every resource keeps
        # its accepted version, and the CDS updates since the reconnect (the one empty reply a
        # resumed wildcard subscription is owed) carry no cluster.
        assert web_envoy.dynamic_versions() == versions
        assert API_CLUSTER in web_envoy.cluster_hosts()
        since = wait_for(lambda: updates(web_envoy)[seen:], message="web resumed")
        assert all("indicates 0 added/updated cluster(s), 0 removed" in line for line in since), since
        assert web_envoy.counters(r"^cluster_manager\.cds\.update_rejected$") == {
            "cluster_manager.cds.update_rejected": 0}
        assert call(), "traffic flows after the failover"

        # Config changes still reach every sidecar, whichever survivor serves it, with the
        # same content-hash version.
        write_mesh(mesh, web, api, "db")
        for envoy in sidecars.envoys.values():
            envoy.wait_until(lambda e=envoy: DB_CLUSTER in e.cluster_hosts(), timeout=60,
                             message="db cluster")
        cds = {e.dynamic_versions()["clusters"][DB_CLUSTER] for e in sidecars.envoys.values()}
        assert len(cds) == 1, f"every replica serves the same content-hash version: {cds}"
    finally:
        sidecars.stop()
        api.backend.stop()
        group.stop()
