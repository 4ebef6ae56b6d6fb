"""A load client: many simulated Envoys, each one ADS stream, in one asyncio process.

Every stream behaves like Envoy on ADS:
  SotW:  CDS wildcard request -> on the CDS response, an EDS request naming every cluster it
         learned, then the CDS ACK (same order as Envoy) -> EDS responses, each ACKed. An ACK
         is a DiscoveryRequest with the response's version_info and nonce and the same names.
         An EDS request that changes the subscription after a CDS change carries the version
         and nonce of the latest EDS response (a request with an older nonce is stale and a
         server rightly ignores it: CONFORMANCE rule 9).
  delta: CDS wildcard subscription -> on the CDS response, an EDS subscription to every
         cluster, then the CDS ACK -> EDS responses, each ACKed with its response_nonce.
Streams are spread over `--channels` channels (each its own TCP connection), opened at most
`--open-concurrency` at a time, and reopened after a jittered exponential backoff if the
server drops or refuses them (UNAVAILABLE is how an overloaded server says "later").

Reconnects (`--resume`): a stream keeps what it holds across its connections, as Envoy keeps
its config. A delta stream reopens with `initial_resource_versions` for CDS and EDS, a SotW
stream re-requests CDS and EDS with the last version_info it accepted (no nonce: a new
stream); both send CDS and EDS at once, as Envoy does on a reconnect. Without `--resume` a
reconnect starts from nothing.

A connection is *at full config* once it has a CDS response and holds, for every cluster, an
assignment at least as new as the newest this process had seen when the connection was
opened (the client tells generations apart by `mesh.generation_of`). Time to full config is
measured from the moment the stream wanted to connect (its drop, or its start), across
refusals and backoffs. A connection not at full config `--give-up` s after it opened is
cancelled by the client (counted as cancelled while waiting) and reopened, as a proxy whose
initial fetch timed out would.

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
  {"cmd":"churn","per_second":R,"group":G,"duration":S}
        every G/R seconds the next G streams (round robin) drop their connection and
        reconnect at once; prints {"event":"churned","drops":..} when done.
  {"cmd":"drop","count":N}
        the first N streams drop their connection at once (a reconnect storm); prints
        {"event":"dropped","count":N,"t_ns":T}.
  {"cmd":"report","file":F}
        writes what was measured to F (JSON: connections, per-second samples, the sampled
        streams' receipts of every change; see `Report`), prints {"event":"reported"}.
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
from bench.mesh import CLUSTER_TYPE, ENDPOINT_TYPE, generation_of

SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse
DeltaDiscoveryRequest = discovery_pb2.DeltaDiscoveryRequest
DeltaDiscoveryResponse = discovery_pb2.DeltaDiscoveryResponse

T_CDS, T_EDS, T_OTHER = 0, 1, 2


def _identity(b: bytes) -> bytes:
    return b


class Drop(Exception):
    """The client itself ended this connection (churn, a storm, or it gave up waiting)."""


class StreamState:
    __slots__ = (
        "bytes_conn",
        "bytes_full",
        "call",
        "cds_names",
        "cds_version",
        "conn_no",
        "drop_reason",
        "eds_names",
        "eds_nonce",
        "eds_version",
        "full",
        "got_cds",
        "held_cds",
        "held_eds",
        "mark_id",
        "need",
        "opened",
        "refusals",
        "sample",
        "sid",
        "synced",
        "t_full",
        "t_open",
        "t_want",
    )

    def __init__(self, sid: int, sample: bool) -> None:
        self.sid = sid
        self.sample = sample
        self.synced = False  # ever at full config (the initial sync)
        self.mark_id = -1
        self.opened = 0
        self.conn_no = 0
        self.refusals = 0
        self.call = None
        self.drop_reason = ""
        self.t_want = time.time_ns()
        # What the simulated Envoy holds (kept across connections with --resume):
        # cluster name -> version (delta) / "" (SotW); CLA name -> (version, generation).
        self.held_cds: dict[str, str] = {}
        self.held_eds: dict[str, tuple[str, int]] = {}
        self.cds_version = ""  # SotW: the last accepted version_info per type
        self.eds_version = ""
        self.new_connection(time.time_ns(), {})

    def new_connection(self, t_open: int, need: dict[str, int]) -> None:
        self.cds_names: tuple[str, ...] | None = None
        self.eds_names: tuple[str, ...] | None = None
        self.eds_nonce = ""
        self.got_cds = False
        self.full = False
        self.need = need
        self.t_open = t_open
        self.t_full = 0
        self.bytes_conn = 0
        self.bytes_full = 0

    def forget(self) -> None:
        self.held_cds = {}
        self.held_eds = {}
        self.cds_version = self.eds_version = ""


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
        every = args.sample_every
        self.states = [StreamState(i, every > 0 and i % every == 0) for i in range(self.n)]
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
        self._cla_by_body: dict[bytes, tuple[str, int]] = {}
        self._eds_prefix: dict[tuple[str, ...], bytes] = {}
        self._cds_ack_prefix = DiscoveryRequest(type_url=CLUSTER_TYPE).SerializeToString()
        self._delta_cds_ack_prefix = DeltaDiscoveryRequest(type_url=CLUSTER_TYPE).SerializeToString()
        self._delta_eds_ack_prefix = DeltaDiscoveryRequest(type_url=ENDPOINT_TYPE).SerializeToString()
        # The newest generation of each CLA any stream of this process has seen.
        self.latest_gen: dict[str, int] = {}
        # Measurements (see report()).
        self.connections: list[tuple] = []  # (sid, conn, t_want, t_open, t_full, t_closed, bytes, how)
        self.receipts: list[tuple] = []  # sampled streams: (sid, conn, kind, name, gen/sign, t_ns)
        self.samples: list[tuple] = []  # per second: (t_ns, open, full, failures, refusals, gave_up)
        self.regressions = 0  # a CLA generation older than one the stream already held
        self.refusals = 0  # opens refused with UNAVAILABLE
        self.gave_up = 0  # connections cancelled by the client while waiting for full config
        self.drops = 0  # connections the client dropped (churn, storm)
        self.open_calls = 0
        self.full_calls = 0
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
            if len(self._eds_prefix) > 1000:
                self._eds_prefix.clear()
            self._eds_prefix[names] = prefix
        return prefix

    def _cluster_names(self, resp) -> tuple[str, ...]:
        key = resp.version_info
        names = self._cds_names_by_version.get(key) if key else None
        if names is None:
            names = tuple(sorted(cluster_pb2.Cluster.FromString(a.value).name for a in resp.resources))
            if key:
                if len(self._cds_names_by_version) > 1000:
                    self._cds_names_by_version.clear()
                self._cds_names_by_version[key] = names
        return names

    def _cla(self, body: bytes) -> tuple[str, int]:
        cache = self._cla_by_body
        got = cache.get(body)
        if got is None:
            cla = endpoint_pb2.ClusterLoadAssignment.FromString(body)
            got = (cla.cluster_name, generation_of(cla))
            if len(cache) > 100_000:
                cache.clear()
            cache[body] = got
            if got[1] > self.latest_gen.get(got[0], -1):
                self.latest_gen[got[0]] = got[1]
        return got

    # Streams -------------------------------------------------------------------------------

    async def run_stream(self, st: StreamState) -> None:
        backoff = self.args.backoff
        while not self.closing:
            call = None
            refused = False
            await self.open_sem.acquire()
            if not self.args.resume:
                st.forget()
            st.conn_no += 1
            st.new_connection(time.time_ns(), dict(self.latest_gen))
            how = "closed"
            try:
                call = st.call = self.callables[st.sid % len(self.callables)](wait_for_ready=True)
                st.opened += 1
                self.open_calls += 1
                give_up = asyncio.get_running_loop().call_later(
                    self.args.give_up, self._give_up, st, st.conn_no) if self.args.give_up > 0 else None
                try:
                    if self.delta:
                        await self._run_delta(st, call)
                    else:
                        await self._run_sotw(st, call)
                finally:
                    if give_up is not None:
                        give_up.cancel()
                if not self.closing:
                    log(f"stream {st.sid}: server closed the stream")
            except Drop:
                how = st.drop_reason
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if st.drop_reason and task is not None and not task.cancelling():
                    how = st.drop_reason  # our own call.cancel(): a drop, not the end
                else:
                    if call is not None:
                        call.cancel()
                    raise
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as e:
                if self.closing:
                    return
                code = e.code() if hasattr(e, "code") else None
                if st.drop_reason:
                    how = st.drop_reason  # our cancel surfaced in a write (or as CANCELLED)
                elif code == grpc.StatusCode.UNAVAILABLE and st.bytes_conn == 0:
                    refused = True  # an overloaded server's "later"
                    st.refusals += 1
                    self.refusals += 1
                    how = "refused"
                else:
                    self.failures += 1
                    how = "failed"
                    if self.failures <= 5:
                        details = e.details() if hasattr(e, "details") else ""
                        log(f"stream {st.sid}: {code or e} {details}")
            except Exception as e:  # a bug or a malformed response: say so, then reconnect
                if self.closing:
                    return
                self.failures += 1
                how = "failed"
                log(f"stream {st.sid}: {type(e).__name__}: {e}")
            finally:
                st.call = None
                if st.full:
                    self.full_calls -= 1
                if call is not None:
                    self.open_calls -= 1
            self.connections.append(self._conn_record(st, how, time.time_ns()))
            if self.closing:
                return
            if how in ("churn", "storm"):
                st.drop_reason = ""
                st.t_want = time.time_ns()
                backoff = self.args.backoff
                continue  # reconnect at once, as a proxy whose connection broke
            st.drop_reason = ""
            if how not in ("refused", "gave_up"):
                st.t_want = time.time_ns()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, self.args.max_backoff) if refused or how == "failed" else self.args.backoff

    @staticmethod
    def _conn_record(st: StreamState, how: str, t_closed: int) -> tuple:
        """(sid, connection, wanted, opened, full, closed, bytes to full config, how it ended)."""
        return (st.sid, st.conn_no, st.t_want, st.t_open, st.t_full, t_closed, st.bytes_full, how)

    def drop(self, st: StreamState, reason: str) -> bool:
        call = st.call
        if call is None or st.drop_reason:
            return False
        st.drop_reason = reason
        call.cancel()
        return True

    def _give_up(self, st: StreamState, conn_no: int) -> None:
        if st.conn_no == conn_no and not st.full and self.drop(st, "gave_up"):
            self.gave_up += 1

    def _release_open(self, st: StreamState, released: list[bool]) -> None:
        if not released[0]:
            released[0] = True
            self.open_sem.release()

    def _check_full(self, st: StreamState, t: int) -> None:
        if st.full or not st.got_cds:
            return
        held, need = st.held_eds, st.need
        for name in st.held_cds:
            got = held.get(name)
            if got is None or got[1] < need.get(name, 0):
                return
        st.full = True
        st.t_full = t
        st.bytes_full = st.bytes_conn
        self.full_calls += 1
        if not st.synced:
            st.synced = True
            self.synced += 1
            if self.synced == self.n:
                self.synced_event.set()

    def _on_eds(self, st: StreamState, entries: list[tuple[str, str, int]], t_recv: int,
                t_ack: int, nbytes: int) -> None:
        held = st.held_eds
        sample = st.sample
        names = []
        for name, version, gen in entries:
            old = held.get(name)
            if old is not None and gen < old[1]:
                self.regressions += 1
            held[name] = (version, gen)
            names.append(name)
            if sample:
                self.receipts.append((st.sid, st.conn_no, "e", name, gen, t_recv))
        if not st.full:
            self._check_full(st, t_recv)
        if self.mark_done is not None and st.mark_id != self.mark_id and self.mark_name in names:
            st.mark_id = self.mark_id
            self.mark_recv.append(t_recv)
            self.mark_ack.append(t_ack)
            self.mark_bytes += nbytes
            self.mark_resources += len(names)
            if len(self.mark_ack) == self.n:
                self.mark_done.set()

    def _on_cds(self, st: StreamState, added: list[str], removed: list[str], t_recv: int) -> None:
        """Clusters a CDS response added and removed (after this connection's first one, the
        sampled streams note each as a receipt)."""
        if st.sample and st.got_cds:
            for name in added:
                self.receipts.append((st.sid, st.conn_no, "c", name, 1, t_recv))
            for name in removed:
                self.receipts.append((st.sid, st.conn_no, "c", name, -1, t_recv))
        for name in removed:
            st.held_eds.pop(name, None)

    async def _run_sotw(self, st: StreamState, call) -> None:
        released = [False]
        try:
            first = DiscoveryRequest(node=self._node(st.sid), type_url=CLUSTER_TYPE,
                                     version_info=st.cds_version)
            await call.write(first.SerializeToString())
            if st.held_cds:
                # A resumed stream asks for everything it had at once (Envoy does), with the
                # version it last accepted; no nonce on a new stream. It holds its clusters:
                # a server may leave an unchanged complete set unsent.
                st.got_cds = bool(st.cds_version)
                st.eds_names = tuple(sorted(st.held_cds))
                await call.write(self._eds_prefix_for(st.eds_names)
                                 + DiscoveryRequest(version_info=st.eds_version).SerializeToString())
            records = self.records
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                t_recv = time.time_ns()
                self._release_open(st, released)
                st.bytes_conn += len(raw)
                resp = DiscoveryResponse.FromString(raw)
                tu = resp.type_url
                tail = DiscoveryRequest(version_info=resp.version_info, response_nonce=resp.nonce).SerializeToString()
                if tu == ENDPOINT_TYPE:
                    entries = [(n, "", g) for n, g in map(self._cla, (a.value for a in resp.resources))]
                    st.eds_nonce = resp.nonce
                    st.eds_version = resp.version_info
                    await call.write(self._eds_prefix_for(st.eds_names or ()) + tail)
                    t_ack = time.time_ns()
                    self._on_eds(st, entries, t_recv, t_ack, len(raw))
                    kind = T_EDS
                elif tu == CLUSTER_TYPE:
                    names = self._cluster_names(resp)
                    old = st.held_cds
                    new = dict.fromkeys(names, "")
                    self._on_cds(st, [n for n in names if n not in old],
                                 [n for n in old if n not in new], t_recv)
                    st.held_cds = new
                    if names != st.eds_names:
                        # Subscribe EDS to the clusters learned (Envoy: EDS request first, then
                        # the CDS ACK), carrying the latest EDS version and nonce: a request
                        # with an older nonce would be stale (rule 9) and ignored.
                        st.eds_names = names
                        await call.write(
                            self._eds_prefix_for(names)
                            + DiscoveryRequest(version_info=st.eds_version,
                                               response_nonce=st.eds_nonce).SerializeToString())
                    await call.write(self._cds_ack_prefix + tail)
                    st.cds_version = resp.version_info
                    st.got_cds = True
                    t_ack = time.time_ns()
                    self._check_full(st, t_recv)
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
            first = DeltaDiscoveryRequest(node=self._node(st.sid), type_url=CLUSTER_TYPE,
                                          initial_resource_versions=st.held_cds)
            await call.write(first.SerializeToString())
            if st.held_cds:
                # Resume: everything the stream had, with the versions it holds (rule 14).
                st.eds_names = tuple(sorted(st.held_cds))
                await call.write(DeltaDiscoveryRequest(
                    type_url=ENDPOINT_TYPE, resource_names_subscribe=st.eds_names,
                    initial_resource_versions={n: v for n, (v, _) in st.held_eds.items()},
                ).SerializeToString())
            records = self.records
            while True:
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    return
                t_recv = time.time_ns()
                self._release_open(st, released)
                st.bytes_conn += len(raw)
                resp = DeltaDiscoveryResponse.FromString(raw)
                tu = resp.type_url
                tail = DeltaDiscoveryRequest(response_nonce=resp.nonce).SerializeToString()
                if tu == ENDPOINT_TYPE:
                    entries = [(r.name, r.version, self._cla(r.resource.value)[1]) for r in resp.resources]
                    for name in resp.removed_resources:
                        st.held_eds.pop(name, None)
                    await call.write(self._delta_eds_ack_prefix + tail)
                    t_ack = time.time_ns()
                    self._on_eds(st, entries, t_recv, t_ack, len(raw))
                    kind = T_EDS
                elif tu == CLUSTER_TYPE:
                    held = st.held_cds
                    added = [r.name for r in resp.resources if r.name not in held]
                    removed = [n for n in resp.removed_resources if n in held]
                    self._on_cds(st, added, removed, t_recv)
                    for r in resp.resources:
                        held[r.name] = r.version
                    for name in removed:
                        del held[name]
                    names = tuple(sorted(held))
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
                    st.got_cds = True
                    t_ack = time.time_ns()
                    self._check_full(st, t_recv)
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
            refusals=self.refusals,
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

    async def churn(self, per_second: float, group: int, duration: float) -> None:
        """Every group/per_second seconds the next `group` streams drop and reconnect."""
        interval = group / per_second
        loop = asyncio.get_running_loop()
        end = loop.time() + duration
        at = loop.time()
        cursor = drops = 0
        while loop.time() < end and not self.closing:
            dropped = 0
            for _ in range(group):
                st = self.states[cursor % self.n]
                cursor += 1
                dropped += self.drop(st, "churn")
            drops += dropped
            self.drops += dropped
            at += interval
            await asyncio.sleep(max(0.0, at - loop.time()))
        emit("churned", drops=drops)

    def storm(self, count: int) -> None:
        t = time.time_ns()
        dropped = sum(self.drop(st, "storm") for st in self.states[:count])
        self.drops += dropped
        emit("dropped", count=dropped, t_ns=t)

    async def sample(self) -> None:
        """Once a second: connections open, at full config, and the counters so far."""
        while True:
            self.samples.append((time.time_ns(), self.open_calls, self.full_calls, self.failures,
                                 self.refusals, self.gave_up))
            await asyncio.sleep(1.0)

    def report(self, path: str) -> None:
        now = time.time_ns()
        connections = list(self.connections)
        connections += [self._conn_record(st, "open", 0) for st in self.states if st.call is not None]
        data = {
            "streams": self.n,
            "mode": self.args.mode,
            "resume": self.args.resume,
            "sampled": [st.sid for st in self.states if st.sample],
            "t_ns": now,
            "connections": connections,
            "samples": self.samples,
            "receipts": self.receipts,
            "regressions": self.regressions,
            "refusals": self.refusals,
            "gave_up": self.gave_up,
            "failures": self.failures,
            "drops": self.drops,
        }
        with open(path, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        emit("reported", file=path, connections=len(connections), receipts=len(self.receipts))

    def stats(self) -> None:
        emit(
            "stats",
            streams=self.n,
            synced=self.synced,
            failures=self.failures,
            refusals=self.refusals,
            gave_up=self.gave_up,
            open=self.open_calls,
            full=self.full_calls,
            regressions=self.regressions,
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
    ap.add_argument("--resume", action="store_true",
                    help="reconnect with what the stream holds (delta initial_resource_versions, "
                         "SotW last version_info)")
    ap.add_argument("--give-up", type=float, default=0.0,
                    help="cancel a connection not at full config after this many s (0: never)")
    ap.add_argument("--backoff", type=float, default=0.25, help="first reconnect backoff, s (jittered)")
    ap.add_argument("--max-backoff", type=float, default=5.0)
    ap.add_argument("--sample-every", type=int, default=0,
                    help="every Nth stream records its receipt of every change (0: none)")
    args = ap.parse_args()
    if args.channels <= 0:
        args.channels = max(1, min(32, (args.streams + 249) // 250))

    client = LoadClient(args)
    client.tasks = [asyncio.create_task(client.run_stream(st)) for st in client.states]
    client.tasks.append(asyncio.create_task(client.sample()))
    sync_task = asyncio.create_task(client.wait_synced(args.sync_timeout))
    side: set[asyncio.Task] = set()
    mark_task: asyncio.Task | None = None
    async for cmd in commands():
        c = cmd.get("cmd")
        if c == "mark":
            if mark_task is not None and not mark_task.done():
                mark_task.cancel()
            mark_task = asyncio.create_task(client.mark(cmd))
        elif c == "churn":
            task = asyncio.create_task(client.churn(float(cmd.get("per_second", 20)),
                                                    int(cmd.get("group", 20)),
                                                    float(cmd.get("duration", 60))))
            side.add(task)
            task.add_done_callback(side.discard)
        elif c == "drop":
            client.storm(int(cmd.get("count", client.n)))
        elif c == "report":
            client.report(str(cmd["file"]))
        elif c == "stats":
            client.stats()
        elif c == "quit":
            break
        else:
            log(f"loadclient: unknown command {cmd!r}")
    sync_task.cancel()
    if mark_task is not None:
        mark_task.cancel()
    for task in side:
        task.cancel()
    await client.close()
    emit("bye")


if __name__ == "__main__":
    asyncio.run(main())
