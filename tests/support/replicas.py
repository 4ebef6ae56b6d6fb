"""Several `xds-server serve` processes sharing one real redis-server, as replicas do.

Each replica is a real process with its own --ca-dir, xDS and admin ports, started with the
same --redis-url, --redis-password-file and --state-key-file; it is stopped by PID (SIGTERM,
or SIGKILL when a test kills it on purpose).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from .admin import Tokens
from .net import free_port
from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


class Replica:
    def __init__(self, name: str, directory: Path, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.directory = directory
        self.xds_port = free_port()
        self.admin_port = free_port()
        self.args = args
        self.env = env
        self.log_path = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def xds_address(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> Replica:
        ca_dir = self.directory / f"ca-{self.name}"
        command = [sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve",
                   "--auth", "tokens", "--xds-address", self.xds_address,
                   "--admin-address", f"127.0.0.1:{self.admin_port}",
                   "--xds-tls-address", "off", "--xds-tls-token-address", "off",
                   "--ca-dir", str(ca_dir), "--replica-id", self.name, "--debounce-quiet", "0.02",
                   "--shutdown-grace", "1", *self.args]
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(f"{self.admin_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready: {self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Replicas:
    """N replicas with one Redis (password from a file), one state key, admin tokens."""

    def __init__(self, directory: Path, count: int, extra_args: list[str] | None = None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(directory / "redis", password="replicas-redis-password")
        self.tokens = Tokens()
        tokens_file = directory / "admin-tokens.yaml"
        tokens_file.write_text(self.tokens.document())
        self.password_file = directory / "redis-password"
        self.password_file.write_text("replicas-redis-password\n")
        self.state_key = directory / "state.key"
        subprocess.run([sys.executable, "-m", "xds_server.cli", "state-key", "create",
                        "--out", str(self.state_key)], check=True, cwd=ROOT,
                       capture_output=True)
        self.env = {**os.environ, "XDS_SERVER_ADMIN_TOKENS_FILE": str(tokens_file)}
        self.env.pop("XDS_SERVER_AUTH", None)
        self.count = count
        self.extra_args = list(extra_args or [])
        self.members: list[Replica] = []

    @property
    def shared_args(self) -> list[str]:
        return ["--redis-url", self.redis.url, "--redis-password-file", str(self.password_file),
                "--state-key-file", str(self.state_key)]

    def start(self) -> Replicas:
        self.redis.start()
        self.members = [Replica(f"replica-{i}", self.directory, self.shared_args + self.extra_args,
                                self.env).start() for i in range(self.count)]
        for replica in self.members:
            replica.wait_ready()
        return self

    def stop(self) -> None:
        for replica in self.members:
            replica.stop()
        self.redis.stop()

    def admin(self, replica: Replica, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, replica.admin_url + path, headers=self.tokens.auth("admin"),
                             timeout=10, **kwargs)
