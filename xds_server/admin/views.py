"""What the admin API shows, as plain JSON-ready data, read from the live server objects.

Pure functions over the running pieces (no HTTP here), so the API, the CLI's tests and other
tools share one rendering. Nothing is copied or cached: every call reads the state the
server itself uses.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, UTC
from typing import Any

from google.protobuf import json_format

from .. import protos
from ..redaction import REDACTED as REDACTED, redact as redact, redact_text
from ..xds import types


# Worst first: a proxy's overall status is the worst of its types.
STATUS_RANK = {"NACKED": 3, "STALE": 2, "NOT SENT": 1, "SYNCED": 0}


def iso(ts: float | datetime | None) -> str | None:
    if ts is None or ts == 0:
        return None
    if isinstance(ts, datetime):
        return ts.astimezone(UTC).isoformat()
    return datetime.fromtimestamp(ts, UTC).isoformat()


# Proxies ------------------------------------------------------------------------------------


def identity_of(conn: Any, trust_domain: str) -> dict[str, Any]:
    """The proxy's SPIFFE identity: the authenticated one when the stream proved it, else the
    one its node claims (marked `verified: false`)."""
    proven = getattr(conn, "identity", None)
    if proven is not None:
        spiffe = proven.spiffe_id(trust_domain) if hasattr(proven, "spiffe_id") else str(proven)
        return {"spiffe_id": spiffe, "verified": True}
    node = conn.state.node
    if node is None:
        return {"spiffe_id": None, "verified": False}
    from ..model.identity import spiffe_id
    from ..xds.node import proxy_claim

    claimed = proxy_claim(node).identity
    try:
        spiffe = spiffe_id(claimed, trust_domain)
    except ValueError:
        spiffe = None
    return {"spiffe_id": spiffe, "verified": False}


def type_status(type_state: Any) -> dict[str, Any]:
    nack = type_state.nack
    return {
        "type_url": type_state.type_url,
        "status": type_state.status(),
        "sent_version": type_state.sent_version or None,
        "acked_version": type_state.acked_version or None,
        "error": None if nack is None else {
            "message": redact_text(nack.message), "version": nack.version, "at": iso(nack.at),
        },
        "wildcard": type_state.wildcard,
        "subscribed_names": len(type_state.names),
        "last_sent": iso(type_state.sent_at),
        "last_acked": iso(type_state.acked_at),
    }


def group_connections(connections: Iterable[Any]) -> dict[str, list[Any]]:
    """Streams by node id (a proxy using per-type services has several), newest last."""
    grouped: dict[str, list[Any]] = {}
    for conn in connections:
        if conn.state.node is None:
            continue  # no request yet: not a proxy we know anything about
        grouped.setdefault(conn.proxy_id, []).append(conn)
    for conns in grouped.values():
        conns.sort(key=lambda c: (c.state.connected_at, c.state.id))
    return grouped


def proxy_entry(proxy_id: str, conns: list[Any], trust_domain: str) -> dict[str, Any]:
    newest = conns[-1]
    node = newest.state.node
    by_type: dict[str, dict[str, Any]] = {}
    for conn in conns:  # newest last: the newest stream's state wins for a type
        for type_url, type_state in conn.state.types.items():
            by_type[types.short_name(type_url)] = type_status(type_state)
    ordered = dict(sorted(by_type.items(), key=lambda kv: types.order_key(kv[1]["type_url"])))
    overall = max((t["status"] for t in ordered.values()), key=STATUS_RANK.__getitem__,
                  default="NOT SENT")
    return {
        "id": proxy_id,
        "cluster": node.cluster if node is not None else "",
        "identity": identity_of(newest, trust_domain),
        "address": newest.peer,
        "connected_since": iso(min(c.state.connected_at for c in conns)),
        "variant": newest.state.variant.value,
        "streams": [
            {"id": c.state.id, "method": c.method, "variant": c.state.variant.value,
             "address": c.peer, "connected_since": iso(c.state.connected_at)}
            for c in conns
        ],
        "status": overall,
        "types": ordered,
    }


def proxies(connections: Iterable[Any], trust_domain: str) -> list[dict[str, Any]]:
    grouped = group_connections(connections)
    return [proxy_entry(pid, grouped[pid], trust_domain) for pid in sorted(grouped)]


# Config dump --------------------------------------------------------------------------------


def message_class_for(full_name: str) -> Any:
    """Any xds-protos message class. Imports them all first (once, ~0.5 s: the API calls it
    in a thread before a dump), so nested `Any`s of any type render too."""
    protos.import_all()
    return protos.registered_class(full_name)


def resource_json(resource: Any) -> dict[str, Any]:
    """One resource as Envoy JSON (proto field names, `@type` first), secrets redacted."""
    type_name = resource.type_url.rsplit("/", 1)[-1]
    cls = message_class_for(type_name)
    if cls is None:  # a type no module here knows: it might hold anything, so not shown
        return {"@type": resource.type_url, "note": "unknown type: contents withheld"}
    message = cls.FromString(resource.body)
    redact(message, message_class_for)
    try:
        body = json_format.MessageToDict(message, preserving_proto_field_name=True)
    except (TypeError, KeyError):  # an Any of a type no module here knows (emptied by redact)
        return {"@type": resource.type_url, "value_base64": base64.b64encode(
            message.SerializeToString(deterministic=True)).decode(), "note": "unknown nested type"}
    return {"@type": resource.type_url, **body}


def subscribed_resources(conn: Any, type_url: str) -> list[Any]:
    """What the stream receives now for one type: its view's resources it subscribes to."""
    state = conn.state
    view = state.view
    type_state = state.types.get(type_url)
    if view is None or type_state is None:
        return []
    found: dict[str, Any] = {}
    if type_state.wildcard:
        for resource in view.visible(type_url):
            found[resource.name] = resource
    for name in type_state.names:
        if name not in found:
            resource = view.get(type_url, name)
            if resource is not None:
                found[name] = resource
    return [found[n] for n in sorted(found)]


