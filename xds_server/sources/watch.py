"""Watching a directory for the file sources: reload on every change, never give up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

log = logging.getLogger(__name__)

# What a reload is told: the paths that changed, or None for "anything may have changed"
# (the first catch-up, a directory that came back): the source rescans everything.
ChangedPaths = frozenset[Path] | None


async def watch_directory(
    directory: Path,
    reload: Callable[[], Awaitable[object]],
    stop: asyncio.Event | None = None,
    *,
    label: str,
) -> None:
    """Call `reload` after every change under `directory` until `stop` is set (or the task is
    cancelled). Never raises: a source keeps serving its last good state whatever happens."""

    async def reload_all(_paths: ChangedPaths) -> object:
        return await reload()

    await watch_changes(directory, reload_all, stop, label=label)


async def watch_changes(
    directory: Path,
    reload: Callable[[ChangedPaths], Awaitable[object]],
    stop: asyncio.Event | None = None,
    *,
    label: str,
) -> None:
    """As `watch_directory`, telling `reload` which paths changed (None: rescan everything)."""
    if stop is None:  # watchfiles polls an event; a private one when callers just cancel
        stop = asyncio.Event()
    while not stop.is_set():
        try:
            if not await asyncio.to_thread(directory.is_dir):
                await reload(None)  # keeps the last good set and reports the problem
            else:
                # Catch up once the watch exists (its first, empty, timeout yield), so a
                # change made between a scan and the start of the watch is never missed.
                caught_up = False
                async for changes in watchfiles.awatch(
                    directory, stop_event=stop, yield_on_timeout=True, rust_timeout=500
                ):
                    if not caught_up:
                        caught_up = True
                        await reload(None)
                    elif changes:
                        await reload(frozenset(Path(path) for _, path in changes))
                    if not await asyncio.to_thread(directory.is_dir):
                        break  # its watch died with it: poll until it comes back
        except Exception as e:
            log.warning("%s: cannot watch %s (%s); retrying", label, directory, e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=2.0)
