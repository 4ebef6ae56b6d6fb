"""The golden driver: `tests/testdata/in/<case>.yaml` -> what one proxy receives, as YAML.

A case is the mesh as users write it (the Kubernetes-shaped documents the file source reads)
plus one `kind: GoldenProxy` document naming the proxy whose view is shown and the server
settings (see tests/testdata/README.md). It goes through the real pipeline: the file
source's parser (`parse_file` + `resolve`), a `MeshStore`, the `MeshController`, that proxy's
view (`view_for`), and for secrets the real SDS glue (`SdsSecrets` over `WorkloadCertificates`) over a throwaway
CA. The output is one file per xDS type, `tests/testdata/out/<case>.<type>.yaml`.

Everything that touches the project's APIs is in `translate_case`, so a renamed API costs a
few lines here and nothing in the cases or the test.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.svid import SvidIssuer
from xds_server.ca.workloads import WorkloadCertificates
from xds_server.model.identity import Identity
from xds_server.model.security import MtlsMode, SecuritySettings
from xds_server.model.store import POD, MeshStore
from xds_server.sds import SdsSecrets
from xds_server.sources.mesh_files import parse_file, resolve
from xds_server.translate.controller import MeshController
from xds_server.translate.capture import OutboundTrafficPolicy
from xds_server.translate.scope import ScopeSettings
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache, View
from xds_server.xds.node import GRPC_FEATURE
from xds_server.xds.resource import Resource

from .proxies import verified

TESTDATA = Path(__file__).resolve().parents[1] / "testdata"
IN_DIR = TESTDATA / "in"
OUT_DIR = TESTDATA / "out"
PROXY_KIND = "GoldenProxy"
CASE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")  # no dots: `<case>.<type>.yaml` stays unambiguous

# Output file suffix -> (type URL, message class), in the order a proxy warms them.
OUTPUT_TYPES: dict[str, tuple[str, type[Message]]] = {
    "clusters": (types.CLUSTER, cluster_pb2.Cluster),
    "endpoints": (types.ENDPOINT, endpoint_pb2.ClusterLoadAssignment),
    "listeners": (types.LISTENER, listener_pb2.Listener),
    "routes": (types.ROUTE, route_pb2.RouteConfiguration),
    "secrets": (types.SECRET, secret_pb2.Secret),
}


@dataclass(frozen=True, slots=True)
class GoldenProxy:
    """The `kind: GoldenProxy` document: whose view is shown, and the server's settings."""

    namespace: str
    pod: str
    service_account: str
    ip: str
    proxyless: bool
    authenticated: bool  # the stream proved its identity: SDS issues its `default` secret
    targets: tuple[str, ...]  # proxyless clients: the listener names gRPC asks for
    security: SecuritySettings
    scope: ScopeSettings


def cases() -> list[str]:
    return sorted(p.stem for p in IN_DIR.glob("*.yaml"))


def out_files(case: str | None = None) -> list[Path]:
    """Output files (of one case, or all)."""
    pattern = f"{case}.*.yaml" if case else "*.yaml"
    return sorted(OUT_DIR.glob(pattern))


def case_of(out_file: Path) -> str:
    return out_file.name.split(".", 1)[0]


def in_path(case: str) -> Path:
    return IN_DIR / f"{case}.yaml"


def mesh_documents(case: str) -> list[dict[str, Any]]:
    """The case's mesh objects as plain dicts (its GoldenProxy document left out), for tests
    that build on a case's mesh."""
    docs = yaml.safe_load_all(in_path(case).read_text())
    return [d for d in docs if d and d.get("kind") != PROXY_KIND]


def _proxy_document(case: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(in_path(case).read_text()) if d and d.get("kind") == PROXY_KIND]
    if len(docs) != 1:
        raise ValueError(f"{case}: expected exactly one `kind: {PROXY_KIND}` document, found {len(docs)}")
    return docs[0]


def golden_proxy(case: str, store: MeshStore) -> GoldenProxy:
    doc = _proxy_document(case)
    proxy, server = dict(doc.get("proxy") or {}), dict(doc.get("server") or {})
    pod = store.get(POD, proxy["namespace"], proxy["pod"])
    security = SecuritySettings(
        mtls=server.get("mtls", True),
        default_mode=MtlsMode(server.get("defaultMode", MtlsMode.PERMISSIVE.value)),
        default_deny=server.get("defaultDeny", False),
    )
    export = server.get("defaultExportTo", "*")
    return GoldenProxy(
        namespace=proxy["namespace"],
        pod=proxy["pod"],
        service_account=proxy.get("serviceAccount") or (pod.service_account if pod else "default"),
        ip=proxy.get("ip") or (pod.ip if pod else ""),
        proxyless=proxy.get("proxyless", False),
        authenticated=proxy.get("authenticated", True),
        targets=tuple(proxy.get("targets") or ()),
        security=security,
        scope=ScopeSettings(
            default_export_to=tuple(e.strip() for e in export.split(",")),
            outbound_traffic_policy=OutboundTrafficPolicy(server.get("outboundTrafficPolicy", "ALLOW_ANY")),
        ),
    )


