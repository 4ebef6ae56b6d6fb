"""xDS over mutual TLS against plaintext (issue 11 benchmark): stream opens per second, push
latency to N streams, and what a server-certificate swap costs with N streams open.

The server runs in a child process (`--serve`): `serve --auth tokens` as security.py wires it
(CA, guard, SDS, the TLS keeper), N raw clusters in the cache, plaintext on loopback and mutual
TLS (its handshake by grpc core, or by the TLS front: `--transports`, in the same run). It takes commands on stdin: `push` (one cluster changed; prints the change's time_ns) and
`swap` (a new server certificate; prints how long the swap took on the loop). The client
(this process) opens N ADS streams spread over `--channels` connections, each asking CDS and
ACKing, as the same workload identity (a workload token in plaintext, its SVID over mTLS).

    .venv/bin/python bench/tls_bench.py --n 1000 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


# Server (child process) -----------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    from tests.support.xds_client import cluster
    from xds_server.security import Security, SecurityConfig
    from xds_server.xds.auth import AuthMode, GuardSettings
    from xds_server.xds.cache import ResourceCache
    from xds_server.xds.server import ServerSettings, XdsServer

    cache = ResourceCache()
    cache.set_type(CDS, [cluster(f"c{i}") for i in range(args.clusters)])
    config = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=Path(args.ca_dir), watch_ca_files=False,
                            limits=GuardSettings(max_streams_per_identity=0,
                                                 max_requests_per_second=0))
    security = Security.build(config, cache, "127.0.0.1:0")
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", tls_address="127.0.0.1:0",
                                             tls_frontend=args.tls_frontend,
                                             debounce_quiet=0, debounce_max=0))
    security.attach(server)
    await server.start()
    stop = asyncio.Event()
    task = asyncio.create_task(security.run(stop))
    assert security.tokens is not None and security.issuer is not None and security.tls
    from xds_server.model.identity import Identity

    svid = security.issuer.issue_for_identity(Identity("bench", "proxy"))
    print(json.dumps({"plain": server.port, "mtls": server.tls_port,
                      "token": security.tokens.create("bench", "proxy", timedelta(hours=1)),
                      "cert": svid.chain_pem.decode(), "key": (svid.key_pem or b"").decode(),
                      "bundle": security.authority.trust_bundle_pem.decode()  # type: ignore[union-attr]
                      }), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    version = 0
    while line := (await reader.readline()).decode().strip():
        if line == "push":
            version += 1
            changed = cluster("c0", connect_timeout_ms=1000 + version)
            at = time.time_ns()
            cache.update(CDS, upsert=[changed])
            print(json.dumps({"at": at}), flush=True)
        elif line == "swap":
            cpu, wall = time.process_time(), time.perf_counter()
            await security.tls.check(force=True)
            print(json.dumps({"swap_ms": (time.perf_counter() - wall) * 1000,
                              "swap_cpu_ms": (time.process_time() - cpu) * 1000,
                              "streams": len(server.connections)}), flush=True)
        elif line == "cpu":
            print(json.dumps({"cpu_s": time.process_time()}), flush=True)
    stop.set()
    await task
    await server.stop(0)


# Client ---------------------------------------------------------------------------------------


def node() -> base_pb2.Node:
    metadata = struct_pb2.Struct()
    metadata.update({"namespace": "bench", "service_account": "proxy"})
    return base_pb2.Node(id="p.bench", cluster="bench", metadata=metadata)


class Stream:
    def __init__(self, channel: grpc.aio.Channel, metadata) -> None:
        self.call = channel.stream_stream(
            ADS, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString)(metadata=metadata)
        self.first = asyncio.get_running_loop().create_future()
        self.received: asyncio.Queue[int] = asyncio.Queue()

    async def run(self) -> None:
        await self.call.write(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node()))
        async for response in self.call:
            now = time.time_ns()
            await self.call.write(discovery_pb2.DiscoveryRequest(
                type_url=CDS, version_info=response.version_info,
                response_nonce=response.nonce))
            if not self.first.done():
                self.first.set_result(now)
            else:
                self.received.put_nowait(now)


async def measure(kind: str, info: dict, proc, args: argparse.Namespace) -> dict:
    options = [("grpc.use_local_subchannel_pool", 1),
               ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if kind.startswith("mtls"):
        creds = grpc.ssl_channel_credentials(info["bundle"].encode(), info["key"].encode(),
                                             info["cert"].encode())
        target = f"127.0.0.1:{info['mtls']}"
        options.append(("grpc.ssl_target_name_override", "localhost"))
        channels = [grpc.aio.secure_channel(target, creds, options=options)
                    for _ in range(args.channels)]
        metadata = None
    else:
        target = f"127.0.0.1:{info['plain']}"
        channels = [grpc.aio.insecure_channel(target, options=options)
                    for _ in range(args.channels)]
        metadata = (("authorization", f"Bearer {info['token']}"),)
    start = time.perf_counter()
    streams = [Stream(channels[i % len(channels)], metadata) for i in range(args.n)]
    tasks = [asyncio.create_task(s.run()) for s in streams]
    await asyncio.wait_for(asyncio.gather(*(s.first for s in streams)), 120)
    open_s = time.perf_counter() - start

    async def push_round(command: str = "push") -> list[float]:
        proc.stdin.write(f"{command}\n".encode())
        await proc.stdin.drain()
        at = json.loads(await proc.stdout.readline())["at"]
        got = await asyncio.wait_for(asyncio.gather(*(s.received.get() for s in streams)), 60)
        return [(t - at) / 1e6 for t in got]

    latencies: list[list[float]] = []
    for _ in range(args.rounds):
        latencies.append(await push_round())
        await asyncio.sleep(0.1)
    proc.stdin.write(b"swap\n")
    await proc.stdin.drain()
    swap = json.loads(await proc.stdout.readline())
    after = await push_round()  # every stream still served after the swap
    alive = sum(1 for t in tasks if not t.done())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()
    p50 = statistics.median(statistics.median(r) for r in latencies)
    p99 = statistics.median(sorted(r)[int(0.99 * (len(r) - 1))] for r in latencies)
    last = statistics.median(max(r) for r in latencies)
    return {"transport": kind, "streams": args.n, "channels": args.channels,
            "opens_per_s": round(args.n / open_s), "push_p50_ms": round(p50, 1),
            "push_p99_ms": round(p99, 1), "push_last_ms": round(last, 1),
            "swap_ms": round(swap["swap_ms"], 2), "swap_cpu_ms": round(swap["swap_cpu_ms"], 2),
            "streams_after_swap": alive, "push_after_swap_last_ms": round(max(after), 1)}


async def client(args: argparse.Namespace) -> list[dict]:
    rows = []
    for kind in args.transports.split(","):
        frontend = kind.partition("-")[2] or "grpc"
        with tempfile.TemporaryDirectory() as ca_dir:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--serve", "--ca-dir", ca_dir,
                "--tls-frontend", frontend,
                "--clusters", str(args.clusters), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, env={**os.environ, "XDS_SERVER_LOG_LEVEL": "error"},
                limit=1 << 24)
            assert proc.stdout is not None
            info = json.loads(await proc.stdout.readline())
            try:
                rows.append(await measure(kind, info, proc, args))
            finally:
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), 30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ca-dir", default="")
    ap.add_argument("--n", type=int, default=1000, help="streams")
    ap.add_argument("--channels", type=int, default=100, help="connections (TLS handshakes)")
    ap.add_argument("--clusters", type=int, default=50, help="clusters in each CDS response")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--transports", default="plaintext,mtls-grpc,mtls-python",
                    help="comma-separated: plaintext (token), mtls-grpc (grpc core's TLS), "
                         "mtls-python (the TLS front, --xds-tls-frontend python)")
    ap.add_argument("--tls-frontend", default="python", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        import logging
        logging.basicConfig(level=logging.ERROR)
        asyncio.run(serve(args))
        return
    rows = asyncio.run(client(args))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
