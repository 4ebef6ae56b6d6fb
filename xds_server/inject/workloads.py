"""Which objects hold a pod template, and where: `xds-server inject` walks multi-document YAML
as `istioctl kube-inject` does. Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
ReplicationControllers, Jobs and CronJobs (their jobTemplate) are injected; a `List` is walked
item by item; every other object (Services, ConfigMaps, custom resources...) passes through
unchanged. Pure, apart from YAML parsing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from .settings import InjectorSettings
from .template import InjectionError, Outcome, inject_pod

__all__ = [
    "POD_TEMPLATES",
    "DocumentError",
    "Injected",
    "inject_documents",
    "inject_object",
    "template_path",
]

# kind -> (API groups it is served in, path of its pod template; () for a Pod itself).
POD_TEMPLATES: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "Pod": (frozenset({""}), ()),
    "ReplicationController": (frozenset({""}), ("spec", "template")),
    "Deployment": (frozenset({"apps", "extensions"}), ("spec", "template")),
    "StatefulSet": (frozenset({"apps"}), ("spec", "template")),
    "DaemonSet": (frozenset({"apps", "extensions"}), ("spec", "template")),
    "ReplicaSet": (frozenset({"apps", "extensions"}), ("spec", "template")),
    "Job": (frozenset({"batch"}), ("spec", "template")),
    "CronJob": (frozenset({"batch"}), ("spec", "jobTemplate", "spec", "template")),
}


class DocumentError(ValueError):
    """A document that cannot be injected: its position (1-based), kind, name and field."""

    def __init__(self, index: int, kind: str, name: str, field: str, message: str) -> None:
        what = f"{kind} {name}".strip()
        where = f"document {index} ({what})" if what else f"document {index}"
        super().__init__(f"{where}: {field}: {message}" if field else f"{where}: {message}")
        self.index, self.kind, self.name, self.field = index, kind, name, field
        self.message = message


@dataclass(frozen=True)
class Injected:
    """One object and what injection did to it (`outcome` None: not a workload kind)."""

    kind: str
    name: str
    outcome: Outcome | None


def template_path(obj: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Where `obj`'s pod template is (() for a Pod), or None for kinds without one."""
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if not isinstance(kind, str) or not isinstance(api_version, str) or kind not in POD_TEMPLATES:
        return None
    group = api_version.rpartition("/")[0]
    groups, path = POD_TEMPLATES[kind]
    return path if group in groups else None


def _describe(obj: Mapping[str, Any]) -> tuple[str, str]:
    kind = obj.get("kind")
    metadata = obj.get("metadata")
    name = namespace = ""
    if isinstance(metadata, dict):
        name = str(metadata.get("name") or metadata.get("generateName") or "")
        namespace = str(metadata.get("namespace") or "")
    return (str(kind) if kind else "", f"{namespace}/{name}" if namespace and name else name)


def inject_object(obj: Any, settings: InjectorSettings, index: int = 1, *,
                  reinject: bool = True) -> tuple[Any, list[Injected]]:
    """`obj` with its pod template (or its List's items') injected. Raises DocumentError."""
    if not isinstance(obj, dict):
        raise DocumentError(index, "", "", "", f"expected a Kubernetes object (a mapping), "
                                               f"got {type(obj).__name__}")
    kind, name = _describe(obj)
    if kind == "List" and obj.get("apiVersion") == "v1":
        items = obj.get("items")
        if not isinstance(items, list):
            raise DocumentError(index, kind, name, "items", "must be a list")
        out = dict(obj)
        out["items"], done = [], []
        for i, item in enumerate(items):
            try:
                injected, results = inject_object(item, settings, index, reinject=reinject)
            except DocumentError as err:
                raise DocumentError(index, err.kind, err.name, f"items[{i}]" +
                                    (f".{err.field}" if err.field else ""),
                                    err.message) from None
            out["items"].append(injected)
            done += results
        return out, done
    path = template_path(obj)
    if path is None:
        return obj, [Injected(kind, name, None)]
    parent: Any = obj
    for depth, key in enumerate(path):
        parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            raise DocumentError(index, kind, name, ".".join(path[:depth + 1]),
                                "missing" if parent is None else "must be a mapping")
    prefix = ".".join(path)
    try:
        template, outcome = inject_pod(parent, settings, reinject=reinject)
    except InjectionError as err:
        raise DocumentError(index, kind, name, f"{prefix}.{err.field}" if prefix else err.field,
                            err.message) from None
    return _replace(obj, path, template), [Injected(kind, name, outcome)]


def _replace(obj: dict[str, Any], path: tuple[str, ...], value: dict[str, Any]) -> dict[str, Any]:
    if not path:
        return value
    out = dict(obj)
    out[path[0]] = _replace(obj[path[0]], path[1:], value)
    return out


def inject_documents(text: str, settings: InjectorSettings) -> tuple[list[Any], list[Injected]]:
    """Every document of a YAML stream, injected; empty documents are dropped. Raises
    DocumentError (a YAML error names the document and the line)."""
    documents: list[Any] = []
    results: list[Injected] = []
    loader = yaml.SafeLoader(text)
    index = 0
    try:
        while True:
            index += 1
            try:
                if not loader.check_node():
                    break
                node = loader.get_node()
                document = loader.construct_document(node) if node is not None else None
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"line {mark.line + 1}" if mark is not None else ""
                problem = getattr(err, "problem", None) or str(err)
                raise DocumentError(index, "", "", where, f"not valid YAML: {problem}") from None
            if document is None:
                continue
            injected, done = inject_object(document, settings, index)
            documents.append(injected)
            results += done
    finally:
        loader.dispose()
    return documents, results
