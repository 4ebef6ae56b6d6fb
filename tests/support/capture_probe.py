"""A stand-in for a sidecar's listeners and an app, run inside a pod's network namespace.

    python capture_probe.py listen PORT [PORT ...]
        accept on 0.0.0.0:PORT for each; every connection gets one line back,
        "<listening port> <original destination ip>:<port>" (SO_ORIGINAL_DST), then is closed.
        Prints "ready" once listening.
    python capture_probe.py connect HOST PORT
        connect, print the line received (or "error: ..."), exit 0 either way.
"""

from __future__ import annotations

import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80


def original_destination(conn: socket.socket) -> str:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:  # no connection tracking here (nothing was ever NATed): the address itself
        host, port = conn.getsockname()[:2]
        return f"{host}:{port}"
    port = struct.unpack("!H", raw[2:4])[0]
    return f"{socket.inet_ntoa(raw[4:8])}:{port}"


def listen(ports: list[int]) -> None:
    selector = selectors.DefaultSelector()
    for port in ports:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", port))
        server.listen(64)
        selector.register(server, selectors.EVENT_READ, port)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            server = key.fileobj
            assert isinstance(server, socket.socket)
            conn, _ = server.accept()
            with conn:
                conn.sendall(f"{key.data} {original_destination(conn)}\n".encode())


def connect(host: str, port: int) -> None:
    try:
        with socket.create_connection((host, port), timeout=3) as conn:
            print(conn.makefile().readline().strip() or "error: closed", flush=True)
    except OSError as err:
        print(f"error: {err}", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "listen":
        listen([int(p) for p in sys.argv[2:]])
    else:
        connect(sys.argv[2], int(sys.argv[3]))
