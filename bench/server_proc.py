"""The server under test: the real `XdsServer`, serving the benchmark mesh, driven like the floor.

Builds the mesh of `mesh.py` (N clusters + N ClusterLoadAssignments) into a `ResourceCache`,
starts `XdsServer` with debounce off, and speaks the same control protocol as
`floor_server.py`, so the same load client and the same harness measure both:
  prints {"event":"ready","port":P,"pid":PID}
  {"cmd":"push","round":R} -> cache.update(ENDPOINT, upsert=[the changed CLA]);
                              prints {"event":"pushed","round":R,"name":..,"t0_ns":..}
  {"cmd":"stats"}          -> {"event":"stats"}
  {"cmd":"quit"}           -> server.stop(grace=1.0), prints {"event":"bye"}
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
    args = ap.parse_args()

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


if __name__ == "__main__":
    asyncio.run(main())
