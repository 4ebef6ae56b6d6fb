"""The built-in CA: trust bundle, issued certificates, root rotation."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from .. import views
from ..app import ERROR_RESPONSES, WRITE_RESPONSES, AdminContext, ApiError, admin_access, context, read_access
from ..schemas import CAStatus, ErrorResponse, IssuedList, RotationRequest, RotationResult, TrustBundle

log = logging.getLogger("xds_server.admin")

router = APIRouter(prefix="/api/v1/ca", tags=["ca"], responses=ERROR_RESPONSES)

NO_CA = "no CA is configured on this server (start it with the built-in CA to use /api/v1/ca)"


def _authority(ctx: AdminContext):
    if ctx.authority is None:
        raise ApiError(404, NO_CA)
    return ctx.authority


def _rotation_lock(request: Request) -> asyncio.Lock:
    """One rotation request at a time: a second "start" waits for the first to record its
    phase (and then gets 409), as when the whole step ran in one loop turn."""
    lock = getattr(request.app.state, "root_rotation_lock", None)
    if lock is None:
        lock = request.app.state.root_rotation_lock = asyncio.Lock()
    return lock


def rotation_status(ctx: AdminContext) -> dict | None:
    """The rotation phase, with bundle delivery (who still lacks the new bundle) when the
    server's SDS provider tracks it."""
    status = ctx.security.rotation_status() if ctx.security is not None else None
    if status is not None:
        return status
    return ctx.rotation.status() if ctx.rotation is not None else None


@router.get("", response_model=CAStatus, dependencies=[Depends(read_access)],
            summary="CA status: roots, signing certificate, rotation phase")
async def ca_status(request: Request) -> dict:
    ctx = context(request)
    status = views.ca_status(_authority(ctx), None, ctx.registry)
    status["rotation"] = rotation_status(ctx)
    return status


@router.get("/trust-bundle", response_model=TrustBundle, dependencies=[Depends(read_access)],
            summary="The trust bundle (every trusted root, PEM)")
async def trust_bundle(request: Request) -> dict:
    authority = _authority(context(request))
    return {"pem": authority.trust_bundle_pem.decode(),
            "roots": [views.certificate_json(r) for r in authority.roots]}


@router.get("/certificates", response_model=IssuedList, dependencies=[Depends(read_access)],
            summary="Issued workload certificates still valid, soonest expiry first")
async def certificates(
    request: Request,
    proxy: Annotated[str | None, Query(min_length=1, max_length=1024)] = None,
    spiffe_id: Annotated[str | None, Query(min_length=1, max_length=2048)] = None,
) -> dict:
    ctx = context(request)
    _authority(ctx)
    if ctx.registry is None:
        return {"certificates": []}
    return {"certificates": [r.to_dict() for r in ctx.registry.records(proxy=proxy, spiffe_id=spiffe_id)]}


@router.post("/root-rotation", response_model=RotationResult, dependencies=[Depends(admin_access)],
             responses={**WRITE_RESPONSES,
                        409: {"model": ErrorResponse, "description": "Not possible in this phase."}},
             summary="Start (or cancel) a root rotation")
async def root_rotation(request: Request, body: RotationRequest) -> dict:
    ctx = context(request)
    _authority(ctx)
    if ctx.rotation is None:
        raise ApiError(404, "root rotation is not enabled on this server")
    from ...ca.rotation import RotationError
    from ...config import ConfigError

    principal = getattr(request.state, "principal", None)
    try:
        async with _rotation_lock(request):
            if body.action == "start" and ctx.security is not None:
                # The new root is generated in a worker thread (ca/workloads.py); SDS
                # publishes the new bundle at once.
                await ctx.security.start_root_rotation()
            elif body.action == "start":
                # Generating a root key and certificate (and writing the CA files) is CPU and
                # disk work: in a thread, so the event loop keeps serving streams meanwhile.
                # Recording the phase stays on the loop.
                await asyncio.to_thread(ctx.rotation.prepare_next_root)
                ctx.rotation.start_root_rotation()
            else:
                ctx.rotation.cancel()  # the CA's change callback republishes the bundle
    except RotationError as err:
        raise ApiError(409, str(err), [{"field": "action", "location": "body",
                                        "message": str(err)}]) from None
    except ConfigError as err:
        raise ApiError(404, str(err)) from None
    log.info("root rotation %s requested through the admin API", body.action,
             extra={"token_name": principal.name if principal else ""})
    return {"action": body.action, "rotation": rotation_status(ctx)}
