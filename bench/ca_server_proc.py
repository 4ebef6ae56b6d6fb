"""The server under test for `ca_bench.py`: the real `XdsServer` with the CA, authentication
and SDS wired in exactly as `xds-server serve --auth insecure-node-metadata` does it
(`Security.build` + `attach` + `run`, app.py), serving the benchmark mesh of `mesh.py`.

Streams prove their identity by node metadata over loopback (no tokens), so each simulated
proxy can claim its own service account: one identity, one certificate per proxy.

Control (JSON lines, bench/control.py):
  prints {"event":"ready","port":P,"pid":PID}
  {"cmd":"sds_stats"}        -> {"event":"sds_stats", issued, renewed, identities, due_pending}
  {"cmd":"storm"}            -> every tracked certificate falls due now (the provider's own
                                schedule: RenewalSchedule.mark_due, then a wake-up); prints
                                {"event":"storm","t0_ns":..,"identities":N}
  {"cmd":"push","round":R}   -> cache.update(ENDPOINT, upsert=[CLA 0, generation R]); prints
                                {"event":"pushed","round":R,"name":..,"t0_ns":..}
  {"cmd":"quit"}
Logs (JSON, level info, as `serve` logs) go to stderr: the harness sends them to a file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import mesh
from bench.control import commands, emit, log

PUSH_INDEX = 0  # the CLA every stream subscribes to and every push changes


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:0")
    ap.add_argument("--services", type=int, default=mesh.DEFAULT_SERVICES)
    ap.add_argument("--workload-ttl", type=float, default=24 * 3600.0, help="seconds")
    ap.add_argument("--key-algorithm", default="ec-p256")
    ap.add_argument("--ca-dir", default="", help="default: a fresh temporary directory")
    ap.add_argument("--log-level", default="info")
    args = ap.parse_args()

    from xds_server import logs
    from xds_server.app import tune_gc
    from xds_server.security import Security, SecurityConfig
    from xds_server.xds import types
    from xds_server.xds.auth import AuthMode, GuardSettings
    from xds_server.xds.cache import ResourceCache
    from xds_server.xds.server import ServerSettings, XdsServer

    logs.configure(args.log_level, "json")
    ca_dir = Path(args.ca_dir or tempfile.mkdtemp(prefix="ca-bench-"))
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, mesh.clusters(args.services))
    cache.set_type(types.ENDPOINT, mesh.clas(args.services))
    config = SecurityConfig(
        auth=AuthMode.INSECURE_NODE_METADATA,
        ca_dir=ca_dir,
        workload_ttl=timedelta(seconds=args.workload_ttl),
        key_algorithm=args.key_algorithm,
        limits=GuardSettings(),
        watch_ca_files=False,
    )
    # Admission control off: this measures issuing, with every stream admitted (issue 15).
    settings = ServerSettings(address=args.address, debounce_quiet=0.0, debounce_max=0.0,
                              max_stream_opens_per_second=0.0, max_initializing_streams=0)
    security = Security.build(config, cache, settings.address)
    server = XdsServer(cache, settings)
    security.attach(server)
    await server.start()
    stop = asyncio.Event()
    sec_task = asyncio.create_task(security.run(stop), name="security")
    tune_gc()
    provider = security.certificates
    assert provider is not None
    emit("ready", port=server.port, pid=os.getpid(), kind="ours+ca")

    async for cmd in commands():
        c = cmd.get("cmd")
        if c == "sds_stats":
            st = provider.stats
            emit("sds_stats", issued=st.issued, renewed=st.renewed,
                 issue_failures=st.issue_failures, identities=len(provider),
                 scheduled=len(provider.schedule))
        elif c == "storm":
            n = len(provider.schedule)
            t0 = time.time_ns()
            provider.schedule.mark_due()
            provider.wake()
            emit("storm", t0_ns=t0, identities=n)
        elif c == "push":
            round_no = int(cmd.get("round", 1))
            changed = mesh.cla(PUSH_INDEX, round_no)
            t0 = time.time_ns()
            cache.update(types.ENDPOINT, upsert=[changed])
            emit("pushed", round=round_no, name=mesh.service_name(PUSH_INDEX), t0_ns=t0)
        elif c == "quit":
            break
        else:
            log(f"ca_server_proc: unknown command {cmd!r}")
    stop.set()
    await asyncio.gather(sec_task, return_exceptions=True)
    await server.stop(grace=1.0)
    emit("bye")


if __name__ == "__main__":
    asyncio.run(main())
