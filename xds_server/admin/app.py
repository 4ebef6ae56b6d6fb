"""The admin HTTP API: an ASGI app (FastAPI) over the running server's own objects.

`create_app(context)` builds it; `server.py` serves it with uvicorn inside the server's event
loop. Handlers read the live state (connections, cache, store, CA) and never keep a copy.

Access:
  * `/healthz`, `/readyz`, `/metrics`, `/openapi.json` (and `/docs` with --admin-docs): no token (probes, scrapers and
    documentation; nothing there is secret or per-proxy).
  * every `/api/v1/...` GET needs a token with the read role; every write the admin role.
Errors are JSON, `{"error": ..., "fields": [{"field", "location", "message"}]}`: 401 without
a valid token, 403 for a read token on a write, 404, 405, 409, 413, 422 for bad input (naming
the field), never a 500 for anything a client sends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..metrics import Metrics
from .auth import Principal, Role, TokenStore, parse_bearer
from .schemas import ErrorResponse
from .settings import MAX_BODY_BYTES

log = logging.getLogger("xds_server.admin")

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes and scrapes: debug logs


@dataclass
class AdminContext:
    """The running pieces the API reads. Only `server`, `cache` and `tokens` are required."""

    server: Any  # XdsServer
    cache: Any  # ResourceCache
    tokens: TokenStore
    metrics: Metrics = field(default_factory=Metrics)
    store: Any = None  # MeshStore
    sources: Mapping[str, Any] = field(default_factory=dict)  # name -> object with `.errors`
    authority: Any = None  # CertificateAuthority
    registry: Any = None  # CertificateRegistry of issued certificates
    rotation: Any = None  # RootRotation
    # The process's security object (security.Security), when it runs the CA: root rotation
    # goes through it so SDS publishes each step; None for a bare CA (tests, tools).
    security: Any = None
    trust_domain: str = "cluster.local"
    load: Any = None  # load_reports.LoadAggregator (LRS), when the server runs one
    started_at: float = field(default_factory=time.time)


class ApiError(Exception):
    def __init__(self, status: int, message: str, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.fields = fields or []
        self.headers = headers


def error_response(status: int, message: str, fields: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "fields": fields or []}, status_code=status,
                        headers=headers)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No valid bearer token."},
    403: {"model": ErrorResponse, "description": "The token's role may not do this."},
    404: {"model": ErrorResponse, "description": "No such object (or that part is not configured)."},
    422: {"model": ErrorResponse, "description": "Bad input; `fields` names each offending field."},
}
WRITE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    400: {"model": ErrorResponse, "description": "The body cannot be parsed at all."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
}


def context(request: Request) -> AdminContext:
    return request.app.state.context


_bearer = HTTPBearer(auto_error=False, description="A token from --admin-tokens-file or "
                                                   "$XDS_SERVER_ADMIN_TOKENS (read or admin role).")


def require(role: Role):
    """A dependency: the caller's principal, if its token has at least `role`."""

    async def check(
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,  # documents it
    ) -> Principal:
        ctx = context(request)
        token, problem = parse_bearer(request.headers.get("authorization"))
        principal = ctx.tokens.authenticate(token) if token is not None else None
        if principal is None:
            reason = problem or "unknown_token"
            ctx.metrics.auth_failure("admin", reason)
            request.state.auth_failure = reason
            message = {
                "missing": "authentication required: send 'Authorization: Bearer <token>'",
                "malformed": "malformed Authorization header: expected 'Bearer <token>'",
            }.get(reason, "invalid token")
            raise ApiError(401, message, headers={"WWW-Authenticate": 'Bearer realm="xds-server"'})
        request.state.principal = principal
        if not principal.may(role):
            ctx.metrics.auth_failure("admin", "forbidden")
            request.state.auth_failure = "forbidden"
            raise ApiError(403, f"the token {principal.name!r} has the {principal.role.name.lower()} "
                                f"role; this needs the {role.name.lower()} role")
        return principal

    return check


def _query_names(dependant: Any) -> set[str]:
    """Query parameter names an operation declares, its dependencies' included."""
    names = {p.alias for p in getattr(dependant, "query_params", ())}
    for sub in getattr(dependant, "dependencies", ()):
        names |= _query_names(sub)
    return names


