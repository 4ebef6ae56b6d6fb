"""The soak's server: the composition `xds-server serve` runs (`app.start_app`: the xDS server
with production admission defaults, the admin HTTP API with its metrics), serving the
benchmark mesh of `mesh.py` written straight into its cache, and churning it on command.

Only the source differs from `serve`: the harness changes the cache directly (no YAML to
parse), so each change is stamped (t0 = time.time_ns() just before it) and logged.

Control (JSON lines, see control.py):
  prints {"event":"ready","port":P,"admin_port":A,"pid":PID}
  {"cmd":"churn","eds_per_second":10,"cluster_every":10,"duration":S,"log":FILE}
        EDS changes at that rate (round robin over the services, each a new generation) and
        a cluster added (with its assignment) or the oldest added one removed every
        `cluster_every` s; every change goes to FILE as [kind, name, generation, t0_ns]
        (kind "eds", "add" or "remove"); prints {"event":"churned","changes":N} at the end.
  {"cmd":"state"}   -> {"event":"state","rss":..,"streams":..,"overload":{..},"stats":{..}}
  {"cmd":"snapshot","label":L}        (with --tracemalloc) keep a tracemalloc snapshot
  {"cmd":"compare","a":L1,"b":L2,"file":F,"top":N}
        write the N largest size differences (by allocation site) from L1 to L2 to F
  {"cmd":"quit"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench import mesh
from bench.control import commands, emit, log
from bench.server_proc import _parse_setting


async def churn(app, cmd: dict, services: int) -> None:
    from xds_server.xds import types

    cache = app.cache
    eds_interval = 1.0 / float(cmd.get("eds_per_second", 10))
    cluster_every = float(cmd.get("cluster_every", 10))
    duration = float(cmd.get("duration", 60))
    loop = asyncio.get_running_loop()
    start = loop.time()
    next_eds = start
    next_cluster = start + cluster_every
    log_rows: list[list] = []
    extras: list[int] = []  # indices of added clusters, oldest first
    next_extra = 1000
    gen = int(cmd.get("first_generation", 1))
    eds_index = 0
    adding = True
    while loop.time() - start < duration:
        now = loop.time()
        if now >= next_cluster:
            next_cluster += cluster_every
            if adding or not extras:
                index = next_extra
                next_extra += 1
                extras.append(index)
                name = mesh.service_name(index)
                t0 = time.time_ns()
                cache.update(types.ENDPOINT, upsert=[mesh.cla(index, gen)])
                cache.update(types.CLUSTER, upsert=[mesh.cluster(index)])
                log_rows.append(["add", name, gen, t0])
                gen += 1
            else:
                index = extras.pop(0)
                name = mesh.service_name(index)
                t0 = time.time_ns()
                cache.update(types.CLUSTER, remove=[name])
                cache.update(types.ENDPOINT, remove=[name])
                log_rows.append(["remove", name, 0, t0])
            adding = not adding
        if now >= next_eds:
            next_eds += eds_interval
            index = eds_index % services
            eds_index += 1
            t0 = time.time_ns()
            cache.update(types.ENDPOINT, upsert=[mesh.cla(index, gen)])
            log_rows.append(["eds", mesh.service_name(index), gen, t0])
            gen += 1
        await asyncio.sleep(max(0.0, min(next_eds, next_cluster) - loop.time()))
    with open(cmd["log"], "w") as f:
        json.dump(log_rows, f)
    emit("churned", changes=len(log_rows), next_generation=gen, extras=len(extras))


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:0")
    ap.add_argument("--admin-address", default="127.0.0.1:0")
    ap.add_argument("--services", type=int, default=mesh.DEFAULT_SERVICES)
    ap.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                    help="trace allocations (this many frames each) for snapshot/compare")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE",
                    help="extra ServerSettings field (repeatable); admission keeps serve's defaults")
    args = ap.parse_args()
    if args.tracemalloc:
        tracemalloc.start(args.tracemalloc)

    from xds_server.logs import configure

    configure("warning")  # the admin API logs every request at info
    from xds_server.admin.settings import AdminSettings
    from xds_server.app import AppConfig, start_app, tune_gc
    from xds_server.xds import types
    from xds_server.xds.server import ServerSettings

    extra = dict(_parse_setting(s) for s in args.setting)
    # As `serve` (debounce on by default) and with the bench's pending-open headroom.
    settings = ServerSettings(address=args.address, **extra)
    app = await start_app(AppConfig(server=settings, admin=AdminSettings(address=args.admin_address)))
    app.cache.set_type(types.CLUSTER, mesh.clusters(args.services))
    app.cache.set_type(types.ENDPOINT, mesh.clas(args.services))
    tune_gc()
    me = psutil.Process()
    emit("ready", port=app.server.port, admin_port=app.admin.port, pid=os.getpid(), kind="soak")

    snapshots: dict[str, tracemalloc.Snapshot] = {}
    side: set[asyncio.Task] = set()
    async for cmd in commands():
        c = cmd.get("cmd")
        if c == "churn":
            task = asyncio.create_task(churn(app, cmd, args.services))
            side.add(task)
            task.add_done_callback(side.discard)
        elif c == "state":
            server = app.server
            emit("state", rss=me.memory_info().rss, streams=len(server.connections),
                 overload=server.overload(), stats=vars(server.stats),
                 traced=tracemalloc.get_traced_memory()[0] if args.tracemalloc else 0)
        elif c == "snapshot" and args.tracemalloc:
            snapshots[cmd["label"]] = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(False, tracemalloc.__file__)])
            emit("snapshotted", label=cmd["label"], traced=tracemalloc.get_traced_memory()[0])
        elif c == "compare" and args.tracemalloc:
            a, b = snapshots[cmd["a"]], snapshots[cmd["b"]]
            top = int(cmd.get("top", 25))
            with open(cmd["file"], "w") as f:
                for key in ("lineno", "traceback"):
                    f.write(f"## {cmd['a']} -> {cmd['b']} by {key}\n")
                    for stat in b.compare_to(a, key)[:top]:
                        f.write(f"{stat.size_diff / 1e6:+.2f} MB {stat.count_diff:+d} blocks\n")
                        lines = stat.traceback.format() if key == "traceback" else [str(stat.traceback)]
                        f.write("    " + "\n    ".join(lines[-8:]) + "\n")
            emit("compared", file=cmd["file"])
        elif c == "quit":
            break
        else:
            log(f"soak_server: unknown command {cmd!r}")
    for task in side:
        task.cancel()
    await app.close(1.0)
    emit("bye")


if __name__ == "__main__":
    asyncio.run(main())
