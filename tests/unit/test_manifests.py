"""The Kubernetes manifests (manifests/): generated files are what the generators write, every
object is valid for a pinned Kubernetes version, RBAC is exactly what the server needs, pods
run locked down, the injection webhook is wired to the server, and the example's plain
Deployments get the sidecars the server expects from `xds-server inject`.

Regenerate the generated files (the CRDs) after an intended change, then review the diff:

    UPDATE_MANIFESTS=1 .venv/bin/pytest tests/unit/test_manifests.py -p no:cacheprovider

(the CRDs alone: `xds-server crds --output-dir manifests/crds`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
import urllib.request
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from xds_server import crds
from xds_server.cli import main
from xds_server.api.v1alpha1 import API_VERSION, GROUP, parse_duration
from xds_server.ca.authority import CertificateAuthority
from xds_server.inject.ca_bundle import MUTATING_WEBHOOK_CONFIGURATION
from xds_server.inject.settings import WebhookSettings
from xds_server.inject.webhook import INJECT_PATH
from xds_server.settings import ServeSettings
from xds_server.sources import k8s_objects

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
# The oldest Kubernetes the manifests support: native sidecars (restartPolicy: Always on init
# containers) are on by default from 1.29, `unhealthyPodEvictionPolicy` is GA in 1.31.
KUBERNETES_VERSION = "1.31.0"
SERVER_NAMESPACE = "xds-system"
EXAMPLE_NAMESPACE = "mesh-demo"
UPDATE = os.environ.get("UPDATE_MANIFESTS") == "1"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "MutatingWebhookConfiguration"}



# Loading --------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((str(path.relative_to(MANIFESTS)), doc))
    return docs


DOCUMENTS = load_documents()


def doc_id(item: tuple[str, dict[str, Any]]) -> str:
    path, doc = item
    return f"{path}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def find(kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    for _, doc in DOCUMENTS:
        meta = doc.get("metadata", {})
        if doc["kind"] == kind and meta.get("name") == name and (
            namespace is None or meta.get("namespace") == namespace
        ):
            return doc
    raise AssertionError(f"no {kind} {namespace}/{name} in manifests/")


def of_kind(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [(path, doc) for path, doc in DOCUMENTS if doc["kind"] == kind]


def pod_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for path, doc in DOCUMENTS:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield f"{path}:{doc['metadata']['name']}", doc["spec"]["template"]["spec"]


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("initContainers", [])) + list(spec["containers"])


# Generated files ------------------------------------------------------------------------------


def test_crds_are_what_the_generator_writes() -> None:
    directory = MANIFESTS / "crds"
    if UPDATE:
        for stale in directory.glob("*.yaml"):
            stale.unlink()
        crds.write_crds(directory)
    expected = {kind.file_name: crds.crd_yaml(kind) for kind in crds.KINDS}
    actual = {p.name: p.read_text(encoding="utf-8") for p in directory.glob("*.yaml")}
    assert sorted(actual) == sorted(expected), "run: xds-server crds --output-dir manifests/crds"
    for name, text in expected.items():
        assert actual[name] == text, f"{name} differs: run xds-server crds --output-dir manifests/crds"


def test_crds_command_prints_every_crd() -> None:
    result = CliRunner().invoke(main, ["crds"])
    assert result.exit_code == 0, result.output
    printed = [d for d in yaml.safe_load_all(result.output) if d]
    assert [d["metadata"]["name"] for d in printed] == [k.name for k in crds.KINDS]
    assert result.output == crds.all_crds_yaml()


# Schemas --------------------------------------------------------------------------------------


def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema, from the CRD files in manifests/."""
    schemas = {}
    for _, doc in of_kind("CustomResourceDefinition"):
        spec = doc["spec"]
        for version in spec["versions"]:
            key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
            schemas[key] = version["schema"]["openAPIV3Schema"]
    return schemas


