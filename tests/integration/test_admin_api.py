"""The admin API and the operator CLI, against real Envoys and the real `xds-server serve`.

What an operator sees: real Envoys listed SYNCED; a config Envoy rejects shown NACKED with
Envoy's own error text in the API, in `xds-server status` and in the metrics, and SYNCED again
after a fix; the convergence histogram moving; tokens enforced (401 / 403) and never logged;
the CA's bundle, issued certificates and root rotation; config dumps with secrets redacted.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from envoy.config.core.v3 import health_check_pb2
from prometheus_client.parser import text_string_to_metric_families

from tests.support.pem import fake_private_key_pem
from tests.support import scenario
from tests.support.admin import CA, AdminStack, Tokens
from tests.support.envoy import EnvoyProcess, ads_bootstrap
from tests.support.net import free_port, next_loopback_ip
from tests.support.upstreams import HttpUpstream, http_request
from tests.support.xds_client import XdsClient, cluster, endpoints
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache

ROOT = Path(__file__).resolve().parents[2]
STATUS_TYPES = ("CDS", "EDS", "LDS", "RDS")


async def _eventually(probe, timeout: float = 15.0, interval: float = 0.05):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = None
    while True:
        last = probe()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        assert loop.time() < deadline, f"condition not reached in time (last: {last!r})"
        await asyncio.sleep(interval)


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `xds-server ARGS` as an operator would (a separate process)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("XDS_SERVER_ADMIN")}
    environ.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.cli", *args, cwd=ROOT, env=environ,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# Real Envoys: SYNCED, NACKED with Envoy's text, SYNCED again ------------------------------------


@pytest.mark.envoy
@pytest.mark.slow
async def test_envoys_synced_nacked_with_envoys_error_and_synced_after_fix() -> None:
    listen_ip = next_loopback_ip()
    upstreams = [HttpUpstream(scenario.upstream_name(k), next_loopback_ip()).start() for k in range(4)]
    http_ports = [free_port(listen_ip) for _ in range(2)]
    tcp_ports = [free_port(listen_ip) for _ in range(2)]
    snapshot = scenario.make_snapshot(0, [u.address for u in upstreams], http_ports, tcp_ports, listen_ip)
    cache = ResourceCache()
    for type_url in types.PUSH_ORDER:
        if type_url in snapshot:
            cache.set_type(type_url, snapshot[type_url])
    stack = await AdminStack(cache=cache).start()
    modes = {"admin-sotw": "sotw-ads", "admin-delta": "delta-ads"}
    envoys = {
        # Each Envoy listens on its own addresses: only the first one serves the listeners.
        node: EnvoyProcess(ads_bootstrap(node, "127.0.0.1", stack.server.port, mode), name=node)
        for node, mode in modes.items()
    }
    token_env = {"XDS_SERVER_ADMIN_ADDRESS": stack.url, "XDS_SERVER_ADMIN_TOKEN": stack.tokens.read}
    try:
        for envoy in envoys.values():
            await asyncio.to_thread(envoy.start)
        async with stack.client("read") as api:

            async def statuses() -> dict[str, dict[str, str]]:
                proxies = (await api.get("/api/v1/proxies")).json()["proxies"]
                return {p["id"]: {t: s["status"] for t, s in p["types"].items()} for p in proxies}

            def all_synced(found: dict) -> bool:
                return set(found) == set(modes) and all(
                    all(found[n].get(t) == "SYNCED" for t in STATUS_TYPES) for n in modes)

            await _eventually(lambda: _check(statuses, all_synced))
            proxies = (await api.get("/api/v1/proxies")).json()["proxies"]
            by_id = {p["id"]: p for p in proxies}
            assert by_id["admin-sotw"]["variant"] == "sotw" and by_id["admin-delta"]["variant"] == "delta"
            for proxy in proxies:
                assert proxy["status"] == "SYNCED" and proxy["address"].startswith("ipv4:127.0.0.1:")
                assert proxy["connected_since"] and proxy["cluster"] == "test"
                cds = proxy["types"]["CDS"]
                assert cds["sent_version"] == cds["acked_version"] and cds["error"] is None

            # The config dump holds what Envoy itself reports as its active clusters.
            dump = (await api.get("/api/v1/proxies/admin-sotw/config", params={"type": "CDS"})).json()
            ours = {r["name"] for r in dump["types"]["CDS"]["resources"]}
            envoy_dump = await asyncio.to_thread(envoys["admin-sotw"].config_dump, False,
                                                 "dynamic_active_clusters")
            assert ours == {c["cluster"]["name"] for c in envoy_dump["configs"]}
            assert set(dump["types"]) == {"CDS"}
            assert dump["types"]["CDS"]["resources"][0]["resource"]["@type"] == types.CLUSTER

            table = await cli("status", env=token_env)
            assert table.returncode == 0, table.stderr
            lines = table.stdout.splitlines()
            assert lines[0].split()[:6] == ["NAME", "IDENTITY", "CDS", "LDS", "EDS", "RDS"]
            for node in modes:
                row = next(line for line in lines if line.startswith(node))
                assert row.split()[2:6] == ["SYNCED"] * 4, row

            before = parse_metrics((await api.get("/metrics")).text)
            converged_before = metric(before, "xds_server_convergence_seconds_count")

            # A cluster Envoy rejects: a health check without interval/timeout/thresholds.
            broken = scenario.make_cluster(0, 0)
            broken.health_checks.append(health_check_pb2.HealthCheck())
            cache.update(types.CLUSTER, upsert=[broken])

            def both_nacked(found: dict) -> bool:
                return all(found.get(n, {}).get("CDS") == "NACKED" for n in modes)

            await _eventually(lambda: _check(statuses, both_nacked))
            recorded = {c.proxy_id: c.state.types[types.CLUSTER].nack.message
                        for c in stack.server.connections}
            proxies = {p["id"]: p for p in (await api.get("/api/v1/proxies")).json()["proxies"]}
            for node in modes:
                error = proxies[node]["types"]["CDS"]["error"]
                # Envoy's own words, exactly as it sent them.
                assert error["message"] == recorded[node]
                assert "HealthCheck" in error["message"] or "interval" in error["message"]
                assert error["version"] == proxies[node]["types"]["CDS"]["sent_version"]
                assert proxies[node]["status"] == "NACKED"

            only_nacked = (await api.get("/api/v1/proxies", params={"status": "NACKED"})).json()
            assert sorted(p["id"] for p in only_nacked["proxies"]) == sorted(modes)
            assert (await api.get("/api/v1/proxies", params={"status": "SYNCED"})).json() == {"proxies": []}

            table = await cli("status", env=token_env)
            assert table.returncode == 0, table.stderr
            for node in modes:
                row = next(line for line in table.stdout.splitlines() if line.startswith(node))
                assert row.split()[2] == "NACKED", row
                assert f"{node} CDS NACKED" in table.stdout
            assert recorded["admin-sotw"].splitlines()[0] in table.stdout
            as_json = json.loads((await cli("status", "--output", "json", env=token_env)).stdout)
            assert {p["id"]: p["types"]["CDS"]["error"]["message"] for p in as_json["proxies"]} == recorded

            nacked = parse_metrics((await api.get("/metrics")).text)
            assert metric(nacked, "xds_server_nacks_total", type="CDS") == 2
            # A NACK answers the change too: it converged (to a rejection).
            assert metric(nacked, "xds_server_convergence_seconds_count") > converged_before

            # Envoy keeps serving the last good config meanwhile.
            target = scenario.upstream_name(scenario.target_cluster(0, 0))
            response = await asyncio.to_thread(http_request, listen_ip, http_ports[0], "/")
            assert response.json["name"] == target

            # The fix: accepted, SYNCED again, the NACK cleared, convergence observed again.
            cache.update(types.CLUSTER, upsert=[scenario.make_cluster(0, 1)])
            await _eventually(lambda: _check(statuses, all_synced))
            fixed = {p["id"]: p for p in (await api.get("/api/v1/proxies")).json()["proxies"]}
            assert all(fixed[n]["types"]["CDS"]["error"] is None for n in modes)

            async def converged_again() -> bool:
                after = parse_metrics((await api.get("/metrics")).text)
                return metric(after, "xds_server_convergence_seconds_count") > \
                    metric(nacked, "xds_server_convergence_seconds_count")

            await _eventually(converged_again)
            after = parse_metrics((await api.get("/metrics")).text)
            assert metric(after, "xds_server_nacks_total", type="CDS") == 2
            assert metric(after, "xds_server_connected_proxies", type="CDS", variant="sotw") == 1
            assert metric(after, "xds_server_connected_proxies", type="CDS", variant="delta") == 1
            assert metric(after, "xds_server_acks_total", type="CDS") >= 4
            table = await cli("status", env=token_env)
            for node in modes:
                row = next(line for line in table.stdout.splitlines() if line.startswith(node))
                assert row.split()[2:6] == ["SYNCED"] * 4, row
            assert "rejected config" not in table.stdout
    finally:
        for envoy in envoys.values():
            await asyncio.to_thread(envoy.stop)
        await stack.close()
        for upstream in upstreams:
            upstream.stop()


async def _check(fetch, predicate) -> bool:
    return predicate(await fetch())


# The real `xds-server serve`: tokens, roles, logs ------------------------------------------------


class Served:
    def __init__(self, tmp_path: Path, tokens: Tokens, *extra: str, auth: str = "none") -> None:
        self.auth = auth
        self.tokens = tokens
        self.tokens_file = tmp_path / "admin-tokens.json"
        self.tokens_file.write_text(tokens.document())  # hashes only
        self.resources = tmp_path / "resources"
        shutil.copytree(ROOT / "examples" / "resources", self.resources)
        self.xds_port = free_port()
        self.extra = extra
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self.admin_url = ""

    async def start(self) -> Served:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve",
            "--xds-address", f"127.0.0.1:{self.xds_port}", "--resources", str(self.resources),
            "--admin-address", "127.0.0.1:0", "--admin-tokens-file", str(self.tokens_file),
            "--debounce-quiet", "0.02", "--shutdown-grace", "1", "--auth", self.auth, *self.extra,
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read())
        line = await _eventually(lambda: next(
            (json.loads(raw) for raw in self.lines if "admin API listening" in raw), None), 30)
        self.admin_url = line["url"]
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return self.proc.returncode


@pytest.mark.slow
async def test_serve_enforces_tokens_and_never_logs_them(tmp_path: Path) -> None:
    tokens = Tokens()
    wrong = "not-a-token-" + "x" * 20
    served = await Served(tmp_path, tokens).start()
    try:
        async with XdsClient(f"127.0.0.1:{served.xds_port}", node_id="cli-proxy.shop") as xds:
            ads = xds.ads()
            await ads.request(types.CLUSTER)
            await ads.ack(await ads.recv())
            async with httpx.AsyncClient(base_url=served.admin_url, trust_env=False, timeout=10) as http:
                # Open: probes, scrapes and the API description.
                assert (await http.get("/healthz")).json() == {"status": "ok"}
                ready = await http.get("/readyz")
                assert ready.status_code == 200 and ready.json()["checks"]["xds"]["ok"]
                samples = parse_metrics((await http.get("/metrics")).text)
                assert metric(samples, "xds_server_connected_proxies", type="CDS", variant="sotw") == 1
                assert metric(samples, "xds_server_source_errors", source="resources") == 0
                spec = (await http.get("/openapi.json")).json()
                assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
                # Interactive docs: off unless --admin-docs.
                assert (await http.get("/docs")).status_code == 404
                assert (await http.get("/redoc")).status_code == 404

                reads = [p for p, item in spec["paths"].items() if "get" in item and p.startswith("/api/")]
                writes = [p for p, item in spec["paths"].items() if "post" in item]
                assert set(writes) == {"/api/v1/push", "/api/v1/ca/root-rotation", "/api/v1/tokens"}
                deletes = [p for p, item in spec["paths"].items() if "delete" in item]
                assert deletes == ["/api/v1/tokens/{token_id}"]
                assert (await http.delete("/api/v1/tokens/0123456789abcdef")).status_code == 401
                r = await http.delete("/api/v1/tokens/0123456789abcdef", headers=tokens.auth("read"))
                assert r.status_code == 403 and "admin role" in r.json()["error"]
                concrete = [p.replace("{proxy_id}", "cli-proxy.shop").replace("{namespace}/{pod}", "shop/web-0")
                            for p in reads]
                for path in concrete:  # no token, a wrong token, a malformed header: 401
                    for headers in ({}, {"Authorization": f"Bearer {wrong}"},
                                    {"Authorization": f"Basic {tokens.read}"}):
                        r = await http.get(path, headers=headers)
                        assert r.status_code == 401, (path, headers, r.text)
                        assert r.json()["error"] and r.headers["www-authenticate"].startswith("Bearer")
                for path in writes:
                    assert (await http.post(path, json={})).status_code == 401
                    r = await http.post(path, json={"action": "start"}, headers=tokens.auth("read"))
                    assert r.status_code == 403, (path, r.text)
                    assert "admin role" in r.json()["error"]

                # The read token reads.
                for path in concrete:
                    r = await http.get(path, headers=tokens.auth("read"))
                    # No CA; no mesh source, so no pod to show the NetworkPolicy of.
                    expected = 404 if path.startswith(("/api/v1/ca", "/api/v1/network-policy/")) else 200
                    assert r.status_code == expected, (path, r.text)
                no_ca = await http.get("/api/v1/ca", headers=tokens.auth("read"))
                assert "no CA is configured" in no_ca.json()["error"]
                proxies = (await http.get("/api/v1/proxies", headers=tokens.auth("read"))).json()
                assert [p["id"] for p in proxies["proxies"]] == ["cli-proxy.shop"]
                sources = (await http.get("/api/v1/sources", headers=tokens.auth("read"))).json()
                assert [s["name"] for s in sources["sources"]] == ["resources"]

                # The admin token writes; bad input is a 4xx naming the field.
                r = await http.post("/api/v1/push", json={"proxy": "cli-proxy.shop", "types": ["CDS"]},
                                    headers=tokens.auth("admin"))
                assert r.status_code == 200 and r.json() == {"streams": 1, "proxies": ["cli-proxy.shop"]}
                r = await http.post("/api/v1/push", json={"types": ["CDX"]}, headers=tokens.auth("admin"))
                assert r.status_code == 422 and r.json()["fields"][0]["field"] == "types.0"
                # No coercion: a number is not a boolean (found by the schema fuzzer).
                r = await http.post("/api/v1/push", json={"resend": 0.0}, headers=tokens.auth("admin"))
                assert r.status_code == 422 and r.json()["fields"][0]["field"] == "resend"
                r = await http.post("/api/v1/push", json={"proxy": "nobody"}, headers=tokens.auth("admin"))
                assert r.status_code == 404 and r.json()["fields"][0]["field"] == "proxy"

                # An invalid source file shows up as a source error with file and field.
                (served.resources / "bad.yaml").write_text(
                    '"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster\n'
                    "name: extra\nconnect_timeout: 5x\n")

                async def source_error() -> dict | None:
                    data = (await http.get("/api/v1/sources", headers=tokens.auth("read"))).json()
                    errors = data["sources"][0]["errors"]
                    return errors[0] if errors else None

                error = await _eventually(source_error)
                assert error["file"] == "bad.yaml" and "connect_timeout" in error["text"]
                samples = parse_metrics((await http.get("/metrics")).text)
                assert metric(samples, "xds_server_source_errors", source="resources") == 1
                assert metric(samples, "xds_server_auth_failures_total", surface="admin",
                              reason="missing") >= len(concrete)
                assert metric(samples, "xds_server_auth_failures_total", surface="admin",
                              reason="forbidden") == len(writes) + 1  # + the DELETE

            # The operator CLI against the real process.
            env = {"XDS_SERVER_ADMIN_ADDRESS": served.admin_url, "XDS_SERVER_ADMIN_TOKEN": tokens.read}
            status = json.loads((await cli("status", "-o", "json", env=env)).stdout)
            assert status["proxies"][0]["types"]["CDS"]["status"] == "SYNCED"
            dump = await cli("config-dump", "cli-proxy.shop", "-o", "json", env=env)
            assert dump.returncode == 0, dump.stderr
            clusters = json.loads(dump.stdout)["types"]["CDS"]["resources"]
            assert [c["name"] for c in clusters] == ["backend"]
            assert clusters[0]["resource"]["connect_timeout"] == "1s"
            denied = await cli("status", env={"XDS_SERVER_ADMIN_ADDRESS": served.admin_url,
                                              "XDS_SERVER_ADMIN_TOKEN": wrong})
            assert denied.returncode == 1 and "401 invalid token" in denied.stderr
            assert wrong not in denied.stderr
            missing = await cli("config-dump", "nobody", env=env)
            assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        assert await served.stop() == 0
    logs = "".join(served.lines)
    for secret in (tokens.admin, tokens.read, wrong):
        assert secret not in logs
    records = [json.loads(line) for line in served.lines if line.startswith("{")]
    requests = [r for r in records if r.get("msg") == "admin request"]
    assert any(r.get("token_name") == "ops" and r["path"] == "/api/v1/push" for r in requests)
    assert any(r.get("auth_failure") == "unknown_token" and r["level"] == "warning" for r in requests)
    assert any(r.get("msg") == "push triggered through the admin API" and r.get("proxy") == "cli-proxy.shop"
               for r in records)


@pytest.mark.slow
async def test_serve_with_the_built_in_ca_lists_issued_certificates_and_rotates(tmp_path: Path) -> None:
    from google.protobuf import struct_pb2

    from envoy.config.core.v3 import base_pb2

    tokens = Tokens()
    served = await Served(tmp_path, tokens, "--ca-dir", str(tmp_path / "ca"),
                          auth="insecure-node-metadata").start()
    try:
        metadata = struct_pb2.Struct()
        metadata.update({"namespace": "shop", "service_account": "web", "pod": "web-0"})
        node = base_pb2.Node(id="web-0.shop", cluster="shop", metadata=metadata)
        async with XdsClient(f"127.0.0.1:{served.xds_port}") as xds:
            ads = xds.ads(node=node)
            await ads.request(types.SECRET, ["default", "ROOTCA"])
            await ads.ack(await ads.recv())
            env = {"XDS_SERVER_ADMIN_ADDRESS": served.admin_url, "XDS_SERVER_ADMIN_TOKEN": tokens.read}
            listed = json.loads((await cli("certs", "-o", "json", env=env)).stdout)["certificates"]
            # the proxy's SVID, and the xDS TLS port's own serving certificate
            assert sorted((c["spiffe_id"], c["proxy"], c["kind"]) for c in listed) == [
                ("dns:localhost", "xds-tls", "serving"),
                ("spiffe://cluster.local/ns/shop/sa/web", "web-0.shop", "sds")]
            status = json.loads((await cli("status", "-o", "json", env=env)).stdout)["proxies"][0]
            assert status["identity"] == {"spiffe_id": "spiffe://cluster.local/ns/shop/sa/web",
                                          "verified": True}
            assert status["types"]["SDS"]["status"] == "SYNCED"
            dump = await cli("config-dump", "web-0.shop", "--type", "SDS", "-o", "json", env=env)
            assert "PRIVATE KEY" not in dump.stdout and "[redacted]" in dump.stdout
            async with httpx.AsyncClient(base_url=served.admin_url, trust_env=False,
                                         headers=tokens.auth("admin")) as http:
                ca = (await http.get("/api/v1/ca")).json()
                assert ca["issued_certificates"] == 2 and ca["rotation"]["phase"] == "idle"
                bundle = (await http.get("/api/v1/ca/trust-bundle")).json()
                assert bundle["pem"].startswith("-----BEGIN CERTIFICATE-----")
                started = await http.post("/api/v1/ca/root-rotation", json={"action": "start"})
                assert started.status_code == 200, started.text
                assert started.json()["rotation"]["phase"] == "publishing"
                assert len((await http.get("/api/v1/ca/trust-bundle")).json()["roots"]) == 2
                again = await http.post("/api/v1/ca/root-rotation", json={"action": "start"})
                assert again.status_code == 409
                samples = parse_metrics((await http.get("/metrics")).text)
                assert metric(samples, "xds_server_certificates_issued_total", kind="sds") >= 1
                assert metric(samples, "xds_server_certificates_valid") >= 1
    finally:
        assert await served.stop() == 0
    assert tokens.admin not in "".join(served.lines) and tokens.read not in "".join(served.lines)


async def test_serve_refuses_a_bad_tokens_file_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "tokens.yaml"
    bad.write_text("tokens:\n  - {name: ops, role: superuser, token: 0123456789abcdefXYZ}\n")
    result = await cli("serve", "--xds-address", "127.0.0.1:0", "--admin-address", "127.0.0.1:0",
                       "--admin-tokens-file", str(bad), "--auth", "none")
    assert result.returncode == 1
    assert "tokens.0.role" in result.stderr and "0123456789abcdefXYZ" not in result.stderr


# The CA: bundle, issued certificates, rotation ---------------------------------------------------


async def test_ca_endpoints_certs_cli_and_root_rotation(tmp_path: Path) -> None:
    from xds_server.model.identity import Identity

    ca = CA(tmp_path / "ca")
    first = ca.issuer.issue_for_identity(Identity("shop", "api"), proxy="api-0.shop")
    second = ca.issuer.issue_for_identity(Identity("shop", "web"), proxy="web-0.shop")
    async with AdminStack(ca=ca) as stack, stack.client("read") as api:
        status = (await api.get("/api/v1/ca")).json()
        assert status["trust_domain"] == "cluster.local" and status["self_signed"] is True
        assert len(status["roots"]) == 1 and status["roots"][0]["signing"] is True
        assert status["rotation"]["phase"] == "idle" and status["issued_certificates"] == 2

        bundle = (await api.get("/api/v1/ca/trust-bundle")).json()
        assert bundle["pem"] == ca.authority.trust_bundle_pem.decode()

        listed = (await api.get("/api/v1/ca/certificates")).json()["certificates"]
        assert [(c["serial"], c["spiffe_id"], c["proxy"]) for c in listed] == [
            (first.serial_hex, "spiffe://cluster.local/ns/shop/sa/api", "api-0.shop"),
            (second.serial_hex, "spiffe://cluster.local/ns/shop/sa/web", "web-0.shop"),
        ]
        assert listed[0]["not_after"] == first.not_after.isoformat()
        only = (await api.get("/api/v1/ca/certificates", params={"proxy": "web-0.shop"})).json()
        assert [c["serial"] for c in only["certificates"]] == [second.serial_hex]

        env = {"XDS_SERVER_ADMIN_ADDRESS": stack.url, "XDS_SERVER_ADMIN_TOKEN": stack.tokens.read}
        table = await cli("certs", env=env)
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].split()[:4] == ["SERIAL", "SPIFFE", "ID", "NOT"]
        assert first.serial_hex in table.stdout and "spiffe://cluster.local/ns/shop/sa/web" in table.stdout
        assert "23h" in table.stdout  # expires in (24 h TTL)
        as_json = json.loads((await cli("certs", "--output", "json", env=env)).stdout)
        assert len(as_json["certificates"]) == 2

        # Root rotation: admin only; start publishes a second root; twice is a conflict.
        assert (await api.post("/api/v1/ca/root-rotation", json={"action": "start"})).status_code == 403
        async with stack.client("admin") as admin:
            started = await admin.post("/api/v1/ca/root-rotation", json={"action": "start"})
            assert started.status_code == 200, started.text
            assert started.json()["rotation"]["phase"] == "publishing"
            assert len(ca.authority.roots) == 2
            again = await admin.post("/api/v1/ca/root-rotation", json={"action": "start"})
            assert again.status_code == 409 and again.json()["fields"][0]["field"] == "action"
            bad = await admin.post("/api/v1/ca/root-rotation", json={"action": "rotate-now"})
            assert bad.status_code == 422 and bad.json()["fields"][0]["field"] == "action"
            missing = await admin.post("/api/v1/ca/root-rotation", json={})
            assert missing.status_code == 422 and missing.json()["fields"][0]["field"] == "action"
            cancelled = await admin.post("/api/v1/ca/root-rotation", json={"action": "cancel"})
            assert cancelled.json()["rotation"]["phase"] == "idle"
            assert len(ca.authority.roots) == 1
        status = (await api.get("/api/v1/ca")).json()
        assert status["rotation"]["phase"] == "idle"


async def test_ca_endpoints_without_a_ca_are_a_clear_404() -> None:
    async with AdminStack() as stack, stack.client("admin") as api:
        for method, path in (("GET", "/api/v1/ca"), ("GET", "/api/v1/ca/trust-bundle"),
                             ("GET", "/api/v1/ca/certificates")):
            r = await api.request(method, path)
            assert r.status_code == 404 and "no CA is configured" in r.json()["error"], path
        r = await api.post("/api/v1/ca/root-rotation", json={"action": "start"})
        assert r.status_code == 404 and "no CA is configured" in r.json()["error"]
        env = {"XDS_SERVER_ADMIN_ADDRESS": stack.url, "XDS_SERVER_ADMIN_TOKEN": stack.tokens.read}
        result = await cli("certs", env=env)
        assert result.returncode == 1 and "no CA is configured" in result.stderr


# Config dumps: a mesh proxy through its own view; secrets redacted ------------------------------


async def test_config_dump_of_a_mesh_proxy_through_its_view(tmp_path: Path) -> None:
    from google.protobuf import struct_pb2

    from envoy.config.core.v3 import base_pb2
    from xds_server.admin.settings import AdminSettings
    from xds_server.app import AppConfig, start_app
    from xds_server.xds.server import ServerSettings

    tokens = Tokens()
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(tokens.document())
    running = await start_app(AppConfig(
        server=ServerSettings(address="127.0.0.1:0", debounce_quiet=0), source=ROOT / "examples" / "demo",
        admin=AdminSettings(address="127.0.0.1:0", tokens_file=tokens_file)))
    try:
        metadata = struct_pb2.Struct()
        metadata.update({"namespace": "demo", "service_account": "frontend", "pod": "frontend-0",
                         "pod_ip": "127.0.10.2"})
        node = base_pb2.Node(id="frontend-0.demo", cluster="demo", metadata=metadata)
        async with XdsClient(running.address) as xds:
            ads = xds.ads(node=node)
            await ads.request(types.LISTENER)
            await ads.ack(await ads.recv())
            async with httpx.AsyncClient(base_url=running.admin.url, headers=tokens.auth("read"),
                                         trust_env=False) as api:
                proxy = (await api.get("/api/v1/proxies/frontend-0.demo")).json()
                assert proxy["identity"] == {"spiffe_id": "spiffe://cluster.local/ns/demo/sa/frontend",
                                             "verified": False}
                dump = (await api.get("/api/v1/proxies/frontend-0.demo/config")).json()
                listeners = {r["name"]: r["resource"] for r in dump["types"]["LDS"]["resources"]}
                # Its own listeners only, as its view scopes them (demo/frontend-0's).
                assert listeners and all("frontend-0" in name for name in listeners), listeners
                outbound = next(v for k, v in listeners.items() if "outbound" in k)
                assert outbound["address"]["socket_address"]["port_value"] == 15001
                assert dump["types"]["LDS"]["status"] == "SYNCED"
                assert dump["types"]["LDS"]["size_bytes"] > 0
                model = (await api.get("/api/v1/model", params={"section": "services"})).json()
                assert {s["name"] for s in model["services"]} >= {"api", "frontend", "db"}
                assert model["endpoints"] == []  # only the section asked for
                endpoints_only = (await api.get("/api/v1/model", params={"section": "endpoints"})).json()
                assert endpoints_only["endpoints"][0]["kind"] == "EndpointSlice"
                sources = (await api.get("/api/v1/sources")).json()["sources"]
                assert sources == [{"name": "files", "synced": True, "errors": [],
                                    "directory": str(ROOT / "examples" / "demo")}]
                ready = (await api.get("/readyz")).json()
                assert ready["ready"] and ready["checks"]["sources"]["ok"]
    finally:
        await running.close(0.1)


async def test_config_dump_redacts_secrets_and_push_resend() -> None:
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

    key = fake_private_key_pem("TOPSECRETKEYBYTES", "EC")
    cache = ResourceCache()
    cache.set_type(types.SECRET, [secret_pb2.Secret(name="default", tls_certificate=common_pb2.TlsCertificate(
        certificate_chain={"inline_string": "-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n"},
        private_key={"inline_string": key}))])
    cache.set_type(types.CLUSTER, [cluster("web")])
    cache.set_type(types.ENDPOINT, [endpoints("web", 8080)])
    async with AdminStack(cache=cache) as stack, XdsClient(stack.server.address, node_id="sds-proxy") as xds:
        ads = xds.ads()
        await ads.request(types.SECRET, ["default"])
        await ads.ack(await ads.recv())
        await ads.request(types.CLUSTER)
        first = await ads.recv()
        await ads.ack(first)
        async with stack.client("read") as api:
            dump = await api.get("/api/v1/proxies/sds-proxy/config")
            assert "TOPSECRETKEYBYTES" not in dump.text
            secret = dump.json()["types"]["SDS"]["resources"][0]["resource"]
            assert secret["tls_certificate"]["private_key"] == {"inline_string": "[redacted]"}
            assert "LEAF" in secret["tls_certificate"]["certificate_chain"]["inline_string"]
            assert set(dump.json()["types"]) == {"CDS", "SDS"}
        async with stack.client("admin") as admin:
            # A plain push re-evaluates: nothing changed, so nothing is sent.
            r = await admin.post("/api/v1/push", json={"proxy": "sds-proxy", "types": ["CDS"]})
            assert r.json() == {"streams": 1, "proxies": ["sds-proxy"]}
            await ads.expect_silence(0.3)
            # With resend the complete current set goes again, same version.
            r = await admin.post("/api/v1/push", json={"types": ["CDS"], "resend": True})
            assert r.status_code == 200
            again = await ads.recv()
            assert again.type_url == types.CLUSTER and again.version_info == first.version_info
            await ads.ack(again)
            r = await admin.post("/api/v1/push")  # no body: every proxy, every type
            assert r.status_code == 200 and r.json()["streams"] == 1


# mTLS with client certificates from the mesh CA ----------------------------------------------


async def test_admin_mtls_requires_a_client_certificate_from_the_mesh_ca(tmp_path: Path) -> None:
    from xds_server.model.identity import Identity

    ca = CA(tmp_path / "ca")
    other = CA(tmp_path / "other-ca")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.authority.trust_bundle_pem)

    def client_files(issuer_ca: CA, name: str) -> tuple[str, str]:
        issued = issuer_ca.issuer.issue_for_identity(Identity("ops", "admin-cli"))
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}-key.pem"
        cert.write_bytes(issued.chain_pem)
        key.write_bytes(issued.key_pem)
        return str(cert), str(key)

    good = client_files(ca, "good")
    foreign = client_files(other, "foreign")

    def context(cert: tuple[str, str] | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(bundle))
        ctx.check_hostname = False  # a SPIFFE certificate names a workload, not a host
        if cert is not None:
            ctx.load_cert_chain(*cert)
        return ctx

    async with AdminStack(ca=ca, mtls=True) as stack:
        assert stack.url.startswith("https://")
        async with httpx.AsyncClient(base_url=stack.url, verify=context(good), trust_env=False) as api:
            assert (await api.get("/healthz")).status_code == 200
            assert (await api.get("/api/v1/proxies")).status_code == 401  # a certificate is not a token
            r = await api.get("/api/v1/proxies", headers=stack.tokens.auth("read"))
            assert r.status_code == 200
        for cert in (None, foreign):
            async with httpx.AsyncClient(base_url=stack.url, verify=context(cert), trust_env=False) as api:
                with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                    await api.get("/healthz")
        env = {"XDS_SERVER_ADMIN_ADDRESS": stack.url.removeprefix("https://"),
               "XDS_SERVER_ADMIN_TOKEN": stack.tokens.read}
        result = await cli("status", "--cacert", str(bundle), "--cert", good[0], "--key", good[1], env=env)
        assert result.returncode == 0 and "no proxies connected" in result.stdout, result.stderr
        result = await cli("status", "--cacert", str(bundle), env=env)
        assert result.returncode == 1 and "cannot reach the admin API" in result.stderr


async def test_readyz_reports_each_check() -> None:
    import types as pytypes

    waiting = pytypes.SimpleNamespace(errors=[], synced=False)
    async with AdminStack(sources={"kubernetes": waiting}) as stack, stack.client(None) as http:
        r = await http.get("/readyz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["sources"] == {"ok": False, "detail": "waiting for the first sync of kubernetes"}
        assert checks["xds"]["ok"] and checks["ca"]["ok"]
        waiting.synced = True
        assert (await http.get("/readyz")).status_code == 200
        await stack.server.stop(0)
        r = await http.get("/readyz")
        assert r.status_code == 503 and not r.json()["checks"]["xds"]["ok"]


async def test_interactive_docs_are_served_only_when_asked_for() -> None:
    """--admin-docs: /docs and /redoc, their files served here and a policy that lets the
    browser fetch nothing elsewhere (test_admin_docs_browser.py drives them in a browser);
    /openapi.json always."""
    for docs, status in ((False, 404), (True, 200)):
        stack = await AdminStack(docs=docs).start()
        try:
            async with stack.client(token=None) as http:
                for page in ("/docs", "/redoc"):
                    response = await http.get(page)
                    assert response.status_code == status
                    if docs:
                        assert "default-src 'self'" in response.headers["content-security-policy"]
                        assert "cdn." not in response.text and "fonts.googleapis" not in response.text
                assert (await http.get("/docs-assets/swagger-ui-bundle.js")).status_code == status
                assert (await http.get("/openapi.json")).status_code == 200
        finally:
            await stack.close()


async def test_the_body_limit_holds_for_chunked_bodies_too() -> None:
    """64 KiB for every transfer encoding: a chunked body (no Content-Length) is counted as it
    arrives and refused with 413 past the limit, with or without a token; a small one works."""
    sent = {"bytes": 0}

    async def chunks(total: int):
        piece = b"x" * 16384
        while sent["bytes"] < total:
            sent["bytes"] += len(piece)
            yield piece

    stack = await AdminStack().start()
    try:
        for token in (None, "admin"):
            sent["bytes"] = 0
            async with stack.client(token=token) as http:
                response = await http.post("/api/v1/push", content=chunks(4 * 1024 * 1024),
                                           headers={"content-type": "application/json"})
            assert response.status_code == 413, (token, response.status_code, response.text)
            assert "Too Large" in response.text
        async with stack.client(token="admin") as http:
            ok = await http.post("/api/v1/push", json={})
        assert ok.status_code in (200, 202), ok.text
    finally:
        await stack.close()
