"""The floor: the least a Python grpc.aio server can do to push one change to N xDS streams.

A bare ADS server (SotW and delta) with a generic handler whose response serializer is the
identity: every response is serialized once and the same bytes are written to every stream.
It serves the same mesh as `server_proc.py` (built by `mesh.py`), answers the initial
CDS-wildcard and EDS subscriptions like a real server would, reads (and drops) every ACK, and
on `{"cmd":"push"}` sends the changed ClusterLoadAssignment to every stream. What it does not
do (per-stream nonces and versions, ACK bookkeeping, views, make-before-break ordering) is
what the real server adds on top; the ratio of the two is the server's overhead.

Control (JSON lines): prints {"event":"ready","port":P,"pid":PID}; reads
  {"cmd":"push","round":R}  -> changes the CLA `mesh.push_target(R)` and pushes it;
                               prints {"event":"pushed","round":R,"name":..,"t0_ns":..}
  {"cmd":"stats"}           -> {"event":"stats","streams":N}
  {"cmd":"quit"}            -> stops, prints {"event":"bye"}
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from bench import mesh
from bench.control import SERVER_OPTIONS, commands, emit, log

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
_CLOSE = b""  # queue sentinel: the client went away


def _identity(b: bytes) -> bytes:
    return b


class Floor:
    def __init__(self, services: int, sotw_eds_full: bool) -> None:
        self.services = services
        self.sotw_eds_full = sotw_eds_full
        self.generation = [0] * services
        self.cla_bytes = [m.SerializeToString(deterministic=True) for m in mesh.clas(services)]
        self.cluster_bytes = [m.SerializeToString(deterministic=True) for m in mesh.clusters(services)]
        self.names = [mesh.service_name(i) for i in range(services)]
        self.push_no = 0
        self.sotw_streams: set[asyncio.Queue] = set()
        self.delta_streams: set[asyncio.Queue] = set()
        self._snapshots()

    # Pre-serialized responses ----------------------------------------------------------------

    def _sotw(self, type_url: str, bodies: list[bytes], version: str) -> bytes:
        return discovery_pb2.DiscoveryResponse(
            version_info=version,
            type_url=type_url,
            nonce=version,
            resources=[any_pb2.Any(type_url=type_url, value=b) for b in bodies],
        ).SerializeToString()

    def _delta(self, type_url: str, items: list[tuple[str, bytes]], version: str) -> bytes:
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=version,
            resources=[
                discovery_pb2.Resource(
                    name=name,
                    version=f"{version}-{i}",
                    resource=any_pb2.Any(type_url=type_url, value=body),
                )
                for i, (name, body) in enumerate(items)
            ],
        ).SerializeToString()

    def _snapshots(self) -> None:
        v = f"init-{self.push_no}"
        self.cds_sotw = self._sotw(mesh.CLUSTER_TYPE, self.cluster_bytes, "c" + v)
        self.eds_sotw = self._sotw(mesh.ENDPOINT_TYPE, self.cla_bytes, "e" + v)
        self.cds_delta = self._delta(mesh.CLUSTER_TYPE, list(zip(self.names, self.cluster_bytes, strict=True)), "c" + v)
        self.eds_delta = self._delta(mesh.ENDPOINT_TYPE, list(zip(self.names, self.cla_bytes, strict=True)), "e" + v)

    # Handlers --------------------------------------------------------------------------------

    async def _serve(self, streams: set, reader, context) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        streams.add(queue)
        task = asyncio.create_task(reader(queue))
        try:
            while True:
                data = await queue.get()
                if data is _CLOSE:
                    return
                await context.write(data)
        finally:
            streams.discard(queue)
            task.cancel()

    async def sotw(self, request_iterator, context) -> None:
        async def reader(queue: asyncio.Queue) -> None:
            try:
                async for req in request_iterator:
                    if req.response_nonce:
                        continue  # an ACK (or NACK): read and dropped
                    if req.type_url == mesh.CLUSTER_TYPE:
                        queue.put_nowait(self.cds_sotw)
                    elif req.type_url == mesh.ENDPOINT_TYPE:
                        queue.put_nowait(self.eds_sotw)
            finally:
                queue.put_nowait(_CLOSE)

        await self._serve(self.sotw_streams, reader, context)

    async def delta(self, request_iterator, context) -> None:
        async def reader(queue: asyncio.Queue) -> None:
            try:
                async for req in request_iterator:
                    if req.response_nonce:
                        continue
                    if req.type_url == mesh.CLUSTER_TYPE:
                        queue.put_nowait(self.cds_delta)
                    elif req.type_url == mesh.ENDPOINT_TYPE and req.resource_names_subscribe:
                        queue.put_nowait(self.eds_delta)
            finally:
                queue.put_nowait(_CLOSE)

        await self._serve(self.delta_streams, reader, context)

    # The change ------------------------------------------------------------------------------

    def push(self, round_no: int, changed) -> str:
        index, name = mesh.push_target(round_no, self.services)
        self.generation[index] = round_no
        body = changed.SerializeToString(deterministic=True)
        self.cla_bytes[index] = body
        self.push_no += 1
        v = f"p{self.push_no}"
        if self.sotw_eds_full:
            sotw = self._sotw(mesh.ENDPOINT_TYPE, self.cla_bytes, v)
        else:
            sotw = self._sotw(mesh.ENDPOINT_TYPE, [body], v)
        delta = self._delta(mesh.ENDPOINT_TYPE, [(name, body)], v)
        for q in self.sotw_streams:
            q.put_nowait(sotw)
        for q in self.delta_streams:
            q.put_nowait(delta)
        # New subscribers get the current state (cheap, off the measured path's hot loop).
        self._snapshots()
        return name


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:0")
    ap.add_argument("--services", type=int, default=mesh.DEFAULT_SERVICES)
    ap.add_argument(
        "--sotw-eds-full",
        action="store_true",
        help="SotW EDS pushes carry every CLA (default: only the changed one, like delta)",
    )
    args = ap.parse_args()

    floor = Floor(args.services, args.sotw_eds_full)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                floor.sotw,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                floor.delta,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(args.address)
    await server.start()
    emit("ready", port=port, pid=os.getpid(), kind="floor")
    async for cmd in commands():
        c = cmd.get("cmd")
        if c == "push":
            round_no = int(cmd.get("round", floor.push_no + 1))
            index, _ = mesh.push_target(round_no, floor.services)
            changed = mesh.cla(index, round_no)  # built before t0, as in server_proc.py
            t0 = time.time_ns()
            name = floor.push(round_no, changed)
            emit("pushed", round=round_no, name=name, t0_ns=t0)
        elif c == "gc_freeze":
            # Experiment only (push_bench --gc-freeze): move everything alive now (the synced
            # streams' state) out of the collector's sight, as a server could after start-up.
            gc.collect()
            gc.freeze()
            emit("gc_frozen", frozen=gc.get_freeze_count())
        elif c == "stats":
            emit("stats", streams=len(floor.sotw_streams) + len(floor.delta_streams))
        elif c == "quit":
            break
        else:
            log(f"floor: unknown command {cmd!r}")
    await server.stop(grace=0.5)
    emit("bye")


if __name__ == "__main__":
    asyncio.run(main())
