"""The xDS server, the mesh model and the sources' current errors."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request

from .. import views
from ..app import ERROR_RESPONSES, context, read_access
from ..schemas import Model, ServerInfo, SourceList

router = APIRouter(prefix="/api/v1", tags=["mesh"], dependencies=[Depends(read_access)],
                   responses=ERROR_RESPONSES)

Section = Literal["namespaces", "services", "endpoints", "workloads", "routes", "policies"]


@router.get("/server", response_model=ServerInfo, summary="The xDS server: address and counters")
async def server_info(request: Request) -> dict:
    ctx = context(request)
    server = ctx.server
    return {
        "xds_address": server.address,
        "control_plane_id": server.settings.control_plane_id,
        "serving": bool(getattr(server, "serving", True)),
        "streams": len(server.connections),
        "proxies": len(views.group_connections(server.connections)),
        # (Not dataclasses.asdict: it rebuilds a Counter from (key, count) pairs as keys.)
        "stats": {f.name: dict(v) if isinstance(v := getattr(server.stats, f.name), dict) else v
                  for f in dataclasses.fields(server.stats)},
        "overload": server.overload() if hasattr(server, "overload") else {},
        "shared_state": ctx.security.shared_status() if ctx.security is not None else None,
    }


@router.get("/model", response_model=Model,
            summary="The mesh model: namespaces, services, endpoints, workloads, routes, policies")
async def get_model(
    request: Request,
    section: Annotated[Section | None, Query(description="Only this part of the model.")] = None,
    namespace: Annotated[str | None, Query(min_length=1, max_length=253,
                                           description="Only objects of this namespace.")] = None,
) -> dict:
    return views.model(context(request).store, section, namespace)


@router.get("/sources", response_model=SourceList,
            summary="Each source: synced or not, and its current errors (file:line, object, field)")
async def get_sources(request: Request) -> dict:
    ctx = context(request)
    return {"sources": [views.source_entry(name, source) for name, source in sorted(ctx.sources.items())]}
