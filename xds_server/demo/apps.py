"""The pods' apps: an HTTP app per HTTP port and a TCP echo per TCP port, on the pod's IP
(explicit mode), or on a socket opened inside the pod's network namespace (capture mode: the
demo's event loop serves it; the socket stays in the pod).

The pod's app container env tunes them (`DEMO_FAIL_EVERY=5`: every 5th request gets 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket


class App:
    """One asyncio server on (ip, port); closing it also closes its open connections."""

    kind = ""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on (ip, port), or serve `sock`, a listening socket made elsewhere."""
        if sock is not None:
            self._server = await asyncio.start_server(self._serve, sock=sock)
        else:
            self._server = await asyncio.start_server(self._serve, self.ip, self.port, reuse_address=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self.handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None


class HttpApp(App):
    """HTTP/1.1 with keep-alive: 200 and JSON naming the pod and its version, or a transient
    503 to every `fail_every`-th new request. A retry of a failed request (the same
    `x-request-id`, which Envoy keeps across retries) succeeds, so the failures are
    deterministic and one retry always gets past one, however requests interleave."""

    kind = "http"

    def __init__(self, ip: str, port: int, pod: str, service: str, version: str,
                 fail_every: int = 0) -> None:
        super().__init__(ip, port)
        self.pod, self.service, self.version, self.fail_every = pod, service, version, fail_every
        self.requests = 0  # new requests (not retries of a failed one)
        self.failures = 0
        self._failed: dict[str, None] = {}  # x-request-ids answered 503, oldest first

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            request_line = await reader.readline()
            if not request_line.strip():
                return
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if length:
                await reader.readexactly(length)
            request_id = headers.get("x-request-id", "")
            if request_id and request_id in self._failed:
                del self._failed[request_id]
                fail = False  # the retry of a request that failed here: it works now
            else:
                self.requests += 1
                fail = bool(self.fail_every) and self.requests % self.fail_every == 0
            if fail:
                self.failures += 1
                if request_id:
                    self._failed[request_id] = None
                    while len(self._failed) > 10_000:  # retries that never came
                        del self._failed[next(iter(self._failed))]
                status = "503 Service Unavailable"
                payload = {"error": "injected failure", "pod": self.pod, "version": self.version}
            else:
                status = "200 OK"
                payload = {"service": self.service, "version": self.version or self.pod,
                           "pod": self.pod}
            body = json.dumps(payload).encode()
            close = headers.get("connection", "").lower() == "close"
            head = [f"HTTP/1.1 {status}", "Content-Type: application/json",
                    f"Content-Length: {len(body)}"] + (["Connection: close"] if close else [])
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
            if close:
                return


class TcpEchoApp(App):
    """A stand-in database: echoes every byte back until the client closes."""

    kind = "tcp-echo"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
