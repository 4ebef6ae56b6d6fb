"""The sidecar-injection admission webhook, served over HTTPS as the API server calls it:
`admission.k8s.io/v1` AdmissionReviews for the pods every workload kind creates, the TLS
handshake verified against the mesh root for `<service>.<namespace>.svc`, the returned JSON
Patch applied (by the `jsonpatch` library, an independent RFC 6902 implementation) and the
patched Pod validated against the Kubernetes 1.31 schema. Bad requests get 400 and are
counted. With the Kubernetes source, the server keeps the MutatingWebhookConfiguration's
caBundle on the mesh roots, through the official client against the fake API server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import base64
import copy
import json
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jsonpatch
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.support.fake_apiserver import FakeApiServer
from xds_server.ca.authority import CertificateAuthority
from xds_server.inject.settings import InjectorSettings, WebhookSettings
from xds_server.inject.template import STATUS_ANNOTATION, inject_pod
from xds_server.inject.webhook import INJECT_PATH, WebhookServer, on_ca_change
from xds_server.metrics import Metrics

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_VERSION = "1.31.0"
HOSTNAME = "xds-server.xds-system.svc"  # what the API server dials and verifies
NAMESPACE = "shop"

TEMPLATE = {
    "metadata": {"labels": {"app": "api"}},
    "spec": {"containers": [{"name": "api", "image": "registry.example/api:1.0",
                             "ports": [{"containerPort": 8080}]}]},
}
# kind -> the controller that creates its pods (the user the API server names in the review)
OWNERS = {
    "Deployment": ("ReplicaSet", "apps/v1", "replicaset-controller"),  # via its ReplicaSet
    "ReplicaSet": ("ReplicaSet", "apps/v1", "replicaset-controller"),
    "StatefulSet": ("StatefulSet", "apps/v1", "statefulset-controller"),
    "DaemonSet": ("DaemonSet", "apps/v1", "daemon-set-controller"),
    "Job": ("Job", "batch/v1", "job-controller"),
    "CronJob": ("Job", "batch/v1", "job-controller"),  # via its Job
    "Pod": (None, None, None),
}


def pod_of(kind: str, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Pod the API server holds at admission for a `kind`'s pod template: a controller's
    pods have only a generateName (the name is not chosen yet) and an ownerReference;
    defaulting has run (serviceAccountName, restartPolicy, ...)."""
    template = copy.deepcopy(template or TEMPLATE)
    owner_kind, owner_version, _ = OWNERS[kind]
    metadata: dict[str, Any] = {**template["metadata"], "namespace": NAMESPACE}
    if owner_kind is None:
        metadata["name"] = "api"
    else:
        metadata["generateName"] = "api-7d9f8c6b5-" if owner_kind == "ReplicaSet" else "api-"
        metadata["ownerReferences"] = [{
            "apiVersion": owner_version, "kind": owner_kind, "name": "api-7d9f8c6b5",
            "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}]
    spec = {**template["spec"], "serviceAccountName": "default", "serviceAccount": "default",
            "restartPolicy": "Never" if kind in ("Job", "CronJob") else "Always",
            "dnsPolicy": "ClusterFirst", "terminationGracePeriodSeconds": 30,
            "schedulerName": "default-scheduler", "securityContext": {}}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def review_of(pod: dict[str, Any], *, operation: str = "CREATE", kind: str = "Pod",
              group: str = "", user: str = "system:serviceaccount:kube-system:replicaset-controller",
              ) -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview as the API server sends it (the documented
    AdmissionRequest fields)."""
    resource = {"group": group, "version": "v1", "resource": kind.lower() + "s"}
    gvk = {"group": group, "version": "v1", "kind": kind}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk, "resource": resource, "requestKind": gvk, "requestResource": resource,
            "name": pod["metadata"].get("name", ""),
            "namespace": NAMESPACE,
            "operation": operation,
            "userInfo": {"username": user, "uid": str(uuid.uuid4()),
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": pod,
            "oldObject": copy.deepcopy(pod) if operation == "UPDATE" else None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1",
                        "kind": "CreateOptions" if operation == "CREATE" else "UpdateOptions"},
        },
    }


@pytest.fixture
def authority(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority(tmp_path / "ca")


@pytest.fixture
async def webhook(authority: CertificateAuthority) -> AsyncIterator[WebhookServer]:
    server = WebhookServer(WebhookSettings(address="127.0.0.1:0"), authority, check_interval=0.2)
    await server.start()
    on_ca_change(authority, server.ca_changed)
    try:
        yield server
    finally:
        await server.close()


def trusting(bundle: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=bundle.decode())
    return context


async def post(server: WebhookServer, body: bytes | Any, *, bundle: bytes | None = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
    """POST as the API server does: HTTPS to the Service's DNS name (SNI and certificate
    verification against the caBundle), here reaching the loopback port."""
    content = body if isinstance(body, (bytes, bytearray)) or hasattr(body, "__aiter__") \
        else json.dumps(body).encode()
    async with httpx.AsyncClient(verify=trusting(bundle or server.authority.trust_bundle_pem),
                                 trust_env=False, timeout=10) as client:
        return await client.post(
            f"https://127.0.0.1:{server.port}{INJECT_PATH}", content=content,
            headers={"Content-Type": "application/json", **(headers or {})},
            extensions={"sni_hostname": HOSTNAME})


def apply(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, patch)


# Every kind's pods, through HTTPS ---------------------------------------------------------------


@pytest.mark.parametrize("kind", list(OWNERS))
async def test_pods_of_every_workload_kind_are_injected(webhook: WebhookServer, kind: str) -> None:
    pod = pod_of(kind)
    review = review_of(pod)
    answer = await post(webhook, review)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == review["request"]["uid"]
    assert response["allowed"] is True
    patched = apply(pod, response)
    kubernetes_validate.validate(patched, KUBERNETES_VERSION, strict=True)
    # The injector's settings with the CA's current roots, which the agent trusts at first
    # contact (the webhook fills them in at every admission).
    roots = webhook.authority.trust_bundle_pem.decode()
    expected, _ = inject_pod(pod, dataclasses.replace(webhook.settings.injector, ca_bundle_pem=roots))
    assert patched == expected
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["xds-init", "xds-agent", "envoy"]
    (agent,) = [c for c in patched["spec"]["initContainers"] if c["name"] == "xds-agent"]
    assert agent["env"] == [{"name": "XDS_SERVER_CA_PEM", "value": roots}]
    assert patched["spec"]["containers"] == pod["spec"]["containers"]
    assert patched["metadata"].get("generateName") == pod["metadata"].get("generateName")
    assert STATUS_ANNOTATION in patched["metadata"]["annotations"]
    assert webhook.stats["injected"] == 1


async def test_the_certificate_is_a_mesh_ca_serving_certificate(webhook: WebhookServer,
                                                                 tmp_path: Path) -> None:
    issued = webhook.certificate
    assert issued is not None
    leaf = issued.leaf
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [
        "xds-server.xds-system.svc", "xds-server.xds-system.svc.cluster.local",
        "xds-server.xds-system", "xds-server"]
    assert not names.get_values_for_type(x509.UniformResourceIdentifier)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.issuer == webhook.authority.state.signing_cert.subject
    # a client trusting another CA refuses the handshake: the verification above is real
    other = CertificateAuthority(tmp_path / "other")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        await post(webhook, review_of(pod_of("Pod")), bundle=other.trust_bundle_pem)


async def test_a_new_signing_root_gets_a_new_certificate(webhook: WebhookServer,
                                                         authority: CertificateAuthority) -> None:
    first = webhook.certificate
    assert first is not None
    authority.prepare_next_root()  # the bundle holds both roots first (caBundle follows)
    authority.activate_next_root()
    new_root = authority.state.root
    deadline = time.monotonic() + 10
    while webhook.certificate is first and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert webhook.certificate is not first, "not re-issued after the signer changed"
    # a client that trusts only the new root accepts the new certificate
    new_bundle = new_root.public_bytes(serialization.Encoding.PEM)
    answer = await post(webhook, review_of(pod_of("Pod")), bundle=new_bundle)
    assert answer.status_code == 200


# Skipped, denied, allowed ---------------------------------------------------------------------


@pytest.mark.parametrize("change, reason", [
    ({"annotations": {"sidecar.xds-server.io/inject": "false"}}, "opted out"),
    ({"hostNetwork": True}, "host network"),
], ids=["opt-out", "host-network"])
async def test_skipped_pods_are_allowed_without_a_patch(webhook: WebhookServer,
                                                        change: dict[str, Any], reason: str) -> None:
    pod = pod_of("Deployment")
    if "annotations" in change:
        pod["metadata"]["annotations"] = change["annotations"]
    else:
        pod["spec"].update(change)
    review = review_of(pod)
    response = (await post(webhook, review)).json()["response"]
    assert response == {"uid": review["request"]["uid"], "allowed": True}, reason
    assert webhook.stats["skipped"] == 1


async def test_an_already_injected_pod_is_left_alone(webhook: WebhookServer) -> None:
    injected, _ = inject_pod(pod_of("Pod"), InjectorSettings(proxy_image="mine:1"))
    response = (await post(webhook, review_of(injected))).json()["response"]
    assert "patch" not in response and response["allowed"] is True


async def test_a_bad_capture_annotation_denies_the_pod_naming_it(webhook: WebhookServer) -> None:
    pod = pod_of("Deployment")
    pod["metadata"]["annotations"] = {"traffic.sidecar.xds-server.io/excludeOutboundPorts": "http"}
    response = (await post(webhook, review_of(pod))).json()["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 400
    assert response["status"]["message"] == (
        "sidecar injection of pod shop/api-7d9f8c6b5-*: metadata.annotations"
        "[traffic.sidecar.xds-server.io/excludeOutboundPorts]: 'http' is not a port (1-65535)")
    assert webhook.stats["denied"] == 1


async def test_updates_are_allowed_untouched(webhook: WebhookServer) -> None:
    review = review_of(pod_of("Pod"), operation="UPDATE")
    response = (await post(webhook, review)).json()["response"]
    assert response == {"uid": review["request"]["uid"], "allowed": True}


# Bad requests ---------------------------------------------------------------------------------


async def _chunks(total: int) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * 65536
        sent += 65536


def _bad_reviews() -> list[tuple[str, Callable[[], Any], str]]:
    deployment = review_of(pod_of("Deployment"), kind="Deployment", group="apps")
    beta = review_of(pod_of("Pod"))
    beta["apiVersion"] = "admission.k8s.io/v1beta1"
    no_uid = review_of(pod_of("Pod"))
    del no_uid["request"]["uid"]
    no_object = review_of(pod_of("Pod"))
    no_object["request"]["object"] = None
    return [
        ("garbage", lambda: b"\x00\xffnot json", "the body is not JSON"),
        ("json-array", lambda: b"[1, 2]", "the body is not a JSON object"),
        ("not-a-pod", lambda: deployment, "request.kind: this webhook injects Pods (core/v1)"),
        ("v1beta1", lambda: beta, "expected apiVersion admission.k8s.io/v1 and kind AdmissionReview"),
        ("no-uid", lambda: no_uid, "request.uid: missing"),
        ("no-object", lambda: no_object, "request.object: missing"),
        ("too-large", lambda: b"{" + b" " * (1024 * 1024) + b"}", "larger than 1048576 bytes"),
        ("too-large-chunked", lambda: _chunks(1024 * 1024 + 65536), "larger than 1048576 bytes"),
    ]


@pytest.mark.parametrize("name, body, message", _bad_reviews(), ids=[b[0] for b in _bad_reviews()])
async def test_bad_requests_get_400_with_a_clear_message(webhook: WebhookServer, name: str,
                                                         body: Callable[[], Any], message: str) -> None:
    answer = await post(webhook, body())
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert message in error and "Traceback" not in answer.text
    assert webhook.stats == {"bad-request": 1}
    metrics = Metrics()
    metrics.attach_webhook(webhook.stats)
    assert metrics.registry.get_sample_value("xds_server_webhook_requests_total",
                                             {"result": "bad-request"}) == 1


async def test_other_methods_and_paths_are_refused(webhook: WebhookServer) -> None:
    async with httpx.AsyncClient(verify=trusting(webhook.authority.trust_bundle_pem),
                                 trust_env=False) as client:
        url = f"https://127.0.0.1:{webhook.port}"
        get = await client.get(url + INJECT_PATH, extensions={"sni_hostname": HOSTNAME})
        assert get.status_code == 405
        other = await client.post(url + "/mutate", content=b"{}", extensions={"sni_hostname": HOSTNAME})
        assert other.status_code == 404


# The caBundle, kept by the server (Kubernetes source, fake API server) ------------------------


def webhook_configuration() -> dict[str, Any]:
    (doc,) = list(yaml.safe_load_all((ROOT / "manifests" / "mutating-webhook.yaml").read_text()))
    return doc


async def eventually(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def ca_bundles(fake: FakeApiServer, name: str) -> list[str | None]:
    current = fake.get("MutatingWebhookConfiguration", None, name)
    return [(w.get("clientConfig") or {}).get("caBundle") for w in current["webhooks"]]


async def test_the_server_keeps_the_ca_bundle_on_the_mesh_roots(tmp_path: Path) -> None:
    """`serve` with the Kubernetes source and the webhook: the shipped configuration gets the
    trust bundle at start and again when a root rotation adds a root; a configuration created
    after the server started, or changed by someone else, is repaired."""
    from xds_server.app import AppConfig, KubernetesConfig, start_app
    from xds_server.security import SecurityConfig
    from xds_server.sources.kubernetes import KubeSettings
    from xds_server.xds.auth import AuthMode
    from xds_server.xds.server import ServerSettings

    with FakeApiServer(bookmark_interval=0.2) as fake:
        kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig", user="xds-server")
        configuration = webhook_configuration()
        name = configuration["metadata"]["name"]
        fake.create(configuration)
        # The server's namespace, where its CA Secret goes (every real cluster has it).
        fake.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
        running = await start_app(AppConfig(
            server=ServerSettings(address="127.0.0.1:0", debounce_quiet=0),
            kubernetes=KubernetesConfig(kubeconfig=kubeconfig, watch=KubeSettings(
                leader=None, write_status=False, backoff_initial=0.05, backoff_max=0.2)),
            security=SecurityConfig(auth=AuthMode.TOKENS, ca_dir=tmp_path / "ca",
                                    watch_ca_files=False),
            webhook=WebhookSettings(address="127.0.0.1:0"),
        ))
        try:
            authority = running.ca.authority
            sync = running.webhook.ca_bundle
            encoded = base64.b64encode(authority.trust_bundle_pem).decode()
            await eventually(lambda: ca_bundles(fake, name) == [encoded], what="first caBundle")
            # the webhook answers over TLS verified with exactly that caBundle
            review = review_of(pod_of("Deployment"))
            answer = await post(running.webhook, review, bundle=base64.b64decode(encoded))
            assert answer.json()["response"]["allowed"] is True
            patches = [r for r in fake.requests(user="xds-server", method="PATCH")
                       if "mutatingwebhookconfigurations" in r.path]
            assert len(patches) == 1

            # a root rotation: the bundle gains the next root before anything is signed with it
            await asyncio.to_thread(authority.prepare_next_root)
            both = base64.b64encode(authority.trust_bundle_pem).decode()
            assert both != encoded
            await eventually(lambda: ca_bundles(fake, name) == [both], what="rotated caBundle")
            assert sync.patches == 2 and sync.last_error == ""
        finally:
            await running.close(0.1)


async def test_a_missing_or_changed_configuration_is_repaired(
        tmp_path: Path, authority: CertificateAuthority) -> None:
    from xds_server.inject.ca_bundle import CaBundleSync
    from xds_server.sources.kube_api import KubeApi, make_api_client

    with FakeApiServer() as fake:
        api = KubeApi(make_api_client(fake.kubeconfig(tmp_path / "kubeconfig", user="xds-server")))
        configuration = webhook_configuration()
        name = configuration["metadata"]["name"]
        sync = CaBundleSync(api, name, lambda: authority.trust_bundle_pem,
                            backoff_initial=0.05, backoff_max=0.2, resync=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(sync.run(stop))
        try:
            await eventually(lambda: "404" in sync.last_error, what="the 404 reported")
            assert name in sync.last_error
            fake.create(configuration)
            encoded = base64.b64encode(authority.trust_bundle_pem).decode()
            await eventually(lambda: ca_bundles(fake, name) == [encoded], what="caBundle")
            await eventually(lambda: sync.last_error == "", what="error cleared")
            # someone else overwrites it: the periodic resync repairs it
            current = fake.get("MutatingWebhookConfiguration", None, name)
            current["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(b"junk").decode()
            fake.update(current)
            await eventually(lambda: ca_bundles(fake, name) == [encoded], what="repaired caBundle")
            assert sync.patches == 2
        finally:
            stop.set()
            await task
            api.close()


# The injected sidecar's readiness endpoint, with a real Envoy and server -----------------------


@pytest.mark.envoy
async def test_the_readiness_port_answers_with_envoys_readiness(tmp_path: Path) -> None:
    """What the injected probes hit: `/healthz/ready` on the readiness port is 200 once Envoy
    has its config from the server (Envoy's /ready), and nothing else is served there."""
    import urllib.error
    import urllib.request

    from tests.support.envoy import EnvoyProcess
    from tests.support.net import free_port
    from xds_server.app import AppConfig, start_app
    from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap
    from xds_server.xds.server import ServerSettings

    running = await start_app(AppConfig(
        server=ServerSettings(address="127.0.0.1:0", debounce_quiet=0),
        source=ROOT / "examples" / "demo"))
    ready_port, admin_port = free_port(), free_port()
    bootstrap = sidecar_bootstrap(SidecarSpec(
        namespace="demo", service_account="frontend", pod="frontend-0", pod_ip="127.0.10.2",
        xds_address=running.address, admin_address=f"127.0.0.1:{admin_port}",
        readiness_port=ready_port, interception="explicit"))

    def get(path: str, method: str = "GET") -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{ready_port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return int(response.status)
        except urllib.error.HTTPError as err:
            return err.code

    envoy = EnvoyProcess(bootstrap, name="injected", workdir=tmp_path / "envoy")
    try:
        await asyncio.to_thread(envoy.start)
        await asyncio.to_thread(envoy.wait_ready)
        assert await asyncio.to_thread(get, "/healthz/ready") == 200
        assert await asyncio.to_thread(get, "/stats") == 404  # the admin API is not exposed
        assert await asyncio.to_thread(get, "/healthz/ready", "POST") == 404
    finally:
        await asyncio.to_thread(envoy.stop)
        await running.close(0.1)
