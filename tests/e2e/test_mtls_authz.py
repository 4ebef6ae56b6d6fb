"""mTLS and authorization end to end: real sidecars, certificates from the built-in CA over
SDS, real requests.

The server runs with the CA and SDS (the proxies' secrets `default` and `ROOTCA` over ADS)
and trusts node metadata (loopback only). Each test writes Kubernetes-shaped YAML (pods,
services, MTLSPolicy, AuthorizationPolicy), waits until what it checks holds, and asserts
what an application or a peer sees: a response, a refused connection, a 403, the certificate
chain `openssl s_client` is shown.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import X509Svid

from tests.support.mesh import MeshHarness, Pod
from tests.support.net import free_port, next_loopback_ip
from tests.support.proxyless import ProxylessProcess
from tests.support.proxyless import bootstrap as proxyless_bootstrap
from tests.support.upstreams import http_request, tcp_roundtrip
from xds_server.ca.agent import CertAgent, GrpcCsrSigner
from xds_server.ca.authority import CertificateAuthority
from xds_server.model.identity import Identity
from xds_server.ca.service import CertificateService
from xds_server.ca.svid import SvidIssuer
from xds_server.ca.tokens import TokenIssuer
from xds_server.model.security import SecuritySettings
from xds_server.xds import types
from xds_server.ca.workloads import WorkloadCertificates
from xds_server.sds import SdsSecrets
from xds_server.xds.auth import Authenticator, AuthMode, StreamGuard

pytestmark = [pytest.mark.envoy, pytest.mark.slow]

NS = "shop"
API_HOST = "api.shop:80"
POLICY_API = "mesh.xds-server.io/v1alpha1"


class SecureMesh(MeshHarness):
    """A MeshHarness whose server has the CA: proxies get their certificates over SDS."""

    def __init__(self, directory: Path, ca_dir: Path, *, settings: SecuritySettings | None = None) -> None:
        from xds_server.xds.cache import ResourceCache

        self.authority = CertificateAuthority(ca_dir)
        self.issuer = SvidIssuer(self.authority)
        cache = ResourceCache()
        self.secrets = SdsSecrets(cache, WorkloadCertificates(self.issuer))
        guard = StreamGuard(
            Authenticator(AuthMode.INSECURE_NODE_METADATA, listen_address="127.0.0.1:0"),
        )
        super().__init__(directory, security=settings or SecuritySettings(mtls=True),
                         hooks=[guard, self.secrets], cache=cache)

    def policy(self, kind: str, name: str, spec: dict[str, Any], namespace: str = NS) -> None:
        self.write(f"{kind}-{namespace}-{name}.yaml", {
            "apiVersion": POLICY_API, "kind": kind,
            "metadata": {"name": name, "namespace": namespace}, "spec": spec,
        })

    def remove(self, kind: str, name: str, namespace: str = NS) -> None:
        (self.directory / f"{kind}-{namespace}-{name}.yaml").unlink()
        self.source.load()

    def workload_secret(self, namespace: str, service_account: str) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) the server issued to an identity over SDS."""
        from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

        spiffe_id = self.issuer.spiffe_id(Identity(namespace, service_account))
        resource = self.cache.get(types.SECRET, f"default@{spiffe_id}")
        assert resource is not None, f"no secret issued for {spiffe_id}"
        secret = resource.unpack(secret_pb2.Secret)
        return secret.tls_certificate.certificate_chain.inline_bytes, secret.tls_certificate.private_key.inline_bytes


@pytest.fixture
async def mesh(tmp_path: Path):
    harness = await SecureMesh(tmp_path / "mesh", tmp_path / "ca").start()
    yield harness
    await harness.stop()


async def api_and_web(mesh: MeshHarness, *, web_account: str = "web") -> tuple[Pod, Pod]:
    api = mesh.pod(NS, "api-1", service_account="api")
    web = mesh.pod(NS, "web-1", service_account=web_account, labels={"app": "web"})
    mesh.service(NS, "api", pods=[api])
    await asyncio.gather(mesh.sidecar(api), mesh.sidecar(web))
    return api, web


