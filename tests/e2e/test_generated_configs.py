"""Every config the server generates is one Envoy accepts, and bad input never breaks it.

1. The examples: for every pod of examples/mesh-basic (and examples/demo when present), and a
   pod-less proxy in each namespace, what `xds-server translate` computes (controller +
   `proxy_resources`) passes `envoy --mode validate`, EDS and RDS inlined into
   static_resources (tests/support/envoy.py `validate_static`).
2. Property-based: hypothesis draws meshes (services with http/grpc/tcp ports, endpoints
   ready/serving/terminating across zones, pods with and without sidecars and TCP upstreams,
   HTTPRoutes and GRPCRoutes with matches, filters, weights, timeouts and retries, and
   TrafficPolicies with valid random fields) as the Kubernetes-shaped objects users write.
   Each goes through the same converter as files; everything every proxy would receive
   passes `envoy --mode validate`. Several models share one Envoy run (disjoint namespaces
   and addresses), so the sample stays fast.
3. A running `xds-server serve --source DIR`: invalid YAML and invalid policies are logged
   with file:line, object and field; connected clients keep the last good config (an invalid
   TrafficPolicy edit keeps the old policy's effect); fixing the file applies it.

What the property test found is pinned by small tests of its own: durations Envoy requires
to be positive, endpoint addresses that are not IPs of the slice's family (FQDN slices are
skipped with a warning), and `%` in header values.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2, symbol_database
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.envoy import validate_static
from tests.support.net import free_port, wait_for_port
from tests.support.proxies import verified
from tests.support.xds_client import XdsClient, sotw_resources
from xds_server.bootstrap import SidecarSpec, sidecar_bootstrap
from xds_server.model.store import NAMESPACE, POD, MeshStore
from xds_server.sources.k8s_objects import ObjectError, convert
from xds_server.sources.mesh_files import MeshDirectory
from xds_server.translate.controller import MeshController, proxy_resources
from xds_server.translate.scope import EXPORT_ANNOTATION, TENANT_LABEL
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = [d for d in ("mesh-basic", "demo") if (ROOT / "examples" / d).is_dir()]

# What a real sidecar runs with (the RE2 program size limits user regexes need).
SIDECAR_RUNTIME = {"layered_runtime": sidecar_bootstrap(SidecarSpec("ns", "sa", "pod", "127.0.0.1"))["layered_runtime"]}




def _message_class(type_url: str) -> type[Message]:
    return symbol_database.Default().GetSymbol(type_url.rsplit("/", 1)[-1])


def proxy_node(namespace: str, pod: str, service_account: str = "default", ip: str = "") -> base_pb2.Node:
    """The node `xds-server translate` (and a sidecar bootstrap) presents."""
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": namespace, "service_account": service_account, "pod": pod, "pod_ip": ip})
    return base_pb2.Node(id=f"{pod}.{namespace}", metadata=metadata)


def mesh_proxies(store: MeshStore, spare_ip: Iterable[str]) -> list[base_pb2.Node]:
    """Every pod of the mesh, plus a pod-less proxy (a VM, `translate` without --pod) in each
    namespace, at an address of its own."""
    spare = iter(spare_ip)
    nodes = [
        proxy_node(ns, name, w.service_account, "" if w.ip else next(spare))
        for (ns, name), w in sorted(store.all(POD).items())
    ]
    namespaces = {ns for ns, _ in store.all(POD)} | {name for _, name in store.all(NAMESPACE)}
    namespaces |= {ns for ns, _ in store.all("Service")}
    nodes += [proxy_node(ns, "vm-proxy", "vm", next(spare)) for ns in sorted(namespaces)]
    return nodes


def translate_all(store: MeshStore, controller: MeshController, nodes: list[base_pb2.Node]) -> dict[str, dict[str, Any]]:
    """proxy id -> type -> name -> message, for every proxy (all connected first)."""
    views = [(node.id, controller.view_for(verified(node))) for node in nodes]
    out: dict[str, dict[str, Any]] = {}
    for proxy, view in views:
        out[proxy] = {
            type_url: {r.name: r.unpack(_message_class(type_url)) for r in resources}
            for type_url, resources in proxy_resources(view).items()
        }
    return out


def as_lists(per_type: dict[str, dict[str, Message]]) -> dict[str, list[Message]]:
    return {type_url: list(by_name.values()) for type_url, by_name in per_type.items()}


# ------------------------------------------------------------------------------ examples


@pytest.mark.envoy
@pytest.mark.parametrize("example", EXAMPLES)
def test_every_proxy_config_of_the_example_passes_envoy_validate(example: str) -> None:
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache)
    errors = MeshDirectory(ROOT / "examples" / example, store).load()
    assert not [e for e in errors if e.severity == "error"], [str(e) for e in errors]
    nodes = mesh_proxies(store, (f"127.0.250.{i}" for i in range(1, 250)))
    configs = translate_all(store, controller, nodes)
    assert len(configs) == len(nodes) >= 3
    for proxy, per_type in configs.items():
        listeners = per_type[types.LISTENER]
        assert listeners and per_type[types.CLUSTER] and per_type[types.ROUTE], proxy
        ok, output = validate_static(as_lists(per_type), bootstrap_overrides=SIDECAR_RUNTIME)
        assert ok, f"{example}: {proxy}: envoy --mode validate failed:\n{output}"


# ------------------------------------------------------------------------- property-based

NAMES = ("api", "web", "db", "cache", "auth")
PATHS = ("/", "/api", "/api/v1", "/users/", "/static/img.png", "/a-b_c.d")


def _api_accepts(path: str) -> bool:
    """The Gateway API's own rules for a path match (its CEL validations): no '//', '/./',
    '/../', '%2f' or '#', and no trailing '/.' or '/..'."""
    lowered = path.lower()
    return not any(p in lowered for p in ("//", "/./", "/../", "%2f", "#")) and not path.endswith(("/.", "/.."))


# Also any printable path a user may write that the API accepts (it starts with "/").
paths = st.sampled_from(PATHS) | st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=10
).map(lambda t: "/" + t).filter(_api_accepts)
REGEXES = ("/api/v[0-9]+/.*", "/users/[a-z]+", ".*", "/(foo|bar)/?", r"/items/\d{1,4}")
HEADER_NAMES = ("x-user", "x-env", "X-Canary", "user-agent", "x_under")
GRPC_SERVICES = ("payments.Payments", "helloworld.Greeter", "a.b.c.Svc")
RETRY_ON = ("5xx", "gateway-error", "reset", "connect-failure", "retriable-4xx", "refused-stream",
            "cancelled", "deadline-exceeded", "unavailable", "resource-exhausted", "503")

durations = st.one_of(  # zero included: where the API allows it, it must work
    st.integers(0, 5000).map(lambda n: f"{n}ms"),
    st.integers(0, 300).map(lambda n: f"{n}s"),
    st.sampled_from(["1m", "1m30s", "0.5s", "2h", "1.25s"]),
)
positive_durations = st.one_of(
    st.integers(1, 5000).map(lambda n: f"{n}ms"),
    st.integers(1, 300).map(lambda n: f"{n}s"),
    st.sampled_from(["1m", "1m30s", "0.5s", "1.25s"]),
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12
)
weights = st.integers(0, 1000)


def opt(strategy: st.SearchStrategy) -> st.SearchStrategy:
    return st.none() | strategy


def compact(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != [] and v != {}}


class Model:
    """What has been drawn so far: services and their ports, for references to them."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.namespaces = [f"m{index}-a", f"m{index}-b"]
        self.services: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.docs: list[dict[str, Any]] = []


