"""An ASGI app served by uvicorn as a task of the running event loop: the admin API and the
admission webhook share it. The socket is bound by the caller beforehand (so a taken port
fails the start-up before anything else starts), signals stay with `serve`, which closes
these servers itself, and TLS comes from a context the caller keeps current."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Generator
from typing import Any

import uvicorn


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process's signals belong to `serve`, which closes us


class HttpTask:
    """One uvicorn server on one bound socket, in a task of the loop."""

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.name = name
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, sock: socket.socket, context: ssl.SSLContext | None = None) -> None:
        """Serve on `sock` (with TLS from `context`); returns once it accepts, or raises."""
        factory = None
        if context is not None:
            factory = lambda _config, _default: context  # noqa: E731
        config = uvicorn.Config(
            self.app, log_config=None, access_log=False, lifespan="off",
            ssl_context_factory=factory, timeout_graceful_shutdown=2, server_header=False,
            proxy_headers=False,
        )
        server = self._server = _Uvicorn(config)
        task = self._task = asyncio.create_task(server.serve(sockets=[sock]), name=self.name)
        while not server.started:
            if task.done():
                task.result()  # raises what stopped it
                raise OSError(f"{self.name} did not start")
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        """Stop gracefully (at most 5 s), then for good."""
        server, task = self._server, self._task
        if server is None or task is None:
            return
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except (TimeoutError, Exception):
            server.force_exit = True
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
