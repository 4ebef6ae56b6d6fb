"""Event-loop lag benchmark (issue 9): the longest stall of the server's event loop during a
full build, a Namespace change, a root-namespace policy change and a rotation storm.

One process, one event loop, the pieces `xds-server serve --auth insecure-node-metadata`
composes (app.py, security.py): a `MeshStore`, the translate controller on it, a
`ResourceCache`, a started `XdsServer` (its cache listener in place, no streams) with the CA,
authentication and SDS (`Security.build` + `attach` + `run`). Mesh changes go straight into the
store (as a source would put them; the file source's own parsing is not part of this).

The mesh is bench/translate_bench.py's (N services over 10 namespaces, one EndpointSlice of
10 meshed-pod endpoints each, an HTTPRoute on 10 % and a TrafficPolicy on 10 % of them) plus
the root namespace with a mesh-wide MTLSPolicy (PERMISSIVE). mTLS is on (the CA runs), as with
`serve --auth ...`. `--proxies` proxies (a pod of a different service each, spread over the
namespaces) are registered through the controller's view API before the build, so every
namespace has a scope and a Namespace or root-policy change has proxies to rebuild.

Scenarios, in this order, in the same process:

  build       one `MeshStore.sync` of every object (a source's first sync): empty to everything
  namespace   one Namespace gains a tenant label: every scope is re-computed, every proxy rebuilt
  root-policy the root namespace's MTLSPolicy goes PERMISSIVE -> STRICT: every proxy rebuilt,
              every service's clusters re-checked
  storm       `--storm` identities (acquired beforehand, one certificate each) all fall due at
              once through the SDS provider's renewal schedule (`RenewalSchedule.mark_due`, the
              path a new signing root takes); done when every one was renewed

Measured per scenario: a sampler task sleeps 5 ms in a loop and records how late it woke up
(the loop lag). "max stall" is the largest lag seen while the scenario ran, "p99" the 99th
percentile of the lag samples overlapping the scenario; "wall" runs from the trigger to the
last cache write of the scenario (no write for `--quiet` s ends it; the storm also waits for
its renewals); "CPU" is this process's CPU time over the same span. As `serve` does,
`app.tune_gc()` runs once the first build is done (serve calls it after start-up).

Every call into xds_server is in the ADAPTER section below, so that the benchmark can be
pointed at a restructured server in minutes. Output: a table on stderr, a JSON report in
`--out-dir` (default bench/out/), and a last stdout line of JSON ({"json": path, "rows": ...}).
`--smoke`: 500 services, 50 proxies, a 200-identity storm, results in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import gc
import inspect
import io
import json
import logging
import os
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.push_bench import fmt, machine, pct, system_busy

BENCH = Path(__file__).resolve().parent
SOURCE = "bench"
SAMPLE_INTERVAL = 0.005  # the sampler's sleep, seconds


def log(msg: str) -> None:
    print(f"[loop_lag {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =============================================================================================
# ADAPTER: every call into the project is here. When the server is restructured, re-point
# these functions (and nothing else).
# =============================================================================================

ROOT_NAMESPACE = "xds-system"  # SecuritySettings' default root namespace
TENANT_LABEL = "xds-server.io/tenant"  # translate/scope.py TENANT_LABEL


@dataclass
class Server:
    """The running pieces of one benchmark process."""

    store: Any  # MeshStore
    cache: Any  # ResourceCache
    controller: Any  # the view provider (translate controller)
    xds: Any  # XdsServer
    security: Any  # security.Security
    provider: Any  # the CA's workload certificates (renewal loop)
    stop: asyncio.Event
    tasks: list[asyncio.Task] = field(default_factory=list)


async def compose(ca_dir: Path, log_file: Path) -> Server:
    """The pieces `serve --auth insecure-node-metadata` wires (app.py start_app + security.py),
    with an empty mesh store; the xDS server listens on a free loopback port."""
    from datetime import timedelta

    from xds_server import logs
    from xds_server.model.security import SecuritySettings
    from xds_server.model.store import MeshStore
    from xds_server.security import Security, SecurityConfig
    from xds_server.gc_policy import DrainCollector
    from xds_server.translate.controller import MeshController
    from xds_server.translate.scope import ScopeSettings
    from xds_server.xds.auth import AuthMode
    from xds_server.xds.cache import ResourceCache
    from xds_server.xds.server import ServerSettings, XdsServer

    # Logs as serve writes them (JSON at info: one line per issued certificate), to a file.
    logs.configure("info", "json")
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(open(log_file, "a"))  # noqa: SIM115 (closed with the process)

    cache = ResourceCache()
    store = MeshStore()
    security_config = SecurityConfig(
        auth=AuthMode.INSECURE_NODE_METADATA, ca_dir=ca_dir, watch_ca_files=False,
        workload_ttl=timedelta(hours=24),
    )
    settings = ServerSettings(address="127.0.0.1:0")
    # app.mesh_security: mTLS is on when proxies can get certificates.
    mesh_security = SecuritySettings(mtls=True, root_namespace=ROOT_NAMESPACE)
    controller = MeshController(store, cache, ScopeSettings(), mesh_security, collector=DrainCollector())
    xds = XdsServer(cache, settings, view_for=controller.view_for, release_view=controller.release)
    security = Security.build(security_config, cache, settings.address)
    security.attach(xds)
    await xds.start()
    stop = asyncio.Event()
    server = Server(store, cache, controller, xds, security, security.certificates, stop)
    server.tasks.append(controller.start())  # the time-sliced drain, as serve runs it
    server.tasks.append(asyncio.create_task(security.run(stop), name="security"))
    return server


async def close(server: Server) -> None:
    server.stop.set()
    await server.controller.stop()  # the drain task runs until stopped
    await asyncio.gather(*server.tasks, return_exceptions=True)
    await server.xds.stop(0)


def tune_gc() -> None:
    """What serve does once started."""
    from xds_server.app import tune_gc as app_tune_gc

    app_tune_gc()


def mesh_objects(n: int, namespaces: int, endpoints: int) -> list[Any]:
    """translate_bench's mesh, plus the root namespace and its mesh-wide mTLS policy."""
    from bench import translate_bench as tb
    from xds_server.model.mesh import Namespace

    objects = tb.mesh_objects(n, namespaces, endpoints)
    objects.append(Namespace(ROOT_NAMESPACE))
    objects.append(root_mtls_policy("PERMISSIVE"))
    return objects