def status(pod: Pod, host: str = API_HOST, path: str = "/", method: str = "GET") -> int:
    try:
        return pod.request(host, path, method=method, timeout=3).status
    except OSError:
        return 0


async def until_status(mesh: MeshHarness, pod: Pod, expected: int, *, path: str = "/",
                       method: str = "GET", timeout: float = 15.0) -> None:
    await mesh.until(lambda: status(pod, path=path, method=method) == expected, timeout,
                     f"{pod.name} {method} {path} -> {expected}")


def plaintext_status(api: Pod) -> int:
    """A client without a sidecar, straight to the inbound listener: 0 when refused."""
    try:
        return http_request(api.ip, 15006, "/", headers={"Host": API_HOST}, timeout=3).status
    except OSError:
        return 0


def counter(pod: Pod, pattern: str) -> int:
    assert pod.envoy is not None
    return sum(int(v) for v in pod.envoy.stats(pattern).values() if isinstance(v, int))


def write_pem(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path


def s_client(host: str, port: int, *args: str, timeout: float = 15) -> str:
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-showcerts", *args],
        input=b"", capture_output=True, timeout=timeout, check=False,
    )
    return proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")


def tls_get(host: str, port: int, roots: Path, cert: tuple[Path, Path] | None = None) -> bytes | None:
    """One HTTP request over TLS; the response bytes, or None when the server refused us."""
    context = ssl.create_default_context(cafile=str(roots))
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    try:
        with socket.create_connection((host, port), timeout=5) as raw, context.wrap_socket(raw) as conn:
            conn.sendall(f"GET / HTTP/1.1\r\nHost: {API_HOST}\r\nConnection: close\r\n\r\n".encode())
            data = conn.recv(65536)
            return data or None
    except (OSError, ssl.SSLError):
        return None


def served_chain(output: str) -> list[x509.Certificate]:
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output, re.S)
    return [x509.load_pem_x509_certificate(b.encode()) for b in blocks]


def uri_sans(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


# ---------------------------------------------------------------------------------- mTLS


async def test_two_sidecars_talk_mtls_with_certificates_from_the_ca(mesh: SecureMesh, tmp_path: Path) -> None:
    mesh.policy("MTLSPolicy", "strict", {"mode": "STRICT"})
    api, web = await api_and_web(mesh)
    await until_status(mesh, web, 200)
    reply = web.request(API_HOST)
    assert reply.json["name"] == "api-1"
    # The client sidecar did TLS handshakes to the server's inbound listener, and the server
    # accepted them with a client certificate (the TLS chain of its inbound listener).
    assert counter(web, r"cluster\.outbound\|80\|\|api\.shop\.svc\.cluster\.local\.ssl\.handshake") >= 1
    assert counter(api, r"listener\.inbound\.ssl\.handshake") >= 1
    assert counter(api, r"listener\.inbound\.ssl\.no_certificate") == 0

    # openssl s_client, with a certificate of the mesh, sees the server's chain and SPIFFE ID.
    client = mesh.issuer.issue_for_identity(Identity(NS, "debug"))
    cert = write_pem(tmp_path, "client.pem", client.chain_pem)
    key = write_pem(tmp_path, "client-key.pem", client.key_pem)
    roots = write_pem(tmp_path, "roots.pem", mesh.authority.trust_bundle_pem)
    output = s_client(api.ip, 15006, "-cert", str(cert), "-key", str(key), "-CAfile", str(roots))
    assert "Verify return code: 0 (ok)" in output, output
    chain = served_chain(output)
    assert chain, output
    assert uri_sans(chain[0]) == [f"spiffe://cluster.local/ns/{NS}/sa/api"]
    text = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"],
                          input=chain[0].public_bytes(serialization.Encoding.PEM),
                          capture_output=True, check=True).stdout.decode()
    assert "URI:spiffe://cluster.local/ns/shop/sa/api" in text, text
    # It is the certificate the server issued over SDS, and a valid X509-SVID (py-spiffe).
    chain_pem, key_pem = mesh.workload_secret(NS, "api")
    svid = X509Svid.parse(chain_pem, key_pem)
    assert str(svid.spiffe_id) == f"spiffe://cluster.local/ns/{NS}/sa/api"
    assert svid.leaf.serial_number == chain[0].serial_number
    # Without a client certificate, TLS to the same listener gets no answer (mTLS required).
    assert tls_get(api.ip, 15006, roots) is None
    assert tls_get(api.ip, 15006, roots, cert=(cert, key)) is not None


