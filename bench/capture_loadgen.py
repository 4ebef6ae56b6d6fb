"""Open-loop HTTP load at a fixed rate, run INSIDE a pod (`ip netns exec POD python ...`).

An unmodified app's client: `http.client` over a small pool of keep-alive connections,
standard library only, no proxy settings; the name in the URL resolves through the pod's
hosts file, so with capture rules in the pod the connections go through its sidecar.

Open loop: request i is due at t0 + i / rate, whatever happened before. Each of the
`--connections` workers takes the next due request, waits for its time, sends it and reads
the response; its latency is measured from the *scheduled* time, not from the send, so a
stall that delays later requests (all connections busy) shows in their latencies instead of
being hidden by sending less (coordinated omission). A request the pool starts late because
every connection was busy is counted in `late` (more than 1 ms after its time).

The first `--warmup` seconds run at the same rate and are not recorded. Prints one JSON
object: {"latencies_us": [...] (recorded requests that succeeded, in schedule order),
"failed": n, "errors": {kind: n}, "sent": n, "late": n, "duration_s": s, ...}.
A failure is a non-200 status, a connection error or a timeout; the worker then opens a new
connection.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.parse


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, default=200.0, help="requests per second (offered)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds recorded")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds at the rate, not recorded")
    ap.add_argument("--connections", type=int, default=4, help="keep-alive connections (workers)")
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()

    url = urllib.parse.urlsplit(args.url)
    host, port = url.hostname or "", url.port or 80
    path = url.path or "/"
    interval = 1.0 / args.rate
    warm_n = round(args.warmup * args.rate)
    total = warm_n + round(args.duration * args.rate)

    lock = threading.Lock()
    next_index = 0
    latencies: list[tuple[int, float]] = []
    errors: dict[str, int] = {}
    late = 0
    start_at = time.perf_counter() + 0.2  # every worker is waiting when the first one is due

    def take() -> int | None:
        nonlocal next_index
        with lock:
            if next_index >= total:
                return None
            i = next_index
            next_index += 1
            return i

    def worker() -> None:
        nonlocal late
        conn: http.client.HTTPConnection | None = None
        while (i := take()) is not None:
            due = start_at + i * interval
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            elif now - due > 0.001 and i >= warm_n:
                with lock:
                    late += 1
            kind = ""
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
                conn.request("GET", path, headers={"x-request-index": str(i)})
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    kind = f"status {resp.status}"
                if resp.will_close:
                    conn.close()
                    conn = None
            except Exception as err:  # a failed request is counted, and the loop goes on
                kind = type(err).__name__
                if conn is not None:
                    conn.close()
                conn = None
            done = time.perf_counter()
            if i < warm_n:
                continue
            with lock:
                if kind:
                    errors[kind] = errors.get(kind, 0) + 1
                else:
                    latencies.append((i, (done - due) * 1e6))
        if conn is not None:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - (start_at + warm_n * interval)
    latencies.sort()
    print(json.dumps({
        "url": args.url, "rate": args.rate, "connections": args.connections,
        "sent": total - warm_n, "sent_with_warmup": total, "failed": sum(errors.values()), "errors": errors, "late": late,
        "duration_s": wall, "latencies_us": [round(us, 1) for _, us in latencies],
    }))


if __name__ == "__main__":
    main()
