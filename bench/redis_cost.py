"""What shared state costs in Redis: commands and bytes per push, per stream open, and idle.

Starts a real redis-server on a free port and one `xds-server serve --redis-url ...` replica
(tests/support/replicas.py), opens N authenticated streams (each gets its SDS secrets), makes
P config changes that reach every stream, and reads the replica's own counters
(`/api/v1/server` `shared_state.operations`, `bytes_sent`, `bytes_received`) around each phase;
the idle rate (health pings, periodic re-reads) measured over the same length of time is
subtracted. Appends a section to bench/RESULTS.md.

    .venv/bin/python bench/redis_cost.py [--streams 200] [--pushes 20] [--workers 2]

`--workers N` runs the replica as `serve --workers N` and counts at Redis instead (`INFO
stats`: commands processed, bytes in and out, every worker's together; the cost of the INFO
call itself, measured back to back, is subtracted), since a worker's counters are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.replicas import Replicas  # noqa: E402
from tests.support.xds_client import XdsClient, sotw_resources  # noqa: E402
from xds_server.xds import types  # noqa: E402

CLUSTER = """\
"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: backend
type: STATIC
connect_timeout: {timeout}s
"""


def counters(group: Replicas, workers: int = 1) -> dict[str, float]:
    if workers > 1:
        import redis

        with redis.Redis.from_url(group.redis.url, password=group.redis.password) as client:
            stats = client.info("stats")
        return {"ops": stats["total_commands_processed"], "out": stats["total_net_input_bytes"],
                "in": stats["total_net_output_bytes"], "t": time.monotonic()}
    shared = group.admin(group.members[0], "GET", "/api/v1/server").json()["shared_state"]
    return {"ops": shared["operations"], "out": shared["bytes_sent"], "in": shared["bytes_received"],
            "t": time.monotonic()}


def delta(before: dict[str, float], after: dict[str, float], idle: dict[str, float],
          probe: dict[str, float]) -> dict[str, float]:
    seconds = after["t"] - before["t"]
    return {k: max(0.0, after[k] - before[k] - idle[k] * seconds - probe[k])
            for k in ("ops", "out", "in")}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--pushes", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    workers = ["--workers", str(args.workers)] if args.workers > 1 else []
    with tempfile.TemporaryDirectory(prefix="redis-cost-") as tmp:
        resources = Path(tmp) / "resources"
        resources.mkdir()
        (resources / "backend.yaml").write_text(CLUSTER.format(timeout=1))
        group = Replicas(Path(tmp) / "group", 1, ["--resources", str(resources), *workers])
        try:
            group.start()
            token = group.admin(group.members[0], "POST", "/api/v1/tokens",
                                json={"namespace": "shop", "service_account": "web", "ttl": "1h"}).json()["token"]
            await asyncio.sleep(2)
            a = counters(group, args.workers)
            await asyncio.sleep(10)
            b = counters(group, args.workers)
            c = counters(group, args.workers)  # back to back: what one reading costs
            probe = {k: c[k] - b[k] for k in ("ops", "out", "in")}
            span = b["t"] - a["t"]
            idle = {k: max(0.0, b[k] - a[k] - probe[k]) / span for k in ("ops", "out", "in")}

            from google.protobuf import struct_pb2
            from envoy.config.core.v3 import base_pb2

            clients, streams = [], []
            before = counters(group, args.workers)
            for i in range(args.streams):
                metadata = struct_pb2.Struct()
                metadata.update({"namespace": "shop", "service_account": "web", "pod": f"web-{i}"})
                node = base_pb2.Node(id=f"web-{i}.shop", cluster="web.shop", metadata=metadata)
                client = XdsClient(group.members[0].xds_address, node_id=node.id,
                                   metadata=[("authorization", f"Bearer {token}")])
                stream = client.ads(node=node)
                await stream.request(types.CLUSTER)
                await stream.ack(await stream.recv(timeout=60))
                await stream.request(types.SECRET, ["default", "ROOTCA"])
                got: dict = {}
                while {"default", "ROOTCA"} - set(got):
                    response = await stream.recv(timeout=60)
                    got.update(sotw_resources(response))
                    await stream.ack(response)
                clients.append(client)
                streams.append(stream)
            opened = counters(group, args.workers)
            per_open = delta(before, opened, idle, probe)

            for p in range(args.pushes):
                (resources / "backend.yaml").write_text(CLUSTER.format(timeout=p + 2))
                for stream in streams:
                    while True:
                        response = await stream.recv(timeout=60)
                        await stream.ack(response)
                        if response.type_url == types.CLUSTER:
                            break
            pushed = counters(group, args.workers)
            per_push = delta(opened, pushed, idle, probe)
            for client in clients:
                await client.close()
        finally:
            group.stop()
    load = os.getloadavg()
    where = (f" run as `serve --workers {args.workers}`, counted at Redis (INFO stats)"
             if args.workers > 1 else "")
    lines = [
        f"\n## {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M:%S} UTC: Redis cost of shared state (bench/redis_cost.py)\n",
        f"One replica with --redis-url (real redis-server){where}, {args.streams} authenticated ADS streams "
        f"(CDS + SDS each), {args.pushes} CDS changes each pushed to every stream. Load average "
        f"during the run: {load[0]:.2f} / {load[1]:.2f} (other agents share the machine).\n",
        "| | Redis commands | bytes sent | bytes received |",
        "|---|---:|---:|---:|",
        f"| idle, per second (health ping, periodic re-reads) | {idle['ops']:.2f} | {idle['out']:.1f} | {idle['in']:.1f} |",
        f"| per stream open (first config and SDS secrets) | {per_open['ops'] / args.streams:.3f} | "
        f"{per_open['out'] / args.streams:.1f} | {per_open['in'] / args.streams:.1f} |",
        f"| per push (one change to {args.streams} streams) | {per_push['ops'] / args.pushes:.3f} | "
        f"{per_push['out'] / args.pushes:.1f} | {per_push['in'] / args.pushes:.1f} |",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    with open(ROOT / "bench" / "RESULTS.md", "a") as results:
        results.write(text)


if __name__ == "__main__":
    asyncio.run(main())