async def known_query_only(request: Request) -> None:
    """Refuse query parameters the operation does not declare: a typo (`?sectoin=`) is an
    error naming the parameter, not a silently ignored filter."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None or not request.query_params:
        return
    known = _query_names(dependant)
    unknown = sorted({k for k in request.query_params if k not in known})
    if unknown:
        raise ApiError(422, "unknown query parameter(s): " + ", ".join(repr(u) for u in unknown),
                       [{"field": u or "(unnamed)", "location": "query", "message": "not a parameter of this "
                         "operation"} for u in unknown])


read_access = require(Role.READ)
admin_access = require(Role.ADMIN)


def _field_problems(exc: RequestValidationError) -> list[dict[str, str]]:
    problems = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ())]
        location = loc[0] if loc else "body"
        path = ".".join(loc[1:]) or location
        message = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":  # loc is ("body", <character position>)
            message = f"the body is not valid JSON (at character {path})"
            path = "body"
        problems.append({"field": path, "location": location, "message": message})
    return problems


def create_app(ctx: AdminContext, *, docs: bool = False, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    from .routes import ca, debug, health, mesh, netpol, proxies, tokens, ui

    app = FastAPI(
        title="xds-server admin API",
        version="1",
        description=(
            "Inspect and operate the xds-server control plane: connected proxies and their "
            "per-type sync status (as `istioctl proxy-status` shows it), a proxy's current "
            "config as Envoy JSON (secrets redacted), the mesh model and source errors, the "
            "built-in CA, and debugging triggers.\n\n"
            "Authenticate with `Authorization: Bearer <token>`. GETs under `/api/v1` need the "
            "read role, every write the admin role. `/healthz`, `/readyz` and `/metrics` are "
            "open."
        ),
        dependencies=[Depends(known_query_only)],
        # The limit for every transfer encoding: a chunked body has no Content-Length for the
        # check in `observe`, so FastAPI counts the bytes as they arrive and stops past it (413).
        # (Starlette's limiter also rewrites `observe`'s JSON 413 for a declared oversize body
        # into its plain-text one: logged and counted here, but not in the API's error shape.)
        max_body_size=max_body_bytes,
        docs_url=None,  # (--admin-docs: served below, from this server only)
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.context = ctx
    if docs:
        _add_docs(app)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.fields, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = _field_problems(exc)
        summary = "; ".join(f"{p['location']} {p['field']}: {p['message']}" for p in problems)
        return error_response(422, f"invalid request: {summary}", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not even decode the body (not UTF-8...)
            return error_response(400, "the body cannot be parsed: send a JSON object (UTF-8)",
                                  [{"field": "body", "location": "body", "message": str(exc.detail)}])
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("admin API: request failed", extra={"path": request.url.path})
        return error_response(500, "internal error (see the server log)")

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            response = error_response(413, f"request body larger than {max_body_bytes} bytes")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        ctx.metrics.admin_requests.labels(request.method, template, str(response.status_code)).inc()
        path = request.url.path
        principal: Principal | None = getattr(request.state, "principal", None)
        extra = {
            "method": request.method,
            "path": path,  # never the query string or headers: nothing secret is logged
            "status": response.status_code,
            "duration_ms": round((time.perf_counter() - start) * 1000, 2),
            "client": request.client.host if request.client else "",
        }
        if principal is not None:
            extra["token_name"] = principal.name
        failure = getattr(request.state, "auth_failure", None)
        if failure is not None:
            extra["auth_failure"] = failure
        level = logging.DEBUG if path in QUIET_PATHS and response.status_code < 400 else logging.INFO
        if failure is not None or response.status_code >= 500:
            level = logging.WARNING
        log.log(level, "admin request", extra=extra)
        return response

    app.include_router(health.router)
    app.include_router(proxies.router)
    app.include_router(mesh.router)
    app.include_router(netpol.router)
    app.include_router(ca.router)
    app.include_router(tokens.router)
    app.include_router(debug.router)
    app.include_router(ui.router)
    app.include_router(ui.api)
    return app


DOCS_ASSETS = "/docs-assets"
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'")


def _add_docs(app: FastAPI) -> None:
    """Swagger UI at /docs and ReDoc at /redoc with every script, style and icon served by
    this server (the files of the `fastapi-offline` package): FastAPI's own pages load them
    from public CDNs (and ReDoc Google's fonts), which breaks offline and tells third parties
    who reads the docs. Swagger UI's validator badge (a request to validator.swagger.io with
    the document's URL) is off."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from starlette.responses import HTMLResponse

    assets = files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")

    def same_origin_only(page: HTMLResponse) -> HTMLResponse:
        # The bundles still name a few outside URLs (ReDoc's footer logo): the browser is told
        # to fetch nothing from anywhere but here (inline: the pages' own start-up scripts).
        page.headers["Content-Security-Policy"] = DOCS_CSP
        return page

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return same_origin_only(get_swagger_ui_html(
            openapi_url="/openapi.json", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None}))

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return same_origin_only(get_redoc_html(
            openapi_url="/openapi.json", title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png", with_google_fonts=False))
