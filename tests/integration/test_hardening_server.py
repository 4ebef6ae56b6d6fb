"""Issue 13's hardening findings through the real `xds-server serve` process: raw gRPC
clients, a real HTTP client, and for what depends on where a client connects from, clients in
a pod's network namespace. Each limit holds, with the status the client sees and the metric an
operator sees.

The server of the network tests runs in a "node" namespace (`ip netns exec`), bound to
0.0.0.0 there; a pod namespace on a veth next to it is the pod `web-1` of the mesh (its IP is
the pod's), and clients in the node namespace itself reach the server over loopback (this
host). The test process reads the admin API from a thread inside the node namespace.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.discovery.v3 import discovery_pb2

from tests.integration.test_admin_api import metric, parse_metrics
from tests.integration.test_sds_auth import bearer, node, spiffe
from tests.support import netns
from tests.support.admin import Tokens
from tests.support.net import free_port
from tests.support.xds_client import XdsClient
from xds_server.ca.agent import GrpcCsrSigner, SignError, build_csr
from xds_server.demo.netns import in_netns
from xds_server.sds import identity_key
from xds_server.translate import names
from xds_server.xds import types

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

XDS_PORT, ADMIN_PORT = 15010, 15014  # inside the test's own node namespace: always free
OTHER_WEB_IP, DB_IP = "10.250.0.9", "10.250.0.8"  # pods of the mesh with no namespace here


def mesh(directory: Path, web_1_ip: str) -> Path:
    directory.mkdir()
    pods = [("web-1", "web", web_1_ip), ("web-2", "web", OTHER_WEB_IP), ("db-0", "db", DB_IP)]
    documents = ["apiVersion: v1\nkind: Namespace\nmetadata: { name: shop }\n"]
    for name, account, ip in pods:
        documents.append(textwrap.dedent(f"""\
            apiVersion: v1
            kind: Pod
            metadata:
              name: {name}
              namespace: shop
              labels: {{ app: {account} }}
              annotations: {{ sidecar.xds-server.io/inject: "true" }}
            spec: {{ serviceAccountName: {account}, containers: [{{ name: app, image: app }}] }}
            status: {{ podIP: {ip} }}
            """))
    documents.append(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: { name: web, namespace: shop }
        spec: { clusterIP: 10.96.0.10, selector: { app: web }, ports: [{ name: http, port: 80, targetPort: 8080 }] }
        """))
    documents.append(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{ name: db, namespace: shop }}
        spec: {{ clusterIP: 10.96.0.11, ports: [{{ name: tcp, port: 5432, appProtocol: tcp }}] }}
        ---
        apiVersion: discovery.k8s.io/v1
        kind: EndpointSlice
        metadata: {{ name: db-1, namespace: shop, labels: {{ kubernetes.io/service-name: db }} }}
        addressType: IPv4
        ports: [{{ name: tcp, port: 5432, appProtocol: tcp }}]
        endpoints: [{{ addresses: ["{DB_IP}"], targetRef: {{ kind: Pod, name: db-0 }} }}]
        """))
    (directory / "mesh.yaml").write_text("---\n".join(documents))
    return directory


class Serve:
    """`xds-server serve` as a child process (optionally inside a network namespace), its
    JSON logs collected, stopped by PID."""

    def __init__(self, args: list[str], netns_name: str | None = None) -> None:
        self.args = args
        self.netns = netns_name
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> Serve:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = await asyncio.create_subprocess_exec(
            *prefix, sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve",
            *self.args, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
        self._reader = asyncio.create_task(self._read())
        await self.logged(lambda line: line.get("msg") == "admin API listening", 60)
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))

    def records(self) -> list[dict[str, Any]]:
        found = []
        for raw in self.lines:
            try:
                found.append(json.loads(raw))
            except ValueError:
                continue
        return found

    async def logged(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for record in self.records():
                if predicate(record):
                    return record
            assert self.proc is not None
            assert self.proc.returncode is None, "".join(self.lines[-20:])
            assert loop.time() < deadline, "".join(self.lines[-20:])
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader


class Probe:
    """tests/support/stream_probe.py in a network namespace: one JSON command, one answer."""

    def __init__(self, netns_name: str) -> None:
        self.netns = netns_name
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Probe:
        self.proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", self.netns, sys.executable, "-m", "tests.support.stream_probe",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT)
        return self

    async def __call__(self, **command: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        assert line, "the probe ended"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class PodServer:
    """The server in the node namespace, probes in the pod (web-1's IP) and on the node."""

    def __init__(self, tmp_path: Path, pod: netns.Pod, *extra: str) -> None:
        self.pod = pod
        self.tokens = Tokens()
        self.ca_dir = tmp_path / "ca"
        tokens_file = tmp_path / "admin-tokens.json"
        tokens_file.write_text(self.tokens.document())
        self.serve = Serve([
            "--auth", "tokens", "--ca-dir", str(self.ca_dir),
            "--source", str(mesh(tmp_path / "mesh", pod.ip)),
            "--xds-address", f"0.0.0.0:{XDS_PORT}", "--allow-plaintext-tokens-off-host",
            "--xds-tls-address", "off", "--xds-tls-token-address", "off",
            "--admin-address", f"127.0.0.1:{ADMIN_PORT}", "--admin-tokens-file", str(tokens_file),
            "--debounce-quiet", "0.02", "--shutdown-grace", "1", *extra,
        ], pod.node)
        self.in_pod = Probe(pod.netns)
        self.on_node = Probe(pod.node)

    @property
    def off_host(self) -> str:
        """The server's address as the pod dials it."""
        return f"{self.pod.node_ip}:{XDS_PORT}"

    local = f"127.0.0.1:{XDS_PORT}"

    async def start(self) -> PodServer:
        await self.serve.start()
        await self.in_pod.start()
        await self.on_node.start()
        return self

    async def stop(self) -> None:
        await self.in_pod.stop()
        await self.on_node.stop()
        await self.serve.stop()

    def token(self, service_account: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "xds_server.cli", "token", "create", "--ca-dir", str(self.ca_dir),
             "--namespace", "shop", "--service-account", service_account, "--ttl", "1h"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout
        return out.strip().splitlines()[-1]

    def metrics(self) -> dict[tuple[str, tuple[Any, ...]], float]:
        def scrape() -> str:
            return httpx.get(f"http://127.0.0.1:{ADMIN_PORT}/metrics", timeout=10, trust_env=False).text

        return parse_metrics(in_netns(self.pod.node, scrape))

    def api(self, path: str) -> Any:
        def get() -> Any:
            return httpx.get(f"http://127.0.0.1:{ADMIN_PORT}{path}", timeout=10, trust_env=False,
                             headers=self.tokens.auth("read")).json()

        return in_netns(self.pod.node, get)


@pytest.fixture
async def pod_server(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[PodServer]:
    why = netns.missing()
    assert why is None, why  # this machine runs the network tests as root: fail, never skip
    extra: tuple[str, ...] = getattr(request, "param", ())
    with netns.pod() as pod:
        server = PodServer(tmp_path, pod, *extra)
        try:
            yield await server.start()
        finally:
            await server.stop()


SLOTS = ("--max-streams-per-identity", "2", "--max-unverified-streams-per-identity", "1")


@pytest.mark.parametrize("pod_server", [SLOTS], indirect=True)
async def test_a_leaked_token_cannot_lock_its_sibling_pods_out(pod_server: PodServer) -> None:
    """A workload token of `web` (not pod-bound) used from elsewhere fills only web's pool of
    unverified claims; web-1 from its own IP and web-2 from this host keep their own pools."""
    server = pod_server
    token = server.token("web")
    stream = {"op": "stream", "token": token, "namespace": "shop", "service_account": "web"}
    # The thief, from web-1's address, claiming the other pods: unverified, one pool of 1.
    first = await server.in_pod(**stream, address=server.off_host, pod="web-2", pod_ip=OTHER_WEB_IP)
    assert first == {"ok": True}
    for pod, ip in (("web-2", OTHER_WEB_IP), ("ghost-0", ""), ("db-0", DB_IP)):
        refused = await server.in_pod(**stream, address=server.off_host, pod=pod, pod_ip=ip)
        assert refused["code"] == "RESOURCE_EXHAUSTED", refused
        assert "from pods it could not verify (limit 1)" in refused["details"]
    # web-1 from its own IP: its own pool of 2.
    for _ in range(2):
        assert await server.in_pod(**stream, address=server.off_host, pod="web-1") == {"ok": True}
    refused = await server.in_pod(**stream, address=server.off_host, pod="web-1")
    assert refused["code"] == "RESOURCE_EXHAUSTED" and "in pod web-1 (limit 2)" in refused["details"]
    # web-2 on this host, stating its IP: its own pool, untouched by the thief.
    for _ in range(2):
        answer = await server.on_node(**stream, address=server.local, pod="web-2", pod_ip=OTHER_WEB_IP)
        assert answer == {"ok": True}
    samples = server.metrics()
    assert metric(samples, "xds_server_stream_limit_refusals_total", limit="streams-unverified-pods") == 3
    assert metric(samples, "xds_server_stream_limit_refusals_total", limit="streams-per-identity") == 1
    # Closed streams give their slots back.
    assert await server.in_pod(op="close") == {"ok": True, "closed": 3}
    assert await server.in_pod(**stream, address=server.off_host, pod="web-1") == {"ok": True}


async def test_reconnects_reuse_the_certificate_and_pod_config_goes_to_the_proven_pod(
        pod_server: PodServer) -> None:
    """An identity that reconnects gets the certificate it had (no new key, no new registry
    entry); another identity gets its own. (On this host: no private key is sent in clear
    off the host.)"""
    server = pod_server
    token = server.token("web")
    stream = {"op": "stream", "token": token, "namespace": "shop", "service_account": "web",
              "pod": "web-1", "pod_ip": server.pod.ip, "secret": True, "address": server.local}
    serials = []
    for _ in range(5):
        answer = await server.on_node(**stream)
        assert answer["ok"], answer
        serials.append(answer["serial"])
        assert await server.on_node(op="close") == {"ok": True, "closed": 1}
    assert len(set(serials)) == 1, serials
    db = await server.on_node(op="stream", token=server.token("db"), namespace="shop",
                              service_account="db", pod="db-0", pod_ip=DB_IP, secret=True,
                              address=server.local)
    assert db["ok"] and db["serial"] != serials[0]
    # Pod-scoped config goes only to the proven pod: web's token claiming db-0 gets its
    # namespace's shared config and none of db-0's listeners; db's own token gets them.
    pod_listener = names.inbound_listener_name("shop", "db-0")
    stranger = await server.on_node(op="stream", token=token, namespace="shop", service_account="web",
                                    pod="db-0", pod_ip=DB_IP, listeners=True, address=server.local)
    assert stranger["ok"] and pod_listener not in stranger["listeners"], stranger
    assert names.capture_outbound_listener_name("shop") in stranger["listeners"]
    owner = await server.on_node(op="stream", token=server.token("db"), namespace="shop",
                                 service_account="db", pod="db-0", pod_ip=DB_IP, listeners=True,
                                 address=server.local)
    assert owner["ok"] and pod_listener in owner["listeners"], owner
    listed = server.api("/api/v1/ca/certificates")
    workload = [c for c in listed["certificates"] if c["spiffe_id"].startswith("spiffe://")]
    assert sorted(c["spiffe_id"] for c in workload) == [spiffe("shop", "db"), spiffe("shop", "web")]
    samples = server.metrics()
    assert metric(samples, "xds_server_certificates_issued_total", kind="sds") == 2


async def test_csds_off_the_host_needs_an_admin_token_and_refusals_are_counted(pod_server: PodServer) -> None:
    server = pod_server
    assert (await server.on_node(op="csds", address=server.local))["ok"]  # this host: served
    for token in (None, "not-a-token-" + "x" * 20):
        refused = await server.in_pod(op="csds", address=server.off_host, token=token)
        assert refused["code"] == "UNAUTHENTICATED" and "admin token" in refused["details"], refused
    assert (await server.in_pod(op="csds", address=server.off_host, token=server.tokens.read))["ok"]
    samples = server.metrics()
    assert metric(samples, "xds_server_auth_failures_total", surface="csds", reason="unauthenticated") == 2
    logs = "".join(server.serve.lines)
    assert server.tokens.read not in logs and "not-a-token-" not in logs


# Limits that do not depend on where a client is: the server on loopback ---------------------


@pytest.fixture
async def limited(tmp_path: Path) -> AsyncIterator[tuple[Serve, str, str, Tokens, Path]]:
    tokens = Tokens()
    tokens_file = tmp_path / "admin-tokens.json"
    tokens_file.write_text(tokens.document())
    source = mesh(tmp_path / "mesh", "10.250.0.2")
    outside = tmp_path / "outside.yaml"
    outside.write_text("apiVersion: v1\nkind: Namespace\nmetadata: { name: elsewhere }\n")
    xds_port, admin_port = free_port(), free_port()
    serve = Serve([
        "--auth", "tokens", "--ca-dir", str(tmp_path / "ca"), "--source", str(source),
        "--xds-address", f"127.0.0.1:{xds_port}", "--xds-tls-address", "off",
        "--xds-tls-token-address", "off", "--admin-address", f"127.0.0.1:{admin_port}",
        "--admin-tokens-file", str(tokens_file), "--debounce-quiet", "0.02", "--shutdown-grace", "1",
        "--first-request-timeout", "1s", "--max-names-per-request", "20", "--max-names-per-stream", "30",
        "--admin-max-body-bytes", "4096", "--max-source-file-bytes", "65536",
        "--max-requests-per-second", "0.2", "--request-burst", "4",
    ])
    await serve.start()
    try:
        yield serve, f"127.0.0.1:{xds_port}", f"http://127.0.0.1:{admin_port}", tokens, source
    finally:
        await serve.stop()


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _token(ca_dir: Path, service_account: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "token", "create", "--ca-dir", str(ca_dir),
         "--namespace", "shop", "--service-account", service_account, "--ttl", "1h"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout
    return out.strip().splitlines()[-1]


async def _eventually_metric(http: httpx.AsyncClient, name: str, expected: float, **labels: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        value = metric(parse_metrics((await http.get("/metrics")).text), name, **labels)
        if value == expected:
            return
        assert loop.time() < deadline, (name, labels, value, expected)
        await asyncio.sleep(0.1)


async def test_every_refusal_holds_and_is_counted(limited: tuple[Serve, str, str, Tokens, Path],
                                                   tmp_path: Path) -> None:
    serve, address, admin, tokens, source = limited
    web = _token(tmp_path / "ca", "web")
    async with httpx.AsyncClient(base_url=admin, trust_env=False, timeout=30) as http:
        async with XdsClient(address, metadata=bearer(web)) as client:
            # A stream that never sends a request is ended (it held no identity yet).
            silent = client.ads(node=node("shop", "web"))
            code, details = await silent.closed_with(timeout=30)
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no request within 1s" in details
            # Too many names in one request, or on one stream over several.
            wide = client.ads(node=node("shop", "web"))
            await wide.request(types.CLUSTER, [f"c{i}" for i in range(21)])
            code, details = await wide.closed_with(timeout=30)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "(limit 20)" in details
            growing = client.ads_delta(node=node("shop", "web"))
            await growing.request(types.CLUSTER, [f"c{i}" for i in range(20)])  # none exists: no answer
            await growing.request(types.ENDPOINT, [f"e{i}" for i in range(11)])
            code, details = await growing.closed_with(timeout=30)
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "on one stream (limit 30)" in details
            # Fetch keeps the per-request limit too.
            fetch = client.channel.unary_unary(
                "/envoy.service.cluster.v3.ClusterDiscoveryService/FetchClusters",
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as fetched:
                await fetch(discovery_pb2.DiscoveryRequest(node=node("shop", "web"),
                                                           resource_names=[f"c{i}" for i in range(21)]),
                            metadata=bearer(web), timeout=30)
            assert fetched.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # A forged token gets nothing; a stream sending faster than its rate is ended.
            forged = client.ads(node=node("shop", "web"), metadata=bearer("forged." + "x" * 30))
            await forged.request(types.CLUSTER)
            code, _ = await forged.closed_with(timeout=30)
            assert code == grpc.StatusCode.UNAUTHENTICATED
            flood = client.ads(node=node("shop", "web"))
            for _ in range(5):  # one more than the burst
                await flood.request(types.ROUTE, ["r"])
            code, details = await flood.closed_with(timeout=30)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "requests per second" in details
            # Another identity's secret is never answered.
            thief = client.ads(node=node("shop", "web"))
            await thief.request(types.SECRET, [identity_key(spiffe("shop", "db"))])
            await thief.expect_silence(1.0)
        # A CSR with a token that proves nothing.
        signer = GrpcCsrSigner(address, token="forged")
        try:
            with pytest.raises(SignError):
                await signer.sign(build_csr(ec.generate_private_key(ec.SECP256R1())), None)
        finally:
            await signer.close()
        # A CSR lifetime of 1e20 seconds: the caller's mistake, named, no INTERNAL.
        async with grpc.aio.insecure_channel(address) as channel:
            sign = channel.unary_unary("/xds_server.ca.v1.CertificateService/Sign")
            with pytest.raises(grpc.aio.AioRpcError) as bad_ttl:
                await sign(b'{"csr": "x", "ttl_seconds": 1e20}', metadata=bearer(web), timeout=30)
        assert bad_ttl.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "ttl_seconds" in (bad_ttl.value.details() or "")
        # A chunked admin body past the limit (256 MiB offered), before authentication: refused
        # with 413, and the server's memory does not follow what was sent.
        assert serve.proc is not None
        before = _rss_bytes(serve.proc.pid)

        async def chunks() -> AsyncIterator[bytes]:
            piece = b"x" * (1024 * 1024)
            for _ in range(256):
                yield piece

        try:
            too_big = await http.post("/api/v1/push", content=chunks(),
                                      headers={"content-type": "application/json"})
            assert too_big.status_code == 413
        except httpx.TransportError:
            pass  # the server may close the connection before the client stops writing
        # Source files past the size limit (a sparse 256 MiB file) or linked from outside.
        with (source / "huge.yaml").open("wb") as huge:
            huge.truncate(256 * 1024 * 1024)
        (source / "link.yaml").symlink_to(tmp_path / "outside.yaml")

        await _eventually_metric(http, "xds_server_stream_limit_refusals_total", 1, limit="first-request-timeout")
        await _eventually_metric(http, "xds_server_stream_limit_refusals_total", 2, limit="names-per-request")
        await _eventually_metric(http, "xds_server_stream_limit_refusals_total", 1, limit="names-per-stream")
        await _eventually_metric(http, "xds_server_auth_failures_total", 1, surface="sds", reason="other-identity")
        await _eventually_metric(http, "xds_server_stream_limit_refusals_total", 1, limit="request-rate")
        samples = parse_metrics((await http.get("/metrics")).text)
        for surface in ("xds", "ca"):  # the forged stream token, the forged CSR token
            assert sum(v for (name, labels), v in samples.items()
                       if name == "xds_server_auth_failures_total" and ("surface", surface) in labels) >= 1
        assert metric(samples, "xds_server_admin_requests_total", method="POST", route="unmatched",
                      code="413") + metric(samples, "xds_server_admin_requests_total", method="POST",
                                           route="/api/v1/push", code="413") == 1
        await _eventually_metric(http, "xds_server_source_files_refused_total", 1, source="files", reason="too-large")
        await _eventually_metric(http, "xds_server_source_files_refused_total", 1, source="files", reason="link-outside")
        errors = (await http.get("/api/v1/sources", headers=tokens.auth("read"))).json()["sources"][0]["errors"]
        texts = {e["file"]: e["text"] for e in errors}
        assert "64 KiB limit" in texts["huge.yaml"] and "out of the source directory" in texts["link.yaml"]
        # Neither the body nor the file was held: far less than either size (before the
        # limits, a 256 MB body grew the server by 687 MB, a 100 MB file by 553 MB).
        grown = _rss_bytes(serve.proc.pid) - before
        assert grown < 64 * 1024 * 1024, grown
    assert serve.proc is not None and serve.proc.returncode is None  # it kept serving
    assert "Traceback" not in "".join(serve.lines)