async def test_strict_rejects_a_plaintext_client(mesh: SecureMesh) -> None:
    mesh.policy("MTLSPolicy", "strict", {"mode": "STRICT"})
    api, web = await api_and_web(mesh)
    await until_status(mesh, web, 200)
    assert plaintext_status(api) == 0  # no filter chain matches plaintext: closed at once
    assert counter(api, r"listener\.inbound\.no_filter_chain_match") >= 1


async def test_permissive_accepts_plaintext_and_mtls(mesh: SecureMesh) -> None:
    api, web = await api_and_web(mesh)  # no policy: the mesh default, PERMISSIVE
    await until_status(mesh, web, 200)
    handshakes = counter(api, r"listener\.inbound\.ssl\.handshake")
    assert handshakes >= 1  # the sidecar client used mTLS
    await mesh.until(lambda: plaintext_status(api) == 200, 10, "plaintext accepted")
    assert web.request(API_HOST).status == 200


async def test_disable_sends_plaintext(mesh: SecureMesh) -> None:
    mesh.policy("MTLSPolicy", "off", {"mode": "DISABLE"})
    api, web = await api_and_web(mesh)
    await until_status(mesh, web, 200)
    for _ in range(5):
        assert web.request(API_HOST).status == 200
    # The client's cluster made connections, none of them TLS; the server has no TLS chain.
    assert counter(web, r"cluster\.outbound\|80\|\|api\.shop\.svc\.cluster\.local\.upstream_cx_total") >= 1
    assert counter(web, r"cluster\.outbound\|80\|\|api\.shop\.svc\.cluster\.local\.ssl\.handshake") == 0
    assert plaintext_status(api) == 200


async def test_mode_change_applies_to_running_sidecars(mesh: SecureMesh) -> None:
    api, web = await api_and_web(mesh)
    await mesh.until(lambda: plaintext_status(api) == 200, 15, "PERMISSIVE")
    # A workload-level port override makes its only port STRICT: plaintext is refused.
    mesh.policy("MTLSPolicy", "api", {"selector": {"matchLabels": {"app": "api-1"}},
                                      "portLevelMtls": {api.app_port: "STRICT"}})
    await mesh.until(lambda: plaintext_status(api) == 0, 15, "plaintext refused")
    await until_status(mesh, web, 200)  # mTLS through the sidecar still works
    mesh.remove("MTLSPolicy", "api")
    await mesh.until(lambda: plaintext_status(api) == 200, 15, "PERMISSIVE again")


async def test_plugged_in_intermediate_ca_chains_to_the_operators_root(tmp_path: Path) -> None:
    from tests.unit.test_ca import make_operator_ca

    root, intermediate = make_operator_ca(tmp_path / "ca")
    mesh = await SecureMesh(tmp_path / "mesh", tmp_path / "ca").start()
    try:
        assert not mesh.authority.self_signed
        api, web = await api_and_web(mesh)
        await until_status(mesh, web, 200)
        client = mesh.issuer.issue_for_identity(Identity(NS, "debug"))
        cert = write_pem(tmp_path, "client.pem", client.chain_pem)
        key = write_pem(tmp_path, "client-key.pem", client.key_pem)
        operator_root = write_pem(tmp_path, "operator-root.pem", mesh.authority.trust_bundle_pem)
        output = s_client(api.ip, 15006, "-cert", str(cert), "-key", str(key), "-CAfile", str(operator_root))
        assert "Verify return code: 0 (ok)" in output, output
        chain = served_chain(output)
        # leaf (the workload's SVID) + the operator's intermediate; the root stays offline
        assert [c.subject for c in chain[1:]] == [intermediate.subject]
        assert chain[0].issuer == intermediate.subject and intermediate.issuer == root.subject
        assert uri_sans(chain[0]) == [f"spiffe://cluster.local/ns/{NS}/sa/api"]
        chain_pem, key_pem = mesh.workload_secret(NS, "api")
        assert str(X509Svid.parse(chain_pem, key_pem).spiffe_id) == f"spiffe://cluster.local/ns/{NS}/sa/api"
    finally:
        await mesh.stop()


