"""Loopback networking helpers for tests.

Everything here stays on 127.0.0.0/8. Ports are picked by the kernel (bind to port 0), so
tests never hard-code ports and can run in parallel (pytest-xdist, or several pytest runs at
once). Fake pods each get their own loopback address so tests can tell endpoints apart by IP,
the way a real mesh does.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time

__all__ = ["free_port", "free_ports", "next_loopback_ip", "wait_for_port", "xdist_worker_index"]


_port_lock = threading.Lock()
_handed_out: set[tuple[str, int]] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port free on `host` right now, never the same one twice per process.

    The port is released before returning, so the kernel may offer it again to the next
    bind(port 0); remembering what we handed out stops two calls in one test from getting
    the same port (seen in practice: two Envoy listeners on one address). Another process
    could still take it in the short window; prefer binding port 0 yourself when possible.
    """
    with _port_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if (host, port) not in _handed_out:
                _handed_out.add((host, port))
                return port
    raise RuntimeError(f"no fresh free port on {host}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports on `host` (see free_port)."""
    return [free_port(host) for _ in range(count)]


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Poll until a TCP connect to (host, port) succeeds; raise TimeoutError otherwise.

    Used to wait for a server (Envoy listener, upstream) to start accepting, instead of
    sleeping for a guessed time.
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(1.0, timeout)):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} not accepting after {timeout}s: {last_error}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def xdist_worker_index() -> int | None:
    """The pytest-xdist worker number (gw3 -> 3), or None when not running under xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    match = re.fullmatch(r"gw(\d+)", worker)
    return int(match.group(1)) if match else None


_ip_lock = threading.Lock()
_ip_counter = itertools.count(2)


def next_loopback_ip() -> str:
    """Return a loopback address not handed out before in this process.

    The second octet is derived from the process id (10-249), so concurrent test processes
    (xdist workers, or separate pytest runs) get disjoint ranges and a backend on a fixed
    app port never collides with another run's. The demo uses 127.0.10.x-style addresses of
    its own only when run by hand. All of 127/8 routes to `lo` on Linux: no setup needed.
    """
    second = 10 + os.getpid() % 240
    with _ip_lock:
        while True:
            n = next(_ip_counter)
            third, fourth = divmod(n, 256)
            if third > 255:
                raise RuntimeError("loopback address space for this process exhausted")
            if fourth in (0, 255):  # avoid network/broadcast-looking addresses
                continue
            if second == 0 and third == 0 and fourth == 1:
                continue  # 127.0.0.1 is shared with everything else
            return f"127.{second}.{third}.{fourth}"
