"""The shared-state store against a real redis-server (started here on a free port): sealed
entries, refusal of entries under another key, password from a file, key prefix, pub/sub, and
a Redis restart: marked down, reconnected with backoff, re-published on return."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from xds_server.config import ConfigError
from xds_server.shared.sealed import SealError
from xds_server.shared.statekey import StateKey
from xds_server.shared.store import RedisSettings, SharedStateUnavailable, SharedStore
from tests.support.redis_server import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path):
    server = RedisServer(tmp_path / "redis", password="test-password-123").start()
    yield server
    server.stop()


def settings(server: RedisServer, tmp_path: Path, **extra) -> RedisSettings:
    password = tmp_path / "redis-password"
    password.write_text("test-password-123\n")
    return RedisSettings(url=server.url, password_file=password, health_interval=0.1,
                         backoff_initial=0.05, backoff_max=0.3, timeout=1.0, connect_timeout=1.0,
                         **extra)


async def eventually(predicate, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_sealed_entries_are_encrypted_and_refused_under_another_key(
        redis_server: RedisServer, tmp_path: Path) -> None:
    key = StateKey.generate()
    store = SharedStore(settings(redis_server, tmp_path, key_prefix="cp-a:"), key)
    assert await store.connect()
    assert await store.set_sealed("ca", b"ca-key.pem: PRIVATE", only_if_absent=True)
    assert not await store.set_sealed("ca", b"another", only_if_absent=True)  # created once
    assert await store.get_sealed("ca") == b"ca-key.pem: PRIVATE"

    raw = aioredis.Redis.from_url(redis_server.url, password="test-password-123")
    stored = await raw.get("cp-a:ca")
    assert stored is not None and b"PRIVATE" not in stored  # never in clear in Redis

    stranger = SharedStore(settings(redis_server, tmp_path, key_prefix="cp-a:"), StateKey.generate())
    assert await stranger.connect()
    with pytest.raises(SealError):
        await stranger.get_sealed("ca")
    assert stranger.refused == {"other-key": 1}
    assert stranger.status()["refused_entries"] == {"other-key": 1}

    await raw.set("cp-a:ca", b"written by someone without the key")
    with pytest.raises(SealError):
        await store.get_sealed("ca")
    await raw.set("cp-a:moved", stored)  # a good entry moved under another name
    with pytest.raises(SealError):
        await store.get_sealed("moved")
    assert store.refused == {"malformed": 1, "forged": 1}
    await raw.aclose()
    for s in (store, stranger):
        await s.client.aclose()


async def test_wrong_password_and_bad_urls_are_reported(redis_server: RedisServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad-password"
    bad.write_text("nope")
    store = SharedStore(RedisSettings(url=redis_server.url, password_file=bad, timeout=1.0), StateKey.generate())
    assert not await store.connect()
    assert not store.up and "AuthenticationError" in store.status()["last_error"]
    await store.client.aclose()
    with pytest.raises(ConfigError, match="--redis-password-file"):
        RedisSettings(url="redis://u:secret@127.0.0.1:1/0").check()
    with pytest.raises(ConfigError, match="scheme"):
        RedisSettings(url="http://127.0.0.1:1").check()
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        RedisSettings(url=redis_server.url, password_file=empty).password()


async def test_restart_marks_down_reconnects_and_republishes(redis_server: RedisServer, tmp_path: Path) -> None:
    store = SharedStore(settings(redis_server, tmp_path), StateKey.generate(), replica="r1")
    received: list[bytes] = []
    store.subscribe("events", received.append)
    republished = asyncio.Event()

    async def republish() -> None:
        await store.set("republished", b"yes")
        republished.set()

    store.on_reconnect(republish)
    stop = asyncio.Event()
    runner = asyncio.create_task(store.run(stop))
    await eventually(lambda: store.up)
    await republished.wait()  # the first connection counts as a return too
    republished.clear()
    await eventually(lambda: store.ops > 3)
    await asyncio.sleep(0.3)  # let the subscription settle
    await store.publish("events", b"one")
    await eventually(lambda: received == [b"one"])

    redis_server.stop()
    await eventually(lambda: not store.up)
    with pytest.raises(SharedStateUnavailable):
        await store.set("during", b"outage")
    assert store.status()["outages"] == 1

    redis_server.start()
    await eventually(lambda: store.up)
    await asyncio.wait_for(republished.wait(), 20)
    assert await store.get("republished") == b"yes"
    # pub/sub resubscribed after the restart
    async def delivered() -> None:
        while b"two" not in received:
            await store.publish("events", b"two")
            await asyncio.sleep(0.2)
    await asyncio.wait_for(delivered(), 20)
    stop.set()
    await runner