def root_mtls_policy(mode: str) -> Any:
    from xds_server.model.security import MTLSPolicy
    from xds_server.sources.policies import parse_mtls_policy_spec

    return MTLSPolicy(namespace=ROOT_NAMESPACE, name="mesh-default",
                      spec=parse_mtls_policy_spec({"mode": mode}),
                      created="2026-01-01T00:00:00Z")


def tenant_namespace(name: str, tenant: str) -> Any:
    from xds_server.model.mesh import Namespace

    return Namespace(name, labels=((TENANT_LABEL, tenant),))


async def sync(server: Server, objects: list[Any]) -> None:
    """A source's first (or full) sync, in slices as the sources run it on the loop."""
    await server.store.sync_in_slices(SOURCE, objects)


def put(server: Server, obj: Any) -> None:
    server.store.put(SOURCE, obj)


def on_cache_write(server: Server, listener: Callable[[str, int], None]) -> None:
    """Call `listener(type_url, names written)` for every cache write."""
    server.cache.add_listener(lambda change: listener(change.type_url, len(change.names)))


def proxy_pod(k: int, namespaces: int, endpoints: int) -> tuple[str, str, str, str]:
    """(namespace, pod, ip, service account) of the k-th proxy: pod 0 of service k."""
    from bench import translate_bench as tb

    return (tb.namespace_of(k, namespaces), tb.pod_name(k, 0), tb._ip(11, k * endpoints),
            f"svc-{k}")