def as_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI 3.0 structural schema as JSON Schema draft 4 (what jsonschema validates):
    `nullable` becomes a null type, and unknown fields are errors (the API server would prune
    them silently and kubectl would reject them: either way a typo in an example is a bug)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {k: as_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = as_json_schema(value)
        elif key == "nullable" or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if node.get("nullable"):
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


_CEL_DURATION = re.compile(r"^duration\(self\) (>|>=|<|<=) duration\('(\d+(?:\.\d+)?)s'\)$")


def check_cel_rules(value: Any, schema: dict[str, Any], where: str) -> None:
    """The CEL rules the generator writes (`x-kubernetes-validations`), evaluated the way the
    API server would for the forms it produces; an unknown form fails the test."""
    for rule in schema.get("x-kubernetes-validations", []):
        match = _CEL_DURATION.match(rule["rule"])
        assert match, f"{where}: teach this test the CEL rule {rule['rule']!r}"
        actual, bound = parse_duration(value), float(match[2])
        ok = {">": actual > bound, ">=": actual >= bound, "<": actual < bound, "<=": actual <= bound}
        if not ok[match[1]]:
            raise jsonschema.ValidationError(f"{where}: {rule['message']}")
    if isinstance(value, dict):
        for key, child in value.items():
            if key in schema.get("properties", {}):
                check_cel_rules(child, schema["properties"][key], f"{where}.{key}")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, child in enumerate(value):
            check_cel_rules(child, schema["items"], f"{where}[{i}]")


def validate_custom_object(doc: dict[str, Any]) -> None:
    schema = crd_schemas()[(doc["apiVersion"], doc["kind"])]
    relaxed = as_json_schema(schema)
    relaxed["properties"]["metadata"] = {"type": "object"}  # metadata: validated by the API server
    jsonschema.Draft4Validator(relaxed).validate(doc)
    check_cel_rules(doc, schema, doc["kind"])


@pytest.mark.parametrize("item", DOCUMENTS, ids=doc_id)
def test_every_object_is_valid_for_the_pinned_kubernetes(item: tuple[str, dict[str, Any]]) -> None:
    path, doc = item
    api_group = doc["apiVersion"].rpartition("/")[0]
    if api_group == GROUP:
        validate_custom_object(doc)  # our kinds: against our own generated CRD
        return
    if api_group == "keda.sh":  # no bundled schema: the fields KEDA documents, checked here
        jsonschema.Draft7Validator(KEDA_SCALED_OBJECT).validate(doc)
        return
    problem = None
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        problem = f"{path}: {doc['kind']} {doc['metadata'].get('name')}: {where}: {err.message}"
    except kubernetes_validate.SchemaNotFoundError as err:  # a kind with no bundled schema
        problem = f"{path}: {err.message}; add a schema check for it here"
    if problem:
        pytest.fail(problem, pytrace=False)


@pytest.mark.parametrize("item", DOCUMENTS, ids=doc_id)
def test_objects_are_namespaced_explicitly(item: tuple[str, dict[str, Any]]) -> None:
    path, doc = item
    namespace = doc["metadata"].get("namespace")
    if doc["kind"] in CLUSTER_SCOPED:
        assert namespace is None
    else:
        expected = EXAMPLE_NAMESPACE if path.startswith("example/") else SERVER_NAMESPACE
        if path.startswith("autoscaling/"):  # the adapter's namespace, or the scaled app's
            expected = "monitoring" if doc["kind"] == "ConfigMap" else EXAMPLE_NAMESPACE
        assert namespace == expected, f"{path}: apply -k must not depend on the current namespace"


def test_kustomizations_list_every_file() -> None:
    kustomizations = sorted(MANIFESTS.rglob("kustomization.yaml"))
    assert {k.parent.relative_to(MANIFESTS).as_posix() for k in kustomizations} == {
        ".", "example", "redis", "autoscaling", "autoscaling/keda"}
    listed: set[Path] = set()
    for path in kustomizations:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert data["kind"] == "Kustomization"
        for resource in data["resources"]:
            target = (path.parent / resource).resolve()
            assert target.is_file(), f"{path}: {resource} does not exist"
            assert target not in listed, f"{resource} listed twice"
            listed.add(target)
    assert listed == {p.resolve() for p in manifest_files()}, "every manifest in one kustomization"


def test_crd_schemas_are_structural() -> None:
    """What the API server requires of a CRD schema (structural, OpenAPI 3.0) and what
    kubernetes-validate's JSONSchemaProps schema cannot see."""
    allowed = {
        "type", "format", "description", "properties", "required", "items", "additionalProperties",
        "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
        "maxLength", "pattern", "minItems", "maxItems", "uniqueItems", "nullable",
        "x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-validations",
    }

    def walk(node: dict[str, Any], where: str) -> None:
        assert set(node) <= allowed, f"{where}: {sorted(set(node) - allowed)}"
        assert "type" in node, f"{where}: no type"
        assert not ("properties" in node and "additionalProperties" in node), where
        for key in ("exclusiveMinimum", "exclusiveMaximum"):
            assert isinstance(node.get(key, True), bool), f"{where}: OpenAPI 3.0 wants a boolean {key}"
        if "pattern" in node:
            re.compile(node["pattern"])
        for rule in node.get("x-kubernetes-validations", []):
            assert set(rule) == {"rule", "message"} and rule["rule"] and rule["message"], where
            # the API server rejects CEL on unbounded strings when the cost estimate is too high
            assert node["type"] != "string" or "maxLength" in node, f"{where}: bound the string"
        for name in node.get("required", []):
            assert name in node["properties"], f"{where}: required {name} is not a property"
        if node.get("x-kubernetes-list-type") == "map":
            item = node["items"]
            assert set(node["x-kubernetes-list-map-keys"]) <= set(item.get("required", [])), where
        for name, child in node.get("properties", {}).items():
            walk(child, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}.*")

    for (_api_version, kind), schema in crd_schemas().items():
        walk(schema, kind)
        assert schema["properties"]["metadata"] == {"type": "object"}
        assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}


def test_crds_have_status_subresource_and_printer_columns() -> None:
    for _, doc in of_kind("CustomResourceDefinition"):
        assert doc["spec"]["group"] == GROUP
        assert doc["spec"]["scope"] == "Namespaced"
        (version,) = doc["spec"]["versions"]
        assert version["name"] == API_VERSION.split("/")[1] and version["served"] and version["storage"]
        assert version["subresources"] == {"status": {}}
        columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
        assert "Age" in columns and "Accepted" in columns
        schema = version["schema"]["openAPIV3Schema"]
        for column in columns.values():  # a column must name a field the schema has
            path = column["jsonPath"].split("[")[0].strip(".").split(".")
            if path[0] == "metadata":
                continue
            node = schema
            for step in path:
                node = node["properties"][step] if "properties" in node else node["items"]["properties"][step]


