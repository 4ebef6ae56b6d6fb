"""The live mesh page: `/ui` (the page and its assets, shipped in the package: no CDN) and
`/api/v1/ui/mesh` (what it shows, read token).

The page itself holds no data, so it is served without a token, like `/openapi.json`; it asks
for a read token (or takes one from the URL fragment `#token=...`, which browsers never send
to a server, and removes it from the address bar) and sends it as a bearer token when it
polls the JSON. A strict Content-Security-Policy allows nothing but this origin.
"""

from __future__ import annotations

import json
import time
from importlib import resources

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response

from .. import mesh_graph
from ..app import ERROR_RESPONSES, ApiError, context, read_access
from ..schemas import MeshGraph

router = APIRouter(tags=["ui"])
api = APIRouter(prefix="/api/v1", tags=["ui"], dependencies=[Depends(read_access)],
                responses=ERROR_RESPONSES)

SHARE_SECONDS = 1.0
ASSETS = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> bytes:
    return resources.files("xds_server.admin").joinpath("ui", name).read_bytes()


@router.get("/ui", include_in_schema=False)
async def page() -> Response:
    return Response(_asset("index.html"), media_type="text/html; charset=utf-8",
                    headers=SECURITY_HEADERS)


@router.get("/ui/assets/{name}", include_in_schema=False)
async def asset(name: str = Path(max_length=64)) -> Response:
    media = ASSETS.get(name)
    if media is None or name == "index.html":
        raise ApiError(404, f"no asset {name!r}")
    return Response(_asset(name), media_type=f"{media}; charset=utf-8", headers=SECURITY_HEADERS)


@api.get("/ui/mesh", response_model=MeshGraph,
         summary="The live mesh page's data: services, traffic and route edges, proxy status, "
                 "certificates close to expiry, source errors")
async def mesh(request: Request) -> Response:
    # Built at most once a second and shared: every open page polls, the build reads the
    # whole mesh (~14 ms at 1,000 proxies and 100 services, bench/lrs_bench.py).
    state = request.app.state
    now = time.monotonic()
    cached = getattr(state, "ui_mesh", None)
    if cached is None or now - cached[0] >= SHARE_SECONDS:
        body = json.dumps(mesh_graph.build(context(request)), separators=(",", ":")).encode()
        cached = state.ui_mesh = (now, body)
    return Response(cached[1], media_type="application/json")
