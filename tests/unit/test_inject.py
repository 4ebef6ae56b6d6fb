"""Sidecar injection (`xds-server inject`, xds_server/inject/): every workload kind gets the
capture init container and the native Envoy sidecar, the results are valid Kubernetes objects,
the commands in them are ones the real CLI accepts, and injection is idempotent, respects
opt-outs and refuses bad input naming the document and the field."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from xds_server.capture.rules import CaptureSettings, nat_rules
from xds_server.cli import main
from xds_server.inject.settings import InjectorSettings
from xds_server.inject.template import (
    AGENT_CONTAINER,
    INIT_CONTAINER,
    SIDECAR_CONTAINER,
    STATUS_ANNOTATION,
    InjectionError,
    capture_command,
    inject_pod,
)
from xds_server.inject.workloads import DocumentError, inject_documents, template_path
from xds_server.sources import k8s_objects

KUBERNETES_VERSION = "1.31.0"  # as tests/unit/test_manifests.py: native sidecars are on


def _mesh_roots() -> str:
    """A real root certificate (the mesh roots the agent trusts at first contact)."""
    import tempfile

    from xds_server.ca.authority import CertificateAuthority

    with tempfile.TemporaryDirectory() as directory:
        return CertificateAuthority(Path(directory)).trust_bundle_pem.decode()


BUNDLE = _mesh_roots()
SETTINGS = InjectorSettings(ca_bundle_pem=BUNDLE)

APP = {
    "metadata": {"labels": {"app": "api", "version": "v1"}},
    "spec": {
        "serviceAccountName": "api",
        "containers": [{
            "name": "api", "image": "registry.example/api:1.2.3",
            "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}],
        }],
        "initContainers": [{"name": "migrate", "image": "registry.example/api:1.2.3",
                            "command": ["migrate"]}],
        "volumes": [{"name": "data", "emptyDir": {}}],
    },
}


def workload(kind: str, name: str = "api", template: dict[str, Any] | None = None) -> dict[str, Any]:
    template = copy.deepcopy(template or APP)
    selector = {"matchLabels": {"app": "api"}}
    meta = {"name": name, "namespace": "shop"}
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, **template["metadata"]},
                "spec": template["spec"]}
    if kind == "Job":
        template["spec"]["restartPolicy"] = "Never"
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
                "spec": {"template": template}}
    if kind == "CronJob":
        template["spec"]["restartPolicy"] = "OnFailure"
        return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta,
                "spec": {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}}}
    spec: dict[str, Any] = {"selector": selector, "template": template}
    if kind == "StatefulSet":
        spec["serviceName"] = "api"
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec}


KINDS = ["Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob"]


def pod_template(obj: dict[str, Any]) -> dict[str, Any]:
    path = template_path(obj)
    assert path is not None
    for key in path:
        obj = obj[key]
    return obj


def container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in pod["spec"]["initContainers"] if c["name"] == name]
    return found


def run_inject(text: str, *args: str, bundle: bool = True) -> tuple[int, str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as roots:
        roots.write(BUNDLE)
        roots.flush()
        extra = ["--ca-bundle", roots.name] if bundle else []
        result = CliRunner().invoke(main, ["inject", "-f", "-", *extra, *args], input=text)
    return result.exit_code, result.stdout, result.stderr


# Every kind -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_workload_kind_is_injected_and_stays_valid(kind: str) -> None:
    original = workload(kind)
    code, out, err = run_inject(yaml.safe_dump(original))
    assert code == 0, err
    (injected,) = list(yaml.safe_load_all(out))
    kubernetes_validate.validate(injected, KUBERNETES_VERSION, strict=True)
    before, after = pod_template(original), pod_template(injected)
    names = [c["name"] for c in after["spec"]["initContainers"]]
    # capture first, then the agent and the sidecar, then the pod's own init containers
    # (already meshed)
    assert names == [INIT_CONTAINER, AGENT_CONTAINER, SIDECAR_CONTAINER, "migrate"]
    assert after["spec"]["containers"] == before["spec"]["containers"]  # the app untouched
    assert after["spec"]["initContainers"][3:] == before["spec"]["initContainers"]
    assert after["spec"]["volumes"][0] == before["spec"]["volumes"][0]
    status = json.loads(after["metadata"]["annotations"][STATUS_ANNOTATION])
    assert status["initContainers"] == [INIT_CONTAINER, AGENT_CONTAINER, SIDECAR_CONTAINER]
    assert status["volumes"] == ["xds-proxy", "xds-token"]
    # everything outside the pod template is as it was
    for key in ("apiVersion", "kind", "metadata"):
        if kind != "Pod":
            assert injected[key] == original[key]


def test_the_sidecar_is_a_locked_down_native_sidecar() -> None:
    pod, outcome = inject_pod(APP, SETTINGS)
    assert outcome.injected
    init, agent, sidecar = pod["spec"]["initContainers"][:3]
    locked_down = {
        "runAsUser": 1337, "runAsGroup": 1337, "runAsNonRoot": True,
        "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"] == locked_down
    # The agent: a native sidecar too, as the proxy UID (its traffic is not captured), the
    # only container with the token; its startup probe holds Envoy back until the files exist.
    assert agent["restartPolicy"] == "Always"
    assert agent["securityContext"] == locked_down
    assert agent["startupProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15020}
    assert {m["name"] for m in agent["volumeMounts"]} == {"xds-proxy", "xds-token"}
    assert {m["name"] for m in sidecar["volumeMounts"]} == {"xds-proxy"}
    assert {e["name"]: e["value"] for e in agent["env"]} == {"XDS_SERVER_CA_PEM": BUNDLE}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    assert set(sidecar["resources"]["requests"]) == {"cpu", "memory"}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert env == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                   "POD_IP": "status.podIP", "SERVICE_ACCOUNT": "spec.serviceAccountName"}
    assert "restartPolicy" not in init  # it runs once, before everything
    assert init["securityContext"] == {
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "allowPrivilegeEscalation": False,
        "privileged": False, "readOnlyRootFilesystem": True,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
    }
    (token,) = [v for v in pod["spec"]["volumes"] if v["name"] == "xds-token"]
    assert token["projected"]["sources"] == [{"serviceAccountToken": {
        "audience": "xds-server", "expirationSeconds": 43200, "path": "token"}}]


def test_the_server_sees_an_injected_pod_as_meshed_with_the_apps_ports() -> None:
    pod, _ = inject_pod(APP, SETTINGS)
    obj = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {**pod["metadata"], "name": "api-0", "namespace": "shop"},
           "spec": pod["spec"], "status": {"podIP": "10.0.0.7"}}
    workload = k8s_objects.convert(obj)
    assert workload.meshed and workload.capture
    assert workload.service_account == "api"
    assert sorted(port for _, port in workload.container_ports) == [8080, 9090]


# The commands are ones the real CLI takes -----------------------------------------------------


def _init_command(pod: dict[str, Any]) -> list[str]:
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == INIT_CONTAINER]
    assert "args" not in init
    return list(init["command"])


ANNOTATED = copy.deepcopy(APP)
ANNOTATED["metadata"]["annotations"] = {
    "traffic.sidecar.xds-server.io/excludeOutboundIPRanges": "169.254.169.254, 10.96.0.0/12",
    "traffic.sidecar.xds-server.io/includeOutboundIPRanges": "*",
    "traffic.sidecar.xds-server.io/excludeOutboundPorts": "5432",
    "traffic.sidecar.xds-server.io/excludeInboundPorts": "9090",
    "traffic.sidecar.xds-server.io/includeInboundPorts": "*",
    "traffic.sidecar.xds-server.io/includeOutboundPorts": "*",
}


@pytest.mark.parametrize("template", [APP, ANNOTATED], ids=["plain", "annotated"])
def test_the_init_container_runs_exactly_the_capture_command_the_cli_accepts(
        template: dict[str, Any]) -> None:
    pod, _ = inject_pod(template, SETTINGS)
    command = _init_command(pod)
    assert command == capture_command(template, SETTINGS)
    assert command[:2] == ["xds-server", "iptables"]
    # the real parser: every option exists and every value is accepted
    context = main.make_context("xds-server", command[1:])
    with context:
        sub = main.get_command(context, "iptables")
        assert sub is not None
        parsed = sub.make_context("iptables", command[2:], parent=context).params
    options = {k: v for k, v in parsed.items() if k not in ("dry_run", "cleanup")}
    settings = CaptureSettings.from_options(**options)
    assert (settings.outbound_port, settings.inbound_port) == (15001, 15006)
    assert (settings.proxy_uid, settings.proxy_gid) == (1337, 1337)
    # the kubelet's probes reach Envoy and the agent directly
    assert {15021, 15020} <= set(settings.exclude_inbound_ports)
    # and the command itself, with --dry-run, prints the rules capture/rules.py makes
    result = CliRunner().invoke(main, [*command[1:], "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == nat_rules(settings)
    if template is ANNOTATED:
        assert [str(n) for n in settings.exclude_outbound_cidrs] == ["169.254.169.254/32",
                                                                     "10.96.0.0/12"]
        assert settings.exclude_outbound_ports == (5432,)
        assert settings.exclude_inbound_ports == (15021, 15020, 9090)
        assert "-A XDS_OUTPUT -d 169.254.169.254/32 -j RETURN" in result.output


def test_pod_port_annotations_move_the_sidecar_ports_everywhere() -> None:
    template = copy.deepcopy(APP)
    template["metadata"]["annotations"] = {"xds-server.io/inbound-port": "16006",
                                           "xds-server.io/outbound-port": "16001"}
    pod, _ = inject_pod(template, SETTINGS)
    command = _init_command(pod)
    assert command[command.index("--inbound-port") + 1] == "16006"
    assert command[command.index("--outbound-port") + 1] == "16001"
    args = container(pod, SIDECAR_CONTAINER)["args"]
    assert args[args.index("--inbound-port") + 1] == "16006"
    assert args[args.index("--outbound-port") + 1] == "16001"


def test_explicit_interception_gets_the_sidecar_without_capture() -> None:
    template = copy.deepcopy(APP)
    template["metadata"]["annotations"] = {"sidecar.xds-server.io/interception": "explicit"}
    pod, _ = inject_pod(template, SETTINGS)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [AGENT_CONTAINER, SIDECAR_CONTAINER,
                                                                  "migrate"]
    args = container(pod, SIDECAR_CONTAINER)["args"]
    assert args[args.index("--interception") + 1] == "explicit"


def expand(text: str, env: dict[str, str]) -> str:
    """$(VAR) as the kubelet expands it in command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), text)


