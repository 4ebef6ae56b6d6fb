"""`xds-server serve --workers 2`: two worker processes on one xDS port, acting as one.

A real supervisor process with a real redis-server: connections spread over both workers
(SO_REUSEPORT) and the admin API (worker 0) lists the proxies of both; a token revoked through
the admin API closes the streams on either worker; a SIGKILLed worker is restarted and serves
new clients; SIGTERM to the supervisor drains every worker (open streams end UNAVAILABLE) and
it exits 0; a SIGKILLed supervisor takes its workers with it; workers that keep crashing make
the supervisor exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from tests.support.replicas import ROOT, Replica, Replicas
from tests.support.xds_client import XdsClient
from xds_server.workers import WORKER_INDEX_ENV
from xds_server.xds import types

from .test_replicas import eventually, node

pytestmark = pytest.mark.slow

CONNECTIONS = 16  # both workers get some: all on one would be a 2 * 2**-16 chance


@pytest.fixture
def group(tmp_path: Path):
    replicas = Replicas(tmp_path, 1, ["--workers", "2", "--revocation-check-interval", "600s"])
    try:
        replicas.start()
        yield replicas
    finally:
        replicas.stop()


def workers_of(supervisor: Replica) -> dict[int, int]:
    """{worker index: pid} of the supervisor's children, read from /proc."""
    assert supervisor.proc is not None
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != supervisor.proc.pid:
                continue
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in environ:
            if item.startswith(WORKER_INDEX_ENV.encode() + b"="):
                found[int(item.split(b"=", 1)[1])] = int(entry)
    return found


async def open_streams(address: str, token: str, pods: list[str]) -> list[tuple[XdsClient, object]]:
    """One connection per pod, each stream with its first response acknowledged."""
    opened = []
    for pod in pods:
        client = XdsClient(address, metadata=[("authorization", f"Bearer {token}")])
        stream = client.ads(node=node("shop", "web", pod))
        await stream.request(types.SECRET, ["ROOTCA"])
        await stream.ack(await stream.recv(timeout=30))
        opened.append((client, stream))
    return opened


def serving(group: Replicas, supervisor: Replica) -> dict[str, str]:
    answer = group.admin(supervisor, "GET", "/api/v1/proxies").json()
    return {p["id"]: p.get("replica") for p in answer["proxies"]}


async def test_streams_spread_over_workers_and_a_revocation_closes_them_on_both(group: Replicas) -> None:
    supervisor = group.members[0]
    assert sorted(workers_of(supervisor)) == [0, 1]
    made = group.admin(supervisor, "POST", "/api/v1/tokens",
                       json={"namespace": "shop", "service_account": "web", "ttl": "1h"}).json()
    pods = [f"web-{i}" for i in range(CONNECTIONS)]
    opened = await open_streams(supervisor.xds_address, made["token"], pods)
    try:
        ids = {f"{pod}.shop" for pod in pods}
        await eventually(lambda: ids <= set(serving(group, supervisor)))
        where = serving(group, supervisor)
        # One admin API answers for both workers: each proxy is listed with the one serving it.
        assert {where[i] for i in ids} == {"replica-0-w0", "replica-0-w1"}, where
        # The workers share stderr; each line says which worker wrote it.
        serving_lines = [line for line in supervisor.logs() if line.get("msg") == "serving"]
        assert sorted(line.get("worker") for line in serving_lines) == [0, 1]

        revoked = group.admin(supervisor, "DELETE", f"/api/v1/tokens/{made['token_id']}")
        assert revoked.status_code == 200 and revoked.json()["revoked"] is True
        for _, stream in opened:  # on worker 0 and worker 1 alike
            code, details = await stream.closed_with(timeout=30)
            assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    finally:
        for client, _ in opened:
            await client.close()

    # A supervisor killed outright takes its workers with it: nothing keeps holding the port.
    children = workers_of(supervisor)
    assert supervisor.proc is not None
    supervisor.proc.kill()
    supervisor.proc.wait()
    await eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children.values()))


