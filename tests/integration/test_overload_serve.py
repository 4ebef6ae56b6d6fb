"""Issue 15's admission control and removal bound through the `xds-server serve` process (the
CLI options, the file source, the admin API), with a raw xDS client: tests/unit/test_overload.py
holds the same server to its bounds in-process, where the churn can be driven every 2 ms."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import free_port, wait_for_port
from tests.support.xds_client import XdsClient, eventually, sotw_names
from xds_server.xds import types

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

CLUSTER = """\
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: {name}
  type: EDS
  connect_timeout: 1s
  eds_cluster_config:
    eds_config: {{ ads: {{}}, resource_api_version: V3 }}
- "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
  cluster_name: {name}
  endpoints:
    - lb_endpoints:
        - endpoint:
            address:
              socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"""


def write_cluster(directory: Path, name: str, port: int) -> None:
    # Written beside and renamed: the source never reads half a file.
    staged = directory / f".{name}.tmp"
    staged.write_text(CLUSTER.format(name=name, port=port))
    staged.rename(directory / f"{name}.yaml")


READ_TOKEN = "overload-test-read-token"


async def serve(resources: Path, *options: str):
    xds_port, admin_port = free_port(), free_port()
    tokens = resources.parent / "admin-tokens.yaml"
    tokens.write_text(f"tokens:\n  - name: test\n    role: read\n    token: {READ_TOKEN}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "xds_server.cli", "--log-format", "json", "serve", "--auth", "none",
        "--xds-address", f"127.0.0.1:{xds_port}", "--admin-address", f"127.0.0.1:{admin_port}",
        "--admin-tokens-file", str(tokens),
        "--xds-tls-address", "off", "--xds-tls-token-address", "off",
        "--resources", str(resources), "--debounce-quiet", "0.01", "--shutdown-grace", "1",
        *options,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
    )
    try:
        await asyncio.to_thread(wait_for_port, "127.0.0.1", xds_port, 30)
        await asyncio.to_thread(wait_for_port, "127.0.0.1", admin_port, 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, f"127.0.0.1:{xds_port}", f"http://127.0.0.1:{admin_port}"


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in (labels or {}).items()):
                return sample.value
    return 0.0


async def refused_at_open(stream, within: float = 2.0) -> tuple[grpc.StatusCode, str] | None:
    try:
        code = await asyncio.wait_for(asyncio.shield(stream.call.code()), within)
    except TimeoutError:
        return None
    return code, await stream.call.details()


async def test_stream_opens_beyond_the_configured_rate_are_refused_and_counted(tmp_path: Path):
    """`--max-stream-opens-per-second 0.05 --stream-open-burst 3`: of eight streams opened in a
    row, three are admitted and served; five end at once with UNAVAILABLE (clients back off
    and retry, or try another replica), never left waiting; /metrics and /api/v1/server say
    so."""
    resources = tmp_path / "resources"
    resources.mkdir()
    write_cluster(resources, "web", 8080)
    proc, xds, admin = await serve(resources, "--max-stream-opens-per-second", "0.05",
                                   "--stream-open-burst", "3")
    try:
        async with XdsClient(xds) as client:
            admitted, refused = [], []
            for _ in range(8):
                stream = client.ads(read=False)
                status = await refused_at_open(stream)
                if status is None:
                    admitted.append(stream)
                    stream.start_reading()
                    await stream.request(types.CLUSTER)
                else:
                    refused.append(status)
            configs = [sotw_names(await s.recv(timeout=20)) for s in admitted]
        assert configs == [["web"]] * 3
        assert len(refused) == 5
        assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in refused), refused
        async with httpx.AsyncClient(base_url=admin, timeout=10,
                                     headers={"Authorization": f"Bearer {READ_TOKEN}"}) as http:
            text = (await http.get("/metrics")).text
            reply = await http.get("/api/v1/server")
            assert reply.status_code == 200, reply.text
            server = reply.json()
        assert metric(text, "xds_server_stream_admission_refusals_total", {"reason": "rate"}) == 5
        assert server["overload"]["refused_open_rate"] == 5
    finally:
        await stop(proc)


async def test_a_removed_cluster_reaches_a_stream_while_endpoints_keep_changing(tmp_path: Path):
    """A cluster file is deleted while another cluster's endpoints change every 50 ms through
    the file source and the client ACKs everything: the removal is delivered while the churn
    goes on (before issue 15 a removal waited for every other type to settle, which such churn
    never allows). The bound itself is measured by bench/soak.py and held in-process by
    tests/unit/test_overload.py; here the churn is still running when the removal arrives."""
    resources = tmp_path / "resources"
    resources.mkdir()
    write_cluster(resources, "keep", 9000)
    write_cluster(resources, "gone", 9100)
    proc, xds, _ = await serve(resources)
    stop_churn = asyncio.Event()
    churned = 0

    async def churn() -> None:
        nonlocal churned
        while not stop_churn.is_set():
            churned += 1
            write_cluster(resources, "keep", 9000 + churned % 500)
            await asyncio.sleep(0.05)

    try:
        async with XdsClient(xds) as client:
            ads = client.ads()
            await ads.request(types.CLUSTER)
            first = await ads.recv(timeout=20)
            assert sorted(sotw_names(first)) == ["gone", "keep"]
            await ads.ack(first)
            await ads.request(types.ENDPOINT, ["gone", "keep"])
            await ads.ack(await ads.recv(timeout=20))
            removed = asyncio.Event()

            async def ack_everything() -> None:
                while True:
                    response = await ads.recv(timeout=60)
                    if response.type_url == types.CLUSTER and "gone" not in sotw_names(response):
                        removed.set()
                    await ads.ack(response)

            acker = asyncio.create_task(ack_everything())
            churner = asyncio.create_task(churn())
            try:
                await eventually(lambda: churned >= 10, timeout=30, what="churn under way")
                at_removal = churned
                (resources / "gone.yaml").unlink()
                await asyncio.wait_for(removed.wait(), 60)
                assert not stop_churn.is_set() and churner.done() is False
                assert churned >= at_removal
            finally:
                stop_churn.set()
                await churner
                acker.cancel()
                await asyncio.gather(acker, return_exceptions=True)
    finally:
        await stop(proc)
