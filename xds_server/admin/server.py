"""Serving the admin API: uvicorn inside the server's own event loop (no extra threads).

`start_admin(running_app, settings)` binds the admin address, feeds a `Metrics` registry from
the running pieces and returns an `AdminServer` to close on shutdown. uvicorn's own signal
handling is switched off: the process's SIGTERM belongs to `serve`, which closes the admin
server with everything else.

mTLS (`--admin-mtls`): clients must present a certificate chaining to the mesh CA's trust
bundle; the admin server's own certificate is issued by the same CA for the control plane's
SPIFFE identity and renewed at half-life. Its key stays in memory (handed to OpenSSL through
an anonymous memfd, never a file on disk). The bearer token still decides the role.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Mapping
from datetime import timedelta
from typing import Any


from ..ca.serving import load_chain
from ..http_task import HttpTask
from ..config import ConfigError, is_loopback, parse_address
from ..metrics import Metrics
from .app import AdminContext, create_app
from .auth import TokenStore
from .settings import AdminSettings

log = logging.getLogger("xds_server.admin")

def bind_admin(address: str, *, any_port_if_taken: bool = False) -> socket.socket:
    """The admin API's listening socket (bound early, so a taken port fails the start-up
    before the xDS server accepts any stream). Raises OSError naming the flag; with
    `any_port_if_taken`, a port in use falls back to any free one (in the same bind, so two
    processes starting together cannot both pass a check and then collide)."""
    host, port = parse_address(address, "--admin-address")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            sock.bind((host, port))
        except OSError as err:
            if not (any_port_if_taken and err.errno == errno.EADDRINUSE):
                raise
            sock.bind((host, 0))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {address} (--admin-address): {err.strerror or err}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


class AdminServer:
    def __init__(self, context: AdminContext, settings: AdminSettings,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.context = context
        self.settings = settings
        self.app = create_app(context, docs=settings.docs, max_body_bytes=settings.max_body_bytes)
        self._ssl_context = ssl_context
        self._http = HttpTask(self.app, f"admin server on {self.settings.address}")
        self._renewal: asyncio.Task | None = None
        self.port = 0
        self.host = ""

    @property
    def metrics(self) -> Metrics:
        return self.context.metrics

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self.address}"

    async def start(self, sock: socket.socket | None = None) -> None:
        # uvicorn's own start/stop chatter ("Started server process") is not an event of ours.
        for name in ("uvicorn", "uvicorn.error"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        sock = sock or bind_admin(self.settings.address,
                                  any_port_if_taken=self.settings.any_port_if_taken)
        self.host, self.port = sock.getsockname()[:2]
        await self._http.start(sock, self._ssl_context)
        log.info("admin API listening", extra={"address": self.address, "url": self.url,
                                               "mtls": self._ssl_context is not None,
                                               "tokens": len(self.context.tokens)})

    async def close(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            await asyncio.gather(self._renewal, return_exceptions=True)
        await self._http.close()
        self.context.metrics.close()


# mTLS -----------------------------------------------------------------------------------------


def mtls_context(authority: Any, issuer: Any, settings: AdminSettings) -> tuple[ssl.SSLContext, Any]:
    """A server context requiring client certificates from the mesh CA, with a certificate
    for the control plane's own identity. Returns (context, the issued certificate)."""
    from ..model.identity import Identity

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=authority.trust_bundle_pem.decode())
    identity = Identity(settings.identity_namespace, settings.identity_service_account)
    issued = issuer.issue_for_identity(identity, proxy="admin-api")
    load_chain(context, issued.chain_pem, issued.key_pem)
    return context, issued


async def _renew(context: ssl.SSLContext, authority: Any, issuer: Any, settings: AdminSettings,
                 issued: Any) -> None:
    """Re-issue the admin server's certificate at half-life and trust new roots (rotation)."""
    from ..model.identity import Identity

    identity = Identity(settings.identity_namespace, settings.identity_service_account)
    bundle = authority.trust_bundle_pem
    while True:
        lifetime = issued.not_after - issued.not_before
        wait = max(60.0, (lifetime / 2).total_seconds())
        await asyncio.sleep(min(wait, 3600.0))
        if authority.trust_bundle_pem != bundle:
            bundle = authority.trust_bundle_pem
            context.load_verify_locations(cadata=bundle.decode())
        if authority.clock() >= issued.not_before + lifetime / 2 - timedelta(seconds=1):
            issued = await asyncio.to_thread(issuer.issue_for_identity, identity, proxy="admin-api")
            load_chain(context, issued.chain_pem, issued.key_pem)
            log.info("admin API certificate renewed",
                     extra={"serial": issued.serial_hex, "not_after": issued.not_after.isoformat()})


