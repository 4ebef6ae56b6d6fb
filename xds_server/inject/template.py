"""The pod patch: what injection adds to a pod (or a workload's pod template). Pure: a dict in,
a new dict out, nothing else read or written.

A pod gets, in this order at the head of its init containers (so the pod's own init containers
already run inside the mesh, as with Istio's native sidecars):

1. `xds-init`: `xds-server iptables ...`, the capture rules of capture/rules.py for this pod's
   ports, proxy UID/GID and the exclusions its annotations ask for. Root with NET_ADMIN and
   NET_RAW only; it exits, and a rule the kernel refuses fails it (the pod never runs
   uncaptured). Left out for pods in the explicit interception mode.
2. `xds-agent` (pods injected with a token, the default): the workload agent, a native
   sidecar as the proxy UID (`xds-server agent`). With the pod's projected service-account
   token (audience `xds-server`, re-read at every renewal) it obtains the pod's X.509-SVID
   over TLS from the server's certificate service, with a key generated in the pod, writes it
   into the memory-backed `xds-proxy` volume and renews it at half-life. Its startup probe
   (`/healthz/ready`, a valid certificate on disk) holds Envoy back until the files exist.
3. `envoy`: the sidecar, a native sidecar (an init container with `restartPolicy: Always`,
   Kubernetes >= 1.29), running as the proxy UID with no capabilities. It writes its own
   bootstrap with `xds-server bootstrap` (pod name, IP, namespace and service account from the
   downward API) into a memory-backed emptyDir and execs Envoy on it. Its startup probe holds
   the app containers back until Envoy has its first config (Envoy's `/ready` through the
   bootstrap's readiness listener, `--readiness-port`).

With the agent, Envoy's bootstrap (`bootstrap --tls`) connects to the server's mutual-TLS
port with the agent's certificate (file-based SDS: renewals apply without a restart); Envoy
never sees the token. Without a token (`token_audience` empty: a lab server trusting node
metadata) there is no agent and Envoy uses the plaintext address.

Plus the volumes they use (`xds-proxy`, and `xds-token`: a projected service-account token for
the server's audience, mounted into the agent only) and the annotation
`sidecar.xds-server.io/status` recording the names added, so that injecting again first takes
exactly those out: injection is idempotent, and a re-run with new settings updates the pod.

Skipped, unchanged: pods that opt out (`sidecar.xds-server.io/inject: "false"`), host-network
pods (their rules would capture the node), and pods that already run a proxy container of
their own (a name in k8s_objects.SIDECAR_CONTAINERS).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..capture.rules import CaptureSettings, parse_cidrs, parse_ports
from ..config import ConfigError
from ..model.mesh import ENVOY_ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT
from ..sources.k8s_objects import (
    INBOUND_PORT_ANNOTATION,
    INJECT_ANNOTATION,
    INTERCEPTION_ANNOTATION,
    OUTBOUND_PORT_ANNOTATION,
    SIDECAR_CONTAINERS,
)
from .settings import VERSION, InjectorSettings

__all__ = [
    "AGENT_CONTAINER",
    "CAPTURE_ANNOTATIONS",
    "INIT_CONTAINER",
    "SIDECAR_CONTAINER",
    "STATUS_ANNOTATION",
    "InjectionError",
    "Outcome",
    "capture_command",
    "inject_pod",
]

STATUS_ANNOTATION = "sidecar.xds-server.io/status"
INIT_CONTAINER = "xds-init"
SIDECAR_CONTAINER = "envoy"  # one of k8s_objects.SIDECAR_CONTAINERS: the server knows it
AGENT_CONTAINER = "xds-agent"
PROXY_VOLUME = "xds-proxy"
TOKEN_VOLUME = "xds-token"
PROXY_DIR = "/etc/xds-proxy"
TOKEN_DIR = "/var/run/secrets/xds-server/tokens"
TOKEN_FILE = f"{TOKEN_DIR}/token"
CERT_DIR = f"{PROXY_DIR}/certs"  # the agent writes, Envoy reads (file-based SDS)
READINESS_PATH = "/healthz/ready"
_OURS = frozenset({INIT_CONTAINER, AGENT_CONTAINER, SIDECAR_CONTAINER, PROXY_VOLUME, TOKEN_VOLUME})

_TRAFFIC = "traffic.sidecar.xds-server.io/"
# Pod annotations -> `xds-server iptables` options (Istio's traffic.sidecar.istio.io/* names).
CAPTURE_ANNOTATIONS = {
    f"{_TRAFFIC}includeOutboundIPRanges": "--include-outbound-cidrs",
    f"{_TRAFFIC}excludeOutboundIPRanges": "--exclude-outbound-cidrs",
    f"{_TRAFFIC}includeOutboundPorts": "--include-outbound-ports",
    f"{_TRAFFIC}excludeOutboundPorts": "--exclude-outbound-ports",
    f"{_TRAFFIC}includeInboundPorts": "--include-inbound-ports",
    f"{_TRAFFIC}excludeInboundPorts": "--exclude-inbound-ports",
}
# The bootstrap, then Envoy on it. "$@" are the container's args (expanded by the kubelet:
# $(POD_NAME) ...), so no value is ever parsed by the shell. umask: the file holds the token.
_SIDECAR_SCRIPT = (
    'umask 077 && xds-server bootstrap "$@" > {dir}/envoy.yaml && '
    "exec envoy --config-path {dir}/envoy.yaml --concurrency {concurrency} "
    "--log-level {log_level} --disable-hot-restart"
)


class InjectionError(ValueError):
    """The pod cannot be injected; `field` is the path of the offending value in the pod
    (`metadata.annotations[...]`, `spec.containers[1].name`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Outcome:
    """What `inject_pod` did: `injected`, or why not (`skipped`)."""

    injected: bool
    reason: str = ""


def _mapping(value: Any, field: str, *, required: bool = False) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise InjectionError(field, "missing" if value is None else
                             f"must be a mapping, not {type(value).__name__}")
    return value


def _named_list(value: Any, field: str, *, required: bool = False) -> list[dict[str, Any]]:
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise InjectionError(field, "missing" if value is None else
                             "must be a non-empty list" if required else
                             f"must be a list, not {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise InjectionError(f"{field}[{i}]", "must be a mapping")
        if not isinstance(item.get("name"), str) or not item["name"]:
            raise InjectionError(f"{field}[{i}].name", "missing")
    return value


def _annotation_field(key: str) -> str:
    return f"metadata.annotations[{key}]"


def _port_annotation(annotations: Mapping[str, str], key: str, default: int) -> int:
    value = annotations.get(key)
    if value is None:
        return default
    text = str(value).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise InjectionError(_annotation_field(key), f"{value!r} is not a port (1-65535)")
    return int(text)


def _capture_options(annotations: Mapping[str, str], settings: InjectorSettings,
                     inbound: int, outbound: int) -> list[str]:
    """The `xds-server iptables` options for this pod, checked with the command's own parser
    (CaptureSettings.from_options): what would fail the init container fails injection."""
    options: dict[str, str] = {}
    for key, option in CAPTURE_ANNOTATIONS.items():
        if key not in annotations:
            continue
        value = str(annotations[key])
        try:
            if option.endswith("-cidrs"):
                networks = parse_cidrs(value, key)
                options[option] = "*" if networks is None else ",".join(str(n) for n in networks)
            else:
                ports = parse_ports(value, key)
                options[option] = "*" if ports is None else ",".join(str(p) for p in ports)
        except ConfigError as err:
            raise InjectionError(_annotation_field(key), str(err).removeprefix(f"{key}: ")) from None
    # The kubelet's probes of the sidecar reach its readiness port directly.
    excluded = [p for p in (options.get("--exclude-inbound-ports") or "").split(",") if p]
    probed = [settings.readiness_port] + ([settings.agent_ready_port] if settings.token_audience else [])
    for port in reversed(probed):
        if str(port) not in excluded:
            excluded.insert(0, str(port))
    options["--exclude-inbound-ports"] = ",".join(excluded)
    argv = ["--outbound-port", str(outbound), "--inbound-port", str(inbound),
            "--proxy-uid", str(settings.proxy_uid), "--proxy-gid", str(settings.proxy_gid)]
    for option in CAPTURE_ANNOTATIONS.values():  # a fixed order: equal pods, equal commands
        if option in options:
            argv += [option, options[option]]
    try:
        CaptureSettings.from_options(
            outbound_port=outbound, inbound_port=inbound, proxy_uid=settings.proxy_uid,
            proxy_gid=settings.proxy_gid,
            **{o.removeprefix("--").replace("-", "_"): v for o, v in options.items()})
    except ConfigError as err:
        for key, option in CAPTURE_ANNOTATIONS.items():
            if str(err).startswith(option) and key in annotations:
                raise InjectionError(_annotation_field(key), str(err)) from None
        raise InjectionError("metadata.annotations", str(err)) from None
    return argv


def capture_command(pod: Mapping[str, Any], settings: InjectorSettings) -> list[str]:
    """The capture init container's command for `pod` (its annotations and ports)."""
    annotations = _mapping(_mapping(pod.get("metadata"), "metadata").get("annotations"),
                           "metadata.annotations")
    inbound = _port_annotation(annotations, INBOUND_PORT_ANNOTATION, INBOUND_PORT)
    outbound = _port_annotation(annotations, OUTBOUND_PORT_ANNOTATION, OUTBOUND_PORT)
    return ["xds-server", "iptables", *_capture_options(annotations, settings, inbound, outbound)]


def _env() -> list[dict[str, Any]]:
    def field_ref(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}

    return [field_ref("POD_NAME", "metadata.name"), field_ref("POD_NAMESPACE", "metadata.namespace"),
            field_ref("POD_IP", "status.podIP"),
            field_ref("SERVICE_ACCOUNT", "spec.serviceAccountName")]


def _probe(settings: InjectorSettings, *, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": READINESS_PATH, "port": settings.readiness_port},
            "periodSeconds": period, "timeoutSeconds": 3, "failureThreshold": failures}


def _sidecar(settings: InjectorSettings, labels: Mapping[str, str], inbound: int, outbound: int,
             interception: str) -> dict[str, Any]:
    args = ["--namespace", "$(POD_NAMESPACE)", "--service-account", "$(SERVICE_ACCOUNT)",
            "--pod", "$(POD_NAME)", "--pod-ip", "$(POD_IP)"]
    if settings.token_audience:  # mutual TLS with the agent's certificate
        args += ["--tls", "--cert-dir", CERT_DIR, "--xds-address", settings.xds_tls_address,
                 "--server-name", settings.server_name]
    else:
        args += ["--xds-address", settings.xds_address]
    args += ["--admin-address", f"127.0.0.1:{ENVOY_ADMIN_PORT}",
             "--inbound-port", str(inbound), "--outbound-port", str(outbound),
             "--readiness-port", str(settings.readiness_port), "--interception", interception]
    for key in sorted(labels):
        # $ cannot occur in a label; the kubelet would expand $(...) in args otherwise.
        args += ["--label", f"{key}={labels[key]}"]
    mounts: list[dict[str, Any]] = [{"name": PROXY_VOLUME, "mountPath": PROXY_DIR}]
    script = _SIDECAR_SCRIPT.format(dir=PROXY_DIR, concurrency=settings.concurrency,
                                    log_level=settings.log_level)
    return {
        "name": SIDECAR_CONTAINER,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["/bin/sh", "-c", script, "xds-proxy"],
        "args": args,
        "env": _env(),
        # The app starts once Envoy has its first config (a native sidecar's startup probe
        # holds the next containers); readiness follows Envoy's /ready afterwards.
        "startupProbe": _probe(settings, period=1, failures=600),
        "readinessProbe": _probe(settings, period=5, failures=3),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"cpu": "2", "memory": "1Gi"}},
        "securityContext": {
            "runAsUser": settings.proxy_uid, "runAsGroup": settings.proxy_gid,
            "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    }


def _agent(settings: InjectorSettings) -> dict[str, Any]:
    probe = {"httpGet": {"path": READINESS_PATH, "port": settings.agent_ready_port},
             "timeoutSeconds": 3}
    return {
        "name": AGENT_CONTAINER,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": ["xds-server", "agent"],
        # First contact with the token on the tokens-over-TLS port; renewals with the
        # certificate on the mutual-TLS port (the token again if that is refused).
        "args": ["--cert-dir", CERT_DIR, "--server", settings.ca_address,
                 "--mtls-server", settings.xds_tls_address,
                 "--server-name", settings.server_name, "--token-file", TOKEN_FILE,
                 "--ready-address", f"0.0.0.0:{settings.agent_ready_port}"],
        # The mesh roots for first contact (public; the agent then also trusts its ca.pem).
        "env": [{"name": "XDS_SERVER_CA_PEM", "value": settings.ca_bundle_pem}],
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 600},
        "readinessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "10m", "memory": "48Mi"},
                      "limits": {"cpu": "500m", "memory": "128Mi"}},
        # The proxy UID: its connections to the server are not captured, and Envoy (same
        # UID) reads the key it writes with mode 0600.
        "securityContext": {
            "runAsUser": settings.proxy_uid, "runAsGroup": settings.proxy_gid,
            "runAsNonRoot": True, "allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": PROXY_VOLUME, "mountPath": PROXY_DIR},
                         {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True}],
    }


