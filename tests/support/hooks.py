"""Test-side `StreamHooks` (xds/hooks.py): follow what a server sends."""

from __future__ import annotations

from collections.abc import Callable

from xds_server.xds.connection import Connection
from xds_server.xds.hooks import StreamHooks
from xds_server.xds.stream import Push


class OnPush(StreamHooks):
    """Calls `record(conn, push)` for every response the server writes."""

    def __init__(self, record: Callable[[Connection, Push], object]) -> None:
        self.record = record

    def pushed(self, conn: Connection, push: Push) -> None:
        self.record(conn, push)