@st.composite
def service_docs(draw, model: Model) -> None:
    for _ in range(draw(st.integers(1, 4))):
        ns = draw(st.sampled_from(model.namespaces))
        name = draw(st.sampled_from(NAMES))
        if (ns, name) in model.services:
            continue
        numbers = draw(st.lists(
            st.sampled_from([80, 443, 8080, 9090, 5432, 6379]) | st.integers(1, 65535),
            min_size=1, max_size=3, unique=True,
        ))
        ports = []
        for j, number in enumerate(numbers):
            protocol = draw(st.sampled_from(["http", "http2", "grpc", "tcp", "h2c", "kubernetes.io/h2c", "postgresql", None]))
            prefix = draw(st.sampled_from(["http-", "grpc-", "tcp-", ""]))
            port_name = "" if len(numbers) == 1 and draw(st.booleans()) else f"{prefix}p{j}"
            target = draw(st.none() | st.integers(1, 65535) | st.sampled_from(["web", "grpc", "metrics"]))
            ports.append(compact({"name": port_name or None, "port": number, "targetPort": target,
                                  "appProtocol": protocol}))
        annotations = {}
        export = draw(st.sampled_from([None, "*", ".", f".,{model.namespaces[0]}", model.namespaces[1]]))
        if export is not None:
            annotations[EXPORT_ANNOTATION] = export
        model.services[(ns, name)] = ports
        model.docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": compact({"name": name, "namespace": ns, "annotations": annotations}),
            "spec": compact({"ports": ports, "clusterIP": draw(st.sampled_from([None, "None", f"10.96.{model.index}.{len(model.services)}"]))}),
        })


