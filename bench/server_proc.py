"""The server under test: the real `XdsServer`, serving the benchmark mesh, driven like the floor.

Builds the mesh of `mesh.py` (N clusters + N ClusterLoadAssignments) into a `ResourceCache`,
starts `XdsServer` with debounce off, and speaks the same control protocol as
`floor_server.py`, so the same load client and the same harness measure both:
  prints {"event":"ready","port":P,"pid":PID}
  {"cmd":"push","round":R} -> cache.update(ENDPOINT, upsert=[the changed CLA]);
                              prints {"event":"pushed","round":R,"name":..,"t0_ns":..}
  {"cmd":"stats"}          -> {"event":"stats"}
  {"cmd":"quit"}           -> server.stop(grace=1.0), prints {"event":"bye"}

`--workers N` (N > 1) measures what `serve --workers N` gives: N of these processes, each with
the whole mesh, bound to one port with SO_REUSEPORT (the kernel spreads the streams); this
process only relays the commands to all of them at once, as a source change reaches every
worker (each watches the same sources), and reports the earliest worker's t0 (so latency
counts from the first change anywhere) and every worker's pid (CPU and RSS are summed).
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

from bench import mesh
from bench.control import commands, emit, log


def _parse_setting(text: str) -> tuple[str, object]:
    key, _, raw = text.partition("=")
    value: object = raw
    for conv in (int, float):
        try:
            value = conv(raw)
            break
        except ValueError:
            pass
    if raw in ("true", "false"):
        value = raw == "true"
    return key, value


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:0")
    ap.add_argument("--services", type=int, default=mesh.DEFAULT_SERVICES)
    ap.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ServerSettings field (repeatable)",
    )
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    if args.workers > 1:
        await relay(args)
        return

    from xds_server.xds import types
    from xds_server.xds.cache import ResourceCache
    from xds_server.app import tune_gc
    from xds_server.xds.server import ServerSettings, XdsServer

    cache = ResourceCache()
    cache.set_type(types.CLUSTER, mesh.clusters(args.services))
    cache.set_type(types.ENDPOINT, mesh.clas(args.services))
    extra = dict(_parse_setting(s) for s in args.setting)
    # The push benchmarks measure the push path: admission control (issue 15) is off unless a
    # run sets it (--setting max_stream_opens_per_second=500 ...), so thousands of streams
    # opening at once are all admitted, as before.
    extra = {"max_stream_opens_per_second": 0.0, "max_initializing_streams": 0, **extra}
    settings = ServerSettings(address=args.address, debounce_quiet=0.0, debounce_max=0.0, **extra)
    server = XdsServer(cache, settings)
    await server.start()
    tune_gc()  # what `xds-server serve` does after start-up
    emit("ready", port=server.port, pid=os.getpid(), kind="ours")

    pushes = 0
    async for cmd in commands():
        c = cmd.get("cmd")
        if c == "push":
            round_no = int(cmd.get("round", pushes + 1))
            index, name = mesh.push_target(round_no, args.services)
            changed = mesh.cla(index, round_no)
            t0 = time.time_ns()
            cache.update(types.ENDPOINT, upsert=[changed])
            pushes += 1
            emit("pushed", round=round_no, name=name, t0_ns=t0)
        elif c == "gc_freeze":
            # Experiment only (push_bench --gc-freeze): move everything alive now (the synced
            # streams' state) out of the collector's sight, as a server could after start-up.
            gc.collect()
            gc.freeze()
            emit("gc_frozen", frozen=gc.get_freeze_count())
        elif c == "stats":
            emit("stats")
        elif c == "quit":
            break
        else:
            log(f"server_proc: unknown command {cmd!r}")
    await server.stop(grace=1.0)
    emit("bye")


async def relay(args: argparse.Namespace) -> None:
    """`--workers N`: N worker processes on one port, commands relayed to every one."""
    import json
    import socket

    with socket.socket() as probe:  # a free port for all the workers to share
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, __file__, f"--address=127.0.0.1:{port}", f"--services={args.services}",
            "--setting=reuse_port=true", *(f"--setting={s}" for s in args.setting)]
    workers = [await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
               for _ in range(args.workers)]

    async def event(worker: asyncio.subprocess.Process) -> dict:
        assert worker.stdout is not None
        return json.loads(await worker.stdout.readline())

    def send(cmd: dict) -> None:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write((json.dumps(cmd) + "\n").encode())

    ready = await asyncio.gather(*(event(w) for w in workers))
    emit("ready", port=port, pid=os.getpid(), pids=[r["pid"] for r in ready], kind="ours",
         workers=args.workers)
    async for cmd in commands():
        send(cmd)
        if cmd.get("cmd") == "quit":
            break
        answers = await asyncio.gather(*(event(w) for w in workers))
        if cmd.get("cmd") == "push":
            emit("pushed", round=answers[0]["round"], name=answers[0]["name"],
                 t0_ns=min(a["t0_ns"] for a in answers))
        else:
            emit(answers[0]["event"], **{k: v for k, v in answers[0].items() if k != "event"})
    for worker in workers:
        await worker.wait()
    emit("bye")


if __name__ == "__main__":
    asyncio.run(main())
