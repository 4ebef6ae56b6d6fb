"""The real `xds-server serve` process: raw resources hot-reloaded, bad input reported with
file and field while the last good config keeps serving, health and reflection, and a
graceful SIGTERM that tells connected clients to reconnect."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
from pathlib import Path

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.net import free_port, wait_for_port
from tests.support.xds_client import XdsClient, sotw_resources
from xds_server.xds import types

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class ServeProcess:
    def __init__(self, resources: Path) -> None:
        self.port = free_port()
        self.resources = resources
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[dict] = []
        self._reader: asyncio.Task | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve",
            "--xds-address", f"127.0.0.1:{self.port}", "--resources", str(self.resources),
            "--debounce-quiet", "0.02", "--shutdown-grace", "2",
            stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        self._reader = asyncio.create_task(self._read_logs())
        await asyncio.to_thread(wait_for_port, "127.0.0.1", self.port, 20)

    async def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"raw": raw.decode(errors="replace")})

    async def log_matching(self, predicate, timeout: float = 10.0) -> dict:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for line in self.lines:
                if predicate(line):
                    return line
            assert loop.time() < deadline, f"no such log line; last: {self.lines[-5:]}"
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return self.proc.returncode


@pytest.fixture
async def served(tmp_path: Path):
    resources = tmp_path / "resources"
    shutil.copytree(ROOT / "examples" / "resources", resources)
    process = ServeProcess(resources)
    await process.start()
    yield process
    await process.stop()


async def test_serves_example_resources_and_survives_bad_files(served: ServeProcess) -> None:
    async with XdsClient(f"127.0.0.1:{served.port}", node_id="cli-proxy") as client:
        ads = client.ads()
        await ads.request(types.CLUSTER)
        first = await ads.recv()
        clusters = sotw_resources(first)
        assert set(clusters) == {"backend"}
        await ads.ack(first)

        # A file that does not match the Envoy API: reported with file, line and field.
        (served.resources / "bad.yaml").write_text(
            '"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster\n'
            "name: extra\n"
            "connect_timeout: 5x\n"
        )
        error = await served.log_matching(lambda line: "bad.yaml" in str(line.get("msg", "")))
        assert "connect_timeout" in error["msg"] and error["level"] == "warning"
        await ads.expect_silence(0.5)  # nothing from the bad file reached the client

        # Breaking a good file keeps its last good version: no push removes the cluster.
        backend = served.resources / "backend.yaml"
        good = backend.read_text()
        backend.write_text(good.replace("connect_timeout: 1s", "connect_timeout: [oops"))
        await served.log_matching(lambda line: "backend.yaml" in str(line.get("msg", "")))
        await ads.expect_silence(0.5)

        # A valid edit is pushed again: the server kept serving through the bad input.
        backend.write_text(good.replace("connect_timeout: 1s", "connect_timeout: 2s"))
        update = await ads.recv(timeout=10)
        cluster = sotw_resources(update)["backend"]
        assert isinstance(cluster, cluster_pb2.Cluster)
        assert cluster.connect_timeout.seconds == 2
        await ads.ack(update)

        # Health and reflection on the same port.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(
                health_pb2.HealthCheckRequest(
                    service="envoy.service.discovery.v3.AggregatedDiscoveryService"
                )
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            call = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            listed = [s.name async for r in call for s in r.list_services_response.service]
            assert "envoy.service.discovery.v3.AggregatedDiscoveryService" in listed
            assert "envoy.service.endpoint.v3.EndpointDiscoveryService" in listed

        # The logs name the proxy.
        await served.log_matching(
            lambda line: line.get("msg") == "stream opened" and line.get("proxy") == "cli-proxy"
        )

        # SIGTERM: streams end with UNAVAILABLE (reconnect elsewhere), the process exits 0.
        assert served.proc is not None
        served.proc.send_signal(signal.SIGTERM)
        code, details = await ads.closed_with(timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        # It exits by itself after the streams (a second signal would mean "stop now").
        assert await asyncio.wait_for(served.proc.wait(), 30) == 0
        assert await served.stop() == 0


async def test_a_taken_admin_port_stops_the_start_before_xds_listens(tmp_path: Path) -> None:
    """The admin port is bound before anything else starts: a busy one ends `serve` with a
    clear message and exit code, and the xDS port never accepts a stream it would then cut."""
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    xds_port = free_port()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve", "--auth", "none",
            "--xds-address", f"127.0.0.1:{xds_port}",
            "--admin-address", f"127.0.0.1:{busy.getsockname()[1]}",
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        busy.close()
    text = stderr.decode()
    assert proc.returncode not in (0, None), text
    assert "cannot listen on" in text and "--admin-address" in text, text
    assert "Traceback" not in text, text
    assert not any(line.get("msg") == "xDS server listening" for line in _json_lines(text)), text


def _json_lines(text: str) -> list[dict]:
    lines = []
    for raw in text.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines
