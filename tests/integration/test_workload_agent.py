"""The workload agent and the TLS bootstraps (issue 11 items 3), with the real pieces: the
`xds-server agent` and `xds-server bootstrap` commands as processes, a real Envoy, the stock
grpcio xDS client, openssl, and the server in `--auth tokens` mode with its TLS ports.

What a user relies on: a pod whose agent holds only a token file gets an SVID over TLS; the
Envoy started from `bootstrap --tls` gets its whole config over mutual TLS with the agent's
files, keeps working while those files are renewed every few seconds, and reconnects after
its token expired and the server restarted; proxyless gRPC does the same with `bootstrap
--grpc` (gRFC A65 channel credentials).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from tests.support.envoy import EnvoyProcess
from tests.support.mesh import MeshHarness, Pod
from tests.support.net import free_port, next_loopback_ip
from tests.support.proxyless import ProxylessProcess
from tests.support.upstreams import http_request
from xds_server.app import attach_load_reports
from xds_server.ca.certdir import CA_FILE, CERT_FILE, KEY_FILE, SDS_CA_FILE, SDS_CERT_FILE
from xds_server.model.mesh import ServiceKey
from xds_server.model.security import SecuritySettings
from xds_server.security import Security, SecurityConfig
from xds_server.xds.auth import AuthMode
from xds_server.xds.cache import ResourceCache
from xds_server.xds.lrs import LrsSettings
from xds_server.xds.server import ServerSettings, XdsServer

pytestmark = [pytest.mark.envoy]

ROOT = Path(__file__).resolve().parents[2]
NS = "shop"
API_HOST = "api.shop:80"


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "xds_server.cli", "--log-format", "text", *args]


class AgentMesh(MeshHarness):
    """The mesh harness with the server as `serve --auth tokens` wires it: the CA, SDS, the
    CSR service and both TLS ports (mutual TLS, tokens over TLS) on free loopback ports."""

    def __init__(self, directory: Path, ca_dir: Path, *, workload_ttl: timedelta = timedelta(hours=1),
                 mtls: bool = False) -> None:
        cache = ResourceCache()
        self.config = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=ca_dir, watch_ca_files=False,
                                     rotation_startup_grace=timedelta(0), workload_ttl=workload_ttl)
        self.security = Security.build(self.config, cache, "127.0.0.1:0")
        assert self.security.sds is not None
        super().__init__(directory, security=SecuritySettings(mtls=mtls),
                         hooks=[], cache=cache)
        self.ports = (free_port(), free_port())
        self.server = self._new_server()
        self.stop_security = asyncio.Event()
        self.security_task: asyncio.Task | None = None
        self.agents: list[subprocess.Popen] = []
        self.work = directory.parent

    def _new_server(self) -> XdsServer:
        server = XdsServer(
            self.cache,
            ServerSettings(address="127.0.0.1:0", tls_address=f"127.0.0.1:{self.ports[0]}",
                           tls_token_address=f"127.0.0.1:{self.ports[1]}",
                           debounce_quiet=0.02, debounce_max=0.2),
            view_for=self.controller.view_for, release_view=self.controller.release)
        self.security.attach(server)
        # Load reports as `serve` composes them: the LRS stream proves itself like ADS.
        self.load = attach_load_reports(server, self.store, LrsSettings(interval=1.0), self.security)
        return server

    async def start(self) -> AgentMesh:
        await super().start()
        self.security_task = asyncio.create_task(self.security.run(self.stop_security))
        return self

    async def restart_server(self) -> None:
        """Stop the xDS server (every stream ends) and start a new one on the same ports."""
        self.stop_security.set()
        assert self.security_task is not None
        await asyncio.wait_for(self.security_task, 10)
        await self.server.stop(0)
        self.server = self._new_server()
        await self.server.start()
        self.stop_security = asyncio.Event()
        self.security_task = asyncio.create_task(self.security.run(self.stop_security))

    async def stop(self) -> None:
        for proc in self.agents:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.stop_security.set()
        if self.security_task is not None:
            await asyncio.wait_for(self.security_task, 10)
        await super().stop()

    @property
    def mtls_address(self) -> str:
        return f"127.0.0.1:{self.ports[0]}"

    @property
    def token_address(self) -> str:
        return f"127.0.0.1:{self.ports[1]}"

    @property
    def bundle(self) -> bytes:
        assert self.security.authority is not None
        return self.security.authority.trust_bundle_pem

    def token(self, service_account: str, ttl: timedelta = timedelta(hours=1)) -> str:
        assert self.security.tokens is not None
        return self.security.tokens.create(NS, service_account, ttl)

    def write_token(self, path: Path, service_account: str, ttl: timedelta) -> None:
        """As the kubelet refreshes a projected token: a new file content, swapped atomically."""
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self.token(service_account, ttl))
        os.replace(tmp, path)

    async def agent(self, service_account: str, name: str, *extra: str,
                    token_ttl: timedelta = timedelta(hours=1)) -> tuple[Path, subprocess.Popen, int]:
        """`xds-server agent` for one workload, as the injector runs it: a token file, the
        mesh roots for first contact, readiness on a port. Returns once it reports ready."""
        home = self.work / f"agent-{name}"
        home.mkdir()
        (home / "roots.pem").write_bytes(self.bundle)
        self.write_token(home / "token", service_account, token_ttl)
        cert_dir = home / "certs"
        ready_port = free_port()
        proc = subprocess.Popen(
            cli("agent", "--cert-dir", str(cert_dir), "--server", self.token_address,
                "--token-file", str(home / "token"), "--server-ca", str(home / "roots.pem"),
                "--server-name", "localhost", "--ready-address", f"127.0.0.1:{ready_port}", *extra),
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(home / "agent.log", "wb"),  # noqa: SIM115
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.agents.append(proc)

        def ready() -> bool:
            assert proc.poll() is None, (home / "agent.log").read_text()
            return readiness(ready_port) == 200

        await self.until(ready, 30, f"agent {name} ready")
        return cert_dir, proc, ready_port

    def tls_bootstrap(self, pod: Pod, cert_dir: Path) -> dict[str, Any]:
        """What `xds-server bootstrap --tls` prints for the pod (the command itself)."""
        out = subprocess.run(
            cli("bootstrap", "--namespace", pod.namespace, "--service-account", pod.service_account,
                "--pod", pod.name, "--pod-ip", pod.ip, "--interception", "explicit",
                "--admin-address", f"{pod.ip}:{free_port(pod.ip)}",
                "--tls", "--cert-dir", str(cert_dir), "--xds-address", self.mtls_address,
                "--server-name", "localhost"),
            cwd=ROOT, capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        bootstrap = yaml.safe_load(out.stdout)
        assert "initial_metadata" not in json.dumps(bootstrap), "no token in the bootstrap"
        return bootstrap

    async def tls_sidecar(self, pod: Pod, cert_dir: Path) -> Pod:
        pod.envoy = EnvoyProcess(self.tls_bootstrap(pod, cert_dir), name=f"{pod.namespace}-{pod.name}")
        await asyncio.to_thread(pod.envoy.start)
        await asyncio.to_thread(pod.envoy.wait_ready, 30)
        return pod


def readiness(port: int) -> int:
    try:
        return http_request("127.0.0.1", port, "/healthz/ready", timeout=2).status
    except OSError:
        return 0


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[AgentMesh]:
    harness = await AgentMesh(tmp_path / "mesh", tmp_path / "ca").start()
    try:
        yield harness
    finally:
        await harness.stop()


def leaf(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def uri_sans(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)


def client_certificate_serials(envoy: EnvoyProcess) -> set[str]:
    """Serials of every certificate Envoy currently presents (/certs), lower-case hex."""
    found = set()
    for context in envoy.admin_json("/certs").get("certificates", ()):
        for cert in context.get("cert_chain", ()):
            found.add(cert["serial_number"].lower().lstrip("0"))
    return found


# ------------------------------------------------------------------------- agent + Envoy


async def test_a_real_envoy_from_the_agents_files_gets_its_config_over_mtls(mesh: AgentMesh) -> None:
    api = mesh.pod(NS, "api-1", service_account="api")
    web = mesh.pod(NS, "web-1", service_account="web")
    mesh.service(NS, "api", pods=[api])
    cert_dir, _, ready_port = await mesh.agent("web", "web-1")
    # The agent's directory: the three files (one generation, switched by a symlink) and the
    # SDS resources Envoy reads; the key never left the pod and is 0600.
    for name in (CERT_FILE, KEY_FILE, CA_FILE, SDS_CERT_FILE, SDS_CA_FILE):
        assert (cert_dir / name).exists(), name
    assert (cert_dir / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert uri_sans(leaf(cert_dir / CERT_FILE)) == [f"spiffe://cluster.local/ns/{NS}/sa/web"]
    assert readiness(ready_port) == 200

    api_certs, _, _ = await mesh.agent("api", "api-1")
    await asyncio.gather(mesh.tls_sidecar(web, cert_dir), mesh.tls_sidecar(api, api_certs))
    # Its whole config came over mutual TLS on the TLS port: routing to api works.
    await mesh.until(lambda: web.request(API_HOST).status == 200, 20, "web -> api")
    # Its load reports go over the same mutual TLS and prove the same identity.
    for _ in range(20):
        await asyncio.to_thread(web.request, API_HOST)
    api_key = ServiceKey(NS, "api")
    await mesh.until(lambda: mesh.load.totals.get(api_key, [0])[0] >= 20, 20, "web's load reports")
    assert mesh.load.lrs_stats.refused == {}
    stats = mesh.security.guard.stats
    assert stats.authenticated["client-certificate"] >= 1
    assert stats.authenticated["workload-token"] == 0, "Envoy sent no token"
    (conn,) = [c for c in mesh.server.connections if c.proxy_id == f"web-1.{NS}"]
    assert conn.proof is not None and conn.proof.method == "client-certificate"
    assert web.envoy is not None
    serial = format(leaf(cert_dir / CERT_FILE).serial_number, "x")
    assert serial in client_certificate_serials(web.envoy), "Envoy presents the agent's certificate"

    # openssl, trusting only the agent's bundle, sees the server's names and chain (run off
    # the loop: the server in this process does its TLS handshakes on it).
    output = (await asyncio.to_thread(
        subprocess.run,
        ["openssl", "s_client", "-connect", mesh.mtls_address, "-servername", "localhost",
         "-CAfile", str(cert_dir / CA_FILE), "-verify_return_error", "-verify_hostname", "localhost",
         "-cert", str(cert_dir / CERT_FILE), "-key", str(cert_dir / KEY_FILE), "-showcerts"],
        input=b"", capture_output=True, timeout=20, check=False)).stdout.decode()
    assert "Verify return code: 0 (ok)" in output, output
    served = x509.load_pem_x509_certificate(
        output[output.index("-----BEGIN CERTIFICATE-----"):].split("-----END CERTIFICATE-----")[0].encode()
        + b"-----END CERTIFICATE-----\n")
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)


async def test_the_agent_refuses_to_send_its_token_in_clear_off_the_host(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    proc = await asyncio.create_subprocess_exec(
        *cli("agent", "--cert-dir", str(tmp_path / "certs"), "--server", "xds.example.test:15010",
             "--token-file", str(token), "--plaintext", "--once"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, out
    assert b"--plaintext" in out and b"--server-ca" in out and b"Traceback" not in out
    assert not (tmp_path / "certs").exists()


async def test_the_agent_is_not_ready_without_a_certificate(mesh: AgentMesh, tmp_path: Path) -> None:
    """A token the server refuses: the agent keeps retrying, reports not ready, writes nothing."""
    token = tmp_path / "token"
    token.write_text("not-a-token")
    (tmp_path / "roots.pem").write_bytes(mesh.bundle)
    port = free_port()
    proc = subprocess.Popen(
        cli("agent", "--cert-dir", str(tmp_path / "certs"), "--server", mesh.token_address,
            "--token-file", str(token), "--server-ca", str(tmp_path / "roots.pem"),
            "--server-name", "localhost", "--ready-address", f"127.0.0.1:{port}"),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    mesh.agents.append(proc)
    await mesh.until(lambda: readiness(port) == 503, 30, "agent answering not ready")
    await mesh.until(lambda: mesh.security.csr_service.failures["unauthenticated"] >= 1, 20,
                     "the refusal counted")
    assert not (tmp_path / "certs" / CERT_FILE).exists()
    # The kubelet replaces the token: the next retry succeeds.
    mesh.write_token(token, "web", timedelta(hours=1))
    await mesh.until(lambda: readiness(port) == 200, 30, "agent ready with the new token")


async def test_the_agent_renews_with_its_certificate_without_the_token(mesh: AgentMesh) -> None:
    """With --mtls-server the agent renews on the mutual-TLS port with the certificate it
    holds: once it has one, its token file may go stale (here: replaced by garbage, as a
    token nobody refreshes becomes useless) and renewals go on without a token."""
    cert_dir, _, port = await mesh.agent("web", "web-1", "--ttl", "4s", "--mtls-server",
                                         mesh.mtls_address)
    (mesh.work / "agent-web-1" / "token").write_text("not-a-token")
    first = leaf(cert_dir / CERT_FILE).serial_number
    seen: set[int] = set()

    def renewed() -> bool:
        seen.add(leaf(cert_dir / CERT_FILE).serial_number)
        return len(seen - {first}) >= 3

    await mesh.until(renewed, 30, "three renewals without a usable token")
    assert readiness(port) == 200
    assert mesh.security.csr_service is not None
    assert mesh.security.csr_service.failures.total() == 0, "the token was never needed"


# ---------------------------------------------------------------- rotation and expiry


class Traffic:
    """web -> api through web's sidecar, as fast as it answers, in a thread: every request
    counted as a success (200) or a failure (anything else, or no answer)."""

    def __init__(self, pod: Pod) -> None:
        self.pod = pod
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="traffic")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.pod.request(API_HOST, timeout=5).status
            except OSError as err:
                self.failed.append(f"{time.monotonic():.1f} {err!r}")
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failed.append(f"{time.monotonic():.1f} status {status}")
            time.sleep(0.02)

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.slow
@pytest.mark.xdist_group("agent-rotation")  # a minute of wall time: its own group
async def test_rotation_every_few_seconds_token_expiry_and_a_server_restart(tmp_path: Path) -> None:
    """A 20 s workload TTL: the agents' certificates (Envoy's xDS client certificate) and the
    data plane's SDS certificates are renewed every ~10 s for a minute, under traffic. The
    agents' tokens live 10 s and the files are refreshed as the kubelet does; after the first
    token has long expired, the server restarts and Envoy reconnects with its current
    certificate. Not one request fails."""
    mesh = await AgentMesh(tmp_path / "mesh", tmp_path / "ca", workload_ttl=timedelta(seconds=20),
                           mtls=True).start()
    traffic: Traffic | None = None
    refresher: asyncio.Task | None = None
    try:
        api = mesh.pod(NS, "api-1", service_account="api")
        web = mesh.pod(NS, "web-1", service_account="web")
        mesh.service(NS, "api", pods=[api])
        short = timedelta(seconds=10)
        (web_certs, _, _), (api_certs, _, _) = await asyncio.gather(
            mesh.agent("web", "web-1", "--ttl", "20s", token_ttl=short),
            mesh.agent("api", "api-1", "--ttl", "20s", token_ttl=short))
        first_token_expires = time.monotonic() + short.total_seconds()

        async def refresh_tokens() -> None:  # the kubelet: a fresh token well before expiry
            while True:
                await asyncio.sleep(3)
                for name, account in (("web-1", "web"), ("api-1", "api")):
                    mesh.write_token(mesh.work / f"agent-{name}" / "token", account, short)

        refresher = asyncio.create_task(refresh_tokens())
        await asyncio.gather(mesh.tls_sidecar(web, web_certs), mesh.tls_sidecar(api, api_certs))
        await mesh.until(lambda: web.request(API_HOST).status == 200, 30, "web -> api over mTLS")
        assert web.envoy is not None
        traffic = Traffic(web).start()

        written: set[str] = set()  # serials the web agent wrote
        presented: set[str] = set()  # serials Envoy's /certs showed

        async def observe(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                written.add(format(leaf(web_certs / CERT_FILE).serial_number, "x"))
                presented.update(await asyncio.to_thread(client_certificate_serials, web.envoy))
                await asyncio.sleep(0.5)

        await observe(35)
        assert time.monotonic() > first_token_expires + 20, "the first token is long expired"
        opened = mesh.security.guard.stats.authenticated["client-certificate"]
        await mesh.restart_server()
        # Envoy reconnects (its backoff) with the certificate it holds now, and is served.
        await mesh.until(lambda: any(c.proxy_id == f"web-1.{NS}" for c in mesh.server.connections),
                         40, "web's sidecar reconnected")
        await observe(15)
        (conn,) = [c for c in mesh.server.connections if c.proxy_id == f"web-1.{NS}"]
        assert conn.proof is not None and conn.proof.method == "client-certificate"
        assert mesh.security.guard.stats.authenticated["client-certificate"] > opened
        # ... and a change made after the restart reaches it.
        mesh.service(NS, "api", pods=[api], annotations={"restarted": "yes"},
                     extra_ports=[{"name": "extra", "port": 81, "targetPort": api.app_port,
                                   "appProtocol": "http"}])
        await mesh.until(lambda: any(":81" in json.dumps(n) or "|81|" in n
                                     for n in web.envoy.cluster_hosts()), 20,
                         "a cluster added after the restart")
    finally:
        if traffic is not None:
            traffic.stop()
        if refresher is not None:
            refresher.cancel()
        await mesh.stop()
    rotated = written & presented
    assert len(rotated) >= 3, f"Envoy presented {len(rotated)} of the agent's certificates ({len(written)} written)"
    assert traffic.ok > 100
    assert traffic.failed == [], traffic.failed[:10]
    assert mesh.security.guard.stats.auth_failures.total() == 0, mesh.security.guard.stats.auth_failures
    assert mesh.security.csr_service is not None
    assert mesh.security.csr_service.failures.total() == 0, mesh.security.csr_service.failures


# ------------------------------------------------------------------------ proxyless gRPC


def grpc_bootstrap_from_cli(mesh: AgentMesh, pod: str, service_account: str, ip: str,
                            cert_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        cli("bootstrap", "--grpc", "--namespace", NS, "--service-account", service_account,
            "--pod", pod, "--pod-ip", ip, "--cert-dir", str(cert_dir),
            "--xds-address", mesh.mtls_address),
        cwd=ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout)


@pytest.mark.slow
async def test_proxyless_grpc_in_tokens_mode_with_the_agents_files(tmp_path: Path) -> None:
    """Stock grpcio xDS server and client, each with an agent: their xDS connection is mutual
    TLS from the agent's files (A65 `channel_creds` of type tls: no token), and they call each
    other over mTLS with the same files (the `default` file_watcher provider)."""
    mesh = await AgentMesh(tmp_path / "mesh", tmp_path / "ca", mtls=True).start()
    processes: list[ProxylessProcess] = []
    try:
        ip = next_loopback_ip()
        port = free_port(ip)
        mesh.write(f"pod-{NS}-greeter-1.yaml", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "greeter-1", "namespace": NS, "labels": {"app": "greeter"},
                         "annotations": {"xds-server.io/proxyless": "true"}},
            "spec": {"serviceAccountName": "greeter",
                     "containers": [{"name": "app", "ports": [{"containerPort": port}]}]},
            "status": {"podIP": ip},
        })
        mesh.write(f"svc-{NS}-greeter.yaml", {
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "greeter", "namespace": NS},
            "spec": {"ports": [{"name": "grpc", "port": 50051, "targetPort": port, "appProtocol": "grpc"}]},
        }, {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "greeter-1", "namespace": NS,
                         "labels": {"kubernetes.io/service-name": "greeter"}},
            "addressType": "IPv4", "ports": [{"name": "grpc", "port": port, "appProtocol": "grpc"}],
            "endpoints": [{"addresses": [ip], "targetRef": {"kind": "Pod", "name": "greeter-1"}}],
        })
        (greeter_certs, _, _), (caller_certs, _, _) = await asyncio.gather(
            mesh.agent("greeter", "greeter-1"), mesh.agent("caller", "caller-1"))
        greeter_boot = grpc_bootstrap_from_cli(mesh, "greeter-1", "greeter", ip, greeter_certs)
        assert greeter_boot["xds_servers"][0]["channel_creds"][0]["type"] == "tls"
        server = ProxylessProcess("server", "greeter-1", ip, str(port), bootstrap=greeter_boot)
        processes.append(await server.start())
        await server.until(lambda e: e.get("serving"), 30, "greeter serving")
        client = ProxylessProcess(
            "client", "xds:///greeter.shop:50051", "60", "0.1",
            bootstrap=grpc_bootstrap_from_cli(mesh, "caller-1", "caller", next_loopback_ip(),
                                              caller_certs))
        processes.append(await client.start())
        answer = await client.until(lambda e: e.get("ok"), 40, "a successful call")
        # The server saw the client's SPIFFE ID from the agent's certificate (mTLS data plane).
        assert answer["answer"] == {"name": "greeter-1",
                                    "peer": f"spiffe://cluster.local/ns/{NS}/sa/caller"}
        # Both xDS streams were proven by client certificate, none by token.
        proofs = {c.proxy_id: c.proof.method for c in mesh.server.connections if c.proof is not None}
        assert proofs.get(f"caller-1.{NS}") == "client-certificate", proofs
        assert proofs.get(f"greeter-1.{NS}") == "client-certificate", proofs
        assert mesh.security.guard.stats.authenticated["workload-token"] == 0
        assert mesh.server.stats.nacks == 0
    finally:
        for process in processes:
            await process.stop()
        await mesh.stop()