# ------------------------------------------------------------------------- authorization


async def test_allowed_identity_gets_200_and_another_403(mesh: SecureMesh) -> None:
    api = mesh.pod(NS, "api-1", service_account="api")
    web = mesh.pod(NS, "web-1", service_account="web", labels={"app": "web"})
    intruder = mesh.pod(NS, "intruder-1", service_account="intruder", labels={"app": "intruder"})
    mesh.service(NS, "api", pods=[api])
    mesh.policy("AuthorizationPolicy", "api-readers", {
        "selector": {"matchLabels": {"app": "api-1"}},
        "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NS}/sa/web"]}}]}],
    })
    await asyncio.gather(mesh.sidecar(api), mesh.sidecar(web), mesh.sidecar(intruder))
    await until_status(mesh, web, 200)
    await until_status(mesh, intruder, 403)
    reply = intruder.request(API_HOST)
    assert reply.status == 403 and b"RBAC: access denied" in reply.body
    assert counter(api, r"http\..*\.rbac\.denied") >= 1
    # A plaintext client has no principal at all: denied too.
    await mesh.until(lambda: plaintext_status(api) == 403, 10, "plaintext denied")


async def test_deny_beats_allow(mesh: SecureMesh) -> None:
    _api, web = await api_and_web(mesh)
    mesh.policy("AuthorizationPolicy", "allow-shop", {
        "rules": [{"from": [{"source": {"namespaces": [NS]}}]}],
    })
    mesh.policy("AuthorizationPolicy", "no-admin", {
        "action": "DENY",
        "rules": [{"from": [{"source": {"serviceAccounts": [f"{NS}/web"]}}],
                   "to": [{"operation": {"paths": ["/admin", "/admin/*"]}}]}],
    })
    await until_status(mesh, web, 403, path="/admin/users")
    assert status(web, path="/") == 200  # the ALLOW still allows the rest
    assert status(web, path="/admin") == 403
    assert status(web, path="/administrator") == 200  # `/admin/*` is a path prefix, not a string one
    # Changing policies changes answers on the same sidecars (a route update, no restart).
    mesh.remove("AuthorizationPolicy", "no-admin")
    await until_status(mesh, web, 200, path="/admin/users")


async def test_default_deny_blocks_what_no_rule_allows(mesh: SecureMesh) -> None:
    _api, web = await api_and_web(mesh)
    await until_status(mesh, web, 200)
    # Istio's mesh-wide default-deny: an ALLOW policy without rules in the root namespace.
    mesh.policy("AuthorizationPolicy", "deny-all", {}, namespace="xds-system")
    await until_status(mesh, web, 403)
    mesh.policy("AuthorizationPolicy", "web-may-read", {
        "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{NS}/sa/web"]}}],
                   "to": [{"operation": {"methods": ["GET"]}}]}],
    })
    await until_status(mesh, web, 200)
    assert status(web, method="POST") == 403  # not allowed by any rule
    mesh.remove("AuthorizationPolicy", "deny-all", namespace="xds-system")
    mesh.remove("AuthorizationPolicy", "web-may-read")
    await until_status(mesh, web, 200, method="POST")


