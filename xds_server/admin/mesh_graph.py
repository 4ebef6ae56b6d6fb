"""What the live mesh page (/ui) shows, as one JSON document: Services and the workloads
calling them as nodes, the traffic between them (from the sidecars' load reports) and the
routes (HTTPRoute/GRPCRoute backends) as edges, every proxy's sync status, certificates
close to expiry and the sources' errors.

Read from the live objects on each call (the page polls every few seconds); nothing is kept.
The cost is linear in the mesh (services, endpoints, proxies, reporting windows) and measured
in bench/lrs_bench.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, UTC
from typing import Any

from . import views

# Certificates with less than this fraction of their lifetime left are "close to expiry"
# (they renew at half-life, so one this far along missed renewals).
EXPIRY_FRACTION = 0.25
MAX_CERTIFICATES = 50  # the soonest ones: the page lists them, the API has them all
MAX_ERRORS = 50
MAX_PROXY_ROWS = 200


def _service_id(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def _workload_id(namespace: str, service_account: str) -> str:
    return f"{namespace}/sa:{service_account}"


def _round(value: float) -> float:
    return round(value, 3)


def build(ctx: Any, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    store = ctx.store
    load = getattr(ctx, "load", None)
    nodes: dict[str, dict[str, Any]] = {}
    pod_services: dict[tuple[str, str], list[str]] = {}
    ready: dict[Any, int] = load.ready_endpoints() if load is not None else {}

    if store is not None:
        from ..model.mesh import EndpointSlice, Service
        from ..model.routes import Route
        from ..model.store import ENDPOINT_SLICE, GRPC_ROUTE, HTTP_ROUTE, SERVICE

        for service in store.all(SERVICE).values():
            if isinstance(service, Service):
                node_id = _service_id(service.namespace, service.name)
                nodes[node_id] = {"id": node_id, "kind": "service", "namespace": service.namespace,
                                  "name": service.name, "endpoints": ready.get(service.key, 0)}
        for slice_ in store.all(ENDPOINT_SLICE).values():
            if isinstance(slice_, EndpointSlice):
                for endpoint in slice_.endpoints:
                    if endpoint.pod:
                        owners = pod_services.setdefault((slice_.namespace, endpoint.pod), [])
                        sid = _service_id(slice_.namespace, slice_.service)
                        if sid not in owners:
                            owners.append(sid)
        route_edges = _route_edges(
            (r for kind in (HTTP_ROUTE, GRPC_ROUTE) for r in store.all(kind).values()
             if isinstance(r, Route)), nodes)
    else:
        route_edges = []

    edges: list[dict[str, Any]] = []
    loads = load.services() if load is not None else {}
    if load is not None:
        def callers_of(source: Any) -> list[str]:
            callers = pod_services.get((source.namespace, source.pod))
            if callers:
                return callers
            # A workload behind no Service: shown as its service account.
            caller = _workload_id(source.namespace, source.service_account)
            nodes.setdefault(caller, {"id": caller, "kind": "workload",
                                      "namespace": source.namespace,
                                      "name": source.service_account, "endpoints": 0})
            return [caller]

        for (source_id, (namespace, name)), (rps, eps, in_flight) in sorted(load.edges(callers_of).items()):
            if rps <= 0 and in_flight <= 0:
                continue
            target = _service_id(namespace, name)
            if target not in nodes:  # reported before the store has it: still shown
                nodes[target] = {"id": target, "kind": "service", "namespace": namespace,
                                 "name": name, "endpoints": 0}
            edges.append({
                "source": source_id, "target": target, "kind": "traffic",
                "rps": _round(rps), "error_ratio": _round(eps / rps) if rps else 0.0,
                "in_flight": int(in_flight),
            })
    for node in nodes.values():
        key_load = _load_of(loads, node)
        node["rps"] = _round(key_load.requests_per_second) if key_load else 0.0
        node["error_ratio"] = _round(key_load.error_ratio) if key_load else 0.0
        node["in_flight"] = key_load.in_flight if key_load else 0
    edges.extend(route_edges)

    proxies, counts = _proxies(ctx.server.connections, getattr(ctx, "trust_domain", "cluster.local"))
    return {
        "generated_at": now.isoformat(),
        "load_report_interval": getattr(load, "interval", None),
        "nodes": sorted(nodes.values(), key=lambda n: (n["namespace"], n["name"], n["kind"])),
        "edges": edges,
        "proxies": proxies,
        "proxy_counts": counts,
        "certificates": _certificates(getattr(ctx, "registry", None), now),
        "source_errors": _source_errors(getattr(ctx, "sources", {}) or {}),
    }


def _load_of(loads: Mapping[Any, Any], node: Mapping[str, Any]) -> Any:
    if node["kind"] != "service":
        return None
    from ..model.mesh import ServiceKey

    return loads.get(ServiceKey(node["namespace"], node["name"]))


def _route_edges(routes: Iterable[Any], nodes: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A route's parent Service -> each backend Service, with its share of the weights."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for route in sorted(routes, key=lambda r: (r.namespace, r.name)):
        for parent in route.parents:
            source = _service_id(parent.service.namespace, parent.service.name)
            for rule in route.rules:
                total = sum(b.weight for b in rule.backends) or 1
                for backend in rule.backends:
                    target = _service_id(backend.service.namespace, backend.service.name)
                    if target == source or source not in nodes or target not in nodes:
                        continue
                    edge = out.setdefault((source, target), {
                        "source": source, "target": target, "kind": "route",
                        "route": f"{route.namespace}/{route.name}", "weight_percent": 0.0})
                    edge["weight_percent"] = max(edge["weight_percent"],
                                                 _round(100.0 * backend.weight / total))
    return [out[k] for k in sorted(out)]


def _proxies(connections: Iterable[Any], trust_domain: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Every proxy's overall status counted; rows for the worst first, at most MAX_PROXY_ROWS
    (the page is for seeing what is wrong; `/api/v1/proxies` lists them all)."""
    from ..redaction import redact_text
    from ..xds import types

    counts = {status: 0 for status in views.STATUS_RANK}
    rows = []
    for proxy_id, conns in views.group_connections(list(connections)).items():
        by_type: dict[str, Any] = {}
        for conn in conns:  # newest last: its state wins for a type
            for type_url, state in conn.state.types.items():
                by_type[types.short_name(type_url)] = state
        statuses = {name: state.status() for name, state in by_type.items()}
        overall = max(statuses.values(), key=views.STATUS_RANK.__getitem__, default="NOT SENT")
        counts[overall] += 1
        rows.append((-views.STATUS_RANK[overall], proxy_id, conns[-1], statuses, by_type, overall))
    rows.sort(key=lambda r: (r[0], r[1]))
    out = []
    for _rank, proxy_id, newest, statuses, by_type, overall in rows[:MAX_PROXY_ROWS]:
        identity = newest.identity
        out.append({
            "id": proxy_id,
            "identity": identity.spiffe_id(trust_domain) if identity is not None else None,
            "status": overall,
            "types": statuses,
            "errors": [{"type": name, "message": redact_text(state.nack.message),
                        "version": state.nack.version, "at": views.iso(state.nack.at)}
                       for name, state in by_type.items()
                       if statuses[name] == "NACKED" and state.nack is not None],
            "connected_since": views.iso(newest.state.connected_at),
        })
    return out, counts


def _certificates(registry: Any, now: datetime) -> dict[str, Any]:
    if registry is None:
        return {"issued": 0, "expiring": []}
    records = registry.records()  # soonest first
    expiring = []
    for record in records:
        lifetime = (record.not_after - record.not_before).total_seconds()
        left = (record.not_after - now).total_seconds()
        if lifetime > 0 and left / lifetime >= EXPIRY_FRACTION:
            continue
        expiring.append({"spiffe_id": record.spiffe_id, "proxy": record.proxy,
                         "serial": format(record.serial, "x"),
                         "not_after": record.not_after.isoformat(),
                         "seconds_left": int(left)})
        if len(expiring) >= MAX_CERTIFICATES:
            break
    return {"issued": len(records), "expiring": expiring,
            "soonest_not_after": records[0].not_after.isoformat() if records else None}


def _source_errors(sources: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for name, source in sorted(sources.items()):
        for error in list(getattr(source, "errors", []) or [])[:MAX_ERRORS]:
            out.append({"source": name, **views.error_json(error)})
    return out[:MAX_ERRORS]
