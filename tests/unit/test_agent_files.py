"""The workload agent's directory (ca/certdir.py), its readiness endpoint, and the bootstrap
options that point Envoy and gRPC at it (`xds-server bootstrap --tls` / `--grpc`)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from xds_server.ca.agent_health import READY_PATH, serve_readiness
from xds_server.ca.certdir import (
    CA_FILE,
    CERT_FILE,
    DATA_LINK,
    KEY_FILE,
    SDS_CA_FILE,
    SDS_CERT_FILE,
    write_generation,
    write_sds_files,
)
from xds_server.cli import main


def test_a_generation_switches_all_three_files_at_once(tmp_path: Path) -> None:
    first = write_generation(tmp_path, b"cert-1", b"key-1", b"ca-1")
    assert (tmp_path / CERT_FILE).read_bytes() == b"cert-1"
    assert os.readlink(tmp_path / DATA_LINK) == first.name
    assert (first / KEY_FILE).stat().st_mode & 0o777 == 0o600
    for n in range(2, 6):
        write_generation(tmp_path, f"cert-{n}".encode(), f"key-{n}".encode(), f"ca-{n}".encode())
    # The stable names follow the one link; readers see one generation's three files.
    assert [(tmp_path / f).read_bytes() for f in (CERT_FILE, KEY_FILE, CA_FILE)] == \
        [b"cert-5", b"key-5", b"ca-5"]
    for name in (CERT_FILE, KEY_FILE, CA_FILE):
        assert os.readlink(tmp_path / name) == f"{DATA_LINK}/{name}"
    generations = [p for p in tmp_path.iterdir() if p.name.startswith("..gen-")]
    assert len(generations) == 2, "older generations are removed, the previous one is kept"


def test_plain_files_of_an_older_layout_are_replaced(tmp_path: Path) -> None:
    for name in (CERT_FILE, KEY_FILE, CA_FILE):
        (tmp_path / name).write_bytes(b"old")
    write_generation(tmp_path, b"cert", b"key", b"ca")
    assert (tmp_path / KEY_FILE).is_symlink() and (tmp_path / KEY_FILE).read_bytes() == b"key"


def test_the_sds_files_name_the_files_and_watch_the_directory(tmp_path: Path) -> None:
    write_sds_files(tmp_path)
    cert = yaml.safe_load((tmp_path / SDS_CERT_FILE).read_text())["resources"][0]
    assert cert["tls_certificate"]["certificate_chain"]["filename"] == str(tmp_path / CERT_FILE)
    assert cert["tls_certificate"]["watched_directory"] == {"path": str(tmp_path)}
    ca = yaml.safe_load((tmp_path / SDS_CA_FILE).read_text())["resources"][0]
    assert ca["validation_context"]["trusted_ca"]["filename"] == str(tmp_path / CA_FILE)
    before = (tmp_path / SDS_CERT_FILE).stat().st_mtime_ns
    write_sds_files(tmp_path)  # unchanged content: not rewritten (no needless reload)
    assert (tmp_path / SDS_CERT_FILE).stat().st_mtime_ns == before


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def test_the_readiness_endpoint() -> None:
    ready = [False]
    server = await serve_readiness("127.0.0.1:0", lambda: ready[0])
    port = server.sockets[0].getsockname()[1]
    try:
        get = f"GET {READY_PATH} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        assert (await _get(port, get)).startswith(b"HTTP/1.1 503")
        ready[0] = True
        assert (await _get(port, get)).startswith(b"HTTP/1.1 200")
        assert (await _get(port, b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 404")
        assert (await _get(port, f"POST {READY_PATH} HTTP/1.1\r\n\r\n".encode())).startswith(b"HTTP/1.1 405")
        assert (await _get(port, b"\r\n")).startswith(b"HTTP/1.1 405")
    finally:
        server.close()
        await server.wait_closed()


BASE = ["bootstrap", "--namespace", "shop", "--pod", "web-1", "--pod-ip", "10.0.0.5",
        "--service-account", "web"]


@pytest.mark.parametrize("args, message", [
    (["--tls"], "--cert-dir"),
    (["--grpc"], "--cert-dir"),
    (["--cert-dir", "/c"], "--tls"),
    (["--server-name", "x"], "--server-name"),
    (["--tls", "--cert-dir", "/c", "--xds-address", "unix:/run/xds.sock"], "Unix socket"),
    (["--xds-address", "a:1,,b:2"], "empty address"),
    (["--xds-address", "a:1", "--xds-address", "unix:/run/xds.sock"], "Unix socket"),
    (["--xds-address", ",".join(f"r{i}:15010" for i in range(17))], "at most 16"),
    (["--xds-address", "a:1", "--xds-address", "b:notaport"], "--xds-address"),
    (["--tls", "--cert-dir", "/c", "--xds-address", "a:15012,b:15012"], "--server-name"),
    (["--grpc", "--cert-dir", "/c", "--xds-address", "a:15012", "--xds-address", "b:15012"], "one address"),
])
def test_bootstrap_option_mistakes_are_named(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, BASE + args)
    assert result.exit_code == 2 and message in result.output, result.output


def test_bootstrap_tls_names_the_server_and_holds_no_secret(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a.b.c")
    refused = CliRunner().invoke(main, BASE + ["--tls", "--cert-dir", "/c", "--token-file", str(token)])
    assert refused.exit_code == 2 and "--token-file" in refused.output
    result = CliRunner().invoke(main, BASE + ["--tls", "--cert-dir", "certs"])
    assert result.exit_code == 0, result.output
    text = result.output
    bootstrap = yaml.safe_load(text)
    (xds,) = bootstrap["static_resources"]["clusters"]
    endpoint = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 15012  # the mTLS default
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
    (sds,) = tls["tls_certificate_sds_secret_configs"]
    # A relative --cert-dir is made absolute: Envoy resolves paths from its own directory.
    assert sds["sds_config"]["path_config_source"]["path"] == str(Path("certs").absolute() / SDS_CERT_FILE)
    (san,) = tls["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert san == {"san_type": "IP_ADDRESS", "matcher": {"exact": "127.0.0.1"}}
    assert "initial_metadata" not in text and "PRIVATE" not in text


def test_bootstrap_lists_every_replica_as_an_endpoint_of_one_xds_cluster() -> None:
    result = CliRunner().invoke(main, BASE + [
        "--tls", "--cert-dir", "/c", "--server-name", "xds.mesh.svc",
        "--xds-address", "10.0.0.1:15012,10.0.0.2:15012", "--xds-address", "10.0.0.3:15012",
        "--xds-address", "10.0.0.1:15012"])  # a repeat is listed once
    assert result.exit_code == 0, result.output
    bootstrap = yaml.safe_load(result.output)
    (xds,) = bootstrap["static_resources"]["clusters"]
    (locality,) = xds["load_assignment"]["endpoints"]
    hosts = [e["endpoint"]["address"]["socket_address"]["address"] for e in locality["lb_endpoints"]]
    assert hosts == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    # ADS and load reports both use that one cluster: one stream each, to one replica at a time.
    (ads,) = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"]
    (lrs,) = bootstrap["cluster_manager"]["load_stats_config"]["grpc_services"]
    assert ads["envoy_grpc"]["cluster_name"] == lrs["envoy_grpc"]["cluster_name"] == "xds-server"
    tls = xds["transport_socket"]["typed_config"]
    assert tls["sni"] == "xds.mesh.svc"
    (san,) = tls["common_tls_context"]["combined_validation_context"][
        "default_validation_context"]["match_typed_subject_alt_names"]
    assert san == {"san_type": "DNS", "matcher": {"exact": "xds.mesh.svc"}}
    # Several ports on one host need no --server-name: the host is the name.
    same_host = CliRunner().invoke(main, BASE + ["--tls", "--cert-dir", "/c", "--xds-address",
                                                 "127.0.0.1:15012,127.0.0.1:15013"])
    assert same_host.exit_code == 0, same_host.output
    assert yaml.safe_load(same_host.output)["static_resources"]["clusters"][0]["transport_socket"][
        "typed_config"]["sni"] == "127.0.0.1"


def test_bootstrap_grpc_is_an_a65_bootstrap(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, BASE + ["--grpc", "--cert-dir", str(tmp_path),
                                              "--xds-address", "xds.example:15012"])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output)
    (server,) = config["xds_servers"]
    assert server["server_uri"] == "xds.example:15012"
    (creds,) = server["channel_creds"]
    assert creds["type"] == "tls"
    assert creds["config"]["certificate_file"] == str(tmp_path / CERT_FILE)
    assert creds["config"]["private_key_file"] == str(tmp_path / KEY_FILE)
    assert creds["config"]["ca_certificate_file"] == str(tmp_path / CA_FILE)
    assert config["certificate_providers"]["default"]["plugin_name"] == "file_watcher"
    assert config["node"]["metadata"] == {"namespace": "shop", "service_account": "web",
                                          "pod": "web-1", "pod_ip": "10.0.0.5"}