def _capture_init(settings: InjectorSettings, command: list[str]) -> dict[str, Any]:
    return {
        "name": INIT_CONTAINER,
        "image": settings.capture_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": command,
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"cpu": "500m", "memory": "128Mi"}},
        # Root with the two capabilities iptables needs, nothing else: no privilege
        # escalation, a read-only root (the nft backend takes no lock file).
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,
            "allowPrivilegeEscalation": False, "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def _volumes(settings: InjectorSettings) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        # In memory: the workload's private key lives here.
        {"name": PROXY_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "8Mi"}},
    ]
    if settings.token_audience:
        volumes.append({"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": settings.token_audience,
            "expirationSeconds": settings.token_expiration_seconds, "path": "token"}}]}})
    return volumes


def _strip(pod: dict[str, Any], status: str) -> None:
    """Take out what a previous injection recorded in its status annotation."""
    try:
        recorded = json.loads(status)
        if not isinstance(recorded, dict):
            raise ValueError
    except ValueError:
        raise InjectionError(_annotation_field(STATUS_ANNOTATION),
                             "not the JSON this injector writes: remove it to inject") from None
    spec = pod["spec"]
    for key, section in (("initContainers", "initContainers"), ("containers", "containers"),
                         ("volumes", "volumes")):
        names = set(recorded.get(key) or ()) & _OURS  # never anything else, whatever it says
        if names and isinstance(spec.get(section), list):
            spec[section] = [item for item in spec[section] if item.get("name") not in names]
            if not spec[section] and section != "containers":
                del spec[section]
    del pod["metadata"]["annotations"][STATUS_ANNOTATION]


