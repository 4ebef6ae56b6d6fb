"""A load client: many simulated Envoys, each one ADS stream, in one asyncio process.

Every stream behaves like Envoy on ADS:
  SotW:  CDS wildcard request -> on the CDS response, an EDS request naming every cluster it
         learned, then the CDS ACK (same order as Envoy) -> EDS responses, each ACKed. An ACK
         is a DiscoveryRequest with the response's version_info and nonce and the same names.
  delta: CDS wildcard subscription -> on the CDS response, an EDS subscription to every
         cluster, then the CDS ACK -> EDS responses, each ACKed with its response_nonce.
Streams are spread over `--channels` channels (each its own TCP connection), opened at most
`--open-concurrency` at a time, and reopened after a backoff if the server drops them.

Per response the client records the receive time and the ACK send time (time.time_ns(), so
they compare with the server's change timestamp in another process), the type, the version,
the resource count and the size. Records go to `--record FILE` (JSON lines) on quit.

Control (JSON lines on stdin/stdout):
  prints {"event":"synced",...} once every stream has ACKed its complete initial CDS and EDS.
  {"cmd":"mark","name":N,"id":K,"timeout":S}
        arms: prints {"event":"armed","id":K} at once; then, when every stream has received
        and ACKed an EDS response carrying resource N, prints {"event":"marked","id":K,
        "streams":..,"missing":..,"base_ns":B,"recv_us":[..],"ack_us":[..],..} where the
        lists hold each stream's receive / ACK-sent time in µs after base_ns.
  {"cmd":"stats"} -> {"event":"stats",...}
  {"cmd":"quit"}  -> closes every stream, writes the record file, prints {"event":"bye"}.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from bench.control import commands, emit, log
from bench.mesh import CLUSTER_TYPE, ENDPOINT_TYPE

SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse
DeltaDiscoveryRequest = discovery_pb2.DeltaDiscoveryRequest
DeltaDiscoveryResponse = discovery_pb2.DeltaDiscoveryResponse

T_CDS, T_EDS, T_OTHER = 0, 1, 2


def _identity(b: bytes) -> bytes:
    return b


class StreamState:
    __slots__ = (
        "cds_names",
        "eds_got",
        "eds_names",
        "mark_id",
        "opened",
        "sid",
        "synced",
    )

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.reset()
        self.synced = False
        self.mark_id = -1
        self.opened = 0

    def reset(self) -> None:
        self.cds_names: tuple[str, ...] | None = None
        self.eds_names: tuple[str, ...] | None = None
        self.eds_got: set[str] = set()


class LoadClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.delta = args.mode == "delta"
        self.n = args.streams
        self.node_prefix = f"{args.node_prefix}-{os.getpid()}"
        opts = [
            ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.enable_retries", 0),
        ]
        self.channels = [grpc.aio.insecure_channel(args.target, options=opts) for _ in range(args.channels)]
        method = DELTA_METHOD if self.delta else SOTW_METHOD
        self.callables = [
            ch.stream_stream(method, request_serializer=_identity, response_deserializer=_identity)
            for ch in self.channels
        ]
        self.states = [StreamState(i) for i in range(self.n)]
        self.open_sem = asyncio.Semaphore(args.open_concurrency)
        self.closing = False
        self.tasks: list[asyncio.Task] = []
        self.synced = 0
        self.synced_event = asyncio.Event()
        self.failures = 0
        self.started_ns = time.time_ns()
        self.records: list[tuple] = [] if args.record else None  # type: ignore[assignment]
        # Caches shared by every stream (all streams see the same resources).
        self._cds_names_by_version: dict[str, tuple[str, ...]] = {}
        self._cla_name_by_body: dict[bytes, str] = {}
        self._eds_prefix: dict[tuple[str, ...], bytes] = {}
        self._cds_ack_prefix = DiscoveryRequest(type_url=CLUSTER_TYPE).SerializeToString()
        self._delta_cds_ack_prefix = DeltaDiscoveryRequest(type_url=CLUSTER_TYPE).SerializeToString()
        self._delta_eds_ack_prefix = DeltaDiscoveryRequest(type_url=ENDPOINT_TYPE).SerializeToString()
        # The current mark.
        self.mark_id = -1
        self.mark_name = ""
        self.mark_recv: list[int] = []
        self.mark_ack: list[int] = []
        self.mark_bytes = 0
        self.mark_resources = 0
        self.mark_done: asyncio.Event | None = None

    # Requests ------------------------------------------------------------------------------

    def _node(self, sid: int) -> base_pb2.Node:
        node = base_pb2.Node(id=f"{self.node_prefix}-{sid}", cluster="bench", user_agent_name="envoy")
        node.user_agent_build_version.version.major_number = 1
        node.user_agent_build_version.version.minor_number = 40
        # Explicit-mode sidecars: it subscribes EDS to every cluster it learns, and capture
        # mode's static (non-EDS) clusters would never get an assignment.
        node.metadata.update({"interception": "explicit"})
        return node

    def _eds_prefix_for(self, names: tuple[str, ...]) -> bytes:
        prefix = self._eds_prefix.get(names)
        if prefix is None:
            prefix = DiscoveryRequest(resource_names=names, type_url=ENDPOINT_TYPE).SerializeToString()
            self._eds_prefix[names] = prefix
        return prefix

    def _cluster_names(self, resp) -> tuple[str, ...]:
        key = resp.version_info
        names = self._cds_names_by_version.get(key) if key else None
        if names is None:
            names = tuple(sorted(cluster_pb2.Cluster.FromString(a.value).name for a in resp.resources))
            if key:
                self._cds_names_by_version[key] = names
        return names

    def _cla_names(self, resp) -> list[str]:
        cache = self._cla_name_by_body
        out = []
        for a in resp.resources:
            body = a.value
            name = cache.get(body)
            if name is None:
                name = endpoint_pb2.ClusterLoadAssignment.FromString(body).cluster_name
                if len(cache) > 100_000:
                    cache.clear()
                cache[body] = name
            out.append(name)
        return out

    # Streams -------------------------------------------------------------------------------

    async def run_stream(self, st: StreamState) -> None:
        backoff = 0.05
        while not self.closing:
            st.reset()
            call = None
            await self.open_sem.acquire()
            try:
                call = self.callables[st.sid % len(self.callables)](wait_for_ready=True)
                st.opened += 1
                if self.delta:
                    await self._run_delta(st, call)
                else:
                    await self._run_sotw(st, call)
                if not self.closing:
                    log(f"stream {st.sid}: server closed the stream")
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
                if self.closing:
                    return
                self.failures += 1
                if self.failures <= 5:
                    code = e.code() if hasattr(e, "code") else e
                    details = e.details() if hasattr(e, "details") else ""
                    log(f"stream {st.sid}: {code} {details}")
            except asyncio.CancelledError:
                if call is not None:
                    call.cancel()
                raise
            except Exception as e:  # a bug or a malformed response: say so, then reconnect
                if self.closing:
                    return
                self.failures += 1
                log(f"stream {st.sid}: {type(e).__name__}: {e}")
            if self.closing:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 2.0)

    def _release_open(self, st: StreamState, released: list[bool]) -> None:
        if not released[0]:
            released[0] = True
            self.open_sem.release()

    def _stream_synced(self, st: StreamState) -> None:
        if not st.synced:
            st.synced = True
            self.synced += 1
            if self.synced == self.n:
                self.synced_event.set()

    def _on_eds(self, st: StreamState, names: list[str], t_recv: int, t_ack: int, nbytes: int) -> None:
        if not st.synced:
            st.eds_got.update(names)
            if st.eds_names is not None and st.eds_got.issuperset(st.eds_names):
                self._stream_synced(st)
        if self.mark_done is not None and st.mark_id != self.mark_id and self.mark_name in names:
            st.mark_id = self.mark_id
            self.mark_recv.append(t_recv)
            self.mark_ack.append(t_ack)
            self.mark_bytes += nbytes
            self.mark_resources += len(names)
            if len(self.mark_ack) == self.n:
                self.mark_done.set()

    async def _run_sotw(self, st: StreamState, call) -> None:
        released = [False]
        try:
            first = DiscoveryRequest(node=self._node(st.sid), type_url=CLUSTER_TYPE)
            await call.write(first.SerializeToString())
            records = self.records
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                t_recv = time.time_ns()
                self._release_open(st, released)
                resp = DiscoveryResponse.FromString(raw)
                tu = resp.type_url
                tail = DiscoveryRequest(version_info=resp.version_info, response_nonce=resp.nonce).SerializeToString()
                if tu == ENDPOINT_TYPE:
                    names = self._cla_names(resp)
                    await call.write(self._eds_prefix_for(st.eds_names or ()) + tail)
                    t_ack = time.time_ns()
                    self._on_eds(st, names, t_recv, t_ack, len(raw))
                    kind = T_EDS
                elif tu == CLUSTER_TYPE:
                    names = self._cluster_names(resp)
                    if names != st.cds_names:
                        st.cds_names = names
                        # Subscribe EDS to the clusters learned (Envoy: EDS request first, then
                        # the CDS ACK). Later changes keep the EDS version and nonce we hold.
                        st.eds_names = names
                        await call.write(self._eds_prefix_for(names))
                    await call.write(self._cds_ack_prefix + tail)
                    t_ack = time.time_ns()
                    kind = T_CDS
                else:
                    await call.write(DiscoveryRequest(type_url=tu).SerializeToString() + tail)
                    t_ack = time.time_ns()
                    kind = T_OTHER
                if records is not None:
                    records.append((st.sid, kind, t_recv, t_ack, resp.version_info, len(resp.resources), len(raw)))
        finally:
            self._release_open(st, released)
            call.cancel()

    async def _run_delta(self, st: StreamState, call) -> None:
        released = [False]
        try:
            first = DeltaDiscoveryRequest(node=self._node(st.sid), type_url=CLUSTER_TYPE)
            await call.write(first.SerializeToString())
            records = self.records
            cds: set[str] = set()
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                t_recv = time.time_ns()
                self._release_open(st, released)
                resp = DeltaDiscoveryResponse.FromString(raw)
                tu = resp.type_url
                tail = DeltaDiscoveryRequest(response_nonce=resp.nonce).SerializeToString()
                if tu == ENDPOINT_TYPE:
                    names = [r.name for r in resp.resources]
                    await call.write(self._delta_eds_ack_prefix + tail)
                    t_ack = time.time_ns()
                    self._on_eds(st, names, t_recv, t_ack, len(raw))
                    kind = T_EDS
                elif tu == CLUSTER_TYPE:
                    for r in resp.resources:
                        cds.add(r.name)
                    for name in resp.removed_resources:
                        cds.discard(name)
                    names = tuple(sorted(cds))
                    old = set(st.eds_names or ())
                    new = set(names)
                    if new != old:
                        st.eds_names = names
                        await call.write(
                            DeltaDiscoveryRequest(
                                type_url=ENDPOINT_TYPE,
                                resource_names_subscribe=sorted(new - old),
                                resource_names_unsubscribe=sorted(old - new),
                            ).SerializeToString()
                        )
                    await call.write(self._delta_cds_ack_prefix + tail)
                    t_ack = time.time_ns()
                    kind = T_CDS
                else:
                    await call.write(DeltaDiscoveryRequest(type_url=tu).SerializeToString() + tail)
                    t_ack = time.time_ns()
                    kind = T_OTHER
                if records is not None:
                    records.append(
                        (st.sid, kind, t_recv, t_ack, resp.system_version_info, len(resp.resources), len(raw))
                    )
        finally:
            self._release_open(st, released)
            call.cancel()

    # Control -------------------------------------------------------------------------------

    async def wait_synced(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.synced_event.wait(), timeout)
        except TimeoutError:
            pass
        # Frugality: the client's own garbage collector must not stall the measured rounds.
        gc.collect()
        gc.freeze()
        emit(
            "synced",
            streams=self.n,
            synced=self.synced,
            complete=self.synced == self.n,
            failures=self.failures,
            opens=sum(s.opened for s in self.states),
            seconds=round((time.time_ns() - self.started_ns) / 1e9, 3),
        )

    async def mark(self, cmd: dict) -> None:
        self.mark_id = int(cmd.get("id", self.mark_id + 1))
        self.mark_name = cmd["name"]
        self.mark_recv = []
        self.mark_ack = []
        self.mark_bytes = 0
        self.mark_resources = 0
        done = self.mark_done = asyncio.Event()
        mark_id = self.mark_id
        emit("armed", id=mark_id)
        try:
            await asyncio.wait_for(done.wait(), float(cmd.get("timeout", 60)))
        except TimeoutError:
            pass
        if self.mark_id != mark_id:
            return
        self.mark_done = None
        recv, ack = self.mark_recv, self.mark_ack
        got = len(ack)
        base = min(recv) if recv else 0
        emit(
            "marked",
            id=mark_id,
            name=self.mark_name,
            streams=self.n,
            got=got,
            missing=self.n - got,
            base_ns=base,
            recv_us=[(t - base) // 1000 for t in recv],
            ack_us=[(t - base) // 1000 for t in ack],
            mean_bytes=(self.mark_bytes / got) if got else 0,
            mean_resources=(self.mark_resources / got) if got else 0,
        )

    def stats(self) -> None:
        emit(
            "stats",
            streams=self.n,
            synced=self.synced,
            failures=self.failures,
            opens=sum(s.opened for s in self.states),
        )

    async def close(self) -> None:
        self.closing = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for ch in self.channels:
            await ch.close()
        if self.records is not None:
            with open(self.args.record, "w") as f:
                for r in self.records:
                    f.write(json.dumps(r) + "\n")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="host:port of the ADS server")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--mode", choices=("sotw", "delta"), default="sotw")
    ap.add_argument("--channels", type=int, default=0, help="default: one per 250 streams")
    ap.add_argument("--open-concurrency", type=int, default=200, help="streams opening at once")
    ap.add_argument("--sync-timeout", type=float, default=120.0)
    ap.add_argument("--node-prefix", default="bench")
    ap.add_argument("--record", default="", help="write every response's record here on quit")
    args = ap.parse_args()
    if args.channels <= 0:
        args.channels = max(1, min(32, (args.streams + 249) // 250))

    client = LoadClient(args)
    client.tasks = [asyncio.create_task(client.run_stream(st)) for st in client.states]
    sync_task = asyncio.create_task(client.wait_synced(args.sync_timeout))
    mark_task: asyncio.Task | None = None
    async for cmd in commands():
        c = cmd.get("cmd")
        if c == "mark":
            if mark_task is not None and not mark_task.done():
                mark_task.cancel()
            mark_task = asyncio.create_task(client.mark(cmd))
        elif c == "stats":
            client.stats()
        elif c == "quit":
            break
        else:
            log(f"loadclient: unknown command {cmd!r}")
    sync_task.cancel()
    if mark_task is not None:
        mark_task.cancel()
    await client.close()
    emit("bye")


if __name__ == "__main__":
    asyncio.run(main())