@st.composite
def pod_docs(draw, model: Model) -> None:
    for k in range(draw(st.integers(0, 3))):
        ns = draw(st.sampled_from(model.namespaces))
        name = f"pod-{k}"
        ip = f"10.{model.index}.0.{k + 1}" if draw(st.booleans()) else f"fd00::{model.index}:{k + 1}"
        container_ports = [
            compact({"name": port_name, "containerPort": number})
            for port_name, number in draw(st.lists(
                st.tuples(st.sampled_from(["web", "grpc", "metrics", None]), st.integers(1, 65535)),
                max_size=3, unique_by=lambda t: t[1],
            ))
        ]
        annotations: dict[str, str] = {}
        inject = draw(st.sampled_from(["true", "false", None]))
        if inject is not None:
            annotations["sidecar.xds-server.io/inject"] = inject
        tcp = [(ns_, svc, p["port"]) for (ns_, svc), ports in model.services.items() for p in ports]
        if tcp and draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(tcp), min_size=1, max_size=2, unique=True))
            annotations["xds-server.io/tcp-upstreams"] = ",".join(
                f"{20000 + i}={svc}.{ns_}:{port}" for i, (ns_, svc, port) in enumerate(chosen)
            )
        containers = [compact({"name": "app", "ports": container_ports})]
        if draw(st.booleans()):
            containers.append({"name": "envoy"})
        doc = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": compact({"name": name, "namespace": ns, "labels": {"app": name}, "annotations": annotations}),
            "spec": {"serviceAccountName": draw(st.sampled_from(["default", "sa-1"])), "containers": containers},
            "status": {"podIP": ip},
        }
        model.pods[(ns, name)] = doc
        model.docs.append(doc)


@st.composite
def slice_docs(draw, model: Model) -> None:
    for (ns, name), ports in model.services.items():
        for j in range(draw(st.integers(0, 2))):
            family = draw(st.sampled_from(["IPv4", "IPv6", "FQDN"]))
            slice_ports = [
                compact({"name": p.get("name"), "port": draw(st.integers(1, 65535)),
                         "appProtocol": p.get("appProtocol")})
                for p in ports if draw(st.booleans()) or len(ports) == 1
            ]
            endpoints = []
            local_pods = [(pn, doc) for (pns, pn), doc in model.pods.items() if pns == ns]
            for e in range(draw(st.integers(0, 4))):
                same_family = [
                    (pn, doc) for pn, doc in local_pods
                    if (":" in doc["status"]["podIP"]) == (family == "IPv6") and family != "FQDN"
                ]
                if family == "FQDN":
                    address, target = draw(st.sampled_from(["example.com", "db.internal.corp"])), None
                elif same_family and draw(st.booleans()):
                    pod_name, doc = draw(st.sampled_from(same_family))
                    address, target = doc["status"]["podIP"], {"kind": "Pod", "name": pod_name, "namespace": ns}
                else:
                    address = f"10.{model.index}.9.{e + 1}" if family == "IPv4" else f"fd00::{model.index}:9:{e + 1}"
                    target = None
                conditions = compact({
                    "ready": draw(opt(st.booleans())), "serving": draw(opt(st.booleans())),
                    "terminating": draw(opt(st.booleans())),
                })
                endpoints.append(compact({
                    "addresses": [address], "conditions": conditions, "targetRef": target,
                    "zone": draw(st.sampled_from([None, "zone-a", "zone-b", "us-east-1c"])),
                    "nodeName": draw(st.sampled_from([None, "node-1"])),
                }))
            model.docs.append(compact({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": f"{name}-{j}", "namespace": ns,
                             "labels": {"kubernetes.io/service-name": name}},
                "addressType": family, "ports": slice_ports, "endpoints": endpoints,
            }))


@st.composite
def backend_ref(draw, model: Model, ns: str, weighted: bool = True) -> dict[str, Any]:
    targets = [*model.services, (ns, "ghost")]
    target_ns, name = draw(st.sampled_from(targets))
    ports = [p["port"] for p in model.services.get((target_ns, name), [])]
    port = draw(st.sampled_from(ports) | st.integers(1, 65535)) if ports else draw(opt(st.integers(1, 65535)))
    ref = {"name": name, "namespace": target_ns if target_ns != ns or draw(st.booleans()) else None, "port": port}
    if weighted:
        ref["weight"] = draw(opt(weights))
    return compact(ref)


@st.composite
def header_modifier(draw) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=4, unique_by=str.lower))
    half = len(names) // 2
    return compact({
        "set": [{"name": n, "value": draw(header_values)} for n in names[:half]],
        "add": [{"name": n, "value": draw(header_values)} for n in names[half:]],
        "remove": draw(st.lists(st.sampled_from(HEADER_NAMES), max_size=2, unique=True)),
    })


