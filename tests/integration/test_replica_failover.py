"""A replica dies, its Envoys carry on: three real `xds-server serve` processes with one real
Redis, real Envoys whose bootstraps (`xds-server bootstrap --xds-address A,B,C`) list every
replica. A replica killed with SIGKILL says no goodbye; its Envoys reconnect to a survivor,
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
from tests.support.replicas import ROOT, Replica, Replicas

pytestmark = [pytest.mark.slow, pytest.mark.envoy, pytest.mark.xdist_group("replica-mesh")]

STATIC_CLUSTER = """\
"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: {name}
type: STATIC
connect_timeout: 1s
load_assignment:
  cluster_name: {name}
  endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}}}]}}]
"""


def bootstrap(addresses: list[str], token_file: Path, pod: str) -> dict[str, Any]:
    args = [sys.executable, "-m", "xds_server.cli", "bootstrap", "--namespace", "shop",
            "--service-account", "web", "--pod", pod, "--pod-ip", "127.0.0.1",
            "--admin-address", "127.0.0.1:0", "--interception", "explicit",
            "--token-file", str(token_file)]
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


def test_envoys_fail_over_to_a_surviving_replica(tmp_path: Path) -> None:
    resources = tmp_path / "resources"
    resources.mkdir()
    (resources / "first.yaml").write_text(STATIC_CLUSTER.format(name="first"))
    group = Replicas(tmp_path / "group", 3, ["--resources", str(resources),
                                             "--revocation-check-interval", "600s"])
    envoys: list[EnvoyProcess] = []
    try:
        group.start()
        addresses = [r.xds_address for r in group.members]
        token = group.admin(group.members[0], "POST", "/api/v1/tokens",
                            json={"namespace": "shop", "service_account": "web", "ttl": "1h"})
        assert token.status_code == 201, token.text
        token_file = tmp_path / "web.token"
        token_file.write_text(token.json()["token"])
        # Each Envoy lists all three replicas, starting from a different one.
        for i in range(3):
            order = addresses[i:] + addresses[:i]
            # Info level: Envoy logs each CDS update ("cds: response indicates N added/updated
            # cluster(s), M removed cluster(s)").
            envoys.append(EnvoyProcess(bootstrap(order, token_file, f"web-{i}"), name=f"web-{i}",
                                       log_level="info").start())
        for envoy in envoys:
            envoy.wait_until(lambda e=envoy: "first" in e.cluster_hosts(), timeout=60, message="first cluster")

        ids = {f"web-{i}.shop" for i in range(3)}
        where = wait_for(lambda: (lambda s: s if ids <= set(s) else None)(serving(group, group.members[0])),
                         message="every Envoy listed")
        # Kill a replica that serves at least one Envoy.
        victim = next(r for r in group.members if r.name in where.values())
        moved = {pid for pid in ids if where[pid] == victim.name}
        survivors = [r for r in group.members if r is not victim]
        by_id = {f"web-{i}.shop": envoys[i] for i in range(3)}
        before = {pid: (by_id[pid].dynamic_versions(), len(updates(by_id[pid]))) for pid in moved}

        victim.stop(signal.SIGKILL)

        # Its Envoys reconnect to a survivor and are shown there, by the status CLI too.
        def moved_over() -> bool:
            now = serving(group, survivors[0])
            return all(now.get(pid) in {r.name for r in survivors} for pid in moved)

        wait_for(moved_over, timeout=90, message="the killed replica's Envoys served by a survivor")
        for asked in survivors:
            shown = subprocess.run(
                [sys.executable, "-m", "xds_server.cli", "status", "--admin-address",
                 f"127.0.0.1:{asked.admin_port}", "--token", group.tokens.read],
                capture_output=True, text=True, cwd=ROOT, timeout=60)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert all(pid in shown.stdout for pid in ids), shown.stdout
            assert victim.name not in shown.stdout, shown.stdout

        for pid in moved:
            envoy = by_id[pid]
            assert wait_for(lambda e=envoy: e.stats(filter=r"^control_plane\.connected_state$")
                            .get("control_plane.connected_state") == 1, message=f"{pid} connected")
            # Kept its config, and the survivor sent nothing it already had: every resource
            # keeps its accepted version, and the updates since the reconnect (the one empty
            # reply a resumed wildcard subscription is owed) carry no cluster.
            versions, seen = before[pid]
            assert "first" in envoy.cluster_hosts()
            assert envoy.dynamic_versions() == versions
            since = wait_for(lambda e=envoy: updates(e)[seen:], message=f"{pid} resumed")
            assert seen >= 1 and all("indicates 0 added/updated cluster(s), 0 removed" in line
                                     for line in since), since
            assert envoy.stats(filter=r"^cluster_manager\.cds\.update_rejected$") == {
                "cluster_manager.cds.update_rejected": 0}

        # Config changes still reach every Envoy, whichever survivor serves it.
        (resources / "second.yaml").write_text(STATIC_CLUSTER.format(name="second"))
        for envoy in envoys:
            envoy.wait_until(lambda e=envoy: "second" in e.cluster_hosts(), timeout=60,
                             message="second cluster")
        versions = {e.subscription_versions()["cds"] for e in envoys}
        assert len(versions) == 1, f"every replica serves the same content-hash version: {versions}"
    finally:
        for envoy in envoys:
            envoy.stop()
        group.stop()
