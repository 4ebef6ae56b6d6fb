"""The server process: sources feeding the cache, the xDS server reading it, one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from .config import is_loopback, parse_address
from .model.store import MeshStore
from .translate.controller import MeshController
from .translate.scope import ScopeSettings
from .xds.cache import ResourceCache
from .xds.server import ServerSettings, XdsServer

log = logging.getLogger("xds_server")


@dataclass
class AppConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    source: Path | None = None  # a directory of Kubernetes-shaped YAML (the mesh)
    resources: Path | None = None  # a directory of raw Envoy resources (YAML/JSON)
    scope: ScopeSettings = field(default_factory=ScopeSettings)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    A push allocates many short-lived objects per stream, and with thousands of streams the
    default gen-0 threshold (700) triggers collections that keep walking the same long-lived
    stream state. Freezing what exists after start-up takes it out of every later collection,
    and a higher gen-0 threshold makes collections rarer. Measured in bench/RESULTS.md.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@dataclass
class RunningApp:
    """The pieces of a started server process: what `serve` runs until a signal, and what
    `xds-server demo` runs in-process next to its sidecars and backends."""

    server: XdsServer
    cache: ResourceCache
    store: MeshStore | None  # the mesh from --source, when given
    stop_event: asyncio.Event
    tasks: list[asyncio.Task]

    @property
    def address(self) -> str:
        """The xDS address actually bound (a configured port 0 is resolved)."""
        return self.server.address

    async def close(self, grace: float | None = None) -> None:
        """Stop serving (streams end with UNAVAILABLE), then stop the sources."""
        self.stop_event.set()
        await self.server.stop(grace)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def start_app(config: AppConfig) -> RunningApp:
    """Load the sources, start watching them and start the xDS server; return at once."""
    from .sources.resource_files import ResourceDirectory  # imports every Envoy proto: lazily

    host, _ = parse_address(config.server.address, "--xds-address")
    if not is_loopback(host):
        log.warning(
            "xDS listening beyond loopback without TLS: only do this on a trusted network",
            extra={"address": config.server.address},
        )
    cache = ResourceCache()
    tasks: list[asyncio.Task] = []
    stop = asyncio.Event()
    if config.resources is not None:
        directory = ResourceDirectory(config.resources, cache)
        errors = directory.load()
        log.info(
            "loaded raw resources",
            extra={"directory": str(config.resources), "errors": len(errors),
                   "resources": sum(len(cache.resources(t)) for t in cache.type_urls())},
        )
        tasks.append(asyncio.create_task(directory.run(stop), name="resource-files"))

    view_for = release = None
    store: MeshStore | None = None
    if config.source is not None:
        from .sources.mesh_files import MeshDirectory

        store = MeshStore()
        controller = MeshController(store, cache, config.scope)
        mesh = MeshDirectory(config.source, store)
        errors = mesh.load()
        log.info(
            "loaded mesh",
            extra={"directory": str(config.source), "errors": len(errors),
                   "services": len(store.all("Service"))},
        )
        tasks.append(asyncio.create_task(mesh.run(stop), name="mesh-files"))
        view_for, release = controller.view_for, controller.release

    server = XdsServer(cache, config.server, view_for=view_for, release_view=release)
    try:
        await server.start()
    except BaseException:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return RunningApp(server, cache, store, stop, tasks)


async def serve(config: AppConfig, *, started: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    app = await start_app(config)
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, app.stop_event.set)
    log.info("serving", extra={"xds_address": app.address})
    if started is not None:
        started.set()
    try:
        await app.stop_event.wait()
    finally:
        log.info("shutting down", extra={"grace_seconds": config.server.shutdown_grace})
        await app.close()
