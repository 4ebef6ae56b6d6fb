"""Connected proxies: sync status per type, and a proxy's current config."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from .. import views
from ..app import ERROR_RESPONSES, ApiError, context, read_access
from ..schemas import ConfigDump, Proxy, ProxyList, Status, TypeName

router = APIRouter(prefix="/api/v1", tags=["proxies"], dependencies=[Depends(read_access)],
                   responses=ERROR_RESPONSES)

ProxyId = Annotated[str, Path(description="The proxy's Envoy node id.", min_length=1, max_length=1024)]


def _streams_of(request: Request, proxy_id: str) -> list:
    conns = views.group_connections(context(request).server.connections).get(proxy_id)
    if not conns:
        raise ApiError(404, f"no connected proxy with node id {proxy_id!r}",
                       [{"field": "proxy_id", "location": "path", "message": "not connected"}])
    return conns


@router.get("/proxies", response_model=ProxyList,
            summary="Connected proxies and their per-type status (like istioctl proxy-status)")
async def list_proxies(
    request: Request,
    status: Annotated[Status | None, Query(description="Only proxies whose overall status "
                                                       "(the worst of their types) is this.")] = None,
):
    ctx = context(request)
    shared = getattr(ctx.security, "proxy_status", None)
    extra: dict = {}
    if shared is not None:
        # With shared state: the proxies of every replica, each with the replica serving it.
        proxies, replicas, complete = await shared.control_plane()
        extra = {"replicas": replicas, "complete": complete}
    else:
        proxies = views.proxies(ctx.server.connections, ctx.trust_domain)
    if status is not None:
        proxies = [p for p in proxies if p["status"] == status]
    # Documented by ProxyList; returned as built (thousands of proxies: no second validation).
    return JSONResponse({"proxies": proxies, **extra})


@router.get("/proxies/{proxy_id}", response_model=Proxy, summary="One proxy's status")
async def get_proxy(request: Request, proxy_id: ProxyId) -> dict:
    return views.proxy_entry(proxy_id, _streams_of(request, proxy_id), context(request).trust_domain)


@router.get("/proxies/{proxy_id}/config", response_model=ConfigDump,
            summary="One proxy's current config as Envoy JSON, secrets redacted")
async def get_proxy_config(
    request: Request,
    proxy_id: ProxyId,
    type: Annotated[list[TypeName] | None, Query(description="Only these types (repeatable).")] = None,
) -> JSONResponse:  # documented by ConfigDump (response_model), rendered once in a thread
    conns = _streams_of(request, proxy_id)
    # Importing every Envoy proto module takes ~0.5 s once: not on the event loop.
    await asyncio.to_thread(views.message_class_for, "envoy.config.cluster.v3.Cluster")
    sections = views.collect_config(conns, set(type) if type else None)
    # Rendering reads only immutable resources: safe, and kept off the loop, in a thread.
    return JSONResponse(await asyncio.to_thread(views.render_config, proxy_id, sections))
