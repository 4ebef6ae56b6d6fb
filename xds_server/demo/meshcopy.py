"""The mesh as the capture mode runs it: a rewritten copy of the user's mesh directory, in the
demo's temp workdir, that the server reads. The user's files are never changed.

What changes in the copy, and only that:
- each Pod's `status.podIP` becomes its network namespace's address (10.89.0.x), and every
  EndpointSlice address that was a pod's IP follows it;
- a Service with no `spec.clusterIP` gets one (10.96.0.x, a range no interface has: only the
  sidecars make it reachable); a Service that has one keeps it;
- the pod annotations that exist only for the loopback (explicit) mode are dropped: the
  explicit interception and the `xds-server.io/tcp-upstreams` local port bindings. Capture,
  the sidecar default, then applies.

`MeshCopy.render()` is called again whenever the user's files change (hot reload keeps
working); addresses already given stay the same, new pods and Services get new ones.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..sources.k8s_objects import INTERCEPTION_ANNOTATION
from ..sources.mesh_files import DEFAULT_NAMESPACE, mesh_files

TCP_UPSTREAMS_ANNOTATION = "xds-server.io/tcp-upstreams"
DROPPED_ANNOTATIONS = (INTERCEPTION_ANNOTATION, TCP_UPSTREAMS_ANNOTATION)

Key = tuple[str, str]  # (namespace, name)


def _objects(text: str) -> list[Any] | None:
    """The documents of a YAML file, List kinds flattened; None if it does not parse (the
    copy keeps the file as it is, and validation reports it)."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError:
        return None
    out: list[Any] = []
    for doc in documents:
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out += doc["items"]
        elif isinstance(doc, list):
            out += doc
        elif doc is not None:
            out.append(doc)
    return out


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _key(obj: dict[str, Any]) -> Key:
    meta = _dict(obj.get("metadata"))
    return str(meta.get("namespace") or DEFAULT_NAMESPACE), str(meta.get("name"))


@dataclass
class MeshCopy:
    source: Path
    target: Path
    pod_prefix: str = "10.89"
    cluster_ip_prefix: str = "10.96"
    pod_ips: dict[Key, str] = field(default_factory=dict)  # pod -> its namespace's address
    cluster_ips: dict[Key, str] = field(default_factory=dict)  # Service -> ClusterIP
    pods: dict[Key, dict[str, Any]] = field(default_factory=dict)  # as rewritten
    _next_pod: int = 2
    _next_cluster_ip: int = 10

    def _allocate_pod_ip(self) -> str:
        n, self._next_pod = self._next_pod, self._next_pod + 1
        return f"{self.pod_prefix}.{n >> 8}.{n & 255}"

    def _allocate_cluster_ip(self) -> str:
        taken = set(self.cluster_ips.values())
        while True:
            n, self._next_cluster_ip = self._next_cluster_ip, self._next_cluster_ip + 1
            ip = f"{self.cluster_ip_prefix}.{n >> 8}.{n & 255}"
            if ip not in taken:
                return ip

    def render(self) -> bool:
        """Write the copy from the source now; whether any file of the copy changed."""
        self.target.mkdir(parents=True, exist_ok=True)
        texts: dict[Path, str] = {}
        for path in mesh_files(self.source):
            try:
                texts[path.relative_to(self.source)] = path.read_text()
            except (OSError, UnicodeDecodeError):
                continue  # validation reports it
        parsed = {rel: _objects(text) for rel, text in texts.items()}
        everything = [o for objs in parsed.values() if objs for o in objs if isinstance(o, dict)]
        # Addresses first, over every file: an EndpointSlice may come before its pods.
        old_ips: dict[tuple[str, str], str] = {}  # (namespace, old pod IP) -> new
        by_pod: dict[Key, str] = {}
        for obj in everything:
            kind, key = obj.get("kind"), _key(obj)
            if kind == "Pod":
                new = self.pod_ips.get(key) or self._allocate_pod_ip()
                self.pod_ips[key] = by_pod[key] = new
                status = _dict(obj.get("status"))
                if status.get("podIP"):
                    old_ips[(key[0], str(status["podIP"]))] = new
            elif kind == "Service":
                spec = _dict(obj.get("spec"))
                given = spec.get("clusterIP")
                if given and given != "None":
                    self.cluster_ips[key] = str(given)
                elif not given and key not in self.cluster_ips:
                    self.cluster_ips[key] = self._allocate_cluster_ip()
        self.pods = {}
        changed = False
        for rel, objs in parsed.items():
            if objs is None:
                text = texts[rel]
            else:
                for obj in objs:
                    if isinstance(obj, dict):
                        self._rewrite(obj, old_ips, by_pod)
                text = yaml.safe_dump_all(objs, sort_keys=False)
            out = self.target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists() or out.read_text() != text:
                out.write_text(text)
                changed = True
        kept = {self.target / rel for rel in texts}
        for path in mesh_files(self.target):
            if path not in kept:
                path.unlink(missing_ok=True)
                changed = True
        return changed

    def _rewrite(self, obj: dict[str, Any], old_ips: dict[tuple[str, str], str],
                 by_pod: dict[Key, str]) -> None:
        kind, key = obj.get("kind"), _key(obj)
        if kind == "Pod":
            obj.setdefault("status", {})["podIP"] = by_pod[key]
            obj["status"].pop("podIPs", None)
            meta = obj.setdefault("metadata", {})
            annotations = meta.get("annotations")
            if isinstance(annotations, dict):
                for name in DROPPED_ANNOTATIONS:
                    annotations.pop(name, None)
            self.pods[key] = obj
        elif kind == "Service":
            spec = obj.setdefault("spec", {})
            if key in self.cluster_ips and not spec.get("clusterIP"):
                spec["clusterIP"] = self.cluster_ips[key]
        elif kind == "EndpointSlice":
            for endpoint in obj.get("endpoints") or ():
                if not isinstance(endpoint, dict):
                    continue
                ref = _dict(endpoint.get("targetRef"))
                pod_key = (str(ref.get("namespace") or key[0]), str(ref.get("name")))
                addresses = endpoint.get("addresses") or []
                if ref.get("kind", "Pod") == "Pod" and pod_key in by_pod and len(addresses) == 1:
                    endpoint["addresses"] = [by_pod[pod_key]]
                else:
                    endpoint["addresses"] = [old_ips.get((key[0], str(a)), a) for a in addresses]

    def services(self) -> list[tuple[str, str, str]]:
        """(name, namespace, ClusterIP) of every Service with an IPv4 ClusterIP."""
        out = []
        for (namespace, name), ip in self.cluster_ips.items():
            try:
                if ipaddress.ip_address(ip).version == 4:
                    out.append((name, namespace, ip))
            except ValueError:
                continue
        return out