async def test_tcp_port_network_rbac(mesh: SecureMesh) -> None:
    db = mesh.pod(NS, "db-1", service_account="db", app="tcp", app_port=5432)
    web = mesh.pod(NS, "web-1", service_account="web", tcp_upstreams="7001=db:5432")
    other = mesh.pod(NS, "other-1", service_account="other", tcp_upstreams="7001=db:5432")
    mesh.service(NS, "db", 5432, app_protocol="tcp", pods=[db])
    mesh.policy("AuthorizationPolicy", "db-clients", {
        "selector": {"matchLabels": {"app": "db-1"}},
        "rules": [{"from": [{"source": {"serviceAccounts": [f"{NS}/web"]}}]}],
    })
    await asyncio.gather(mesh.sidecar(db), mesh.sidecar(web), mesh.sidecar(other))

    def roundtrip(pod: Pod) -> bytes:
        try:
            return tcp_roundtrip(pod.ip, 7001, b"ping", timeout=3)
        except OSError:
            return b""

    await mesh.until(lambda: roundtrip(web) == b"db-1:ping", 15, "allowed TCP client")
    assert roundtrip(other) == b""  # closed by the network RBAC filter
    assert counter(db, r".*rbac.*denied") >= 1
    assert counter(web, r"cluster\.outbound\|5432\|\|db\.shop\.svc\.cluster\.local\.ssl\.handshake") >= 1


# ----------------------------------------------------------------------- proxyless gRPC


class ProxylessMesh(SecureMesh):
    """SecureMesh plus the CSR endpoint (for cert-agent) on the xDS port."""

    def __init__(self, directory: Path, ca_dir: Path) -> None:
        super().__init__(directory, ca_dir)
        self.tokens = TokenIssuer(ca_dir)
        self.server.extra_handlers.append(CertificateService(self.issuer, self.tokens.verify).handler())

    async def cert_agent(self, namespace: str, service_account: str, out_dir: Path) -> Path:
        """What `xds-server cert-agent` does for a workload that keeps its own key."""
        token = self.tokens.create(namespace, service_account, timedelta(hours=1))
        signer = GrpcCsrSigner(self.server.address, token=token)
        try:
            await CertAgent(signer, out_dir).run(once=True)
        finally:
            await signer.close()
        return out_dir

    def proxyless_pod(self, namespace: str, name: str, service_account: str, ip: str, port: int) -> None:
        self.write(f"pod-{namespace}-{name}.yaml", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": {"app": name},
                         "annotations": {"xds-server.io/proxyless": "true"}},
            "spec": {"serviceAccountName": service_account,
                     "containers": [{"name": "app", "ports": [{"containerPort": port}]}]},
            "status": {"podIP": ip},
        })


@pytest.fixture
async def proxyless_mesh(tmp_path: Path):
    harness = await ProxylessMesh(tmp_path / "mesh", tmp_path / "ca").start()
    processes: list[ProxylessProcess] = []
    harness.processes = processes
    yield harness
    for process in processes:
        await process.stop()
    await harness.stop()


async def start_greeter(mesh: ProxylessMesh, tmp_path: Path) -> tuple[str, int]:
    """A proxyless gRPC server `greeter-1` (service account greeter) behind Service greeter."""
    ip, port = next_loopback_ip(), 0
    port = free_port(ip)
    mesh.proxyless_pod(NS, "greeter-1", "greeter", ip, port)
    mesh.write(f"svc-{NS}-greeter.yaml", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "greeter", "namespace": NS},
        "spec": {"ports": [{"name": "grpc", "port": 50051, "targetPort": port, "appProtocol": "grpc"}]},
    }, {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "greeter-1", "namespace": NS, "labels": {"kubernetes.io/service-name": "greeter"}},
        "addressType": "IPv4", "ports": [{"name": "grpc", "port": port, "appProtocol": "grpc"}],
        "endpoints": [{"addresses": [ip], "targetRef": {"kind": "Pod", "name": "greeter-1"}}],
    })
    certs = await mesh.cert_agent(NS, "greeter", tmp_path / "greeter-certs")
    server = ProxylessProcess("server", "greeter-1", ip, str(port), bootstrap=proxyless_bootstrap(
        mesh.server.address, namespace=NS, pod="greeter-1", service_account="greeter", pod_ip=ip,
        cert_dir=certs))
    mesh.processes.append(await server.start())
    await server.until(lambda e: e.get("serving"), 30, "greeter serving")
    return ip, port