# Wiring ---------------------------------------------------------------------------------------


def context_from(running: Any, tokens: TokenStore, metrics: Metrics | None = None) -> AdminContext:
    """An AdminContext from a `RunningApp` (attributes the CA wiring may add are optional:
    `authority`, `issuer`, `registry`, `rotation`, or a `ca` object holding them)."""
    ca = getattr(running, "ca", None)

    def piece(name: str) -> Any:
        value = getattr(running, name, None)
        if value is None and ca is not None:
            value = getattr(ca, name, None)
        return value

    authority = piece("authority")
    issuer = piece("issuer")
    registry = piece("registry") or (issuer.registry if issuer is not None else None)
    rotation = piece("rotation")
    sources: Mapping[str, Any] = getattr(running, "sources", None) or {}
    kube = getattr(running, "kubernetes", None)
    if kube is not None and "kubernetes" not in sources:
        sources = {**sources, "kubernetes": kube}
    trust_domain = getattr(issuer, "trust_domain", None) or getattr(authority, "trust_domain", None) \
        or "cluster.local"
    metrics = metrics or Metrics()
    metrics.attach_server(running.server)
    guard = getattr(ca, "guard", None)
    if guard is not None:
        metrics.attach_guard(guard)
    sds = getattr(ca, "sds", None)
    if sds is not None:
        metrics.attach_refusals("sds", sds.stats.refused)
    csr_service = getattr(ca, "csr_service", None)
    if csr_service is not None:
        metrics.attach_refusals("ca", csr_service.failures)
    server_stats = getattr(running.server, "stats", None)
    if server_stats is not None:
        metrics.attach_refusals("csds", server_stats.csds_refusals)
    metrics.attach_cache(running.cache)
    store = getattr(ca, "store", None)
    if store is not None:
        metrics.attach_shared(store)
    webhook = getattr(running, "webhook", None)
    if webhook is not None:
        metrics.attach_webhook(webhook.stats)
    if running.store is not None:
        metrics.attach_store(running.store)
    metrics.attach_sources(sources)
    load = getattr(running, "load", None)
    if load is not None:
        metrics.attach_load(load)
    if authority is not None or registry is not None:
        metrics.attach_ca(authority, registry)
    return AdminContext(
        server=running.server, cache=running.cache, tokens=tokens, metrics=metrics,
        store=running.store, sources=sources, authority=authority, registry=registry,
        rotation=rotation, trust_domain=trust_domain, load=load,
        security=ca if callable(getattr(ca, "start_root_rotation", None)) else None,
    )


async def start_admin(running: Any, settings: AdminSettings,
                      environ: Mapping[str, str] | None = None,
                      sock: socket.socket | None = None) -> AdminServer:
    """Start the admin API for a running server (see app.py `start_app`)."""
    tokens = TokenStore.load(settings.tokens_file, environ)
    host, _ = parse_address(settings.address, "--admin-address")
    if not len(tokens):
        log.warning("admin API has no tokens configured: every /api request will be refused "
                    "(set --admin-tokens-file or $XDS_SERVER_ADMIN_TOKENS)")
    if not is_loopback(host) and not settings.mtls:
        log.warning("admin API listening beyond loopback without TLS: tokens cross the network "
                    "in clear; use --admin-mtls or keep it on a trusted network",
                    extra={"address": settings.address})
    ctx = context_from(running, tokens)
    ssl_context = issued = None
    if settings.mtls:
        issuer = getattr(running, "issuer", None) or getattr(getattr(running, "ca", None), "issuer", None)
        if ctx.authority is None or issuer is None:
            ctx.metrics.close()
            raise ConfigError("--admin-mtls needs the built-in CA (client certificates come "
                              "from the mesh CA), and no CA is configured")
        # Key generation (RSA: tens of ms) in a worker thread, never on the loop.
        ssl_context, issued = await asyncio.to_thread(mtls_context, ctx.authority, issuer, settings)
    admin = AdminServer(ctx, settings, ssl_context)
    try:
        await admin.start(sock)
    except BaseException:
        ctx.metrics.close()
        raise
    if ssl_context is not None:
        admin._renewal = asyncio.create_task(
            _renew(ssl_context, ctx.authority, issuer, settings, issued), name="admin-cert-renewal")
    return admin