def all_traffic_policies() -> list[tuple[str, dict[str, Any]]]:
    """Every TrafficPolicy the project ships (manifests, examples, demos)."""
    found = []
    for base in (MANIFESTS, ROOT / "examples"):
        for path in sorted(base.rglob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
                if isinstance(doc, dict) and doc.get("kind") == "TrafficPolicy":
                    found.append((str(path.relative_to(ROOT)), doc))
    return found


def test_every_shipped_traffic_policy_is_valid_for_both_the_crd_and_the_model() -> None:
    policies = all_traffic_policies()
    assert any(path.startswith("manifests/") for path, _ in policies)
    for _path, doc in policies:
        validate_custom_object(doc)
        k8s_objects.convert(doc)  # the server reads it without error


@pytest.mark.parametrize("spec, field", [
    ({"targetRef": {"name": "echo"}, "timeout": "2 seconds"}, "timeout"),
    ({"targetRef": {"name": "echo"}, "timeout": 2}, "timeout"),  # custom resources: strings only
    ({"targetRef": {"name": "echo", "kind": "Pod"}}, "kind"),
    ({"targetRef": {"name": ""}}, "name"),
    ({"targetRef": {"name": "echo"}, "retries": {"attempts": 101}}, "attempts"),
    ({"targetRef": {"name": "echo"}, "loadBalancer": {"simple": "FASTEST"}}, "simple"),
    ({"targetRef": {"name": "echo"}, "retires": {"attempts": 1}}, "retires"),
    ({"retries": {"attempts": 1}}, "targetRef"),
    ({"targetRef": {"name": "echo"}, "connectionPool": {"tcp": {"connectTimeout": "0s"}}}, "connectTimeout"),
    ({"targetRef": {"name": "echo"}, "healthCheck": {"interval": "0ms"}}, "interval"),
])
def test_crd_schema_rejects_what_the_model_rejects(spec: dict[str, Any], field: str) -> None:
    doc = {"apiVersion": API_VERSION, "kind": "TrafficPolicy",
           "metadata": {"name": "p", "namespace": "default"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError) as err:
        validate_custom_object(doc)
    assert field in str(err.value)
    if spec.get("timeout") == 2:
        return  # the model also takes plain seconds (files); custom resources use strings
    with pytest.raises(k8s_objects.ObjectError):
        k8s_objects.convert(doc)


def test_crd_keeps_null_where_the_model_gives_it_a_meaning() -> None:
    # consecutive5xxErrors defaults to 5; null turns it off, so null must reach the server.
    doc = {"apiVersion": API_VERSION, "kind": "TrafficPolicy",
           "metadata": {"name": "p", "namespace": "default"},
           "spec": {"targetRef": {"name": "echo"}, "outlierDetection": {"consecutive5xxErrors": None}}}
    validate_custom_object(doc)
    assert k8s_objects.convert(doc).spec.outlier_detection.consecutive_5xx_errors is None


def test_status_the_server_writes_fits_the_crd() -> None:
    """The API server prunes status fields its schema lacks: what the status writer produces
    must survive, for an accepted policy and for a rejected one."""
    kube_status = pytest.importorskip("xds_server.sources.kube_status")
    from xds_server.model.mesh import ServiceKey

    doc = {"apiVersion": API_VERSION, "kind": "TrafficPolicy",
           "metadata": {"name": "p", "namespace": "shop", "generation": 3},
           "spec": {"targetRef": {"name": "api"}, "timeout": "1s"}}
    accepted = kube_status.policy_status(doc, error=None, kept_last_good=False,
                                         services={ServiceKey("shop", "api")})
    error = k8s_objects.ObjectError("TrafficPolicy", "shop", "p", "spec.timeout", "invalid duration")
    rejected = kube_status.policy_status(doc, error=error, kept_last_good=True, services=set())
    for status in (accepted, rejected):
        validate_custom_object({**doc, "status": status})
    assert accepted["conditions"][0]["observedGeneration"] == 3


def test_generator_maps_pydantic_constructs_to_structural_ones() -> None:
    from typing import Literal

    from pydantic import BaseModel, Field

    class Inner(BaseModel):
        """An inner model."""

        size: int = Field(gt=0, lt=10)

    class Outer(BaseModel):
        optional: int | None = None
        off_switch: int | None = 5
        required_nullable: int | None
        mode: Literal["A", "B"] | None = None
        fixed: Literal["only"] = "only"
        inner: Inner | None = None
        tags: dict[str, str] = {}

    schema = crds.model_schema(Outer)
    props = schema["properties"]
    assert props["optional"] == {"type": "integer"}
    assert props["off_switch"] == {"type": "integer", "nullable": True}
    assert props["required_nullable"] == {"type": "integer", "nullable": True}
    assert props["mode"] == {"type": "string", "enum": ["A", "B"]}
    assert props["fixed"] == {"type": "string", "enum": ["only"]}
    assert props["inner"] == {
        "type": "object", "description": "An inner model.", "required": ["size"],
        "properties": {"size": {"type": "integer", "minimum": 0, "exclusiveMinimum": True,
                                "maximum": 10, "exclusiveMaximum": True}},
    }
    assert props["tags"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert schema["required"] == ["required_nullable"]


def test_generator_refuses_what_a_structural_schema_cannot_express() -> None:
    from pydantic import BaseModel

    class Either(BaseModel):
        value: int | str

    class Loop(BaseModel):
        child: Loop | None = None

    with pytest.raises(crds.UnsupportedSchema, match="union"):
        crds.model_schema(Either)
    with pytest.raises(crds.UnsupportedSchema, match="recursive"):
        crds.model_schema(Loop)


# RBAC -----------------------------------------------------------------------------------------


def rules(doc: dict[str, Any]) -> set[tuple[str, str, tuple[str, ...]]]:
    """(group, resource, verbs); a rule limited to named objects reads `resource[name,...]`."""
    out = set()
    for rule in doc["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs", "resourceNames"}, "no nonResourceURLs"
        names = rule.get("resourceNames")
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                if names:
                    resource = f"{resource}[{','.join(sorted(names))}]"
                out.add((group, resource, tuple(sorted(rule["verbs"]))))
    return out


WEBHOOK_RULE = ("admissionregistration.k8s.io",
                f"mutatingwebhookconfigurations[{WebhookSettings().configuration}]", ("get", "patch"))


READ = ("get", "list", "watch")
STATUS = ("patch", "update")


def test_cluster_role_is_least_privilege() -> None:
    role = find("ClusterRole", "xds-server")
    assert rules(role) == {
        ("", "namespaces", READ),
        ("", "services", READ),
        ("", "pods", READ),
        ("discovery.k8s.io", "endpointslices", READ),
        ("gateway.networking.k8s.io", "httproutes", READ),
        ("gateway.networking.k8s.io", "grpcroutes", READ),
        ("gateway.networking.k8s.io", "httproutes/status", STATUS),
        ("gateway.networking.k8s.io", "grpcroutes/status", STATUS),
        ("mesh.xds-server.io", "trafficpolicies", READ),
        ("mesh.xds-server.io", "trafficpolicies/status", STATUS),
        ("mesh.xds-server.io", "mtlspolicies", READ),
        ("mesh.xds-server.io", "mtlspolicies/status", STATUS),
        ("mesh.xds-server.io", "authorizationpolicies", READ),
        ("mesh.xds-server.io", "authorizationpolicies/status", STATUS),
        ("networking.k8s.io", "networkpolicies", READ),
        ("authentication.k8s.io", "tokenreviews", ("create",)),
        WEBHOOK_RULE,
    }
    # every custom kind the server reads is readable, and nothing else of ours
    ours = {r for g, r, _ in rules(role) if g == GROUP and "/" not in r}
    assert ours == {kind.plural for kind in crds.KINDS}


def test_cluster_role_covers_what_the_kubernetes_source_does() -> None:
    """The kinds the Kubernetes source watches and the ones it writes status for: each needs its
    rule, and a rule nobody uses is a privilege too many."""
    source = pytest.importorskip("xds_server.sources.kubernetes")
    granted = rules(find("ClusterRole", "xds-server"))
    watched = {(kind.group, kind.plural, READ) for kind in source.WATCHED.values()}
    status = {(source.WATCHED[name].group, f"{source.WATCHED[name].plural}/status", STATUS)
              for name in source.STATUS_KINDS}
    token_review = {("authentication.k8s.io", "tokenreviews", ("create",))}
    # ca_bundle.py: GET, then a merge patch, of the one configuration the server is told about
    assert MUTATING_WEBHOOK_CONFIGURATION.plural in WEBHOOK_RULE[1]
    assert granted == watched | status | token_review | {WEBHOOK_RULE}


def test_leader_election_is_a_role_in_the_server_namespace_only() -> None:
    role = find("Role", "xds-server-leader-election", SERVER_NAMESPACE)
    assert rules(role) == {("coordination.k8s.io", "leases", ("create", "get", "update"))}
    assert sorted(doc["kind"] for _, doc in DOCUMENTS if doc["kind"] in ("Role", "ClusterRole")) == [
        "ClusterRole", "Role", "Role"
    ]


def test_the_ca_secret_is_reachable_by_name_in_the_server_namespace_only() -> None:
    role = find("Role", "xds-server-ca-secret", SERVER_NAMESPACE)
    by_names = {tuple(rule.get("resourceNames", ())): tuple(sorted(rule["verbs"])) for rule in role["rules"]}
    assert by_names == {("xds-server-ca",): ("get", "list", "update", "watch"),
                        ("cacerts",): ("get",),
                        (): ("create",)}  # create cannot be limited by name (Kubernetes)
    assert all(rule["resources"] == ["secrets"] and rule["apiGroups"] == [""] for rule in role["rules"])
    for _, doc in of_kind("ClusterRole"):
        assert all("secrets" not in rule["resources"] for rule in doc["rules"])


def test_no_wildcards_and_no_secrets_anywhere() -> None:
    for kind in ("Role", "ClusterRole"):
        for _, doc in of_kind(kind):
            for rule in doc["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[field], f"{kind} {doc['metadata']['name']}: {field}: *"
                if doc["metadata"]["name"] != "xds-server-ca-secret":
                    assert "secrets" not in rule["resources"]
                assert not {"escalate", "bind", "impersonate", "delete", "deletecollection"} & set(rule["verbs"])


def test_bindings_grant_the_roles_to_the_server_service_account_only() -> None:
    account = find("ServiceAccount", "xds-server", SERVER_NAMESPACE)
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": SERVER_NAMESPACE}
    cluster_binding = find("ClusterRoleBinding", "xds-server")
    assert cluster_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                          "name": "xds-server"}
    assert cluster_binding["subjects"] == [subject]
    binding = find("RoleBinding", "xds-server-leader-election", SERVER_NAMESPACE)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "xds-server-leader-election"}
    assert binding["subjects"] == [subject]


# The control plane's Deployment ---------------------------------------------------------------


def server_deployment() -> dict[str, Any]:
    return find("Deployment", "xds-server", SERVER_NAMESPACE)


def server_container() -> dict[str, Any]:
    (container,) = server_deployment()["spec"]["template"]["spec"]["containers"]
    return container


def test_deployment_is_highly_available() -> None:
    deployment = server_deployment()
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    keys = {c["topologyKey"] for c in pod["spec"]["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    for constraint in pod["spec"]["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    pdb = find("PodDisruptionBudget", "xds-server", SERVER_NAMESPACE)
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert 1 <= pdb["spec"]["minAvailable"] < spec["replicas"]
    assert pod["spec"]["serviceAccountName"] == "xds-server"


def test_deployment_runs_locked_down() -> None:
    pod = server_deployment()["spec"]["template"]["spec"]
    container = server_container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert not security.get("privileged", False)
    # the user the image declares (Dockerfile `USER uid:gid`)
    user = re.search(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert user is not None
    assert pod["securityContext"]["runAsUser"] == int(user.group(1))
    assert pod["securityContext"]["runAsGroup"] == int(user.group(2))
    # writable places are explicit volumes, the working directory among them
    workdir = re.findall(r"^WORKDIR (\S+)$", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", workdir} <= mounts
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and {"cpu", "memory"} <= set(resources["limits"])


def test_deployment_image_is_this_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert server_container()["image"] == f"xds-server:{version}"


def test_probes_use_the_admin_apis_health_endpoints() -> None:
    """The kubelet cannot probe over TLS with gRPC, and plaintext xDS stays on loopback: the
    probes use the admin API's open /healthz and /readyz (tests/integration/test_admin_api.py
    checks what they answer), on the port the admin API binds on the pod network."""
    container = server_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-admin"}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/readyz", "port": "http-admin"}, probe
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["XDS_SERVER_ADMIN_ADDRESS"] == f"0.0.0.0:{ports['http-admin']}"
    assert ports == {"grpc-xds-tls": 15012, "grpc-xds-token": 15013,
                     "http-admin": 15014, "https-webhook": 15017}


def test_no_plaintext_xds_off_the_pod_and_no_opt_out(tmp_path: Path) -> None:
    """Tokens and keys never cross the pod network in clear: plaintext xDS keeps its loopback
    default, and the loud opt-out is not used."""
    env = {e["name"]: e["value"] for e in server_container()["env"]}
    for name in ("XDS_SERVER_REDIS_PASSWORD_FILE", "XDS_SERVER_STATE_KEY_FILE"):
        (tmp_path / name).write_text("x")  # mounted from Secrets in the cluster
        env[name] = str(tmp_path / name)
    assert "XDS_SERVER_XDS_ADDRESS" not in env
    assert "XDS_SERVER_ALLOW_PLAINTEXT_TOKENS_OFF_HOST" not in env
    assert env["XDS_SERVER_AUTH"] == "tokens"
    settings = ServeSettings.load(environ=env)
    assert settings.app_config().server.address.startswith("127.0.0.1:")


def test_deployment_environment_is_accepted_by_xds_server_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every XDS_SERVER_* variable names a real option (a typo would be silently ignored), and
    `xds-server serve` parses the Deployment's arguments and environment (values included)."""
    container = server_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    serve = main.commands["serve"]
    known = {p.envvar for cmd in (main, serve) for p in cmd.params if getattr(p, "envvar", None)}
    assert set(env) <= known, f"unknown settings: {sorted(set(env) - known)}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)[1])
    assert entrypoint[:2] == ["xds-server", "serve"] and "command" not in container
    for name in [n for n in os.environ if n.startswith("XDS_SERVER_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with main.make_context("xds-server", ["serve"]) as group_ctx:
        assert group_ctx.params["log_format"] == env["XDS_SERVER_LOG_FORMAT"]
        with serve.make_context("serve", entrypoint[2:] + list(container.get("args", [])),
                                parent=group_ctx) as ctx:
            assert ctx.params["xds_tls_address"] == env["XDS_SERVER_XDS_TLS_ADDRESS"]


def test_xds_over_tls_is_served_on_the_pod_network_for_the_service_names(tmp_path: Path) -> None:
    """15012 (mutual TLS) and 15013 (tokens over TLS) listen on the pod network, and the
    server certificate names the Service as clients dial it."""
    container = server_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["XDS_SERVER_XDS_TLS_ADDRESS"] == f"0.0.0.0:{ports['grpc-xds-tls']}"
    assert env["XDS_SERVER_XDS_TLS_TOKEN_ADDRESS"] == f"0.0.0.0:{ports['grpc-xds-token']}"
    service = find("Service", "xds-server", SERVER_NAMESPACE)
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    sans = env["XDS_SERVER_XDS_TLS_SAN"].split(",")
    for dns in (f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"):
        assert dns in sans
    # The Secret-mounted files exist only in the pod: stand-ins here.
    for name in ("XDS_SERVER_REDIS_PASSWORD_FILE", "XDS_SERVER_STATE_KEY_FILE"):
        (tmp_path / name).write_text("x")
        env[name] = str(tmp_path / name)
    settings = ServeSettings.load(environ=env)
    assert settings.xds.tls_sans == tuple(sans)


def test_replicas_share_state_through_secrets_and_redis() -> None:
    """The Deployment reads the Redis password and the state key from Secrets mounted read-only
    (no secret in the manifests or the environment), dials the Redis Service, and Redis
    requires the same password."""
    container = server_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    spec = find("Deployment", "xds-server", SERVER_NAMESPACE)["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert set(secrets.values()) == {"xds-server-redis", "xds-server-state-key"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"] if m["name"] in secrets}
    for variable in ("XDS_SERVER_REDIS_PASSWORD_FILE", "XDS_SERVER_STATE_KEY_FILE"):
        directory = str(Path(env[variable]).parent)
        assert directory in mounts and mounts[directory]["readOnly"] is True
    redis_service = find("Service", "redis", SERVER_NAMESPACE)
    assert env["XDS_SERVER_REDIS_URL"] == (
        f"redis://{redis_service['metadata']['name']}.{SERVER_NAMESPACE}.svc:"
        f"{redis_service['spec']['ports'][0]['port']}/0")
    redis = find("Deployment", "redis", SERVER_NAMESPACE)["spec"]["template"]["spec"]["containers"][0]
    assert "--requirepass" in redis["args"]
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in redis["env"]} == {"xds-server-redis"}


def test_service_exposes_the_xds_and_admin_ports() -> None:
    service = find("Service", "xds-server", SERVER_NAMESPACE)
    container_ports = {p["name"]: p["containerPort"] for p in server_container()["ports"]}
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {name: p["port"] for name, p in ports.items()} == {
        "grpc-xds-tls": 15012, "grpc-xds-token": 15013, "http-admin": 15014,
        "https-webhook": 15017
    }
    for name, port in ports.items():
        assert port["targetPort"] in container_ports, name
        assert container_ports[port["targetPort"]] == port["port"]
    assert service["spec"]["selector"] == server_deployment()["spec"]["selector"]["matchLabels"]


# Every pod ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where, spec", list(pod_specs()), ids=[w for w, _ in pod_specs()])
def test_every_pod_meets_the_restricted_pod_security_standard(where: str, spec: dict[str, Any]) -> None:
    pod_security = spec.get("securityContext", {})
    assert pod_security.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    assert pod_security.get("runAsNonRoot") is True, where
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    for volume in spec.get("volumes", []):
        assert "hostPath" not in volume, f"{where}: hostPath"
    for container in all_containers(spec):
        name = f"{where}/{container['name']}"
        security = container["securityContext"]
        assert security.get("allowPrivilegeEscalation") is False, name
        assert security.get("capabilities") == {"drop": ["ALL"]}, name
        assert security.get("readOnlyRootFilesystem") is True, name
        assert not security.get("privileged", False), name
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        assert isinstance(user, int) and user > 0, f"{name}: a numeric non-root user the kubelet can verify"
        assert {"cpu", "memory"} <= set(container["resources"]["requests"]), name
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), name
        image = container["image"]
        tag = image.rpartition(":")[2]
        assert ":" in image and tag != "latest" and re.search(r"\d", tag), f"{name}: pin {image}"


# The injection webhook ------------------------------------------------------------------------


def webhook_configuration() -> dict[str, Any]:
    return find("MutatingWebhookConfiguration", WebhookSettings().configuration)


def test_the_webhook_configuration_calls_the_servers_webhook() -> None:
    """The API server reaches the server's webhook: the Service port exists and leads to the
    container port the server listens on, the path is the server's, and the certificate the
    server issues names the Service (WebhookSettings' defaults are what the manifests use)."""
    defaults = WebhookSettings()
    (hook,) = webhook_configuration()["webhooks"]
    service_ref = hook["clientConfig"]["service"]
    assert (service_ref["name"], service_ref["namespace"], service_ref["path"]) == (
        defaults.service, defaults.namespace, INJECT_PATH)
    assert f"{service_ref['name']}.{service_ref['namespace']}.svc" in defaults.dns_names
    assert "url" not in hook["clientConfig"] and "caBundle" not in hook["clientConfig"]
    service = find("Service", service_ref["name"], service_ref["namespace"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == service_ref["port"]]
    container_ports = {p["name"]: p["containerPort"] for p in server_container()["ports"]}
    env = {e["name"]: e["value"] for e in server_container()["env"]}
    assert env["XDS_SERVER_WEBHOOK_ADDRESS"] == f"0.0.0.0:{container_ports[port['targetPort']]}"
    # as Istio's injector: v1 reviews, no side effects, fail closed, Pod CREATEs only
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail"
    assert hook["reinvocationPolicy"] == "Never"
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["objectSelector"]["matchExpressions"] == [
        {"key": "sidecar.xds-server.io/inject", "operator": "NotIn", "values": ["false"]}]


# The example ----------------------------------------------------------------------------------


def example_deployments() -> list[dict[str, Any]]:
    return [doc for path, doc in of_kind("Deployment") if path.startswith("example/")]


def example_injected() -> list[dict[str, Any]]:
    """`xds-server inject` over every file of the example, as an operator without the webhook
    would run it (kustomize's order: the kustomization's list)."""
    kustomization = yaml.safe_load((MANIFESTS / "example" / "kustomization.yaml").read_text())
    text = "---\n".join((MANIFESTS / "example" / name).read_text() for name in kustomization["resources"])
    with tempfile.TemporaryDirectory() as directory:  # the mesh roots, as the webhook knows them
        roots = Path(directory) / "roots.pem"
        roots.write_bytes(CertificateAuthority(Path(directory) / "ca").trust_bundle_pem)
        result = CliRunner().invoke(main, ["inject", "-f", "-", "--ca-bundle", str(roots)], input=text)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # nothing skipped
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_example_namespace_opts_in_and_its_deployments_are_plain_apps() -> None:
    namespace = find("Namespace", EXAMPLE_NAMESPACE)
    (hook,) = webhook_configuration()["webhooks"]
    selector = hook["namespaceSelector"]["matchLabels"]
    assert selector.items() <= namespace["metadata"]["labels"].items()
    deployments = example_deployments()
    assert sorted(d["metadata"]["name"] for d in deployments) == ["client", "echo"]
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        assert "initContainers" not in spec and "volumes" not in spec, "no hand-written sidecar"
        assert not {c["name"] for c in spec["containers"]} & k8s_objects.SIDECAR_CONTAINERS
    assert not [d for p, d in of_kind("ConfigMap") if not p.startswith("autoscaling/")], \
        "no bootstrap ConfigMaps: sidecars write their own"


def test_xds_server_inject_on_the_example() -> None:
    """Every Deployment gets the capture init container, the workload agent and the sidecar;
    everything else is unchanged; the result is valid Kubernetes; the agent gets its SVID on
    the Service's tokens-over-TLS port with a projected token for the server's audience, and
    the sidecar talks mutual TLS to the Service's xDS TLS port with the agent's files."""
    originals = [doc for path, doc in DOCUMENTS if path.startswith("example/")]
    injected = example_injected()
    assert len(injected) == len(originals)
    service = find("Service", "xds-server", SERVER_NAMESPACE)
    service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    host = f"{service['metadata']['name']}.{SERVER_NAMESPACE}.svc"
    sans = {e["name"]: e["value"] for e in server_container()["env"]}["XDS_SERVER_XDS_TLS_SAN"]
    for doc in injected:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) \
            if doc["apiVersion"].rpartition("/")[0] != GROUP else validate_custom_object(doc)
        if doc["kind"] != "Deployment":
            assert doc in originals
            continue
        (original,) = [d for d in example_deployments() if d["metadata"] == doc["metadata"]]
        before, after = original["spec"]["template"], doc["spec"]["template"]
        assert after["spec"]["containers"] == before["spec"]["containers"]
        init, agent, sidecar = after["spec"]["initContainers"]
        assert (init["name"], agent["name"], sidecar["name"]) == ("xds-init", "xds-agent", "envoy")
        assert init["command"][:2] == ["xds-server", "iptables"]
        assert sidecar["restartPolicy"] == agent["restartPolicy"] == "Always"
        args = sidecar["args"]
        assert "--tls" in args and "--token-file" not in args
        assert args[args.index("--xds-address") + 1] == f"{host}:{service_ports['grpc-xds-tls']}"
        assert args[args.index("--server-name") + 1] in sans.split(",")
        assert args[args.index("--cert-dir") + 1] == agent["args"][agent["args"].index("--cert-dir") + 1]
        assert agent["args"][agent["args"].index("--server") + 1] == \
            f"{host}:{service_ports['grpc-xds-token']}"
        assert agent["args"][agent["args"].index("--mtls-server") + 1] == \
            f"{host}:{service_ports['grpc-xds-tls']}"
        (token,) = [v for v in after["spec"]["volumes"] if v["name"] == "xds-token"]
        projected = token["projected"]["sources"][0]["serviceAccountToken"]
        assert projected["audience"] == "xds-server"  # the server's --token-audience default
        assert projected["expirationSeconds"] >= 600


def test_example_pods_are_meshed_workloads_for_the_server() -> None:
    """What the Kubernetes source will make of the injected pods: meshed, capture mode, with the
    right identity and the app's ports (not the sidecar's)."""
    for deployment in [d for d in example_injected() if d["kind"] == "Deployment"]:
        template = deployment["spec"]["template"]
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {**template["metadata"], "name": f"{deployment['metadata']['name']}-0",
                         "namespace": deployment["metadata"]["namespace"]},
            "spec": template["spec"], "status": {"podIP": "10.0.0.7"},
        }
        workload = k8s_objects.convert(pod)
        assert workload.meshed and workload.capture
        assert workload.service_account == template["spec"]["serviceAccountName"]
        assert all(port < 15000 for _, port in workload.container_ports)  # no sidecar port
        if deployment["metadata"]["name"] == "echo":
            assert workload.container_ports == (("http", 8080),)
    for path, doc in of_kind("Service"):
        if path.startswith("example/"):
            k8s_objects.convert(doc)


def expand_kubernetes_vars(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


@pytest.mark.envoy
def test_example_sidecar_bootstrap_gets_the_pods_identity(tmp_path: Path) -> None:
    """The injected echo sidecar's arguments, expanded as the kubelet would, through the real
    `xds-server bootstrap`; the pinned Envoy accepts the result and reports the pod's identity."""
    import subprocess
    import time

    from tests.support.envoy import envoy_binary
    from tests.support.net import free_port

    (echo,) = [d for d in example_injected() if d["kind"] == "Deployment"
               and d["metadata"]["name"] == "echo"]
    from xds_server.ca.certdir import write_generation, write_sds_files
    from xds_server.ca.svid import SvidIssuer
    from xds_server.model.identity import Identity

    (sidecar,) = [c for c in echo["spec"]["template"]["spec"]["initContainers"] if c["name"] == "envoy"]
    pod_env = {"POD_NAME": "echo-6d5f7c9b8-x2x7q", "POD_NAMESPACE": EXAMPLE_NAMESPACE,
               "POD_IP": "10.244.1.17", "SERVICE_ACCOUNT": "echo"}
    args = [expand_kubernetes_vars(a, pod_env) for a in sidecar["args"]]
    # The agent's files, as it writes them before its startup probe lets Envoy start.
    authority = CertificateAuthority(tmp_path / "ca")
    svid = SvidIssuer(authority).issue_for_identity(Identity(EXAMPLE_NAMESPACE, "echo"))
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir()
    write_generation(cert_dir, svid.chain_pem, svid.key_pem or b"", authority.trust_bundle_pem)
    write_sds_files(cert_dir)
    args[args.index("--cert-dir") + 1] = str(cert_dir)
    admin_port, ready_port = free_port(), free_port()  # the pod's may be taken here
    args[args.index("--admin-address") + 1] = f"127.0.0.1:{admin_port}"
    args[args.index("--readiness-port") + 1] = str(ready_port)
    result = CliRunner().invoke(main, ["bootstrap", *args])
    assert result.exit_code == 0, result.output
    (tmp_path / "envoy.yaml").write_text(result.stdout)
    proc = subprocess.Popen([envoy_binary(), "--config-path", str(tmp_path / "envoy.yaml"),
                             "--concurrency", "1", "--disable-hot-restart"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        info = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/server_info", timeout=2) as response:
                    info = json.load(response)
                break
            except OSError:
                time.sleep(0.1)
        assert info is not None, proc.stderr.read().decode() if proc.poll() is not None else "no admin"
    finally:
        proc.terminate()
        proc.wait(10)
    node = info["node"]
    assert node["id"] == f"{pod_env['POD_NAME']}.{EXAMPLE_NAMESPACE}"
    assert node["cluster"] == f"echo.{EXAMPLE_NAMESPACE}"
    assert node["metadata"]["pod"] == pod_env["POD_NAME"]
    assert node["metadata"]["pod_ip"] == pod_env["POD_IP"]
    assert node["metadata"]["namespace"] == EXAMPLE_NAMESPACE
    assert node["metadata"]["service_account"] == "echo"
    assert node["metadata"]["inbound_port"] == "15006"
    assert node["metadata"]["interception"] == "capture"


# Autoscaling on load reports (manifests/autoscaling) -------------------------------------------

# KEDA's ScaledObject (keda.sh/v1alpha1), the fields its documentation gives for the
# Prometheus scaler: https://keda.sh/docs/latest/reference/scaledobject-spec/
KEDA_SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                  "apiVersion": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer"}, "pollingInterval": {"type": "integer"},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {
                        "type": {"type": "string"},
                        "metadata": {"type": "object", "additionalProperties": {"type": "string"},
                                     "required": ["serverAddress", "query", "threshold"]},
                    }}},
            },
        },
    },
}


