"""An xDS server with its admin API, in-process, for admin and metrics tests.

`AdminStack` runs in the test's event loop. `ThreadedStack` runs one in a thread of its own
(its own loop) for synchronous clients such as schemathesis; the server under test still has
a single event loop, as in production.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import types
from pathlib import Path
from typing import Any

import httpx

from xds_server.admin.auth import TokenStore
from xds_server.admin.server import AdminServer, context_from
from xds_server.admin.settings import AdminSettings
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer


class Tokens:
    def __init__(self) -> None:
        self.admin = "adm-" + secrets.token_urlsafe(24)
        self.read = "rd-" + secrets.token_urlsafe(24)

    def store(self) -> TokenStore:
        return TokenStore.from_tokens({"ops": (self.admin, "admin"), "viewer": (self.read, "read")})

    def document(self) -> str:
        """A tokens file holding only hashes."""
        from xds_server.admin.auth import document_for

        return document_for({"ops": (self.admin, "admin"), "viewer": (self.read, "read")})

    def auth(self, which: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {getattr(self, which)}"}


class CA:
    """A built-in CA made in a test directory: authority, issuer (registry), rotation."""

    def __init__(self, directory: Path) -> None:
        from xds_server.ca.authority import CertificateAuthority
        from xds_server.ca.rotation import RootRotation
        from xds_server.ca.svid import SvidIssuer

        self.authority = CertificateAuthority(directory)
        self.issuer = SvidIssuer(self.authority)
        self.registry = self.issuer.registry
        self.rotation = RootRotation(self.authority, self.registry)


class AdminStack:
    def __init__(self, *, cache: ResourceCache | None = None, server: XdsServer | None = None,
                 store: Any = None, sources: dict | None = None, ca: CA | None = None,
                 settings: ServerSettings | None = None, tokens: Tokens | None = None,
                 mtls: bool = False, docs: bool = False, load: Any = None) -> None:
        self.cache = cache if cache is not None else ResourceCache()
        self.server = server or XdsServer(
            self.cache, settings or ServerSettings(address="127.0.0.1:0", debounce_quiet=0))
        self.store = store
        self.sources = sources or {}
        self.ca = ca
        self.tokens = tokens or Tokens()
        self.mtls = mtls
        self.docs = docs
        self.load = load  # load_reports.LoadAggregator, for the metrics and /ui
        self.admin: AdminServer | None = None

    async def start(self) -> AdminStack:
        from xds_server.admin.server import mtls_context

        if self.server._server is None:
            await self.server.start()
        running = types.SimpleNamespace(server=self.server, cache=self.cache, store=self.store,
                                        sources=self.sources, ca=self.ca, load=self.load)
        ctx = context_from(running, self.tokens.store())
        settings = AdminSettings(address="127.0.0.1:0", mtls=self.mtls, docs=self.docs)
        ssl_context = None
        if self.mtls:
            assert self.ca is not None
            ssl_context, _ = mtls_context(self.ca.authority, self.ca.issuer, settings)
        self.admin = AdminServer(ctx, settings, ssl_context)
        await self.admin.start()
        return self

    @property
    def url(self) -> str:
        assert self.admin is not None
        return self.admin.url

    @property
    def metrics(self):
        assert self.admin is not None
        return self.admin.metrics

    def client(self, token: str | None = "read", **kwargs: Any) -> httpx.AsyncClient:
        headers = self.tokens.auth(token) if token else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10, trust_env=False,
                                 **kwargs)

    async def close(self) -> None:
        if self.admin is not None:
            await self.admin.close()
        await self.server.stop(0.2)

    async def __aenter__(self) -> AdminStack:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


class ThreadedStack:
    """An AdminStack on its own event loop in a thread, for synchronous test clients."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="admin-stack", daemon=True)
        self.stack: AdminStack | None = None

    def run(self, coro, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> AdminStack:
        self._thread.start()

        async def make() -> AdminStack:
            return await AdminStack(**self._kwargs).start()

        self.stack = self.run(make())
        return self.stack

    def stop(self) -> None:
        if self.stack is not None:
            self.run(self.stack.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