def collect_config(conns: list[Any], only: set[str] | None = None) -> list[dict[str, Any]]:
    """Phase one of a config dump, on the event loop: per type, the stream state and the
    (immutable) resources the proxy receives now. Cheap; rendering is phase two."""
    latest: dict[str, Any] = {}
    for conn in conns:  # newest last
        for type_url in conn.state.types:
            latest[type_url] = conn
    sections = []
    for type_url in sorted(latest, key=types.order_key):
        short = types.short_name(type_url)
        if only is not None and short not in only:
            continue
        type_state = latest[type_url].state.types[type_url]
        sections.append({
            "short": short,
            "type_url": type_url,
            "status": type_state.status(),
            "sent_version": type_state.sent_version or None,
            "acked_version": type_state.acked_version or None,
            "resources": subscribed_resources(latest[type_url], type_url),
        })
    return sections


def render_config(proxy_id: str, sections: list[dict[str, Any]]) -> dict[str, Any]:
    """Phase two: Envoy JSON with secrets redacted (safe in a worker thread: it only reads
    immutable resources)."""
    out: dict[str, Any] = {}
    for section in sections:
        resources = section["resources"]
        out[section["short"]] = {
            "type_url": section["type_url"],
            "status": section["status"],
            "sent_version": section["sent_version"],
            "acked_version": section["acked_version"],
            "size_bytes": sum(len(r.body) for r in resources),
            "resources": [
                {"name": r.name, "version": r.version, "resource": resource_json(r)}
                for r in resources
            ],
        }
    return {"proxy": proxy_id, "generated_at": iso(time.time()), "types": out}


def config_dump(proxy_id: str, conns: list[Any], only: set[str] | None = None) -> dict[str, Any]:
    """A proxy's current configuration as the server holds it for it, by type: the resources
    of each type it subscribes to, through its own view (scoping applied), secrets redacted."""
    return render_config(proxy_id, collect_config(conns, only))


# The model ----------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == "labels" and isinstance(item, tuple):
                out[f.name] = {k: v for k, v in item}
            else:
                out[f.name] = to_jsonable(item)
        return out
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


MODEL_SECTIONS = {
    "namespaces": "Namespace",
    "services": "Service",
    "endpoints": "EndpointSlice",
    "workloads": "Pod",
    "routes": ("HTTPRoute", "GRPCRoute"),
    "policies": "TrafficPolicy",
}


def model(store: Any, section: str | None = None, namespace: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kinds in MODEL_SECTIONS.items():
        if section is not None and section != name:
            continue
        items = []
        for kind in (kinds if isinstance(kinds, tuple) else (kinds,)):
            objects = store.all(kind) if store is not None else {}
            for (ns, obj_name), obj in sorted(objects.items()):
                if namespace is not None and kind != "Namespace" and ns != namespace:
                    continue
                entry = to_jsonable(obj)
                if isinstance(entry, dict):
                    entry = {"kind": kind, **entry}
                    owner = store.owner((kind, ns, obj_name))
                    if owner is not None:
                        entry["source"] = owner
                items.append(entry)
        out[name] = items
    return out


# Sources ------------------------------------------------------------------------------------


def error_json(error: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"text": str(error)}
    if dataclasses.is_dataclass(error):
        for f in dataclasses.fields(error):
            value = getattr(error, f.name)
            if value not in (None, ""):
                out[f.name] = to_jsonable(value)
    elif hasattr(error, "field_path"):  # the Kubernetes source's ObjectError
        out.update({"kind": error.kind, "namespace": error.namespace, "name": error.name,
                    "field": error.field_path, "message": error.message,
                    "severity": "warning" if getattr(error, "warning", False) else "error"})
        if getattr(error, "more", ()):
            out["more"] = [{"field": f, "message": m} for f, m in error.more]
    return out


def source_entry(name: str, source: Any) -> dict[str, Any]:
    errors = list(getattr(source, "errors", []) or [])
    entry: dict[str, Any] = {
        "name": name,
        "synced": bool(getattr(source, "synced", True)),
        "errors": [error_json(e) for e in errors],
    }
    directory = getattr(source, "directory", None)
    if directory is not None:
        entry["directory"] = str(directory)
    return entry


# The CA -------------------------------------------------------------------------------------


def certificate_json(cert: Any, **extra: Any) -> dict[str, Any]:
    from ..ca.authority import fingerprint

    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "fingerprint": fingerprint(cert),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        **extra,
    }


def ca_status(authority: Any, rotation: Any = None, registry: Any = None) -> dict[str, Any]:
    from ..ca.authority import fingerprint

    state = authority.state
    signing_root = fingerprint(state.root)
    pending = fingerprint(state.pending_root) if state.pending_root is not None else None
    return {
        "trust_domain": authority.trust_domain,
        "self_signed": state.self_signed,
        "signing_certificate": certificate_json(state.signing_cert),
        "not_after": state.not_after.isoformat(),
        "roots": [
            certificate_json(root, signing=fingerprint(root) == signing_root,
                             pending=fingerprint(root) == pending)
            for root in state.roots
        ],
        "rotation": rotation.status() if rotation is not None else None,
        "issued_certificates": len(registry.records()) if registry is not None else None,
    }