@st.composite
def value_matches(draw, names: Iterable[str], max_size: int) -> list[dict[str, Any]]:
    out = []
    for name in draw(st.lists(st.sampled_from(list(names)), max_size=max_size, unique=True)):
        if draw(st.booleans()):
            out.append({"name": name, "type": "RegularExpression", "value": draw(st.sampled_from(REGEXES))})
        else:
            out.append(compact({"name": name, "type": draw(st.sampled_from(["Exact", None])), "value": draw(header_values)}))
    return out


@st.composite
def http_match(draw) -> dict[str, Any]:
    kind = draw(st.sampled_from(["Exact", "PathPrefix", "RegularExpression", None]))
    value = draw(st.sampled_from(REGEXES) if kind == "RegularExpression" else paths)
    return compact({
        "path": compact({"type": kind, "value": value}) if draw(st.booleans()) else None,
        "headers": draw(value_matches(HEADER_NAMES, 2)),
        "queryParams": draw(value_matches(("q", "page", "debug"), 1)),
        "method": draw(st.sampled_from([None, "GET", "POST", "DELETE", "PATCH"])),
    })


def path_modifier(kind: str, value: str) -> dict[str, Any]:
    field = "replaceFullPath" if kind == "ReplaceFullPath" else "replacePrefixMatch"
    return {"type": kind, field: value}


@st.composite
def http_rule(draw, model: Model, ns: str) -> dict[str, Any]:
    matches = draw(st.lists(http_match(), max_size=2))
    filters: list[dict[str, Any]] = []
    if draw(st.booleans()):
        filters.append({"type": "RequestHeaderModifier", "requestHeaderModifier": draw(header_modifier())})
    if draw(st.booleans()):
        filters.append({"type": "ResponseHeaderModifier", "responseHeaderModifier": draw(header_modifier())})
    action = draw(st.sampled_from(["forward", "redirect", "rewrite"]))
    prefix_ok = len(matches) <= 1 and all(m.get("path", {}).get("type") in (None, "PathPrefix") for m in matches)
    modifiers = ["ReplaceFullPath", *(["ReplacePrefixMatch"] if prefix_ok else [])]
    if action == "redirect":
        filters.append({"type": "RequestRedirect", "requestRedirect": compact({
            "scheme": draw(st.sampled_from([None, "http", "https"])),
            "hostname": draw(st.sampled_from([None, "example.com", "web.other"])),
            "port": draw(opt(st.integers(1, 65535))),
            "statusCode": draw(st.sampled_from([301, 302, 303, 307, 308])),
            "path": path_modifier(draw(st.sampled_from(modifiers)), draw(paths)) if draw(st.booleans()) else None,
        })})
    elif action == "rewrite":
        filters.append({"type": "URLRewrite", "urlRewrite": compact({
            "hostname": draw(st.sampled_from([None, "rewritten.example"])),
            "path": path_modifier(draw(st.sampled_from(modifiers)), draw(paths)) if draw(st.booleans()) else None,
        })})
    for _ in range(draw(st.integers(0, 1))):
        mirror = {"backendRef": draw(backend_ref(model, ns, weighted=False))}
        choice = draw(st.sampled_from(["none", "percent", "fraction"]))
        if choice == "percent":
            mirror["percent"] = draw(st.integers(0, 100))
        elif choice == "fraction":
            denominator = draw(st.integers(1, 1000))
            mirror["fraction"] = {"numerator": draw(st.integers(0, denominator)), "denominator": denominator}
        filters.append({"type": "RequestMirror", "requestMirror": mirror})
    backends = [] if action == "redirect" else draw(st.lists(backend_ref(model, ns), max_size=3))
    rule: dict[str, Any] = compact({"matches": matches, "filters": filters, "backendRefs": backends})
    if draw(st.booleans()):
        request = draw(opt(durations))
        backend = draw(opt(durations))
        if request and backend and _seconds(backend) > _seconds(request):
            request, backend = backend, request
        rule["timeouts"] = compact({"request": request, "backendRequest": backend})
    if draw(st.booleans()):
        rule["retry"] = compact({
            "attempts": draw(opt(st.integers(0, 10))),
            "codes": draw(st.lists(st.sampled_from([429, 500, 502, 503, 504]), max_size=3)),
            "backoff": draw(opt(durations)),
        })
    return rule


def _seconds(value: str) -> float:
    from xds_server.api.v1alpha1 import parse_duration

    return parse_duration(value)


