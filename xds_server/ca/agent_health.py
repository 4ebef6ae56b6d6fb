"""The workload agent's readiness endpoint: `GET /healthz/ready` answers 200 while the agent
holds a valid certificate on disk, 503 before (and after it expired without renewal).

The kubelet's startup probe on it holds Envoy back until the files its bootstrap names exist
(a native sidecar's startup probe gates the next container). One path, no body to parse: a
few lines on asyncio's streams rather than a web framework in the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ..config import parse_address

READY_PATH = "/healthz/ready"
_MAX_REQUEST_LINE = 4096


def _response(status: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


async def _handle(ready: Callable[[], bool], reader: asyncio.StreamReader,
                  writer: asyncio.StreamWriter) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        parts = line[:_MAX_REQUEST_LINE].decode("latin-1").split()
        if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
            writer.write(_response("405 Method Not Allowed", b"GET only\n"))
        elif parts[1] != READY_PATH:
            writer.write(_response("404 Not Found", b"not found\n"))
        elif ready():
            writer.write(_response("200 OK", b"ready\n"))
        else:
            writer.write(_response("503 Service Unavailable", b"no valid certificate yet\n"))
        await writer.drain()
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve_readiness(address: str, ready: Callable[[], bool]) -> asyncio.Server:
    """Listen on HOST:PORT (port 0: any free port; read it from the returned server)."""
    host, port = parse_address(address, "--ready-address")
    return await asyncio.start_server(lambda r, w: _handle(ready, r, w), host, port)
