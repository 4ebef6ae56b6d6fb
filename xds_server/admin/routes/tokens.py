"""Workload tokens: create and revoke (admin role). With shared state a revocation reaches
every replica; the token is signed with the key every replica shares."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from fastapi import APIRouter, Depends, Path, Request

from ..app import WRITE_RESPONSES, ApiError, admin_access, context
from ..schemas import TokenIssued, TokenRequest, TokenRevoked

log = logging.getLogger("xds_server.admin")

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], dependencies=[Depends(admin_access)],
                   responses=WRITE_RESPONSES)


def _security(request: Request):
    security = context(request).security
    if security is None or getattr(security, "tokens", None) is None:
        raise ApiError(404, "workload tokens need the built-in CA (--auth tokens)")
    return security


@router.post("", response_model=TokenIssued, status_code=201,
             summary="Create a workload token (returned once)")
async def create_token(request: Request, body: TokenRequest) -> dict:
    from ...config import ConfigError, parse_duration

    security = _security(request)
    try:
        ttl = timedelta(seconds=parse_duration(body.ttl, settings_form=True))
    except ConfigError as err:
        raise ApiError(422, str(err), [{"field": "ttl", "location": "body", "message": str(err)}]) from None
    try:
        issued = await asyncio.to_thread(security.tokens.issue, body.namespace, body.service_account, ttl)
    except ValueError as err:
        raise ApiError(422, str(err), [{"field": "body", "location": "body", "message": str(err)}]) from None
    principal = getattr(request.state, "principal", None)
    log.info("workload token created through the admin API", extra={
        "token_id": issued.token_id, "identity": str(issued.identity),
        "token_name": principal.name if principal else ""})
    return {"token": issued.token, "token_id": issued.token_id, "identity": str(issued.identity),
            "expires_at": issued.expires_at.isoformat()}


@router.delete("/{token_id}", response_model=TokenRevoked,
               summary="Revoke a workload token (every replica closes its streams)")
async def revoke_token(request: Request,
                       token_id: str = Path(pattern=r"^[A-Za-z0-9_-]{8,64}$")) -> dict:
    security = _security(request)
    fresh = await security.revoke_token(token_id)
    principal = getattr(request.state, "principal", None)
    log.info("workload token revoked through the admin API", extra={
        "token_id": token_id, "token_name": principal.name if principal else ""})
    return {"token_id": token_id, "revoked": fresh}