def _node(proxy: GoldenProxy) -> base_pb2.Node:
    """The node the proxy's bootstrap presents (`xds-server bootstrap`), or gRPC's."""
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": proxy.namespace, "pod": proxy.pod,
                     "service_account": proxy.service_account, "pod_ip": proxy.ip})
    node = base_pb2.Node(id=f"{proxy.pod}.{proxy.namespace}", metadata=metadata, user_agent_name="envoy")
    if proxy.proxyless:
        node.user_agent_name = "gRPC Python"
        node.client_features.append(GRPC_FEATURE)
    return node


def load_mesh(case: str) -> MeshStore:
    """The case's mesh through the file source's parser; any error but the GoldenProxy
    document's "not read by the mesh" warning fails the case."""
    path = in_path(case)
    parsed = parse_file(path.read_bytes(), False, path.name)
    served, errors = resolve({path.name: parsed}, {})
    problems = [str(e) for e in errors if not (e.kind == PROXY_KIND and e.severity == "warning")]
    if problems:
        raise ValueError(f"{case}: the mesh does not load:\n" + "\n".join(problems))
    store = MeshStore()
    store.sync("files", [held.obj for held in served.values()])
    return store


def translate_case(case: str) -> tuple[GoldenProxy, dict[str, list[Message]]]:
    """The proxy's resources by output type (sorted by name), as the server would send them."""
    store = load_mesh(case)
    proxy = golden_proxy(case, store)
    controller = MeshController(store, ResourceCache(), settings=proxy.scope, security=proxy.security)
    view: View = controller.view_for(verified(_node(proxy)))
    with tempfile.TemporaryDirectory(prefix="golden-ca-") as ca_dir:
        # With the CA and SDS on, secrets come from the real provider; a proxyless gRPC
        # client never asks for them (its certificates come from files, the workload agent's).
        if proxy.security.mtls and not proxy.proxyless:
            issuer = SvidIssuer(CertificateAuthority(Path(ca_dir) / "ca"), default_ttl=timedelta(hours=1))
            provider = SdsSecrets(controller.cache, WorkloadCertificates(issuer))
            identity = Identity(proxy.namespace, proxy.service_account) if proxy.authenticated else None
            if identity is not None:
                provider.acquire(identity)  # what a subscription to `default` does
            view = provider.view(view, identity)
        found: dict[str, list[Message]] = {}
        for suffix, (type_url, cls) in OUTPUT_TYPES.items():
            resources: dict[str, Resource] = {r.name: r for r in view.visible(type_url)}
            if type_url == types.LISTENER:
                for target in proxy.targets:  # built when asked (translate/proxyless.py)
                    if (asked := view.get(type_url, target)) is not None:
                        resources[asked.name] = asked
            if type_url == types.ENDPOINT:  # what the clusters warm with, as proxy_resources
                clusters = view.visible(types.CLUSTER)
                resources = {r.name: r for c in clusters if c.warms_with and (r := view.get(type_url, c.warms_with))}
            found[suffix] = [resources[n].unpack(cls) for n in sorted(resources)]
    return proxy, found


# Rendering ------------------------------------------------------------------------------------


def redact_secret(secret: secret_pb2.Secret) -> secret_pb2.Secret:
    """Keys and certificate bodies change every run (a fresh CA): stable placeholders that
    still say what the secret holds."""
    out = secret_pb2.Secret()
    out.CopyFrom(secret)
    if out.HasField("tls_certificate"):
        chain = out.tls_certificate.certificate_chain
        certs = x509.load_pem_x509_certificates(chain.inline_bytes or chain.inline_string.encode())
        sans = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = ",".join(sans.get_values_for_type(x509.UniformResourceIdentifier))
        chain.Clear()
        chain.inline_string = f"[redacted: chain of {len(certs)} certificate(s), leaf {uris}]"
        if out.tls_certificate.private_key.WhichOneof("specifier") is not None:
            out.tls_certificate.private_key.Clear()
            out.tls_certificate.private_key.inline_string = "[redacted: private key]"
    if out.HasField("validation_context") and out.validation_context.HasField("trusted_ca"):
        ca = out.validation_context.trusted_ca
        count = len(x509.load_pem_x509_certificates(ca.inline_bytes or ca.inline_string.encode()))
        ca.Clear()
        ca.inline_string = f"[redacted: trust bundle of {count} root certificate(s)]"
    if out.HasField("generic_secret"):
        out.generic_secret.secret.Clear()
        out.generic_secret.secret.inline_string = "[redacted]"
    return out


def _ordered(value: Any) -> Any:
    """Keys sorted (protobuf maps have no stable order), `name` first for the reader."""
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: (k != "name", k))
        return {k: _ordered(value[k]) for k in keys}
    if isinstance(value, list):
        return [_ordered(v) for v in value]
    return value


def render(case: str, resources: Mapping[str, list[Message]]) -> dict[str, str]:
    """File name -> content, for every non-empty output type."""
    files: dict[str, str] = {}
    for suffix, messages in resources.items():
        if not messages:
            continue
        if suffix == "secrets":
            messages = [redact_secret(m) for m in messages if isinstance(m, secret_pb2.Secret)]
        data = [_ordered(json_format.MessageToDict(m, preserving_proto_field_name=True)) for m in messages]
        header = f"# Generated from tests/testdata/in/{case}.yaml: UPDATE_GOLDENS=1 regenerates it.\n"
        files[f"{case}.{suffix}.yaml"] = header + yaml.safe_dump(
            data, sort_keys=False, width=120, default_flow_style=False, allow_unicode=True)
    return files