@st.composite
def grpc_rule(draw, model: Model, ns: str) -> dict[str, Any]:
    matches = []
    for _ in range(draw(st.integers(0, 2))):
        kind = draw(st.sampled_from(["Exact", "RegularExpression", None]))
        if kind == "RegularExpression":
            method = {"type": kind, "service": draw(st.sampled_from(["pay.*", "helloworld\\..*"])), "method": "Say.*"}
        else:
            method = compact({"type": kind, "service": draw(st.sampled_from([None, *GRPC_SERVICES])),
                              "method": draw(st.sampled_from(["Charge", "SayHello", None]))})
            if "service" not in method and "method" not in method:
                method["service"] = GRPC_SERVICES[0]
        matches.append(compact({"method": method, "headers": draw(value_matches(HEADER_NAMES, 1))}))
    filters = []
    if draw(st.booleans()):
        filters.append({"type": "RequestHeaderModifier", "requestHeaderModifier": draw(header_modifier())})
    if draw(st.booleans()):
        filters.append({"type": "RequestMirror", "requestMirror": {"backendRef": draw(backend_ref(model, ns, weighted=False))}})
    return compact({"matches": matches, "filters": filters, "backendRefs": draw(st.lists(backend_ref(model, ns), max_size=2))})


@st.composite
def route_docs(draw, model: Model) -> None:
    for r in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["HTTPRoute", "HTTPRoute", "GRPCRoute"]))
        ns = draw(st.sampled_from(model.namespaces))
        parent_ns, parent = draw(st.sampled_from([*model.services, (ns, "ghost")]))
        ports = [p["port"] for p in model.services.get((parent_ns, parent), [])]
        parent_ref = compact({
            "group": "", "kind": "Service", "name": parent,
            "namespace": parent_ns if parent_ns != ns else None,
            "port": draw(st.sampled_from(ports)) if ports and draw(st.booleans()) else None,
        })
        make_rule = http_rule if kind == "HTTPRoute" else grpc_rule
        rules = draw(st.lists(make_rule(model, ns), max_size=3))
        version = "v1" if draw(st.booleans()) else ("v1beta1" if kind == "HTTPRoute" else "v1alpha2")
        model.docs.append({
            "apiVersion": f"gateway.networking.k8s.io/{version}", "kind": kind,
            "metadata": {"name": f"route-{r}", "namespace": ns,
                         "creationTimestamp": f"2024-01-0{r + 1}T00:00:00Z"},
            "spec": compact({"parentRefs": [parent_ref], "rules": rules}),
        })


@st.composite
def traffic_policy_spec(draw, target: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"targetRef": {"kind": "Service", "name": target}}
    if draw(st.booleans()):
        if draw(st.booleans()):
            spec["loadBalancer"] = {"simple": draw(st.sampled_from(["LEAST_REQUEST", "ROUND_ROBIN", "RANDOM"]))}
        else:
            key = draw(st.sampled_from([
                {"httpHeaderName": "x-user"}, {"httpCookie": "session"}, {"useSourceIp": True},
            ]))
            spec["loadBalancer"] = {"consistentHash": compact({
                **key, "minimumRingSize": draw(opt(st.integers(1, 8_388_608))),
            })}
    if draw(st.booleans()):
        spec["connectionPool"] = compact({
            "tcp": compact({"maxConnections": draw(opt(st.integers(1, 2**32 - 1))),
                            "connectTimeout": draw(opt(positive_durations))}) or None,
            "http": compact({
                "http1MaxPendingRequests": draw(opt(st.integers(1, 2**32 - 1))),
                "http2MaxRequests": draw(opt(st.integers(1, 2**32 - 1))),
                "maxRequestsPerConnection": draw(opt(st.integers(1, 2**32 - 1))),
                "maxRetries": draw(opt(st.integers(0, 2**32 - 1))),
            }) or None,
        })
    if draw(st.booleans()):
        spec["outlierDetection"] = compact({
            "consecutive5xxErrors": draw(opt(st.integers(0, 1000))),
            "consecutiveGatewayErrors": draw(opt(st.integers(0, 1000))),
            "interval": draw(opt(positive_durations)),
            "baseEjectionTime": draw(opt(positive_durations)),
            "maxEjectionPercent": draw(opt(st.integers(0, 100))),
        })
    if draw(st.booleans()):
        spec["retries"] = compact({
            "attempts": draw(st.integers(0, 100)),
            "perTryTimeout": draw(opt(durations)),
            "retryOn": ",".join(draw(st.lists(st.sampled_from(RETRY_ON), min_size=1, max_size=4, unique=True))) if draw(st.booleans()) else None,
        })
    if draw(st.booleans()):
        spec["timeout"] = draw(durations)
    if draw(st.booleans()):
        spec["fault"] = compact({
            "delay": {"percentage": draw(st.floats(0, 100)), "fixedDelay": draw(positive_durations)} if draw(st.booleans()) else None,
            "abort": {"percentage": draw(st.floats(0, 100)), "httpStatus": draw(st.integers(200, 599))} if draw(st.booleans()) else None,
        })
    if draw(st.booleans()):
        spec["rateLimit"] = compact({
            "requests": draw(st.integers(1, 1_000_000)),
            "per": draw(opt(positive_durations)),
            "burst": draw(opt(st.integers(1, 1_000_000))),
        })
    if draw(st.booleans()):
        spec["healthCheck"] = compact({
            "interval": draw(opt(positive_durations)),
            "timeout": draw(opt(positive_durations)),
            "unhealthyThreshold": draw(opt(st.integers(1, 10))),
            "healthyThreshold": draw(opt(st.integers(1, 10))),
            "path": draw(st.sampled_from([None, "/healthz", "/ready?full=1"])),
            "expectedStatuses": draw(st.lists(st.integers(200, 599), min_size=1, max_size=3, unique=True)) if draw(st.booleans()) else None,
        })
    return spec


