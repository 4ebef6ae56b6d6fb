"""The shared-state store: Redis through the `redis` package's asyncio client.

What it adds to the client:

- connection settings operators can give safely (`RedisSettings`): `redis://` or `rediss://`,
  the password from a file (never in the URL: command lines are visible to every user of the
  machine), a key prefix so several control planes can share one Redis, timeouts;
- an up/down state (`up`, the `xds_server_redis_up` metric, `/api/v1/server`): a health loop
  pings, marks Redis down on the first failure and retries with exponential backoff and jitter;
  callbacks registered with `on_reconnect` re-publish what could not be shared meanwhile;
- sealed entries (sealed.py): `get_sealed` refuses an entry that does not open under the
  state key (counted in `refused` by reason, logged with the entry's name), never trusts it;
- pub/sub with resubscription after a lost connection;
- counters of operations and bytes (what the benchmark reports per push and per stream open).

Operations fail fast with `SharedStateUnavailable` while Redis is down: callers keep serving
from what they hold and re-publish later; nothing here blocks the xDS server.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import ConfigError, is_loopback
from .sealed import SealError, seal, unseal
from .statekey import StateKey

log = logging.getLogger("xds_server.shared")

DEFAULT_PREFIX = "xds-server:"
MAX_PASSWORD_BYTES = 4096


class SharedStateUnavailable(Exception):
    """Redis cannot be reached now (the operation was not done)."""


@dataclass(frozen=True)
class RedisSettings:
    url: str
    password_file: Path | None = None
    ca_file: Path | None = None  # rediss://: roots to verify the server (default: the system's)
    key_prefix: str = DEFAULT_PREFIX
    connect_timeout: float = 2.0
    timeout: float = 2.0  # one operation
    health_interval: float = 1.0  # ping period while up
    backoff_initial: float = 0.2
    backoff_max: float = 5.0

    def check(self) -> None:
        """Raise ConfigError naming the setting when the URL or the password cannot be used."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss"):
            raise ConfigError(f"--redis-url: expected redis://HOST:PORT[/DB] or rediss://..., "
                              f"got scheme {parts.scheme!r}")
        if not parts.hostname:
            raise ConfigError("--redis-url: no host")
        if parts.password:
            raise ConfigError("--redis-url: holds a password; put it in --redis-password-file "
                              "(a URL is visible in the process list)")
        if self.ca_file is not None and parts.scheme != "rediss":
            raise ConfigError("--redis-ca-file: only for rediss:// URLs")
        if not self.key_prefix:
            raise ConfigError("--redis-key-prefix: must not be empty")
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ConfigError("--redis-timeout: must be positive")

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def redacted_url(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"

    def password(self) -> str | None:
        if self.password_file is None:
            return None
        try:
            with open(self.password_file, "rb") as handle:
                data = handle.read(MAX_PASSWORD_BYTES + 1)
        except OSError as err:
            raise ConfigError(f"--redis-password-file {self.password_file}: cannot read: "
                              f"{err.strerror}") from None
        if len(data) > MAX_PASSWORD_BYTES:
            raise ConfigError(f"--redis-password-file {self.password_file}: too large")
        try:
            password = data.decode().strip()
        except UnicodeDecodeError:
            raise ConfigError(f"--redis-password-file {self.password_file}: not text") from None
        if not password:
            raise ConfigError(f"--redis-password-file {self.password_file}: empty")
        return password


def default_replica_id() -> str:
    import os
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class SharedConfig:
    """`serve`'s shared state: where Redis is, the key that seals, who this replica is."""

    redis: RedisSettings
    state_key_file: Path
    replica: str = ""


Handler = Callable[[bytes], Awaitable[None] | None]


class SharedStore:
    """One replica's connection to the shared state (see the module doc)."""

    def __init__(self, settings: RedisSettings, key: StateKey, *, replica: str = "") -> None:
        settings.check()
        self.settings = settings
        self.key = key
        self.replica = replica
        self.prefix = settings.key_prefix
        if settings.url.startswith("redis://") and not is_loopback(settings.host) and settings.password_file:
            log.warning("Redis password sent in clear over the network (redis://); use rediss://",
                        extra={"redis": settings.redacted_url})
        kwargs: dict[str, Any] = {
            "password": settings.password(),
            "socket_timeout": settings.timeout,
            "socket_connect_timeout": settings.connect_timeout,
            # No retries inside one call: the health loop owns reconnecting, callers fail fast.
            "retry_on_timeout": False,
            "health_check_interval": 0,
            "client_name": f"xds-server {replica}"[:60].replace(" ", "-"),
        }
        if settings.ca_file is not None:
            kwargs["ssl_ca_certs"] = str(settings.ca_file)
        # Imported here, not at module level: every command imports this module, and only a
        # process with --redis-url needs the client (the demo's unprivileged run may be on
        # an interpreter older than 3.11.3, where redis-py needs async-timeout).
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.client = aioredis.Redis.from_url(settings.url, **kwargs)
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self.client.set_retry(Retry(NoBackoff(), 0))
        self.up = False
        self.refused: collections.Counter[str] = collections.Counter()  # reason -> entries
        self.errors = 0
        self.ops = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.outages = 0
        self.last_error = ""
        self._reconnect: list[Callable[[], Awaitable[None]]] = []
        self._handlers: dict[str, list[Handler]] = {}
        self._changed_up = asyncio.Event()

    # -- names ----------------------------------------------------------------------------

    def name(self, key: str) -> str:
        return self.prefix + key

    # -- state ----------------------------------------------------------------------------

    def _failed(self, err: BaseException, op: str) -> SharedStateUnavailable:
        self.errors += 1
        self.last_error = f"{op}: {type(err).__name__}: {err}"[:300]
        if self.up:
            self.up = False
            self.outages += 1
            log.error("Redis unreachable: shared state degraded (xDS keeps serving)",
                      extra={"redis": self.settings.redacted_url, "error": self.last_error})
        return SharedStateUnavailable(f"Redis {self.settings.redacted_url} unreachable ({op})")

    async def _call(self, op: str, coro: Awaitable[Any]) -> Any:
        self.ops += 1
        try:
            return await asyncio.wait_for(coro, self.settings.timeout + self.settings.connect_timeout)
        except self._errors as err:
            raise self._failed(err, op) from None

    def status(self) -> dict[str, Any]:
        return {"url": self.settings.redacted_url, "up": self.up, "key_prefix": self.prefix,
                "state_key_id": self.key.key_id_hex, "outages": self.outages,
                "errors": self.errors, "last_error": self.last_error,
                "refused_entries": dict(self.refused), "operations": self.ops,
                "bytes_sent": self.bytes_out, "bytes_received": self.bytes_in}

    def on_reconnect(self, callback: Callable[[], Awaitable[None]]) -> None:
        """`callback()` runs each time Redis comes back after being down (re-publish)."""
        self._reconnect.append(callback)

    async def connect(self) -> bool:
        """One attempt; True when Redis answered."""
        try:
            await self._call("ping", self.client.ping())
        except SharedStateUnavailable:
            return False
        if not self.up:
            self.up = True
            log.info("Redis reachable: shared state in use",
                     extra={"redis": self.settings.redacted_url, "key_prefix": self.prefix})
        return True

    # -- plain values ----------------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        value = await self._call("get", self.client.get(self.name(key)))
        self.bytes_in += len(value or b"")
        return value

    async def set(self, key: str, value: bytes, *, only_if_absent: bool = False,
                  ttl: float | None = None) -> bool:
        self.bytes_out += len(value)
        done = await self._call("set", self.client.set(
            self.name(key), value, nx=only_if_absent, px=int(ttl * 1000) if ttl else None))
        return bool(done)

    async def delete(self, key: str) -> None:
        await self._call("del", self.client.delete(self.name(key)))

    async def hset(self, key: str, field: str, value: bytes, ttl: float | None = None) -> None:
        self.bytes_out += len(value) + len(field)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.name(key), field, value)
            if ttl:
                pipe.pexpire(self.name(key), int(ttl * 1000))
            await self._call("hset", pipe.execute())

    async def hget(self, key: str, field: str) -> bytes | None:
        value = await self._call("hget", self.client.hget(self.name(key), field))
        self.bytes_in += len(value or b"")
        return value

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        values = await self._call("hgetall", self.client.hgetall(self.name(key)))
        self.bytes_in += sum(len(k) + len(v) for k, v in values.items())
        return dict(values)

    async def hdel(self, key: str, *fields: str) -> None:
        if fields:
            await self._call("hdel", self.client.hdel(self.name(key), *fields))

    async def publish(self, channel: str, message: bytes) -> None:
        self.bytes_out += len(message)
        await self._call("publish", self.client.publish(self.name(channel), message))

    # -- sealed entries ---------------------------------------------------------------------

    async def get_sealed(self, key: str) -> bytes | None:
        """The entry opened with the state key; None when absent. Raises SealError (counted,
        logged) for an entry that must not be trusted."""
        blob = await self.get(key)
        if blob is None:
            return None
        try:
            return unseal(self.key, self.name(key), blob)
        except SealError as err:
            self.refused[err.reason] += 1
            log.error("refused a shared-state entry: %s", err,
                      extra={"entry": self.name(key), "reason": err.reason})
            raise

    def open_sealed(self, name: str, blob: bytes) -> bytes:
        """Open an entry read by other means (a hash field); SealError counted and logged."""
        try:
            return unseal(self.key, self.name(name), blob)
        except SealError as err:
            self.refused[err.reason] += 1
            log.error("refused a shared-state entry: %s", err,
                      extra={"entry": self.name(name), "reason": err.reason})
            raise

    def sealed(self, name: str, plaintext: bytes) -> bytes:
        return seal(self.key, self.name(name), plaintext)

    async def set_sealed(self, key: str, plaintext: bytes, *, only_if_absent: bool = False) -> bool:
        return await self.set(key, seal(self.key, self.name(key), plaintext),
                              only_if_absent=only_if_absent)

    # -- pub/sub and health ---------------------------------------------------------------------

    def subscribe(self, channel: str, handler: Handler) -> None:
        """`handler(message)` for every message on `channel` (before `run`)."""
        self._handlers.setdefault(channel, []).append(handler)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the connection: health pings, backoff while down, re-publish on return,
        pub/sub delivery. Until `stop`."""
        listener = asyncio.create_task(self._listen(stop), name="redis-pubsub")
        try:
            await self._health(stop)
        finally:
            listener.cancel()
            with contextlib.suppress(BaseException):
                await listener
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def _wait(self, stop: asyncio.Event, seconds: float) -> bool:
        """Sleep `seconds` or until stop; True when stopping."""
        try:
            await asyncio.wait_for(stop.wait(), seconds)
            return True
        except TimeoutError:
            return False

    async def _health(self, stop: asyncio.Event) -> None:
        delay = self.settings.backoff_initial
        while not stop.is_set():
            was_up = self.up
            if await self.connect():
                delay = self.settings.backoff_initial
                if not was_up:
                    await self._republish()
                if await self._wait(stop, self.settings.health_interval):
                    return
            else:
                # Full jitter: replicas that lost Redis together do not return in lockstep.
                if await self._wait(stop, random.uniform(0.5, 1.0) * delay):
                    return
                delay = min(self.settings.backoff_max, delay * 2)

    async def _republish(self) -> None:
        for callback in list(self._reconnect):
            try:
                await callback()
            except SharedStateUnavailable:
                return  # down again: the next return re-publishes
            except Exception:
                log.exception("re-publishing shared state failed")

    async def _listen(self, stop: asyncio.Event) -> None:
        if not self._handlers:
            return
        delay = self.settings.backoff_initial
        names = {self.name(channel): channel for channel in self._handlers}
        while not stop.is_set():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await asyncio.wait_for(pubsub.subscribe(*names), self.settings.timeout)
                delay = self.settings.backoff_initial
                while not stop.is_set():
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    channel = names.get(_text(message.get("channel")))
                    data = message.get("data")
                    if channel is None or not isinstance(data, bytes):
                        continue
                    self.bytes_in += len(data)
                    for handler in self._handlers.get(channel, ()):
                        try:
                            result = handler(data)
                            if asyncio.iscoroutine(result):
                                await result
                        except Exception:
                            log.exception("shared-state message handler failed",
                                          extra={"channel": channel})
            except self._errors as err:
                self._failed(err, "subscribe")
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            if await self._wait(stop, random.uniform(0.5, 1.0) * delay):
                return
            delay = min(self.settings.backoff_max, delay * 2)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
