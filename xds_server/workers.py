"""`serve --workers N`: N server processes on one machine, one per core, acting as one.

The parent only supervises: it starts N copies of the same `serve` command (each told its
index through an environment variable), restarts a worker that dies (with backoff), forwards
SIGTERM/SIGINT so every worker drains its streams, and exits non-zero when workers keep
crashing. Each worker is a full server translating from the same sources (so versions are the
same content hashes everywhere) and binds the same xDS ports with SO_REUSEPORT: the kernel
spreads connections over the workers. They share the CA, token revocations and proxy status
through Redis (shared state is required: without it each worker would mint its own root).
Worker 0 alone runs the admin API and the webhook; it answers for every worker through the
shared proxy status, and a revocation made through it reaches every worker by pub/sub.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from types import FrameType

from .app import AppConfig
from .config import ConfigError, parse_address

log = logging.getLogger("xds_server.workers")

# Set by the supervisor in each worker's environment (not a setting: users never give it).
WORKER_INDEX_ENV = "_XDS_SERVER_WORKER_INDEX"
# A worker crashing this often within the window means it will not come up: give up.
MAX_CRASHES = 5
CRASH_WINDOW = 60.0
RESTART_BACKOFF_MAX = 10.0
POLL_SECONDS = 0.2


def worker_index(environ: dict[str, str] | os._Environ[str] = os.environ) -> int | None:
    text = environ.get(WORKER_INDEX_ENV)
    return int(text) if text is not None and text.isdigit() else None


def check_workers(config: AppConfig, workers: int) -> None:
    """What several workers need, refused at start with the setting to change."""
    security = config.security
    if security is None or getattr(security, "shared", None) is None:
        raise ConfigError(f"--workers {workers} needs shared state (--redis-url and "
                          "--state-key-file): without it each worker would create its own "
                          "root and token key, and revocations would reach one worker only")
    server = config.server
    for flag, address in (("--xds-address", server.address),
                          ("--xds-tls-address", server.tls_address),
                          ("--xds-tls-token-address", server.tls_token_address)):
        if address is not None and parse_address(address, flag)[1] == 0:
            raise ConfigError(f"{flag} {address}: --workers {workers} share the port, so it "
                              "must be fixed (not 0)")
    if server.unix_socket is not None:
        raise ConfigError(f"--xds-unix-socket: one socket file cannot be shared by "
                          f"--workers {workers}; run it with --workers 1")
    if server.tls_address is not None and server.tls_frontend == "python":
        raise ConfigError(f"--xds-tls-frontend python: its relay listener is per process; "
                          f"use --xds-tls-frontend grpc with --workers {workers}")


def worker_config(config: AppConfig, index: int) -> AppConfig:
    """Worker `index`'s configuration: the shared ports, its own replica name, the admin API
    and webhook on worker 0 only."""
    server = dataclasses.replace(config.server, reuse_port=True)
    security = config.security
    if security is not None and security.shared is not None:
        shared = dataclasses.replace(security.shared, replica=f"{security.shared.replica}-w{index}")
        security = dataclasses.replace(security, shared=shared)
    first = index == 0
    return dataclasses.replace(config, server=server, security=security,
                               serve_admin=first and config.serve_admin,
                               webhook=config.webhook if first else None)


def tag_logs(index: int) -> None:
    """Every log line of worker `index` says so (`worker` field): the workers share stderr."""

    def add_worker(record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker"):
            record.worker = index
        return True

    for handler in logging.getLogger().handlers:
        handler.addFilter(add_worker)


def _die_with_parent() -> None:
    # A worker outliving a SIGKILLed supervisor would hold the ports forever.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    def __init__(self, count: int, argv: Sequence[str], *, grace: float) -> None:
        self.count = count
        self.argv = list(argv)
        self.grace = grace
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.crashes: deque[float] = deque()
        self.restart_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False

    def spawn(self, index: int) -> None:
        env = {**os.environ, WORKER_INDEX_ENV: str(index)}
        command = [sys.executable, "-m", "xds_server.cli", *self.argv]
        self.procs[index] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL,
                                             preexec_fn=_die_with_parent)
        log.info("worker started", extra={"worker": index, "pid": self.procs[index].pid})

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._signal)
        for index in range(self.count):
            self.spawn(index)
        code = 0
        while not self.stopping:
            now = time.monotonic()
            for index, proc in list(self.procs.items()):
                if proc.poll() is None:
                    continue
                del self.procs[index]
                self.crashes.append(now)
                failures = self.failures.get(index, 0) + 1
                self.failures[index] = failures
                delay = min(RESTART_BACKOFF_MAX, 0.5 * 2 ** (failures - 1))
                self.restart_at[index] = now + delay
                log.error("worker exited; restarting it",
                          extra={"worker": index, "pid": proc.pid, "exit_code": proc.returncode,
                                 "restart_in_seconds": delay})
            while self.crashes and now - self.crashes[0] > CRASH_WINDOW:
                self.crashes.popleft()
            if len(self.crashes) >= MAX_CRASHES:
                log.error("workers keep crashing: stopping",
                          extra={"crashes": len(self.crashes), "window_seconds": CRASH_WINDOW})
                code = 1
                break
            for index, when in list(self.restart_at.items()):
                if now >= when:
                    del self.restart_at[index]
                    self.spawn(index)
            time.sleep(POLL_SECONDS)
        self.stop()
        return code

    def stop(self) -> None:
        """SIGTERM to every worker (each drains its streams), SIGKILL after the grace."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace + 15.0
        for index, proc in self.procs.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker did not stop in time: killed", extra={"worker": index})
                proc.kill()
                proc.wait()
        log.info("workers stopped", extra={"workers": self.count})


def supervise(count: int, argv: Sequence[str], *, grace: float) -> int:
    return Supervisor(count, argv, grace=grace).run()