def connect_proxy(server: Server, namespace: str, pod: str, ip: str, service_account: str) -> None:
    """Register a proxy through the view API, as the xDS server does on a stream's first
    request (after issue 9: `view_for(VerifiedProxy)`; before: `view_for(Node)`)."""
    from envoy.config.core.v3 import base_pb2

    node = base_pb2.Node(id=f"{pod}.{namespace}", cluster=namespace)
    node.metadata.update({"namespace": namespace, "pod": pod, "pod_ip": ip,
                          "service_account": service_account})
    from xds_server.model.identity import Proof, VerifiedProxy
    from xds_server.xds.node import proxy_claim

    proof = Proof(namespace, service_account, "node-metadata")
    server.controller.view_for(VerifiedProxy(proxy_claim(node), proof))


def acquire_identity(server: Server, k: int, namespaces: int) -> None:
    """One more identity holding a certificate (what a stream's SDS subscription does)."""
    from xds_server.model.identity import Identity

    server.provider.track(Identity(f"ns-{k % namespaces}", f"storm-{k}"), proxy=f"storm-{k}")


def renewals(server: Server) -> int:
    return int(server.provider.stats.renewed)


def start_storm(server: Server) -> int:
    """Every tracked certificate falls due now (the path a new signing root takes, see
    WorkloadCertificates._ca_changed); returns how many."""
    provider = server.provider
    count = len(provider.schedule)
    provider.schedule.mark_due()
    provider._wake_up()
    return count


async def settled(server: Server) -> None:
    """Wait until the server has finished applying what it was given: store changes are
    queued and drained in time slices by the orchestrator (translate/orchestrator.py); the
    harness also waits for the cache to go quiet."""
    await server.controller.settled()


# =============================================================================================
# End of the adapter.
# =============================================================================================


class LagSampler:
    """Sleeps SAMPLE_INTERVAL in a loop; each sample is (woke-up time, lag beyond the sleep)."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (start, end, lag)
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            start = time.monotonic()  # the clock of asyncio's timers
            await asyncio.sleep(SAMPLE_INTERVAL)
            end = time.monotonic()
            self.samples.append((start, end, max(0.0, end - start - SAMPLE_INTERVAL)))

    def start(self) -> None:
        self.samples.clear()
        self._task = asyncio.create_task(self._run(), name="lag-sampler")

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def between(self, t0: float, t1: float) -> list[float]:
        """Lags of the samples overlapping [t0, t1]."""
        return [lag for start, end, lag in self.samples if end >= t0 and start <= t1]


class GcPauses:
    """CPython's garbage collections while a scenario runs (gc.callbacks): each one holds the
    loop like any other code, and a full (generation 2) pass over a big heap is the longest."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []  # (generation, seconds)
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *_: object) -> None:
        gc.callbacks.remove(self._callback)

    def longest(self, generation: int | None = None) -> float:
        return max((d for g, d in self.pauses if generation is None or g == generation), default=0.0)


class Writes:
    """Cache writes since the last reset: when the last one was, and how many per type."""

    def __init__(self) -> None:
        self.last = 0.0
        self.count = 0
        self.by_type: dict[str, int] = {}

    def reset(self) -> None:
        self.last, self.count, self.by_type = 0.0, 0, {}

    def __call__(self, type_url: str, names: int) -> None:
        self.last = time.monotonic()  # (a write from a worker thread counts too)
        self.count += 1
        short = type_url.rsplit(".", 1)[-1]
        self.by_type[short] = self.by_type.get(short, 0) + names


@dataclass
class Scenario:
    name: str
    label: str
    trigger: Callable[[], object]  # runs on the loop; may return an awaitable
    done: Callable[[], bool] = lambda: True  # besides the cache having gone quiet


