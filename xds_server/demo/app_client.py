"""What the calling pod's app does: HTTP GETs on keep-alive connections and TCP round trips.
Standard library only, so it also runs on its own as the app inside a pod.

In the explicit (loopback) mode the demo calls these functions in its own threads: HTTP to
the sidecar's outbound port with `Host: api`, TCP to the local port bindings. In the capture
mode the demo starts this file as a program inside the client pod's network namespace
(`ip netns exec POD python -I app_client.py`): it sees the pod's network and its /etc/hosts,
dials `http://api/` and `db:5432` by name like any unmodified app (http.client and socket, no
proxy settings), and iptables in the pod send its connections to the sidecar.

Program protocol: one JSON object per line on stdin, one answer per line on stdout.

    {"op": "round", "http": {"host": "api", "port": 80, "path": "/orders/", "requests": N,
     "workers": W, "first": K}, "tcp": [{"host": "db", "port": 5432, "trips": T}]}
        -> {"http": [[seconds, version, error], ...], "tcp": [[host:port, ok], ...]}
    {"op": "resolve", "hosts": ["api", ...]}  -> {"addresses": {"api": "10.96.0.10", ...}}
"""

from __future__ import annotations

import http.client
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Call = tuple[float, str, str]  # seconds, version answered (or ""), error (or "")


@dataclass(frozen=True)
class HttpTarget:
    """Where the app's requests go: the address it connects to, the Host it sends (None:
    the one http.client derives from the address, as for a URL), the path prefix."""

    connect_host: str
    connect_port: int
    host_header: str | None = None
    source_ip: str | None = None
    path: str = "/orders/"


def http_calls(target: HttpTarget, count: int, sequence: Iterator[int],
               stopped: Callable[[], bool] = lambda: False) -> list[Call]:
    """`count` GETs on one keep-alive connection (a new one after an error); every call's
    latency and the `version` of the JSON answer, or its error."""
    calls: list[Call] = []
    conn: http.client.HTTPConnection | None = None
    try:
        for _ in range(count):
            if stopped():
                break
            if conn is None:
                source = (target.source_ip, 0) if target.source_ip else None
                conn = http.client.HTTPConnection(target.connect_host, target.connect_port,
                                                  timeout=15, source_address=source)
            started = time.perf_counter()
            version, error = "", ""
            try:
                headers = {"Host": target.host_header} if target.host_header else {}
                conn.request("GET", f"{target.path}{next(sequence)}", headers=headers)
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
            calls.append((time.perf_counter() - started, version, error))
    finally:
        if conn is not None:
            conn.close()
    return calls


def tcp_round_trip(host: str, port: int, n: int, source_ip: str | None = None) -> bool:
    """Connect, send a line, read it back: whether the echo came back whole."""
    message = f"SELECT {n};\n".encode()
    try:
        source = (source_ip, 0) if source_ip else None
        with socket.create_connection((host, port), timeout=5, source_address=source) as sock:
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


def parallel_calls(target: HttpTarget, requests: int, workers: int, sequence: Iterator[int],
                   stopped: Callable[[], bool] = lambda: False) -> list[Call]:
    """`requests` GETs over `workers` connections at once."""
    workers = max(1, min(workers, requests))
    shares = [requests // workers + (i < requests % workers) for i in range(workers)]
    results: list[list[Call]] = [[] for _ in shares]
    lock = threading.Lock()

    def next_number() -> Iterator[int]:
        while True:
            with lock:
                yield next(sequence)

    def work(i: int) -> None:
        results[i] = http_calls(target, shares[i], next_number(), stopped)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(shares))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [call for part in results for call in part]


def _round(command: dict[str, object]) -> dict[str, object]:
    spec = command.get("http") or {}
    assert isinstance(spec, dict)
    answer: dict[str, object] = {"http": [], "tcp": []}
    sequence = itertools.count(int(spec.get("first", 1)))
    trips: list[list[object]] = []

    def db() -> None:
        for item in command.get("tcp") or ():  # type: ignore[attr-defined]
            for i in range(int(item["trips"])):
                ok = tcp_round_trip(str(item["host"]), int(item["port"]), i)
                trips.append([f"{item['host']}:{item['port']}", ok])

    db_thread = threading.Thread(target=db, daemon=True)
    db_thread.start()
    if spec:
        target = HttpTarget(str(spec["host"]), int(spec.get("port", 80)), path=str(spec.get("path", "/")))
        answer["http"] = parallel_calls(target, int(spec["requests"]), int(spec.get("workers", 1)), sequence)
    db_thread.join()
    answer["tcp"] = trips
    return answer


def _resolve(command: dict[str, object]) -> dict[str, object]:
    addresses: dict[str, str] = {}
    for host in command.get("hosts") or ():  # type: ignore[attr-defined]
        try:
            addresses[str(host)] = str(socket.getaddrinfo(str(host), None, socket.AF_INET)[0][4][0])
        except OSError as err:
            addresses[str(host)] = f"unresolved ({err})"
    return {"addresses": addresses}


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        try:
            answer = _resolve(command) if command.get("op") == "resolve" else _round(command)
        except Exception as err:  # every failure is an answer, never a dead app
            answer = {"error": f"{type(err).__name__}: {err}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
