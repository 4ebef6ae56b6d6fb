"""Debugging aids: trigger a push."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request

from ...xds import types
from ..app import WRITE_RESPONSES, ApiError, admin_access, context
from ..schemas import PushRequest, PushResult

log = logging.getLogger("xds_server.admin")

router = APIRouter(prefix="/api/v1", tags=["debug"], dependencies=[Depends(admin_access)],
                   responses=WRITE_RESPONSES)


def _forget_sent(type_state) -> None:
    """Make the stream treat the client as having nothing of this type, so the next response
    carries the complete current set (the protocol allows re-sending unchanged resources)."""
    type_state.known.clear()
    type_state.full_version = None
    type_state.must_reply = True


@router.post("/push", response_model=PushResult,
             summary="Re-evaluate (or, with resend, re-send) the config of one or every proxy")
async def push(request: Request, body: Annotated[PushRequest | None, Body()] = None) -> dict:
    body = body or PushRequest()
    server = context(request).server
    wanted = set(body.types) if body.types else None
    streams = 0
    proxies: set[str] = set()
    for conn in list(server.connections):
        if conn.state.node is None or (body.proxy is not None and conn.proxy_id != body.proxy):
            continue
        hit = False
        for type_url, type_state in list(conn.state.types.items()):
            if wanted is not None and types.short_name(type_url) not in wanted:
                continue
            if not type_state.seen_request:
                continue
            if body.resend:
                _forget_sent(type_state)
            conn.state.mark_dirty(type_url, None)
            hit = True
        if hit:
            streams += 1
            proxies.add(conn.proxy_id)
            conn.wake.set()
    if body.proxy is not None and not proxies:
        raise ApiError(404, f"no connected proxy with node id {body.proxy!r}",
                       [{"field": "proxy", "location": "body", "message": "not connected"}])
    principal = getattr(request.state, "principal", None)
    log.info("push triggered through the admin API", extra={
        "proxy": body.proxy or "*", "types": ",".join(sorted(wanted)) if wanted else "*",
        "resend": body.resend, "streams": streams,
        "token_name": principal.name if principal else ""})
    return {"streams": streams, "proxies": sorted(proxies)}
