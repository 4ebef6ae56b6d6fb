"""Liveness, readiness and Prometheus metrics: open, for probes and scrapers."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..app import AdminContext, context
from ..schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the event loop answers")
async def healthz() -> dict:
    return {"status": "ok"}


def readiness(ctx: AdminContext) -> dict:
    checks: dict[str, dict] = {}
    serving = bool(getattr(ctx.server, "serving", True))
    checks["xds"] = {"ok": serving, "detail": f"serving on {ctx.server.address}" if serving
                     else "the xDS server is not serving (starting or shutting down)"}
    unsynced = [name for name, source in sorted(ctx.sources.items())
                if not getattr(source, "synced", True)]
    checks["sources"] = {
        "ok": not unsynced,
        "detail": "waiting for the first sync of " + ", ".join(unsynced) if unsynced
        else f"{len(ctx.sources)} source(s) synced",
    }
    if ctx.authority is not None:
        from ..views import iso
        from ...ca.authority import utcnow

        try:
            not_after = ctx.authority.state.not_after
            ok = not_after > utcnow()
            detail = f"signing certificate valid until {iso(not_after)}" if ok \
                else f"the CA certificate expired at {iso(not_after)}"
        except Exception as err:
            ok, detail = False, f"CA not usable: {err}"
        checks["ca"] = {"ok": ok, "detail": detail}
    else:
        checks["ca"] = {"ok": True, "detail": "no CA configured"}
    shared = ctx.security.shared_status() if ctx.security is not None else None
    if shared is not None:
        # Degraded is still ready: xDS serves from this replica's own sources and CA.
        checks["shared_state"] = {
            "ok": True,
            "detail": f"Redis {shared['url']} up" if shared["up"] else
            f"degraded: Redis {shared['url']} unreachable (serving; re-published when it returns)"}
    return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "Not ready: see `checks`."}},
            summary="Readiness: sources synced, CA usable, xDS serving")
async def readyz(request: Request):
    result = readiness(context(request))
    if not result["ready"]:
        return JSONResponse(result, status_code=503)
    return result


@router.get("/metrics", summary="Prometheus metrics (text exposition format)",
            response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format."}})
async def metrics(request: Request) -> Response:
    ctx = context(request)
    return Response(generate_latest(ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
