"""What operators see of NetworkPolicy: the admin API (read token) and `xds-server validate`
show, for a pod, which policies select it and what they allow, and for each policy what the
sidecars could not express by identity; an invalid policy is reported naming the field and
its last good version stays."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.support.admin import AdminStack
from xds_server.model.store import MeshStore
from xds_server.sources.mesh_files import MeshDirectory

ROOT = Path(__file__).resolve().parents[2]
CASE = ROOT / "tests" / "testdata" / "in" / "netpol-ingress.yaml"
JOBS = "spiffe://cluster.local/ns/data/sa/jobs"


def mesh_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "mesh"
    directory.mkdir()
    shutil.copy(CASE, directory / "mesh.yaml")
    return directory


async def test_the_admin_api_shows_a_pods_network_policy_and_each_policys_gaps(tmp_path: Path) -> None:
    store = MeshStore()
    source = MeshDirectory(mesh_dir(tmp_path), store)
    source.load()
    async with AdminStack(store=store, sources={"files": source}) as stack:
        async with stack.client("read") as api:
            answer = await api.get("/api/v1/network-policy/shop/api-1")
            assert answer.status_code == 200, answer.text
            pod = answer.json()
            assert pod["selected_by"] == {"shop/api-ingress": ["Ingress"]} and pod["enforced"]
            allows = {a["rule"]: a for a in pod["ingress"]["allows"]}
            assert allows["shop/api-ingress ingress[0]"] == {
                "rule": "shop/api-ingress ingress[0]", "tcp_ports": ["8080"],  # the named port `http`
                "peers": ["principal spiffe://cluster.local/ns/shop/sa/frontend"],
            }
            assert allows["shop/api-ingress ingress[1]"]["peers"] == [
                f"principal {JOBS} from 10.0.1.10/32", f"principal {JOBS} from 10.0.1.11/32",
                "address 10.0.1.20/32",
            ]
            assert allows["shop/api-ingress ingress[1]"]["tcp_ports"] == ["5432", "9000-9010"]
            assert any("2 of the 3 pods of service account data/jobs" in n for n in pod["ingress"]["notes"])
            assert pod["egress"]["isolated"] is False

            # A pod without a sidecar: selected, but nothing enforces it; unknown pods are 404.
            listing = (await api.get("/api/v1/network-policies")).json()["policies"]
            assert [p["name"] for p in listing] == ["api-ingress"]
            assert listing[0]["selects"] == ["shop/api-1"] and listing[0]["not_enforced"] == []
            assert any(n.startswith("spec.ingress[1].from[0]: pod data/cron-0 has no sidecar")
                       for n in listing[0]["notes"])
            missing = await api.get("/api/v1/network-policy/shop/nobody")
            assert missing.status_code == 404 and "shop/nobody" in missing.json()["error"]
        async with stack.client(None) as anonymous:
            assert (await anonymous.get("/api/v1/network-policy/shop/api-1")).status_code == 401
            assert (await anonymous.get("/api/v1/network-policies")).status_code == 401


async def test_an_invalid_network_policy_names_the_field_and_keeps_its_last_good_version(tmp_path: Path) -> None:
    directory = mesh_dir(tmp_path)
    store = MeshStore()
    source = MeshDirectory(directory, store)
    assert not [e for e in source.load() if e.severity == "error"]
    good = store.get("NetworkPolicy", "shop", "api-ingress")
    docs = list(yaml.safe_load_all((directory / "mesh.yaml").read_text()))
    policy = next(d for d in docs if d.get("kind") == "NetworkPolicy")
    policy["spec"]["ingress"][0]["ports"][0] = {"port": 9000, "endPort": 8000}
    (directory / "mesh.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    errors = [e for e in source.load() if e.severity == "error"]
    assert len(errors) == 1, errors
    assert (errors[0].kind, errors[0].name, errors[0].field) == ("NetworkPolicy", "api-ingress",
                                                                 "spec.ingress[0].ports[0].endPort")
    assert "greater than or equal to port 9000" in errors[0].message
    assert store.get("NetworkPolicy", "shop", "api-ingress") == good  # the last good version
    assert store.get("Pod", "shop", "api-1") is not None  # the rest of the mesh is unaffected


async def test_validate_shows_a_pods_network_policy_and_warns_where_identity_falls_short(tmp_path: Path) -> None:
    directory = mesh_dir(tmp_path)
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "xds_server.cli", "validate", str(directory),
                         "--pod", "shop/api-1"], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert ("warning: NetworkPolicy shop/api-ingress: spec.ingress[1].from[0]: selects 2 of the 3 pods of "
            "service account data/jobs") in out
    assert "pod shop/api-1: NetworkPolicy\n  selected by: shop/api-ingress (Ingress)" in out
    assert "shop/api-ingress ingress[0]: TCP ports 8080; principal spiffe://cluster.local/ns/shop/sa/frontend" in out
    assert "egress: everything (no policy selects the pod for this direction)" in out
    unknown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "xds_server.cli", "validate", str(directory), "--pod", "shop/x"],
        capture_output=True, text=True, timeout=60,
    )
    assert unknown.returncode == 1 and "pod shop/x: not found" in unknown.stderr