async def test_a_killed_worker_is_restarted_and_sigterm_drains_all(group: Replicas) -> None:
    supervisor = group.members[0]
    before = workers_of(supervisor)
    made = group.admin(supervisor, "POST", "/api/v1/tokens",
                       json={"namespace": "shop", "service_account": "web", "ttl": "1h"}).json()
    pods = [f"old-{i}" for i in range(CONNECTIONS)]
    opened = await open_streams(supervisor.xds_address, made["token"], pods)
    try:
        await eventually(lambda: {f"{p}.shop" for p in pods} <= set(serving(group, supervisor)))
        on_w1 = [s for p, (_, s) in zip(pods, opened, strict=True)
                 if serving(group, supervisor)[f"{p}.shop"] == "replica-0-w1"]
        assert on_w1, "some connections land on worker 1"

        os.kill(before[1], signal.SIGKILL)
        for stream in on_w1:  # its clients see the connection go...
            code, _ = await stream.closed_with(timeout=30)
            assert code == grpc.StatusCode.UNAVAILABLE
        # ...and the supervisor starts a new worker 1, which serves new connections.
        await eventually(lambda: workers_of(supervisor).get(1) not in (None, before[1]), timeout=60)
        assert workers_of(supervisor)[0] == before[0], "worker 0 untouched"
        assert supervisor.proc is not None and supervisor.proc.poll() is None
        # The new worker serves once it has started (CA from Redis, first build): until then
        # the kernel routes every connection to worker 0. New connections until one lands on it.
        deadline = time.monotonic() + 90
        batch = 0
        while True:
            again = [f"new-{batch}-{i}" for i in range(4)]
            opened.extend(await open_streams(supervisor.xds_address, made["token"], again))
            wanted = {f"{p}.shop" for p in again}
            await eventually(lambda wanted=wanted: wanted <= set(serving(group, supervisor)))
            where = serving(group, supervisor)
            if "replica-0-w1" in {where[f"{p}.shop"] for p in again}:
                break
            assert time.monotonic() < deadline, "the restarted worker 1 never served"
            batch += 1
            await asyncio.sleep(0.5)
    finally:
        for client, _ in opened:
            with contextlib.suppress(Exception):
                await client.close()

    # SIGTERM to the supervisor: every worker drains, its open streams end with UNAVAILABLE
    # (so proxies reconnect elsewhere), and the supervisor exits 0.
    children = workers_of(supervisor)
    last = [f"last-{i}" for i in range(CONNECTIONS)]
    open_now = await open_streams(supervisor.xds_address, made["token"], last)
    try:
        await eventually(lambda: {f"{p}.shop" for p in last} <= set(serving(group, supervisor)))
        where = serving(group, supervisor)
        assert {where[f"{p}.shop"] for p in last} == {"replica-0-w0", "replica-0-w1"}, where
        supervisor.proc.send_signal(signal.SIGTERM)
        for _, stream in open_now:
            code, _ = await stream.closed_with(timeout=60)
            assert code == grpc.StatusCode.UNAVAILABLE
    finally:
        for client, _ in open_now:
            with contextlib.suppress(Exception):
                await client.close()
    assert await asyncio.to_thread(supervisor.proc.wait, 60) == 0
    for pid in children.values():  # every worker drained and exited with it
        assert not Path(f"/proc/{pid}").exists()
    lines = [line.get("msg") for line in supervisor.logs()]
    assert "workers stopped" in lines and "worker exited; restarting it" in lines


def test_workers_need_shared_state(tmp_path: Path) -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "xds_server.cli", "serve", "--auth", "tokens", "--workers", "2",
         "--xds-address", "127.0.0.1:15999", "--ca-dir", str(tmp_path / "ca")],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert shown.returncode == 2 and "--workers 2 needs shared state" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_workers_that_keep_crashing_stop_the_supervisor(tmp_path: Path) -> None:
    """Another program holds the xDS port (without SO_REUSEPORT): every worker fails to bind;
    the supervisor restarts them with backoff, then gives up and exits non-zero."""
    import socket

    group = Replicas(tmp_path, 1)
    group.redis.start()
    supervisor = Replica("replica-0", tmp_path, group.shared_args + ["--workers", "2"], group.env)
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", supervisor.xds_port))
        holder.listen()
        supervisor.start()
        assert supervisor.proc is not None
        assert supervisor.proc.wait(180) == 1
        lines = [line.get("msg") for line in supervisor.logs()]
        assert lines.count("worker exited; restarting it") >= 4
        assert "workers keep crashing: stopping" in lines
    finally:
        holder.close()
        supervisor.stop()
        group.redis.stop()