async def start_client(mesh: ProxylessMesh, tmp_path: Path, service_account: str) -> ProxylessProcess:
    name = f"{service_account}-1"
    certs = await mesh.cert_agent(NS, service_account, tmp_path / f"{name}-certs")
    client = ProxylessProcess("client", "xds:///greeter.shop:50051", "60", "0.1",
                              bootstrap=proxyless_bootstrap(
                                  mesh.server.address, namespace=NS, pod=name,
                                  service_account=service_account, pod_ip=next_loopback_ip(),
                                  cert_dir=certs))
    mesh.processes.append(await client.start())
    return client


async def test_proxyless_grpc_client_and_server_talk_mtls(proxyless_mesh: ProxylessMesh, tmp_path: Path) -> None:
    mesh = proxyless_mesh
    mesh.policy("MTLSPolicy", "strict", {"mode": "STRICT"})
    await start_greeter(mesh, tmp_path)
    client = await start_client(mesh, tmp_path, "caller")
    answer = await client.until(lambda e: e.get("ok"), 40, "a successful call")
    # The server saw the client's SPIFFE ID from its certificate (cert-agent's files).
    assert answer["answer"] == {"name": "greeter-1", "peer": f"spiffe://cluster.local/ns/{NS}/sa/caller"}
    # What the server sent: a cluster with a plain TLS transport socket using the bootstrap's
    # certificate provider (no SDS, no transport_socket_matches), checking greeter's identity.
    (conn,) = [c for c in mesh.server.connections if c.proxy_id == f"caller-1.{NS}"]
    assert conn.state.types[types.LISTENER].names == {"greeter.shop:50051"}
    assert mesh.server.stats.nacks == 0


async def test_proxyless_server_enforces_authorization(proxyless_mesh: ProxylessMesh, tmp_path: Path) -> None:
    mesh = proxyless_mesh
    mesh.policy("AuthorizationPolicy", "greeter-callers", {
        "selector": {"matchLabels": {"app": "greeter-1"}},
        "rules": [{"from": [{"source": {"serviceAccounts": [f"{NS}/caller"]}}]}],
    })
    await start_greeter(mesh, tmp_path)
    allowed = await start_client(mesh, tmp_path, "caller")
    denied = await start_client(mesh, tmp_path, "stranger")
    answer = await allowed.until(lambda e: e.get("ok"), 40, "the allowed caller's call")
    assert answer["answer"]["peer"] == f"spiffe://cluster.local/ns/{NS}/sa/caller"
    refused = await denied.until(lambda e: e.get("code") == "PERMISSION_DENIED", 40, "a denied call")
    assert not refused["ok"]
    assert mesh.server.stats.nacks == 0


async def test_sidecar_calls_proxyless_server_over_mtls(proxyless_mesh: ProxylessMesh, tmp_path: Path) -> None:
    """Mixed mesh: an Envoy sidecar client reaches a proxyless gRPC server with mTLS, the
    server's identity checked against the service's service accounts."""
    mesh = proxyless_mesh
    mesh.policy("MTLSPolicy", "strict", {"mode": "STRICT"})
    await start_greeter(mesh, tmp_path)
    web = mesh.pod(NS, "web-1", service_account="web", labels={"app": "web"})
    await mesh.sidecar(web)

    def who() -> dict | None:
        try:
            return grpc_who(web.ip, 15001, "greeter.shop:50051")
        except Exception:
            return None

    answer = await mesh.until(who, 30, "a gRPC call through the sidecar")
    assert answer == {"name": "greeter-1", "peer": f"spiffe://cluster.local/ns/{NS}/sa/web"}
    assert counter(web, r"cluster\.outbound\|50051\|\|greeter\.shop\.svc\.cluster\.local\.ssl\.handshake") >= 1


def grpc_who(host: str, port: int, authority: str) -> dict:
    import grpc

    with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.default_authority", authority)]) as channel:
        call = channel.unary_unary("/xds_server.test.Echo/Who", request_serializer=None,
                                   response_deserializer=None)
        return json.loads(call(b"", timeout=3))
