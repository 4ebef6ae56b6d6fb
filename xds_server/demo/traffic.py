"""Traffic as the calling pod's app sends it: HTTP through its sidecar's outbound listener,
TCP round trips through its local bindings; and what one round of it gave."""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from .pods import PodPlan

DB_TRIPS_PER_ROUND = 10


@dataclass
class RoundResult:
    requests: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    error_kinds: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, of every request
    db_ok: int = 0
    db_trips: int = 0
    upstream_5xx: int = 0
    retries: int = 0
    retries_ok: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.errors == 0 and self.db_ok == self.db_trips

    def add(self, other: RoundResult) -> None:
        for name in ("requests", "errors", "db_ok", "db_trips", "upstream_5xx", "retries",
                     "retries_ok", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.versions.update(other.versions)
        self.error_kinds.update(other.error_kinds)
        self.latencies += other.latencies


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Traffic:
    """What the calling pod's app does: HTTP through its sidecar, TCP through its bindings."""

    def __init__(self, client: PodPlan, host: str, halt: threading.Event) -> None:
        self.ip = client.workload.ip
        self.outbound = client.workload.outbound_port
        self.host = host
        self.bindings = [(t.local_port, t.service.name) for t in client.workload.tcp_upstreams]
        self.halt = halt
        self._sequence = itertools.count(1)

    def http_worker(self, count: int, result: RoundResult, lock: threading.Lock) -> None:
        conn: http.client.HTTPConnection | None = None
        try:
            for _ in range(count):
                if self.halt.is_set():
                    result.interrupted = True
                    return
                if conn is None:
                    conn = http.client.HTTPConnection(
                        self.ip, self.outbound, timeout=15, source_address=(self.ip, 0)
                    )
                started = time.perf_counter()
                version, error = "", ""
                try:
                    conn.request("GET", f"/orders/{next(self._sequence)}", headers={"Host": self.host})
                    response = conn.getresponse()
                    body = response.read()
                    if 200 <= response.status < 300:
                        version = str(json.loads(body).get("version") or "?")
                    else:
                        error = f"HTTP {response.status}"
                except (OSError, http.client.HTTPException, ValueError) as err:
                    error = type(err).__name__
                    conn.close()
                    conn = None
                elapsed = time.perf_counter() - started
                with lock:
                    result.requests += 1
                    result.latencies.append(elapsed)
                    if error:
                        result.errors += 1
                        result.error_kinds[error] += 1
                    else:
                        result.versions[version] += 1
        finally:
            if conn is not None:
                conn.close()

    def db_round_trip(self, local_port: int, n: int) -> bool:
        message = f"SELECT {n};\n".encode()
        try:
            with socket.create_connection((self.ip, local_port), timeout=5,
                                          source_address=(self.ip, 0)) as sock:
                sock.sendall(message)
                received = b""
                while len(received) < len(message):
                    chunk = sock.recv(len(message) - len(received))
                    if not chunk:
                        break
                    received += chunk
                return received == message
        except OSError:
            return False

    def db_worker(self, trips: int, result: RoundResult, lock: threading.Lock) -> None:
        for i in range(trips):
            for local_port, _ in self.bindings:
                if self.halt.is_set():
                    result.interrupted = True
                    return
                ok = self.db_round_trip(local_port, i)
                with lock:
                    result.db_trips += 1
                    result.db_ok += ok
