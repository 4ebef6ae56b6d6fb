"""Traffic as the calling pod's app sends it, and what one round of it gave.

Two ways, one app (app_client.py): `LoopbackTraffic` (explicit mode) calls it in the demo's
own threads, HTTP to the sidecar's outbound port with the Host header, TCP through the local
port bindings; `PodTraffic` (capture mode) runs it as a program inside the client pod's
network namespace, dialling `http://api/` and `db:5432` by name."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import app_client
from .app_client import Call, HttpTarget
from .errors import DemoError
from .netns import NetPod
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

    def add_calls(self, calls: Iterable[Call]) -> None:
        for seconds, version, error in calls:
            self.requests += 1
            self.latencies.append(seconds)
            if error:
                self.errors += 1
                self.error_kinds[error] += 1
            else:
                self.versions[version] += 1



def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]




class LoopbackTraffic:
    """Explicit mode: the app's calls from the demo's threads, on the client pod's loopback
    address: HTTP to its sidecar's outbound port with `Host: <DEMO_CALLS>`, TCP round trips
    through each `xds-server.io/tcp-upstreams` binding."""

    def __init__(self, client: PodPlan, host: str, halt: threading.Event) -> None:
        w = client.workload
        self.target = HttpTarget(w.ip, w.outbound_port, host_header=host, source_ip=w.ip)
        self.bindings = [(t.local_port, t.service.name) for t in w.tcp_upstreams]
        self.halt = halt
        self._sequence = itertools.count(1)
        self.ip = w.ip

    def describe(self, requests: int, name: str) -> str:
        bindings = ", ".join(f"{svc} via {self.ip}:{port}" for port, svc in self.bindings)
        return (f"Traffic, as {name}'s app: {requests} x HTTP GET with Host: {self.target.host_header} "
                f"to its sidecar {self.ip}:{self.target.connect_port}"
                + (f"; TCP round trips to {bindings}" if bindings else ""))

    def run(self, requests: int, workers: int, db_trips: int) -> RoundResult:
        result = RoundResult()
        trips: list[bool] = []

        def db() -> None:
            for i in range(db_trips):
                for port, _ in self.bindings:
                    if self.halt.is_set():
                        return
                    trips.append(app_client.tcp_round_trip(self.ip, port, i, self.ip))

        db_thread = threading.Thread(target=db, daemon=True)
        db_thread.start()
        result.add_calls(app_client.parallel_calls(self.target, requests, workers, self._sequence,
                                                   self.halt.is_set))
        db_thread.join()
        result.db_trips, result.db_ok = len(trips), sum(trips)
        result.interrupted = self.halt.is_set()
        return result

    def close(self) -> None:
        pass


class PodTraffic:
    """Capture mode: the app is app_client.py running inside the client pod's network
    namespace (`ip netns exec`: its network, its /etc/hosts), dialling names. It runs in
    its own session, so a terminal's Ctrl-C reaches the demo only; `interrupt()` and
    `close()` end it by PID."""

    def __init__(self, pod: NetPod, host: str, tcp_targets: list[tuple[str, int]],
                 halt: threading.Event) -> None:
        self.pod = pod
        self.host, self.port = host, 80
        self.tcp_targets = tcp_targets
        self.halt = halt
        self._first = 1
        self._lock = threading.Lock()
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            pod.command([sys.executable, "-I", "-u", str(Path(app_client.__file__).resolve())]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}/"

    def describe(self, requests: int, name: str) -> str:
        tcp = ", ".join(f"{h}:{p}" for h, p in self.tcp_targets)
        return (f"Traffic, as {name}'s app (a process in its network namespace, no proxy settings): "
                f"{requests} x GET {self.url}" + (f"; TCP round trips to {tcp}" if tcp else ""))

    def _call(self, command: Mapping[str, object], timeout: float) -> dict[str, object] | None:
        """The app's answer; None if it is gone (interrupted) or does not answer in time."""
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None or self.proc.stdout is None:
                return None
            try:
                self.proc.stdin.write(json.dumps(command).encode() + b"\n")
                self.proc.stdin.flush()
            except OSError:
                return None
            fd = self.proc.stdout.fileno()
            if not select.select([fd], [], [], timeout)[0]:
                raise DemoError(f"the app in {self.pod.name} did not answer in {timeout:.0f}s")
            line = self.proc.stdout.readline()
        if not line:
            return None
        answer: dict[str, object] = json.loads(line)
        if "error" in answer:
            raise DemoError(f"the app in {self.pod.name} failed: {answer['error']}")
        return answer

    def resolve(self, hosts: list[str]) -> dict[str, str]:
        """What the app's getaddrinfo gives for `hosts` (its pod's /etc/hosts)."""
        command: dict[str, object] = {"op": "resolve", "hosts": hosts}
        answer = self._call(command, 10)
        addresses = answer.get("addresses") if answer else None
        return {str(k): str(v) for k, v in addresses.items()} if isinstance(addresses, dict) else {}

    def run(self, requests: int, workers: int, db_trips: int) -> RoundResult:
        result = RoundResult()
        command = {
            "op": "round",
            "http": {"host": self.host, "port": self.port, "path": "/orders/", "requests": requests,
                     "workers": workers, "first": self._first},
            "tcp": [{"host": h, "port": p, "trips": db_trips} for h, p in self.tcp_targets],
        }
        self._first += requests
        answer = self._call(command, 60 + requests * 0.5)
        if answer is None or self.halt.is_set():
            result.interrupted = True
            return result
        calls = answer.get("http") or []
        assert isinstance(calls, list)
        result.add_calls((float(s), str(v), str(e)) for s, v, e in calls)
        trips = answer.get("tcp") or []
        assert isinstance(trips, list)
        result.db_trips = len(trips)
        result.db_ok = sum(bool(ok) for _, ok in trips)
        return result

    def interrupt(self) -> None:
        """Ctrl-C: end the app by PID (a round in progress is dropped)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.interrupt()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
