"""Simulated Envoys that hold workload certificates: many SotW ADS streams in one asyncio
process, each subscribed to a few EDS names and to the SDS secrets `default` + `ROOTCA`,
ACKing every response like Envoy (same names, the response's version and nonce).

Each stream claims its own identity in its node metadata (`namespace: bench`,
`service_account: sa-<prefix>-<i>`), so with `--auth insecure-node-metadata` over loopback
every stream is one identity with one certificate of its own. Its EDS names: `svc-00000`
(the one every push changes) and two more picked by its index.

Control (JSON lines on stdin/stdout, bench/control.py):
  prints {"event":"synced",...} once every stream has its `default`, `ROOTCA` and its EDS names.
  {"cmd":"mark","kind":"eds","name":N,"id":K,"timeout":S}
  {"cmd":"mark","kind":"sds","id":K,"timeout":S}
        arm: prints {"event":"<kind>_armed","id":K}; then, once every stream has received
        (and ACKed) an EDS response carrying N (kind eds) or a new `default` secret (kind sds),
        or at the timeout, prints {"event":"<kind>_marked","id":K,"got":..,"missing":..,
        "base_ns":B,"recv_us":[..]} (receive times in µs after base_ns). An eds and an sds mark
        can be armed at once.
  {"cmd":"quit"}
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2

from bench import mesh
from bench.control import commands, emit, log

SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
ENDPOINT_TYPE = mesh.ENDPOINT_TYPE
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SECRET_NAMES = ("default", "ROOTCA")
DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse


def _identity(b: bytes) -> bytes:
    return b


class Mark:
    def __init__(self, kind: str, mark_id: int, name: str, n: int) -> None:
        self.kind, self.id, self.name, self.n = kind, mark_id, name, n
        self.seen: set[int] = set()
        self.recv: list[int] = []
        self.done = asyncio.Event()

    def hit(self, sid: int, t_recv: int) -> None:
        if sid not in self.seen:
            self.seen.add(sid)
            self.recv.append(t_recv)
            if len(self.seen) == self.n:
                self.done.set()


class Stream:
    __slots__ = ("default_count", "eds_got", "eds_names", "opened", "secrets_got", "sid", "synced")

    def __init__(self, sid: int, eds_names: tuple[str, ...]) -> None:
        self.sid = sid
        self.eds_names = eds_names
        self.eds_got: set[str] = set()
        self.secrets_got: set[str] = set()
        self.synced = False
        self.default_count = 0
        self.opened = 0


class SdsLoadClient:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.n = args.streams
        self.prefix = f"{args.node_prefix}-{os.getpid()}"
        opts = [
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.enable_retries", 0),
        ]
        self.channels = [grpc.aio.insecure_channel(args.target, options=opts) for _ in range(args.channels)]
        self.callables = [
            ch.stream_stream(SOTW_METHOD, request_serializer=_identity, response_deserializer=_identity)
            for ch in self.channels
        ]
        services = args.services
        self.streams = []
        for i in range(self.n):
            others = sorted({1 + (i % (services - 1)), 1 + ((i + 37) % (services - 1))})
            names = tuple([mesh.service_name(0)] + [mesh.service_name(k) for k in others])
            self.streams.append(Stream(i, names))
        self.open_sem = asyncio.Semaphore(args.open_concurrency)
        self.closing = False
        self.tasks: list[asyncio.Task] = []
        self.synced = 0
        self.synced_event = asyncio.Event()
        self.failures = 0
        self.started_ns = time.time_ns()
        self.marks: dict[str, Mark] = {}
        self._cla_name_by_body: dict[bytes, str] = {}
        self._sds_prefix = DiscoveryRequest(resource_names=SECRET_NAMES, type_url=SECRET_TYPE).SerializeToString()

    def _node(self, sid: int) -> base_pb2.Node:
        node = base_pb2.Node(id=f"{self.prefix}-{sid}.bench", cluster="bench", user_agent_name="envoy")
        node.metadata.update({"namespace": "bench", "service_account": f"sa-{self.prefix}-{sid}",
                              "pod": f"{self.prefix}-{sid}"})
        return node

    def _cla_names(self, resp) -> list[str]:
        cache = self._cla_name_by_body
        out = []
        for a in resp.resources:
            name = cache.get(a.value)
            if name is None:
                name = endpoint_pb2.ClusterLoadAssignment.FromString(a.value).cluster_name
                if len(cache) > 100_000:
                    cache.clear()
                cache[a.value] = name
            out.append(name)
        return out

    def _check_synced(self, st: Stream) -> None:
        if not st.synced and len(st.secrets_got) == 2 and st.eds_got.issuperset(st.eds_names):
            st.synced = True
            self.synced += 1
            if self.synced == self.n:
                self.synced_event.set()

    async def run_stream(self, st: Stream) -> None:
        backoff = 0.05
        while not self.closing:
            st.eds_got.clear()
            st.secrets_got.clear()
            call = None
            await self.open_sem.acquire()
            released = False
            try:
                call = self.callables[st.sid % len(self.callables)](wait_for_ready=True)
                st.opened += 1
                eds_req = DiscoveryRequest(resource_names=st.eds_names, type_url=ENDPOINT_TYPE)
                first = DiscoveryRequest(node=self._node(st.sid), type_url=ENDPOINT_TYPE,
                                         resource_names=st.eds_names)
                await call.write(first.SerializeToString())
                await call.write(self._sds_prefix)
                eds_prefix = eds_req.SerializeToString()
                while True:
                    raw = await call.read()
                    if raw is grpc.aio.EOF:
                        break
                    t_recv = time.time_ns()
                    if not released:
                        released = True
                        self.open_sem.release()
                    resp = DiscoveryResponse.FromString(raw)
                    tail = DiscoveryRequest(version_info=resp.version_info,
                                            response_nonce=resp.nonce).SerializeToString()
                    if resp.type_url == ENDPOINT_TYPE:
                        names = self._cla_names(resp)
                        await call.write(eds_prefix + tail)
                        st.eds_got.update(names)
                        m = self.marks.get("eds")
                        if m is not None and m.name in names:
                            m.hit(st.sid, t_recv)
                    elif resp.type_url == SECRET_TYPE:
                        names = [secret_pb2.Secret.FromString(a.value).name for a in resp.resources]
                        await call.write(self._sds_prefix + tail)
                        st.secrets_got.update(names)
                        if "default" in names:
                            st.default_count += 1
                            m = self.marks.get("sds")
                            if m is not None:
                                m.hit(st.sid, t_recv)
                    else:
                        await call.write(DiscoveryRequest(type_url=resp.type_url).SerializeToString() + tail)
                    self._check_synced(st)
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
            finally:
                if not released:
                    self.open_sem.release()
                if call is not None:
                    call.cancel()
            if self.closing:
                return
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 2.0)

    async def wait_synced(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.synced_event.wait(), timeout)
        except TimeoutError:
            pass
        gc.collect()
        gc.freeze()
        emit("synced", streams=self.n, synced=self.synced, complete=self.synced == self.n,
             failures=self.failures, opens=sum(s.opened for s in self.streams),
             seconds=round((time.time_ns() - self.started_ns) / 1e9, 3))

    async def mark(self, cmd: dict) -> None:
        kind = cmd.get("kind", "eds")
        m = Mark(kind, int(cmd.get("id", 0)), cmd.get("name", ""), self.n)
        self.marks[kind] = m
        emit(f"{kind}_armed", kind=kind, id=m.id)
        try:
            await asyncio.wait_for(m.done.wait(), float(cmd.get("timeout", 60)))
        except TimeoutError:
            pass
        if self.marks.get(kind) is m:
            del self.marks[kind]
        base = min(m.recv) if m.recv else 0
        emit(f"{kind}_marked", kind=kind, id=m.id, streams=self.n, got=len(m.seen), missing=self.n - len(m.seen),
             base_ns=base, recv_us=[(t - base) // 1000 for t in m.recv])

    async def close(self) -> None:
        self.closing = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for ch in self.channels:
            await ch.close()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--services", type=int, default=mesh.DEFAULT_SERVICES)
    ap.add_argument("--channels", type=int, default=0, help="default: one per 250 streams")
    ap.add_argument("--open-concurrency", type=int, default=200)
    ap.add_argument("--sync-timeout", type=float, default=180.0)
    ap.add_argument("--node-prefix", default="sds")
    args = ap.parse_args()
    if args.channels <= 0:
        args.channels = max(1, min(32, (args.streams + 249) // 250))
    client = SdsLoadClient(args)
    client.tasks = [asyncio.create_task(client.run_stream(st)) for st in client.streams]
    sync_task = asyncio.create_task(client.wait_synced(args.sync_timeout))
    mark_tasks: list[asyncio.Task] = []
    async for cmd in commands():
        c = cmd.get("cmd")
        if c == "mark":
            mark_tasks.append(asyncio.create_task(client.mark(cmd)))
        elif c == "quit":
            break
        else:
            log(f"sds_loadclient: unknown command {cmd!r}")
    sync_task.cancel()
    for t in mark_tasks:
        t.cancel()
    await client.close()
    emit("bye")


if __name__ == "__main__":
    asyncio.run(main())
