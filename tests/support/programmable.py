"""An HTTP backend whose behaviour the test sets while it runs ("programmable pod app").

Like `HttpUpstream` (tests/support/upstreams.py) it binds at construction, serves HTTP/1.1
keep-alive from threads and answers with JSON naming itself, but a test can also make it:

- fail a fraction of requests with a status (default 503), chosen at random per request
  from a seeded generator (`fail_fraction`, `fail_status`);
- answer every request with a status on demand (`status`), or one path differently
  (`path_status`, e.g. a failing health endpoint);
- fail exactly the next N requests, then recover (`fail_next = N`, counted down per
  request; a deterministic flaky backend for retries);
- delay its answers (`delay`, seconds; interrupted by stop(), so teardown never waits);
- count what it saw: requests in total and per path, requests in flight and the most that
  were ever in flight at once (`requests_total`, `requests_for`, `in_flight`, `max_in_flight`).

Settings are plain attributes, read once per request, so changing them takes effect on the
next request. Use it as a pod's app with `mesh.pod(..., app="none")` (see `programmable_pod`).
"""

from __future__ import annotations

import json
import random
import socketserver
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from tests.support.upstreams import UPSTREAM_NAME_HEADER, _TrackingMixin, _UpstreamBase

if TYPE_CHECKING:
    from tests.support.mesh import MeshHarness, Pod

__all__ = ["ProgrammableBackend", "programmable_pod"]


class _Server(_TrackingMixin, ThreadingHTTPServer):
    backend: ProgrammableBackend

    def __init__(self, address: tuple[str, int], backend: ProgrammableBackend) -> None:
        self.backend = backend
        self._init_tracking()
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Envoy's upstream pools expect
    timeout = 600  # idle kept-alive connections are closed by stop()
    server: _Server

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        backend = self.server.backend
        status = backend._begin(self.path)
        try:
            stopping = backend.delay > 0 and backend._stopping.wait(backend.delay)
        finally:
            # Done before the answer leaves: a request the client sends after seeing this
            # answer can never overlap it in `in_flight`.
            backend._end()
        if stopping:
            self.close_connection = True
            return  # stopping: drop the request, do not keep teardown waiting
        payload = {
            "name": backend.name,
            "path": self.path,
            "status": status,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header(UPSTREAM_NAME_HEADER, backend.name)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ProgrammableBackend(_UpstreamBase):
    """HTTP/1.1 backend on (host, port) whose answers the test programs (see module doc)."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        fail_fraction: float = 0.0,
        fail_status: int = 503,
        fail_next: int = 0,
        status: int = 200,
        delay: float = 0.0,
        path_status: dict[str, int] | None = None,
        seed: int | None = 0,
    ) -> None:
        super().__init__(name)
        self.fail_fraction = fail_fraction
        self.fail_status = fail_status
        self.fail_next = fail_next
        self.status = status
        self.delay = delay
        self.path_status: dict[str, int] = dict(path_status or {})
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._paths: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._in_flight = 0
        self._max_in_flight = 0
        self._server = _Server((host, port), self)

    # -- behaviour (called by the handler) ---------------------------------------------

    def _begin(self, path: str) -> int:
        with self._lock:
            self._paths[path.split("?", 1)[0]] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            if path.split("?", 1)[0] in self.path_status:
                status = self.path_status[path.split("?", 1)[0]]
            elif self.fail_next > 0:
                self.fail_next -= 1
                status = self.fail_status
            elif self.fail_fraction > 0 and self._random.random() < self.fail_fraction:
                status = self.fail_status
            else:
                status = self.status
            self._statuses[status] += 1
            return status

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- observations ------------------------------------------------------------------

    @property
    def requests_total(self) -> int:
        with self._lock:
            return sum(self._paths.values())

    def requests_for(self, prefix: str) -> int:
        """Requests whose path (without query) starts with `prefix`."""
        with self._lock:
            return sum(n for p, n in self._paths.items() if p.startswith(prefix))

    def statuses(self) -> dict[int, int]:
        """How many answers of each status were decided so far."""
        with self._lock:
            return dict(self._statuses)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    def reset_counters(self) -> None:
        with self._lock:
            self._paths.clear()
            self._statuses.clear()
            self._max_in_flight = self._in_flight

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> ProgrammableBackend:
        super().start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()  # wake delayed handlers first, so joining them is quick
        super().stop(timeout)

    def __enter__(self) -> ProgrammableBackend:
        return self.start()


def programmable_pod(
    mesh: MeshHarness, namespace: str, name: str, **behaviour: Any
) -> tuple[Pod, ProgrammableBackend]:
    """A mesh pod whose app is a started ProgrammableBackend on the pod's ip:app_port.

    Keyword arguments are split: `service_account`, `labels`, `app_port` go to `mesh.pod`,
    the rest configure the backend. The harness stops the backend with the pod.
    """
    pod_args = {k: behaviour.pop(k) for k in ("service_account", "labels", "app_port") if k in behaviour}
    pod = mesh.pod(namespace, name, app="none", **pod_args)
    backend = ProgrammableBackend(name, pod.ip, pod.app_port, **behaviour).start()
    pod.backend = backend  # type: ignore[assignment] - MeshHarness.stop() calls .stop()
    return pod, backend