@st.composite
def policy_docs(draw, model: Model) -> None:
    for p in range(draw(st.integers(0, 2))):
        ns, name = draw(st.sampled_from([*model.services, (model.namespaces[0], "ghost")]))
        model.docs.append({
            "apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": f"policy-{p}", "namespace": ns},
            "spec": draw(traffic_policy_spec(name)),
        })


@st.composite
def namespace_docs(draw, model: Model) -> None:
    for ns in model.namespaces:
        tenant = draw(st.sampled_from([None, "t1", "t2"]))
        if tenant is None and draw(st.booleans()):
            continue  # a namespace with no object of its own
        labels = {TENANT_LABEL: tenant} if tenant else {"team": "x"}
        model.docs.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})


@st.composite
def mesh_model(draw, index: int) -> list[dict[str, Any]]:
    model = Model(index)
    draw(namespace_docs(model))
    draw(service_docs(model))
    draw(pod_docs(model))
    draw(slice_docs(model))
    draw(route_docs(model))
    draw(policy_docs(model))
    return model.docs


@st.composite
def model_batches(draw) -> list[list[dict[str, Any]]]:
    return [draw(mesh_model(i)) for i in range(draw(st.integers(2, 4)))]


def translate_model(index: int, docs: list[dict[str, Any]]) -> dict[str, dict[str, Message]]:
    """Every resource any proxy of the model receives: type -> name -> message."""
    objects = []
    for doc in docs:
        try:
            objects.append(convert(doc))
        except ObjectError as e:
            if e.warning:
                continue  # skipped on purpose (FQDN slices), as every source skips it
            # The strategies draw only what the API would accept.
            raise AssertionError(f"generated an invalid object: {e}\n{yaml.safe_dump(doc)}") from None
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache)
    store.sync("hypothesis", objects)
    nodes = mesh_proxies(store, (f"10.{index}.8.{i}" for i in range(1, 250)))
    merged: dict[str, dict[str, Message]] = {}
    for proxy, per_type in translate_all(store, controller, nodes).items():
        for type_url, by_name in per_type.items():
            into = merged.setdefault(type_url, {})
            for name, message in by_name.items():
                # A resource shared by proxies is one resource: the same bytes for everyone.
                assert name not in into or into[name] == message, (proxy, name)
                into[name] = message
    return merged