def inject_pod(pod: Mapping[str, Any], settings: InjectorSettings, *,
               reinject: bool = True) -> tuple[dict[str, Any], Outcome]:
    """A copy of `pod` (a Pod or a pod template: `metadata` and `spec`) with the sidecar, and
    what was done. An already injected pod is injected again from scratch (`reinject`), or
    left as it is. Raises InjectionError naming the field of what prevents injection."""
    out = copy.deepcopy(dict(pod))
    metadata = out["metadata"] = _mapping(out.get("metadata"), "metadata")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    for key, value in annotations.items():
        if not isinstance(value, str):
            raise InjectionError(_annotation_field(str(key)), "annotation values are strings")
    labels = _mapping(metadata.get("labels"), "metadata.labels")
    spec = _mapping(out.get("spec"), "spec", required=True)
    _named_list(spec.get("containers"), "spec.containers", required=True)
    _named_list(spec.get("initContainers"), "spec.initContainers")
    _named_list(spec.get("volumes"), "spec.volumes")

    inject = annotations.get(INJECT_ANNOTATION)
    if inject not in (None, "true", "false"):
        raise InjectionError(_annotation_field(INJECT_ANNOTATION),
                             f'expected "true" or "false", got {inject!r}')
    if inject == "false" or labels.get(INJECT_ANNOTATION) == "false":
        # the label too: the webhook configuration's objectSelector filters on it
        return out, Outcome(False, f'{INJECT_ANNOTATION}: "false"')
    if spec.get("hostNetwork") is True:
        return out, Outcome(False, "hostNetwork: the capture rules would apply to the node")
    if STATUS_ANNOTATION in annotations:
        if not reinject:
            return out, Outcome(False, f"already injected ({STATUS_ANNOTATION})")
        metadata["annotations"] = annotations
        _strip(out, annotations[STATUS_ANNOTATION])
        annotations = metadata["annotations"]
    for section in ("initContainers", "containers"):
        for item in spec.get(section) or ():
            if item["name"] in SIDECAR_CONTAINERS or item["name"] in (INIT_CONTAINER, AGENT_CONTAINER):
                return out, Outcome(False, f"the pod already has a container {item['name']!r}")
    for volume in spec.get("volumes") or ():
        if volume["name"] in (PROXY_VOLUME, TOKEN_VOLUME):
            raise InjectionError("spec.volumes", f"the name {volume['name']!r} is the injector's")

    inbound = _port_annotation(annotations, INBOUND_PORT_ANNOTATION, INBOUND_PORT)
    outbound = _port_annotation(annotations, OUTBOUND_PORT_ANNOTATION, OUTBOUND_PORT)
    interception = annotations.get(INTERCEPTION_ANNOTATION, "capture")
    if interception not in ("capture", "explicit"):
        raise InjectionError(_annotation_field(INTERCEPTION_ANNOTATION),
                             f'expected "capture" or "explicit", got {interception!r}')
    if settings.token_audience and settings.agent_ready_port in (inbound, outbound, ENVOY_ADMIN_PORT):
        raise InjectionError(_annotation_field(INBOUND_PORT_ANNOTATION if
                                               settings.agent_ready_port == inbound else
                                               OUTBOUND_PORT_ANNOTATION),
                             f"the workload agent's readiness port is {settings.agent_ready_port}")
    if settings.readiness_port in (inbound, outbound, ENVOY_ADMIN_PORT):
        raise InjectionError(_annotation_field(INBOUND_PORT_ANNOTATION if
                                               settings.readiness_port == inbound else
                                               OUTBOUND_PORT_ANNOTATION),
                             f"the sidecar's readiness port is {settings.readiness_port}")
    added_init: list[dict[str, Any]] = []
    if interception == "capture":
        command = ["xds-server", "iptables",
                   *_capture_options(annotations, settings, inbound, outbound)]
        added_init.append(_capture_init(settings, command))
    elif inbound == outbound:
        raise InjectionError(_annotation_field(OUTBOUND_PORT_ANNOTATION),
                             f"the same port as the inbound port ({inbound})")
    if settings.token_audience:
        added_init.append(_agent(settings))
    added_init.append(_sidecar(settings, {str(k): str(v) for k, v in labels.items()},
                               inbound, outbound, interception))
    added_volumes = _volumes(settings)
    spec["initContainers"] = added_init + list(spec.get("initContainers") or [])
    spec["volumes"] = list(spec.get("volumes") or []) + added_volumes
    status = {
        "version": VERSION,
        "initContainers": [c["name"] for c in added_init],
        "containers": [],
        "volumes": [v["name"] for v in added_volumes],
    }
    metadata["annotations"] = {**annotations,
                               STATUS_ANNOTATION: json.dumps(status, separators=(",", ":"))}
    return out, Outcome(True)