@pytest.mark.envoy
def test_the_sidecar_writes_a_bootstrap_envoy_accepts(tmp_path: Path) -> None:
    """The agent's and the sidecar's own args, expanded as the kubelet would, through the real
    `xds-server agent` parser and `xds-server bootstrap`: the pod's identity, mutual TLS from
    the agent's directory (no token in the bootstrap), the readiness listener, and Envoy
    validates it with the agent's files in place."""
    from tests.support.envoy import envoy_binary
    from xds_server.ca.certdir import write_generation, write_sds_files

    pod, _ = inject_pod(APP, SETTINGS)
    agent = container(pod, AGENT_CONTAINER)
    context = main.make_context("xds-server", list(agent["command"][1:]) + list(agent["args"]))
    with context:
        sub = main.get_command(context, "agent")
        assert sub is not None
        params = sub.make_context("agent", list(agent["args"]), parent=context).params
    assert str(params["cert_dir"]) == "/etc/xds-proxy/certs"
    assert params["server"] == "xds-server.xds-system.svc:15013"
    assert str(params["token_file"]) == "/var/run/secrets/xds-server/tokens/token"

    sidecar = container(pod, SIDECAR_CONTAINER)
    command = sidecar["command"]
    assert command[:2] == ["/bin/sh", "-c"]
    script = command[2]
    assert script.startswith('umask 077 && xds-server bootstrap "$@" > /etc/xds-proxy/envoy.yaml')
    assert "exec envoy --config-path /etc/xds-proxy/envoy.yaml" in script
    env = {"POD_NAME": "api-7d9f8-abcde", "POD_NAMESPACE": "shop", "POD_IP": "10.244.0.12",
           "SERVICE_ACCOUNT": "api"}
    args = [expand(a, env) for a in sidecar["args"]]
    assert "--token-file" not in args
    assert args[args.index("--xds-address") + 1] == "xds-server.xds-system.svc:15012"
    cert_dir = tmp_path / "certs"  # where the agent writes, here with real files
    cert_dir.mkdir()
    from xds_server.ca.authority import CertificateAuthority
    from xds_server.ca.svid import SvidIssuer
    from xds_server.model.identity import Identity

    authority = CertificateAuthority(tmp_path / "ca")
    svid = SvidIssuer(authority).issue_for_identity(Identity("shop", "api"))
    write_generation(cert_dir, svid.chain_pem, svid.key_pem or b"", authority.trust_bundle_pem)
    write_sds_files(cert_dir)
    args[args.index("--cert-dir") + 1] = str(cert_dir)
    result = CliRunner().invoke(main, ["bootstrap", *args])
    assert result.exit_code == 0, result.output
    bootstrap = yaml.safe_load(result.output)
    node = bootstrap["node"]
    assert node["id"] == "api-7d9f8-abcde.shop"
    assert node["metadata"]["pod_ip"] == "10.244.0.12"
    assert node["metadata"]["service_account"] == "api"
    assert node["metadata"]["labels"] == {"app": "api", "version": "v1"}
    grpc = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"][0]
    assert "initial_metadata" not in grpc
    (xds_cluster, _) = bootstrap["static_resources"]["clusters"]
    tls = xds_cluster["transport_socket"]["typed_config"]
    assert tls["sni"] == "xds-server.xds-system.svc"
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 15021
    path = tmp_path / "envoy.yaml"
    path.write_text(result.output)
    done = subprocess.run([envoy_binary(), "--mode", "validate", "--config-path", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_without_a_token_there_is_no_agent_and_envoy_uses_the_plaintext_address() -> None:
    pod, _ = inject_pod(APP, InjectorSettings(token_audience=""))
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names == [INIT_CONTAINER, SIDECAR_CONTAINER, "migrate"]
    args = container(pod, SIDECAR_CONTAINER)["args"]
    assert "--tls" not in args and args[args.index("--xds-address") + 1].endswith(":15010")
    assert [v["name"] for v in pod["spec"]["volumes"]][-1] == "xds-proxy"


def test_inject_without_the_mesh_roots_names_the_option() -> None:
    code, _, err = run_inject(yaml.safe_dump(workload("Pod")), bundle=False)
    assert code == 2 and "--ca-bundle" in err and "caBundle" in err


# Idempotence and opting out -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_injecting_twice_gives_the_same_object(kind: str) -> None:
    once = run_inject(yaml.safe_dump(workload(kind)))[1]
    twice = run_inject(once)[1]
    assert twice == once


def test_injecting_again_with_new_settings_replaces_what_was_added() -> None:
    first, _ = inject_pod(APP, SETTINGS)
    second, _ = inject_pod(first, InjectorSettings(ca_bundle_pem=BUNDLE, proxy_image="mirror.example/proxy:2"))
    fresh, _ = inject_pod(APP, InjectorSettings(ca_bundle_pem=BUNDLE, proxy_image="mirror.example/proxy:2"))
    assert second == fresh


def test_the_webhook_form_leaves_an_injected_pod_alone() -> None:
    first, _ = inject_pod(APP, SETTINGS)
    again, outcome = inject_pod(first, InjectorSettings(ca_bundle_pem=BUNDLE, proxy_image="other:1"), reinject=False)
    assert again == first and not outcome.injected and "already injected" in outcome.reason


def test_a_forged_status_annotation_never_removes_the_apps_containers() -> None:
    template = copy.deepcopy(APP)
    template["metadata"]["annotations"] = {STATUS_ANNOTATION: json.dumps(
        {"initContainers": ["migrate"], "containers": ["api"], "volumes": ["data"]})}
    pod, outcome = inject_pod(template, SETTINGS)
    assert outcome.injected
    assert [c["name"] for c in pod["spec"]["containers"]] == ["api"]
    assert "migrate" in [c["name"] for c in pod["spec"]["initContainers"]]


@pytest.mark.parametrize("change, reason", [
    ({"metadata": {"annotations": {"sidecar.xds-server.io/inject": "false"}}}, "inject"),
    ({"spec": {"hostNetwork": True}}, "hostNetwork"),
    ({"spec": {"containers": [{"name": "envoy", "image": "envoyproxy/envoy:v1.40.0"}]}}, "envoy"),
])
def test_opted_out_host_network_and_hand_written_sidecars_are_left_alone(
        change: dict[str, Any], reason: str) -> None:
    template = copy.deepcopy(APP)
    for section, values in change.items():
        for key, value in values.items():
            if key == "containers":
                template[section][key] = template[section][key] + value
            else:
                template[section][key] = value
    obj = workload("Deployment", template=template)
    code, out, err = run_inject(yaml.safe_dump(obj))
    assert code == 0, err
    assert yaml.safe_load(out) == obj
    assert "skipped Deployment shop/api: " in err and reason in err


def test_other_kinds_pass_through_unchanged_and_lists_are_walked() -> None:
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
               "spec": {"ports": [{"port": 80}]}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}
    custom = {"apiVersion": "example.com/v1", "kind": "Deployment", "metadata": {"name": "not-apps"},
              "spec": {"template": "whatever"}}
    listed = {"apiVersion": "v1", "kind": "List", "items": [workload("Pod"), service]}
    docs, results = inject_documents(yaml.safe_dump_all([service, config, custom, listed]), SETTINGS)
    assert docs[:3] == [service, config, custom]
    assert docs[3]["items"][1] == service
    assert STATUS_ANNOTATION in docs[3]["items"][0]["metadata"]["annotations"]
    assert [(r.kind, r.outcome is not None and r.outcome.injected) for r in results] == [
        ("Service", False), ("ConfigMap", False), ("Deployment", False), ("Pod", True),
        ("Service", False)]


def test_file_in_file_out(tmp_path: Path) -> None:
    source, target = tmp_path / "in.yaml", tmp_path / "out.yaml"
    source.write_text(yaml.safe_dump_all([workload("Deployment"), workload("Job")]))
    (tmp_path / "roots.pem").write_text(BUNDLE)
    result = CliRunner().invoke(main, ["inject", "-f", str(source), "-o", str(target),
                                       "--ca-bundle", str(tmp_path / "roots.pem")])
    assert result.exit_code == 0, result.output
    assert [d["kind"] for d in yaml.safe_load_all(target.read_text())] == ["Deployment", "Job"]


# Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("kind: Service\n---\nspec: [\n", "document 2: line 4: not valid YAML"),
    ("- just\n- a list\n", "document 1: expected a Kubernetes object (a mapping), got list"),
    (yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment",
                     "metadata": {"name": "api", "namespace": "shop"}, "spec": {}}),
     "document 1 (Deployment shop/api): spec.template: missing"),
    (yaml.safe_dump({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
                     "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": {}}}}}}}),
     "document 1 (CronJob c): spec.jobTemplate.spec.template.spec.containers: must be a non-empty list"),
    (yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                     "spec": {"containers": [{"image": "x:1"}]}}),
     "document 1 (Pod p): spec.containers[0].name: missing"),
    (yaml.safe_dump(workload("StatefulSet", template={
        "metadata": {"annotations": {"traffic.sidecar.xds-server.io/excludeOutboundIPRanges": "10.0.0.0/33"}},
        "spec": {"containers": [{"name": "a", "image": "a:1"}]}})),
     "document 1 (StatefulSet shop/api): spec.template.metadata.annotations"
     "[traffic.sidecar.xds-server.io/excludeOutboundIPRanges]: '10.0.0.0/33' is not an IPv4 address or CIDR"),
    (yaml.safe_dump(workload("Pod", template={
        "metadata": {"annotations": {"traffic.sidecar.xds-server.io/excludeInboundPorts": "80,99999"}},
        "spec": {"containers": [{"name": "a", "image": "a:1"}]}})),
     "document 1 (Pod shop/api): metadata.annotations[traffic.sidecar.xds-server.io/excludeInboundPorts]: "
     "'99999' is not a port (1-65535)"),
    (yaml.safe_dump(workload("Pod", template={
        "metadata": {"annotations": {"sidecar.xds-server.io/inject": "no"}},
        "spec": {"containers": [{"name": "a", "image": "a:1"}]}})),
     "document 1 (Pod shop/api): metadata.annotations[sidecar.xds-server.io/inject]: "
     "expected \"true\" or \"false\", got 'no'"),
])
def test_bad_input_names_the_document_and_the_field(text: str, message: str) -> None:
    code, out, err = run_inject(text)
    assert code == 1 and out == ""
    assert err.startswith(f"Error: <stdin>: {message}") and err.count("\n") == 1
    assert "Traceback" not in err


def test_bad_settings_are_usage_errors() -> None:
    code, _, err = run_inject("", "--xds-address", "nowhere")
    assert code == 2 and "--xds-address" in err


def test_the_pure_function_raises_with_the_field() -> None:
    with pytest.raises(InjectionError) as err:
        inject_pod({"metadata": {}, "spec": {"containers": "x"}}, SETTINGS)
    assert err.value.field == "spec.containers"
    with pytest.raises(DocumentError):
        inject_documents("kind: Pod\napiVersion: v1\nspec: 3\n", SETTINGS)