@pytest.mark.envoy
@settings(
    max_examples=25, deadline=None, database=None,  # no example database in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(model_batches())
def test_generated_models_produce_configs_envoy_accepts(batch: list[list[dict[str, Any]]]) -> None:
    by_name: dict[str, dict[str, Message]] = {}
    for index, docs in enumerate(batch):
        for type_url, resources in translate_model(index, docs).items():
            into = by_name.setdefault(type_url, {})
            for name, message in resources.items():
                # Per-model names differ (their namespaces do); the capture clusters are the
                # same constant resources in every model.
                assert name not in into or into[name] == message, name
                into[name] = message
    union = {type_url: list(resources.values()) for type_url, resources in by_name.items()}
    assert union[types.LISTENER] and union[types.ROUTE]  # every namespace has a proxy at least
    # Capture listeners of every proxy bind 0.0.0.0:15001/15006: each its own port, so the
    # union of many proxies fits one Envoy (what is validated is the listener's content).
    ports = itertools.count(20000)
    for listener in union[types.LISTENER]:
        address = listener.address.socket_address  # type: ignore[attr-defined]
        if address.address == "0.0.0.0":
            address.port_value = next(ports)
    ok, output = validate_static(union, bootstrap_overrides=SIDECAR_RUNTIME)
    assert ok, f"envoy --mode validate failed:\n{output[-3000:]}\n--- models:\n" + "\n".join(
        yaml.safe_dump_all(docs, sort_keys=False) for docs in batch
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"connectionPool": {"tcp": {"connectTimeout": "0s"}}}, "spec.connectionPool.tcp.connectTimeout"),
        ({"outlierDetection": {"interval": "0ms"}}, "spec.outlierDetection.interval"),
        ({"outlierDetection": {"baseEjectionTime": 0}}, "spec.outlierDetection.baseEjectionTime"),
        ({"fault": {"delay": {"percentage": 5, "fixedDelay": "0s"}}}, "spec.fault.delay.fixedDelay"),
        ({"healthCheck": {"interval": "0s"}}, "spec.healthCheck.interval"),
        ({"healthCheck": {"timeout": "0s"}}, "spec.healthCheck.timeout"),
    ],
)
def test_zero_durations_envoy_would_reject_are_refused_naming_the_field(spec: dict[str, Any], field: str) -> None:
    """Found by the property test: Envoy requires these durations to be positive, so a
    policy saying 0 is refused at load time with its field, not NACKed by every proxy."""
    doc = {
        "apiVersion": "mesh.xds-server.io/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": {"targetRef": {"kind": "Service", "name": "api"}, **spec},
    }
    with pytest.raises(ObjectError) as caught:
        convert(doc)
    assert caught.value.field_path == field, caught.value.problems
    assert "greater than 0" in caught.value.message


@pytest.mark.parametrize(
    ("family", "address", "problem"),
    [
        ("IPv4", "10.0.0.300", "not an IPv4 address"),
        ("IPv4", "fd00::1", "not an IPv4 address"),
        ("IPv6", "10.0.0.1", "not an IPv6 address"),
        ("IPv4", "db.example.com", "not an IPv4 address"),
    ],
)
def test_endpoint_addresses_envoy_would_reject_are_refused_naming_the_field(
    family: str, address: str, problem: str
) -> None:
    """Found by the property test: an endpoint address that is not an IP of the slice's
    family made every proxy that sees the service reject its ClusterLoadAssignment."""
    doc = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "api-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "api"}},
        "addressType": family, "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["10.0.0.1" if family == "IPv4" else "fd00::1"]}, {"addresses": [address]}],
    }
    with pytest.raises(ObjectError) as caught:
        convert(doc)
    assert caught.value.field_path == "endpoints[1].addresses[0]"
    assert problem in caught.value.message and not caught.value.warning


def test_fqdn_endpoint_slices_are_skipped_with_a_warning() -> None:
    doc = {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "ext-1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "ext"}},
        "addressType": "FQDN", "ports": [{"name": "http", "port": 80}],
        "endpoints": [{"addresses": ["example.com"]}],
    }
    with pytest.raises(ObjectError) as caught:
        convert(doc)
    assert caught.value.warning and caught.value.field_path == "addressType"


# --------------------------------------------------------------- a running server, bad input