def _exported_load_metrics() -> dict[str, set[str]]:
    """Sample name -> label names, as the server exports them for a reported Service."""
    from xds_server.load_reports import LoadAggregator
    from xds_server.model.identity import ProxyClaim
    from xds_server.model.mesh import ServiceKey
    from xds_server.translate.names import cluster_name
    from xds_server.xds.lrs import ClusterLoad

    load = LoadAggregator(None, 10.0)
    claim = ProxyClaim(node_id="c-0.mesh-demo", namespace="mesh-demo", service_account="c", pod="c-0")
    load.report(claim, [ClusterLoad(cluster_name(ServiceKey("mesh-demo", "echo"), 80), 10.0, 5, 1, 6, 1)])
    return {sample.name: set(sample.labels) for family in load.collect() for sample in family.samples}


def _autoscaling(name: str) -> dict[str, Any]:
    return yaml.safe_load((MANIFESTS / "autoscaling" / name).read_text())


def test_autoscaling_reads_metrics_the_server_exports() -> None:
    """The adapter rules, the HPA and the KEDA queries name series the server really exports,
    by the labels it puts on them, and target the example's echo Service and Deployment."""
    exported = _exported_load_metrics()
    rules = yaml.safe_load(_autoscaling("prometheus-adapter-rules.yaml")["data"]["config.yaml"])["rules"]
    served: set[str] = set()
    for rule in rules:
        pattern = re.search(r"__name__=~\"([^\"]+)\"", rule["seriesQuery"])
        names = ({n for n in exported if re.fullmatch(pattern.group(1), n)} if pattern
                 else {rule["seriesQuery"].split("{", 1)[0]})
        assert names and names <= set(exported), rule["seriesQuery"]
        for name in names:
            assert set(rule["resources"]["overrides"]) <= exported[name]
            served.add(re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), name))
        for metric in re.findall(r"xds_server_\w+", rule["metricsQuery"]):
            assert metric in exported, metric
    assert {"requests_per_second", "requests_in_flight_per_endpoint", "error_ratio"} <= served
    hpa = _autoscaling("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "echo"
    for metric in hpa["spec"]["metrics"]:
        assert metric["object"]["metric"]["name"] in served
        assert metric["object"]["describedObject"] == {"apiVersion": "v1", "kind": "Service", "name": "echo"}
    keda = _autoscaling("keda/scaledobject.yaml")
    for trigger in keda["spec"]["triggers"]:
        query = trigger["metadata"]["query"]
        for metric in re.findall(r"xds_server_\w+", query):
            assert metric in exported and {"namespace", "service"} <= exported[metric]
        assert 'namespace="mesh-demo"' in query and 'service="echo"' in query
    example = [doc for path, doc in DOCUMENTS if path.startswith("example/")]
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "echo" for d in example)
    assert any(d["kind"] == "Deployment" and d["metadata"]["name"] == "echo" for d in example)


def test_workers_match_the_cpu_limit_and_have_shared_state() -> None:
    container = server_container()
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["XDS_SERVER_WORKERS"]) == int(container["resources"]["limits"]["cpu"])
    assert env["XDS_SERVER_REDIS_URL"] and env["XDS_SERVER_STATE_KEY_FILE"]  # --workers needs both
