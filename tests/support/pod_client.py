"""An unmodified app inside a pod: a long-lived program the test drives over stdin/stdout.

Why a separate program: started with `ip netns exec POD`, it sees the pod's network and its
/etc/hosts (bind-mounted from /etc/netns/POD/hosts), so service names resolve through the
ordinary getaddrinfo, and its connections are the app's connections the capture rules catch.
It uses only the standard library (http.client, socket; never urllib, which honours proxy
environment variables) and follows no redirects.

Protocol: one JSON object per line on stdin, one JSON object per line on stdout.

    {"op": "http", "url": "http://api/x", "method": "GET", "headers": [[k, v], ...],
     "body": base64 | null, "timeout": 5}
        -> {"ok": true, "status": 200, "headers": [[lower-case name, value], ...],
            "body": base64, "elapsed": seconds}
    {"op": "http_many", ...the fields of "http"..., "count": 20, "concurrency": 20,
     "together": true}
        -> {"ok": true, "results": [answer of "http" (or its failure, with "elapsed"), ...]}
           `count` requests, each on its own connection, `concurrency` at a time from
           threads; `together`: the first `concurrency` are released at the same moment
           (a barrier), as a burst of simultaneous callers would be.
    {"op": "tcp", "host": h, "port": p, "payload": base64, "timeout": 5}
        -> {"ok": true, "reply": base64}   (sends, half-closes, reads to EOF)
    {"op": "connect", "host": h, "port": p, "timeout": 5}
        -> {"ok": true, "local": "ip:port", "peer": "ip:port"}
    {"op": "resolve", "host": h}
        -> {"ok": true, "addresses": ["10.96.0.10", ...]}

A failure is {"ok": false, "kind": K, "error": message} with K one of refused, reset,
closed (peer closed before answering), timeout, unreachable, resolve, error.
"""

from __future__ import annotations

import base64
import errno
import http.client
import json
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def _kind(err: BaseException) -> str:
    if isinstance(err, socket.gaierror):
        return "resolve"
    if isinstance(err, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(err, ConnectionRefusedError):
        return "refused"
    if isinstance(err, http.client.RemoteDisconnected | http.client.IncompleteRead):
        return "closed"
    if isinstance(err, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(err, OSError) and err.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    return "error"


def _http(cmd: dict[str, Any]) -> dict[str, Any]:
    url = urllib.parse.urlsplit(cmd["url"])
    if url.scheme != "http" or not url.hostname:
        raise ValueError(f"only http://host[:port]/path URLs, got {cmd['url']!r}")
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    timeout = float(cmd.get("timeout", 5))
    body = base64.b64decode(cmd["body"]) if cmd.get("body") is not None else None
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    start = time.monotonic()
    try:
        headers = [(str(k), str(v)) for k, v in cmd.get("headers", ())]
        named = {k.lower() for k, _ in headers}
        # Host comes from the URL ("api" or "api:8080"), as any app's client sends it.
        conn.putrequest(cmd.get("method", "GET"), path, skip_host="host" in named)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None and "content-length" not in named:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return {
            "ok": True, "status": resp.status,
            "headers": [[k.lower(), v] for k, v in resp.getheaders()],
            "body": base64.b64encode(data).decode(), "elapsed": time.monotonic() - start,
        }
    finally:
        conn.close()


def _http_many(cmd: dict[str, Any]) -> dict[str, Any]:
    count = int(cmd.get("count", 1))
    concurrency = max(1, min(int(cmd.get("concurrency", 1)), count or 1))
    barrier = threading.Barrier(concurrency) if cmd.get("together") else None

    def one(index: int) -> dict[str, Any]:
        if barrier is not None and index < concurrency:
            barrier.wait(10)
        start = time.monotonic()
        answer = handle_command(_http, cmd)
        answer.setdefault("elapsed", time.monotonic() - start)
        return answer

    with ThreadPoolExecutor(concurrency) as pool:
        return {"ok": True, "results": list(pool.map(one, range(count)))}


def _tcp(cmd: dict[str, Any]) -> dict[str, Any]:
    timeout = float(cmd.get("timeout", 5))
    with socket.create_connection((cmd["host"], int(cmd["port"])), timeout=timeout) as sock:
        sock.sendall(base64.b64decode(cmd.get("payload") or ""))
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return {"ok": True, "reply": base64.b64encode(b"".join(chunks)).decode()}


def _connect(cmd: dict[str, Any]) -> dict[str, Any]:
    timeout = float(cmd.get("timeout", 5))
    with socket.create_connection((cmd["host"], int(cmd["port"])), timeout=timeout) as sock:
        local, peer = sock.getsockname(), sock.getpeername()
    return {"ok": True, "local": f"{local[0]}:{local[1]}", "peer": f"{peer[0]}:{peer[1]}"}


def _resolve(cmd: dict[str, Any]) -> dict[str, Any]:
    infos = socket.getaddrinfo(cmd["host"], None, socket.AF_INET, socket.SOCK_STREAM)
    return {"ok": True, "addresses": sorted({str(info[4][0]) for info in infos})}


OPS = {"http": _http, "http_many": _http_many, "tcp": _tcp, "connect": _connect, "resolve": _resolve}


def handle_command(op: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    try:
        answer: dict[str, Any] = op(cmd)
        return answer
    except Exception as err:  # every failure is an answer, never a dead client
        return {"ok": False, "kind": _kind(err), "error": f"{type(err).__name__}: {err}"}


def handle(line: str) -> dict[str, Any]:
    try:
        cmd = json.loads(line)
    except ValueError as err:
        return {"ok": False, "kind": "error", "error": f"not JSON: {err}"}
    op = OPS.get(cmd.get("op")) if isinstance(cmd, dict) else None
    if op is None:
        return {"ok": False, "kind": "error", "error": f"unknown op {line.strip()[:100]!r}"}
    return handle_command(op, cmd)


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        sys.stdout.write(json.dumps(handle(line)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