class ServeProcess:
    """`xds-server serve --source DIR` as operators run it, JSON logs collected."""

    def __init__(self, source: Path) -> None:
        self.port = free_port()
        self.source = source
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict[str, Any]] = []
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve",
            "--xds-address", f"127.0.0.1:{self.port}", "--source", str(self.source),
            "--debounce-quiet", "0.02", "--shutdown-grace", "1",
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read_logs())
        await asyncio.to_thread(wait_for_port, "127.0.0.1", self.port, 20)

    async def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"msg": raw.decode(errors="replace")})

    async def log_matching(self, *parts: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first log line (after those already consumed) whose message has every part."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for line in self.lines:
                if all(p in str(line.get("msg", "")) for p in parts):
                    return line
            assert loop.time() < deadline, f"no log line with {parts}; last: {self.lines[-5:]}"
            await asyncio.sleep(0.05)

    async def stop(self) -> int | None:
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


@pytest.fixture
async def served(tmp_path: Path):
    source = tmp_path / "mesh"
    shutil.copytree(ROOT / "examples" / "mesh-basic", source)
    process = ServeProcess(source)
    await process.start()
    yield process
    await process.stop()


API = "outbound|80||api.shop.svc.cluster.local"


def max_connections(cluster: cluster_pb2.Cluster) -> int:
    return cluster.circuit_breakers.thresholds[0].max_connections.value


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


async def fresh_clusters(port: int) -> dict[str, Any]:
    """What a proxy connecting now gets."""
    async with XdsClient(f"127.0.0.1:{port}") as client:
        ads = client.ads(node=proxy_node("shop", "late-joiner"))
        await ads.request(types.CLUSTER)
        return sotw_resources(await ads.recv())


@pytest.mark.slow
async def test_running_server_keeps_last_good_config_through_bad_input(served: ServeProcess) -> None:
    policy_file = served.source / "shop" / "policy.yaml"
    good = policy_file.read_text()
    async with XdsClient(f"127.0.0.1:{served.port}") as client:
        ads = client.ads(node=proxy_node("shop", "web-0", "web"))
        await ads.request(types.CLUSTER)
        first = await ads.recv()
        api = sotw_resources(first)[API]
        assert api.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST and max_connections(api) == 100
        await ads.ack(first)

        # 1. Not YAML at all: file:line in the log; every object the file held stays.
        broken = good.replace("simple: LEAST_REQUEST", "simple: [LEAST_REQUEST")
        policy_file.write_text(broken)
        error = await served.log_matching("shop/policy.yaml:", "invalid YAML")
        assert error["level"] == "warning"
        line = int(error["msg"].split("shop/policy.yaml:", 1)[1].split(":", 1)[0])
        assert abs(line - line_of(broken, "[LEAST_REQUEST")) <= 1, error["msg"]
        await ads.expect_silence(0.5)
        assert max_connections((await fresh_clusters(served.port))[API]) == 100

        # 2. Valid YAML, invalid policy: file:line, object and field; the old policy keeps
        # its effect (the valid-looking part of the same edit is not applied either).
        served.lines.clear()
        invalid = good.replace("maxConnections: 100", "maxConnections: 200").replace(
            "consecutive5xxErrors: 5", "consecutive5xxErrors: 5\n    maxEjectionPercent: 150"
        )
        policy_file.write_text(invalid)
        error = await served.log_matching(
            f"shop/policy.yaml:{line_of(invalid, 'maxEjectionPercent')}:",
            "TrafficPolicy shop/api-resilience",
            "spec.outlierDetection.maxEjectionPercent",
        )
        assert "100" in error["msg"]  # says what the limit is
        await ads.expect_silence(0.5)
        kept = (await fresh_clusters(served.port))[API]
        assert max_connections(kept) == 100 and kept.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST

        # 3. An invalid new object next to valid ones: named with its field; nothing pushed.
        served.lines.clear()
        bad_service = served.source / "shop" / "extra.yaml"
        bad_service.write_text(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: extra\n  namespace: shop\n"
            "spec:\n  ports:\n    - name: http\n      port: eighty\n"
        )
        await served.log_matching("shop/extra.yaml:9:", "Service shop/extra", "spec.ports[0].port")
        await ads.expect_silence(0.5)

        # 4. Fixing the files applies them: the new policy arrives, and so does the service.
        policy_file.write_text(good.replace("maxConnections: 100", "maxConnections: 200"))
        update = await ads.recv(timeout=10)
        assert max_connections(sotw_resources(update)[API]) == 200
        await ads.ack(update)
        bad_service.write_text(bad_service.read_text().replace("port: eighty", "port: 80"))
        update = await ads.recv(timeout=10)
        clusters = sotw_resources(update)
        assert "outbound|80||extra.shop.svc.cluster.local" in clusters
        assert max_connections(clusters[API]) == 200
        await ads.ack(update)


@pytest.mark.envoy
@pytest.mark.slow
async def test_header_values_with_percent_are_sent_literally(tmp_path: Path) -> None:
    """Found by the property test: Envoy reads `%` in header values as a command, so a
    value like "50%" made every proxy reject the route configuration. It is sent as written."""
    from tests.support.mesh import MeshHarness

    mesh = await MeshHarness(tmp_path / "mesh").start()
    try:
        api, client = mesh.pod("shop", "api-1"), mesh.pod("shop", "client")
        mesh.service("shop", "api", pods=[api])
        value = "50% off %REQ(x-user)%"
        mesh.write("route.yaml", {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "api", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "api"}],
                "rules": [{
                    "filters": [{"type": "RequestHeaderModifier",
                                 "requestHeaderModifier": {"set": [{"name": "x-offer", "value": value}]}}],
                    "backendRefs": [{"name": "api", "port": 80}],
                }],
            },
        })
        await asyncio.gather(mesh.sidecar(api), mesh.sidecar(client))
        response = await mesh.until(
            lambda: (r := client.request("api", headers={"x-user": "alice"})).status == 200 and r,
            message="client -> api",
        )
        assert response.json["headers"]["x-offer"] == value
    finally:
        await mesh.stop()
