"""Real loopback backends ("fake pods") for tests, plus tiny proxy-free clients.

Each server binds at construction (port 0 by default, so no port race), serves from a
background thread, and `stop()` closes the listening socket, every open connection (Envoy
keeps upstream connections alive) and joins every thread, so nothing leaks between tests.

The clients use raw sockets / http.client, never urllib, so an `http_proxy` environment
variable on the machine cannot redirect loopback test traffic.
"""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

__all__ = [
    "UPSTREAM_NAME_HEADER",
    "HttpResponse",
    "HttpUpstream",
    "TcpEchoUpstream",
    "http_request",
    "tcp_roundtrip",
]

UPSTREAM_NAME_HEADER = "x-upstream-name"


class _TrackingMixin:
    """Tracks live connections and handler threads so stop() can close and join them all."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256

    def _init_tracking(self) -> None:
        self._conn_lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._live_threads: set[threading.Thread] = set()
        self.connections_total = 0

    def process_request(self, request: Any, client_address: Any) -> None:  # type: ignore[override]
        thread = threading.Thread(
            target=self._serve_one, args=(request, client_address), daemon=True,
            name=f"upstream-conn-{client_address}",
        )
        with self._conn_lock:
            self._conns.add(request)
            self._live_threads.add(thread)
            self.connections_total += 1
        thread.start()

    def _serve_one(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)  # type: ignore[attr-defined]
        except Exception:
            pass
        finally:
            try:
                self.shutdown_request(request)  # type: ignore[attr-defined]
            finally:
                with self._conn_lock:
                    self._conns.discard(request)
                    self._live_threads.discard(threading.current_thread())

    def _close_all(self, timeout: float) -> None:
        with self._conn_lock:
            conns = list(self._conns)
            threads = list(self._live_threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout)


class _UpstreamBase:
    """Start/stop/context-manager plumbing shared by the HTTP and TCP upstreams."""

    _server: Any

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._stopped = False

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def address(self) -> tuple[str, int]:
        """(ip, port) actually bound; feed this to endpoints in generated config."""
        return (self.host, self.port)

    @property
    def connections_total(self) -> int:
        """Number of TCP connections accepted so far (lets tests see reuse/fan-out)."""
        return int(self._server.connections_total)

    def start(self) -> _UpstreamBase:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"upstream-{self.name}", daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every open connection, join all threads. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout)
        self._server.server_close()
        self._server._close_all(timeout)

    def __enter__(self) -> _UpstreamBase:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, address={self.host}:{self.port})"


# ---------------------------------------------------------------------------------- HTTP


class _HttpServer(_TrackingMixin, ThreadingHTTPServer):
    upstream_name: str
    requests_total: int

    def __init__(self, address: tuple[str, int], name: str) -> None:
        self.upstream_name = name
        self.requests_total = 0
        self._count_lock = threading.Lock()
        self._init_tracking()
        super().__init__(address, _EchoHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def count_request(self) -> None:
        with self._count_lock:
            self.requests_total += 1


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers every request 200 with JSON naming the upstream and echoing the request."""

    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream pools expect
    # Idle kept-alive connections are closed by stop(); a long timeout avoids racing Envoy's
    # pool reusing a connection we are closing (which would surface as a 503).
    timeout = 600
    # The status line + headers and the body go out in two writes; with Nagle on, the body
    # waits for the peer's delayed ACK of the headers (~40 ms) on every kept-alive request.
    disable_nagle_algorithm = True
    server: _HttpServer

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        self.server.count_request()
        payload = {
            "name": self.server.upstream_name,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            # Every header line as received (lower-case name), repeated names included.
            "header_list": [[k.lower(), v] for k, v in self.headers.items()],
            "body": body.decode("utf-8", "replace"),
            "server": f"{self.server.server_address[0]}:{self.server.server_address[1]}",
        }
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header(UPSTREAM_NAME_HEADER, self.server.upstream_name)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean


class HttpUpstream(_UpstreamBase):
    """HTTP/1.1 backend on (host, port): every request gets 200 + JSON
    {"name", "method", "path", "headers", "header_list", "body", "server"} and an
    `x-upstream-name` header (`headers` keeps the last value of a repeated name;
    `header_list` has every [name, value] line in order).
    """

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(name)
        self._server = _HttpServer((host, port), name)

    @property
    def requests_total(self) -> int:
        """Requests served so far."""
        return int(self._server.requests_total)

    def __enter__(self) -> HttpUpstream:
        self.start()
        return self


# ----------------------------------------------------------------------------------- TCP


class _EchoTcpHandler(socketserver.BaseRequestHandler):
    """Sends `prefix` once, before echoing the first bytes received, then echoes until EOF."""

    server: _TcpServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(600)
        sent_prefix = False
        while True:
            data = sock.recv(65536)
            if not data:
                break
            self.server.count_bytes(len(data))
            if not sent_prefix:
                data = self.server.prefix + data
                sent_prefix = True
            sock.sendall(data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _TcpServer(_TrackingMixin, socketserver.TCPServer):
    def __init__(self, address: tuple[str, int], prefix: bytes) -> None:
        self.prefix = prefix
        self.bytes_received = 0
        self._bytes_lock = threading.Lock()
        self._init_tracking()
        super().__init__(address, _EchoTcpHandler)

    def count_bytes(self, n: int) -> None:
        with self._bytes_lock:
            self.bytes_received += n


class TcpEchoUpstream(_UpstreamBase):
    """TCP backend: replies `prefix` (default "<name>:") followed by every byte received.

    The prefix goes out once per connection, just before the first echoed bytes; the server
    half-closes when the client does, so `tcp_roundtrip` can read to EOF.
    """

    def __init__(
        self, name: str, host: str = "127.0.0.1", port: int = 0, prefix: bytes | None = None
    ) -> None:
        super().__init__(name)
        self.prefix = prefix if prefix is not None else f"{name}:".encode()
        self._server = _TcpServer((host, port), self.prefix)

    @property
    def bytes_received(self) -> int:
        """Bytes received from clients so far, over every connection."""
        return int(self._server.bytes_received)

    def __enter__(self) -> TcpEchoUpstream:
        self.start()
        return self


# ------------------------------------------------------------------------------- clients


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    json: Any = field(default=None)


def http_request(
    host: str,
    port: int,
    path: str = "/",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 5.0,
) -> HttpResponse:
    """One HTTP/1.1 request on a fresh connection (no proxy env, no pooling).

    A fresh connection per call means each request sees Envoy's current listener config.
    `json` is the parsed body when it is JSON, else None.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        data = resp.read()
        parsed: Any = None
        if resp.getheader("content-type", "").startswith("application/json"):
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
        return HttpResponse(
            status=resp.status,
            headers={k.lower(): v for k, v in resp.getheaders()},
            body=data,
            json=parsed,
        )
    finally:
        conn.close()


def tcp_roundtrip(host: str, port: int, payload: bytes, timeout: float = 5.0) -> bytes:
    """Connect, send `payload`, half-close, and return everything read until EOF."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)