async def wait_idle(args: argparse.Namespace, label: str) -> None:
    """Wait (up to --quiet-wait s) until other processes use at most --quiet-below cores: the
    lag is wall-clock time, so a busy machine shows in it."""
    me = psutil.Process()
    deadline = time.monotonic() + args.quiet_wait
    while True:
        b0, own0, w0 = system_busy(), sum(me.cpu_times()[:2]), time.monotonic()
        await asyncio.sleep(1.0)
        load = (system_busy() - b0 - (sum(me.cpu_times()[:2]) - own0)) / (time.monotonic() - w0)
        if load <= args.quiet_below:
            return
        if time.monotonic() >= deadline:
            log(f"{label}: machine still busy ({load:.2f} cores used by others), measuring anyway")
            return


async def run_scenario(server: Server, writes: Writes, scenario: Scenario,
                       args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    quiet, timeout = args.quiet, args.timeout
    if args.quiet_wait > 0:
        await wait_idle(args, scenario.name)
    me = psutil.Process()
    profile = cProfile.Profile() if args.profile else None
    sampler = LagSampler()
    sampler.start()
    await asyncio.sleep(0.2)  # the sampler's baseline
    writes.reset()
    busy0, own0 = system_busy(), sum(me.cpu_times()[:2])
    c0 = time.process_time()
    t0 = time.monotonic()
    if profile is not None:
        profile.enable()
    with GcPauses() as collections:
        result = scenario.trigger()
        if inspect.isawaitable(result):
            await result
        await settled(server)
        deadline = t0 + timeout
        while True:
            now = time.monotonic()
            if writes.count and scenario.done() and now - writes.last >= quiet:
                break
            if now > deadline:
                raise TimeoutError(f"{scenario.name}: not settled within {timeout} s "
                                   f"({writes.count} cache writes)")
            await asyncio.sleep(0.01)
    cpu = time.process_time() - c0
    if profile is not None:
        profile.disable()
        path = out_dir / f"loop-lag-N={args.services}-{scenario.name}.prof"
        profile.dump_stats(path)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
        log(f"profile {path}:\n{text.getvalue()}")
    t1 = writes.last
    elapsed = time.monotonic() - t0
    other = (system_busy() - busy0 - (sum(me.cpu_times()[:2]) - own0)) / elapsed
    await asyncio.sleep(0.05)
    await sampler.stop()
    lags = sampler.between(t0, t1)
    row = {
        "scenario": scenario.name,
        "label": scenario.label,
        "max_stall_ms": max(lags) * 1000 if lags else 0.0,
        "p99_lag_ms": pct(lags, 99) * 1000 if lags else 0.0,
        "samples": len(lags),
        "stalls_over_50ms": sum(1 for lag in lags if lag > 0.050),
        "wall_s": t1 - t0,
        "cpu_s": cpu,
        "cache_writes": dict(sorted(writes.by_type.items())),
        "other_load_cores": max(0.0, other),
        "gc_collections": len(collections.pauses),
        "longest_gc_ms": collections.longest() * 1000,
        "full_gc_collections": sum(1 for g, _ in collections.pauses if g == 2),
    }
    log(f"{scenario.name}: max stall {row['max_stall_ms']:.1f} ms, p99 {row['p99_lag_ms']:.1f} ms, "
        f"wall {row['wall_s']:.2f} s, CPU {cpu:.2f} s, {len(lags)} samples, writes {row['cache_writes']}, "
        f"longest GC pause {row['longest_gc_ms']:.0f} ms ({row['full_gc_collections']} full)")
    return row


async def measure(args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    n, namespaces, endpoints = args.services, args.namespaces, args.endpoints
    if args.proxies > n:
        raise SystemExit("--proxies must not exceed --services (one proxy per service's pod)")
    objects = mesh_objects(n, namespaces, endpoints)
    log(f"mesh: {len(objects)} objects ({n} services)")
    with tempfile.TemporaryDirectory(prefix="loop-lag-ca-") as ca_dir:
        server = await compose(Path(ca_dir), out_dir / f"loop-lag-N={n}.log")
        try:
            writes = Writes()
            on_cache_write(server, writes)
            for k in range(args.proxies):
                connect_proxy(server, *proxy_pod(k, namespaces, endpoints))
            renewed_target = 0

            def storm() -> None:
                nonlocal renewed_target
                renewed_target = renewals(server) + start_storm(server)

            scenarios = [
                Scenario("build", f"full build ({n} services, {args.proxies} proxies)",
                         lambda: sync(server, objects)),
                Scenario("namespace", "Namespace change (tenant label on ns-1)",
                         lambda: put(server, tenant_namespace("ns-1", "team-a"))),
                Scenario("root_policy", "root-namespace MTLSPolicy PERMISSIVE -> STRICT",
                         lambda: put(server, root_mtls_policy("STRICT"))),
                Scenario("storm", f"rotation storm ({args.storm} certificates)", storm,
                         done=lambda: renewals(server) >= renewed_target),
            ]
            rows = []
            for scenario in scenarios:
                if scenario.name == "storm":
                    log(f"issuing {args.storm} identities' first certificates (not measured)")
                    for k in range(args.storm):
                        acquire_identity(server, k, namespaces)
                        if k % 100 == 99:
                            await asyncio.sleep(0)
                    await asyncio.sleep(args.quiet)
                rows.append(await run_scenario(server, writes, scenario, args, out_dir))
                if scenario.name == "build":
                    tune_gc()
        finally:
            await close(server)
    return {
        "services": n, "namespaces": namespaces, "endpoints_per_service": endpoints,
        "proxies": args.proxies, "storm": args.storm, "objects": len(objects),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["result"]
    lines = [
        f"Loop lag, {report['date']}: {r['services']} services, {r['proxies']} proxies, "
        f"{r['storm']}-certificate storm. Machine: {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}.",
        "",
        "| scenario | max stall ms | p99 lag ms | longest GC pause ms (full GCs) | wall s | CPU s "
        "| lag samples | other load (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['label']} | {fmt(row['max_stall_ms'], '.0f')} | {fmt(row['p99_lag_ms'], '.0f')} "
            f"| {fmt(row['longest_gc_ms'], '.0f')} ({row['full_gc_collections']}) "
            f"| {fmt(row['wall_s'], '.2f')} | {fmt(row['cpu_s'], '.2f')} | {row['samples']} "
            f"| {fmt(row['other_load_cores'], '.2f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--endpoints", type=int, default=10, help="endpoints (meshed pods) per service")
    ap.add_argument("--proxies", type=int, default=300)
    ap.add_argument("--storm", type=int, default=5000, help="identities renewed at once")
    ap.add_argument("--quiet", type=float, default=0.3,
                    help="a scenario ends after this long without a cache write (s)")
    ap.add_argument("--timeout", type=float, default=300.0, help="per scenario (s)")
    ap.add_argument("--quiet-wait", type=float, default=30.0,
                    help="before each scenario, wait up to this long for an idle machine (s)")
    ap.add_argument("--quiet-below", type=float, default=0.3,
                    help="idle: other processes use at most this many cores")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile each scenario (the stall then includes the profiler's cost)")
    ap.add_argument("--out-dir", default="", help="default: bench/out (smoke: a temp dir)")
    ap.add_argument("--smoke", action="store_true",
                    help="500 services, 50 proxies, a 200-certificate storm, a temp dir")
    args = ap.parse_args()
    if args.smoke:
        args.services, args.proxies, args.storm, args.quiet_wait = 500, 50, 200, 0.0
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="loop-lag-") if args.smoke else BENCH / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)

    result = asyncio.run(measure(args, out_dir))
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    report = {"date": date, "machine": machine(), "args": vars(args), "result": result,
              "pid": os.getpid()}
    stamp = date.replace(" ", "T").replace(":", "")
    path = out_dir / f"loop-lag-N={args.services}-{stamp}.json"
    path.write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out_dir / f"loop-lag-N={args.services}-{stamp}.md").write_text(table)
    print(table, file=sys.stderr)
    print(json.dumps({"json": str(path), "rows": [
        {k: row[k] for k in ("scenario", "max_stall_ms", "p99_lag_ms", "wall_s")}
        for row in result["rows"]
    ]}))


if __name__ == "__main__":
    gc.collect()
    main()
