"""`xds-server validate DIR`: every problem in a directory of mesh files, without a server.

The same parsing, conversion and duplicate rules as `--source DIR`, so a directory that
validates clean loads clean. Files are named as the user gave the path (`mesh/api.yaml:14`)
so editors and terminals can jump to them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..model import netpol
from ..model.client_kinds import grpc_notes
from ..model.mesh import EndpointSlice, Namespace, Service, Workload
from ..model.store import NETWORK_POLICY, ObjectKey
from ..model.policy import TrafficPolicy
from .mesh_files import MeshError, ParsedFile, mesh_files, read_file, resolve


def validate_directory(path: Path | str) -> list[MeshError]:
    """Every error and warning of every mesh file under `path` (or of the one file `path`)."""
    root = Path(path)
    try:
        paths = [root] if root.is_file() else mesh_files(root) if root.is_dir() else None
    except OSError as e:
        return [MeshError(file=str(root), message=f"cannot list the directory: {e}")]
    if paths is None:
        return [MeshError(file=str(root), message="no such file or directory")]
    parsed: dict[str, ParsedFile] = {}
    for file in paths:
        display = file.as_posix()
        try:
            result = read_file(file, display)
        except FileNotFoundError:  # deleted while validating
            continue
        if result is not None:
            parsed[display] = result
    served, errors = resolve(parsed, {})
    # Said only where proxyless gRPC workloads exist: an Envoy-only mesh gets no such noise.
    proxyless = any(isinstance(h.obj, Workload) and h.obj.proxyless for h in served.values())
    for held in served.values():
        service = held.obj
        if isinstance(service, Service) and service.cluster_ip is None and not service.headless:
            errors.append(MeshError(
                file=held.file, line=held.line, kind="Service", namespace=service.namespace,
                name=service.name, field="spec.clusterIP", severity="warning",
                message="not set: capture-mode sidecars match a service by its ClusterIP, so "
                        "apps reach it by pod IP only (Kubernetes allocates one; in files, set "
                        "it, or None for a headless service)",
            ))
        if isinstance(service, TrafficPolicy) and proxyless:
            # What proxyless gRPC clients cannot apply as Envoy does (model/client_kinds.py).
            for field, message in grpc_notes(service.spec):
                errors.append(MeshError(
                    file=held.file, line=held.line, kind="TrafficPolicy", namespace=service.namespace,
                    name=service.name, field=field, severity="warning", message=message,
                ))
    errors += _network_policy_warnings(served)
    errors.sort(key=lambda e: (e.file, e.line or 0))
    return errors


def _objects(served: dict[ObjectKey, Any]) -> dict[type, list[Any]]:
    out: dict[type, list[Any]] = {}
    for held in served.values():
        out.setdefault(type(held.obj), []).append(held.obj)
    return out


def network_policy_view(objects: dict[type, list[Any]]) -> netpol.PodView:
    return netpol.view_of(
        objects.get(Workload, []), {n.name: n for n in objects.get(Namespace, [])},
        objects.get(Service, []), objects.get(EndpointSlice, []),
    )


def _network_policy_warnings(served: dict[ObjectKey, Any]) -> list[MeshError]:
    """What the sidecars cannot enforce by identity, on the NetworkPolicy that says it: pods it
    selects that no sidecar protects, and rules matched by source IP instead of identity."""
    objects = _objects(served)
    policies: list[netpol.NetworkPolicy] = objects.get(netpol.NetworkPolicy, [])
    if not policies:
        return []
    view = network_policy_view(objects)
    found: dict[tuple[str, str, str], str] = {}
    for workload in objects.get(Workload, []):
        selecting = netpol.selected_by(workload, policies)
        if not selecting:
            continue
        why = netpol.enforced_by_sidecar(workload)
        if why is not None:
            for policy in selecting:
                found[(policy, "spec.podSelector", f"selects pod {workload.namespace}/{workload.name}: {why}")] = ""
            continue
        for enforcement in (netpol.resolve_ingress(workload, policies, view),
                            netpol.resolve_egress(workload, policies, view)):
            for note in enforcement.notes:
                found[(note.policy, note.field, note.message)] = ""
    out = []
    for policy, field, message in sorted(found):
        namespace, _, name = policy.partition("/")
        held = served.get((NETWORK_POLICY, namespace, name))
        out.append(MeshError(
            file=held.file if held is not None else "", line=held.line if held is not None else None,
            kind=NETWORK_POLICY, namespace=namespace, name=name, field=field, severity="warning",
            message=message,
        ))
    return out


def describe_pod(path: Path | str, namespace: str, pod: str) -> dict[str, Any] | None:
    """Which NetworkPolicies select a pod of a mesh directory and what they allow (None: no
    such pod)."""
    root = Path(path)
    paths = [root] if root.is_file() else mesh_files(root)
    parsed = {f.as_posix(): r for f in paths if (r := read_file(f, f.as_posix())) is not None}
    served, _ = resolve(parsed, {})
    objects = _objects(served)
    workload = next((w for w in objects.get(Workload, []) if (w.namespace, w.name) == (namespace, pod)), None)
    if workload is None:
        return None
    return netpol.describe(workload, objects.get(netpol.NetworkPolicy, []), network_policy_view(objects))


def has_errors(errors: list[MeshError]) -> bool:
    """True when anything is broken (warnings alone do not fail validation)."""
    return any(error.severity == "error" for error in errors)


def format_errors(errors: list[MeshError]) -> str:
    """One line per problem, then a summary line; for a terminal or CI log."""
    if not errors:
        return "no problems found"
    counts = Counter(error.severity for error in errors)
    files = len({error.file for error in errors})
    summary = ", ".join(
        f"{n} {severity}{'s' if n != 1 else ''}"
        for severity, n in (("error", counts["error"]), ("warning", counts["warning"]))
        if n
    )
    lines = [str(error) for error in errors]
    lines.append(f"{summary} in {files} file{'s' if files != 1 else ''}")
    return "\n".join(lines)
