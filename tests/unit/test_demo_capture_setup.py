"""The demo's capture-mode set-up that needs no root: the decision whether pods can be network
namespaces here (netns.capture_unavailable / choose_mode, on their real inputs and on stated
ones), and the rewritten copy of the mesh the server reads (meshcopy.MeshCopy)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from xds_server.demo.errors import DemoError
from xds_server.demo.meshcopy import MeshCopy
from xds_server.demo.netns import TOOLS, capture_unavailable, choose_mode, hosts_text, service_host_entries
from xds_server.envoy_process import find_envoy
from xds_server.inject.settings import InjectorSettings
from xds_server.inject.template import capture_command
from xds_server.sources.validate import has_errors, validate_directory

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo"


def test_the_decision_on_this_machine_matches_what_it_reads() -> None:
    why = capture_unavailable(find_envoy())
    if os.geteuid() != 0:
        assert why == "network namespaces need root"
    elif any(shutil.which(tool) is None for tool, _ in TOOLS):
        assert why is not None and "not found, install the Debian package" in why
    else:
        assert why is None or "not executable by the proxy UID" in why


def test_each_missing_piece_is_named_with_what_to_install() -> None:
    assert capture_unavailable(euid=1000) == "network namespaces need root"
    for tool, package in TOOLS:
        def which(name: str, missing: str = tool) -> str | None:
            return None if name == missing else f"/usr/sbin/{name}"

        assert capture_unavailable(euid=0, which=which) == \
            f"{tool} not found, install the Debian package {package}"


def test_an_envoy_the_proxy_uid_cannot_reach(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    binary = private / "envoy"
    binary.write_text("")
    binary.chmod(0o755)
    private.chmod(0o700)
    why = capture_unavailable(str(binary), euid=0, which=lambda name: f"/usr/sbin/{name}")
    assert why == f"the Envoy binary {binary} is not executable by the proxy UID 1337"


def test_modes() -> None:
    assert choose_mode("explicit", None) == ("explicit", "requested (--mode explicit or XDS_SERVER_DEMO_MODE=explicit)")
    why = capture_unavailable(find_envoy())
    assert choose_mode("auto", find_envoy()) == (("capture", None) if why is None else ("explicit", why))
    if why is not None:
        with pytest.raises(DemoError, match="cannot run here: " + why):
            choose_mode("capture", find_envoy())
    with pytest.raises(DemoError, match="expected one of auto, capture, explicit"):
        choose_mode("sideways", None)


def _load(directory: Path) -> dict[tuple[str, str], dict]:
    out = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                meta = doc["metadata"]
                out[(doc["kind"], meta["name"])] = doc
    return out


def test_the_mesh_copy_moves_pods_gives_clusterips_and_drops_loopback_annotations(tmp_path: Path) -> None:
    source = tmp_path / "demo"
    shutil.copytree(DEMO, source)
    before = {p.name: p.read_text() for p in source.glob("*.yaml")}
    copy = MeshCopy(source, tmp_path / "copy")
    assert copy.render() is True
    assert {p.name: p.read_text() for p in source.glob("*.yaml")} == before  # the user's files
    original, rewritten = _load(source), _load(copy.target)
    assert original.keys() == rewritten.keys()

    pods = {name: doc for (kind, name), doc in rewritten.items() if kind == "Pod"}
    assert len(pods) == 4
    new_ip = {original[("Pod", n)]["status"]["podIP"]: pod["status"]["podIP"] for n, pod in pods.items()}
    assert all(ip.startswith("10.89.") for ip in new_ip.values())
    assert len(set(new_ip.values())) == 4
    for pod in pods.values():
        annotations = pod["metadata"]["annotations"]
        assert "sidecar.xds-server.io/interception" not in annotations
        assert "xds-server.io/tcp-upstreams" not in annotations
        assert annotations["sidecar.xds-server.io/inject"] == "true"
        # The capture rules the demo applies: the injector's own init container command.
        argv = capture_command(pod, InjectorSettings())
        assert argv[:2] == ["xds-server", "iptables"] and "--proxy-uid" in argv
    for (kind, name), doc in rewritten.items():
        if kind == "EndpointSlice":
            for old, new in zip(original[(kind, name)]["endpoints"], doc["endpoints"], strict=True):
                assert new["addresses"] == [new_ip[a] for a in old["addresses"]]
        if kind == "Service":
            assert doc["spec"]["clusterIP"].startswith("10.96.")
    assert len({ip for _, _, ip in copy.services()}) == len(copy.services()) == 5
    assert not has_errors(validate_directory(copy.target))

    # Rendering again changes nothing; an edit of the user's file reaches the copy, with the
    # addresses given before kept.
    services = copy.services()
    assert copy.render() is False
    routes = source / "routes.yaml"
    routes.write_text(routes.read_text().replace("weight: 90", "weight: 50"))
    assert copy.render() is True
    assert "weight: 50" in (copy.target / "routes.yaml").read_text()
    assert copy.services() == services
    assert _load(copy.target)[("Pod", "frontend-0")]["status"]["podIP"] == pods["frontend-0"]["status"]["podIP"]


def test_hosts_files_name_services_as_kubernetes_dns_would() -> None:
    entries = service_host_entries([("api", "demo", "10.96.0.10"), ("db", "other", "10.96.0.11")], "demo")
    assert entries == {
        "api": "10.96.0.10", "api.demo": "10.96.0.10", "api.demo.svc": "10.96.0.10",
        "api.demo.svc.cluster.local": "10.96.0.10",
        "db.other": "10.96.0.11", "db.other.svc": "10.96.0.11", "db.other.svc.cluster.local": "10.96.0.11",
    }
    text = hosts_text(entries)
    assert text.startswith("127.0.0.1\tlocalhost\n")
    assert "10.96.0.10\tapi.demo api.demo.svc api.demo.svc.cluster.local api\n" in text
