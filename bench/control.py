"""The JSON-lines control protocol every bench process speaks on stdin/stdout.

Commands arrive on stdin, one JSON object per line (`{"cmd": ...}`); events leave on stdout,
one JSON object per line (`{"event": ...}`). Anything else a process wants to say goes to
stderr, so stdout stays machine-readable.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Server-side gRPC options for thousands of streams opening at once (FIELD-NOTES: with the
# defaults a burst of 5,000 opens lost 1,000-1,800 streams). Names checked in grpc core
# (src/core/server/server.h: GRPC_ARG_SERVER_MAX_PENDING_REQUESTS[_HARD_LIMIT]).
SERVER_OPTIONS = [
    ("grpc.server.max_pending_requests", 1 << 20),
    ("grpc.server.max_pending_requests_hard_limit", 1 << 20),
]


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def log(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


async def commands() -> AsyncIterator[dict]:
    """Yield the commands read from stdin until it closes (EOF counts as a quit)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            yield {"cmd": "quit", "eof": True}
            return
        line = line.strip()
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            log(f"bad command line: {line!r}")
