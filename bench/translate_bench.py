"""Translation benchmark: the MeshController's CPU per model change, and a full build.

The mesh, for each size N (default 1,000 and 10,000 services):

  - N services over 10 namespaces, each one HTTP port (80 -> 8080) and a cluster IP
  - one EndpointSlice per service with 10 endpoints, each backed by a meshed Pod
  - 10 % of the services with an HTTPRoute (a header-matched /v2 rule to a second service of
    the namespace, and a 90/10 weighted default rule), 10 % with a TrafficPolicy (load
    balancer, connection pool, outlier detection, retries, timeout)
  - one connected proxy per namespace (one of the pods), so every namespace's outbound route
    configuration (its scope) exists, as it does in a running server

Measured, each size in its own process (so the peak RSS is that size's alone):

  build     CPU seconds (process time) from an empty store to everything in the cache: the
            proxies connect to the empty controller, then the source syncs every object at
            once (one `MeshStore.sync`, as a source's first list does); peak RSS (ru_maxrss)
  endpoint  one EndpointSlice replaced by one with a changed endpoint (readiness flipped):
            CPU of that `MeshStore.put` (store + controller + cache writes) per change
  route     one HTTPRoute changed (its canary weight moved)
  service   one Service added (its pods first, untimed), then its EndpointSlice
  proxy     the first proxy of a new namespace connects (a new scope is computed)

CPU is `time.process_time_ns()` around the one call (one thread, ns resolution). The garbage
collector stays on, as in the server, so the p99 includes its pauses. There is no gRPC server
and no stream: this is translation and cache writes only (pushing is bench/push_bench.py's).

Results: a JSON file under bench/out/ and a dated section appended to bench/RESULTS.md.
`--smoke` runs tiny sizes and a few changes and writes to a temporary directory.
`--cprofile` writes a cProfile of every phase next to the JSON (and prints the top entries).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import gc
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.config.core.v3 import base_pb2

from bench.publish import publish
from bench.push_bench import fmt, machine, pct, system_busy
from xds_server.model.mesh import (
    AppProtocol,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Namespace,
    Service,
    ServiceKey,
    ServicePort,
    Workload,
)
from xds_server.model.policy import TrafficPolicy
from xds_server.sources.policies import parse_traffic_policy_spec
from xds_server.model.routes import (
    BackendRef,
    MatchType,
    ParentRef,
    PathMatch,
    Route,
    RouteMatch,
    RouteRule,
    ValueMatch,
)
from xds_server.model.store import HTTP_ROUTE, MeshStore
from xds_server.model.identity import VerifiedProxy
from xds_server.translate.controller import MeshController
from xds_server.xds.node import proxy_claim
from xds_server.xds.cache import Change, ResourceCache

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SOURCE = "bench"

# Targets from the issue.
TARGET_AT = 10_000
TARGET_ENDPOINT_CHANGE_MS = 1.0  # translation CPU per endpoint change at TARGET_AT services
TARGET_FULL_BUILD_S = 3.0  # full build of TARGET_AT services

ENDPOINTS = 10
NAMESPACES = 10
APP_PORT = 8080


def verified(node: base_pb2.Node) -> VerifiedProxy:
    """The proxy a node claims to be, as the server hands it to the view provider."""
    return VerifiedProxy.unverified(proxy_claim(node))



def log(msg: str) -> None:
    print(f"[translate_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# The mesh -----------------------------------------------------------------------------------


def _ip(base: int, index: int) -> str:
    return f"{base}.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}"


def namespace_of(i: int, namespaces: int) -> str:
    return f"ns-{i % namespaces}"


def service(i: int, namespaces: int) -> Service:
    return Service(
        namespace=namespace_of(i, namespaces),
        name=f"svc-{i}",
        ports=(ServicePort(80, "http", APP_PORT, AppProtocol.HTTP),),
        cluster_ip=_ip(10, i),
    )


def pod_name(i: int, j: int) -> str:
    return f"svc-{i}-{j}"


def pods(i: int, namespaces: int, endpoints: int) -> list[Workload]:
    ns = namespace_of(i, namespaces)
    return [
        Workload(
            namespace=ns,
            name=pod_name(i, j),
            ip=_ip(11, i * endpoints + j),
            service_account=f"svc-{i}",
            labels=(("app", f"svc-{i}"),),
            meshed=True,
            container_ports=(("http", APP_PORT),),
        )
        for j in range(endpoints)
    ]


def endpoint_slice(i: int, namespaces: int, endpoints: int) -> EndpointSlice:
    ns = namespace_of(i, namespaces)
    return EndpointSlice(
        namespace=ns,
        name=f"svc-{i}-abcde",
        service=f"svc-{i}",
        ports=(EndpointPort("http", APP_PORT, AppProtocol.HTTP),),
        endpoints=tuple(
            Endpoint(
                address=_ip(11, i * endpoints + j),
                zone=f"zone-{j % 3}",
                node=f"node-{j % 50}",
                pod=pod_name(i, j),
            )
            for j in range(endpoints)
        ),
    )


def http_route(i: int, n: int, namespaces: int, canary: int = 10) -> Route:
    """A route on svc-i: /v2 with `x-version: v2` to the next service of the namespace, and
    everything else 90/10 (`canary`) between svc-i and that service."""
    ns = namespace_of(i, namespaces)
    me = ServiceKey(ns, f"svc-{i}")
    other = ServiceKey(ns, f"svc-{(i + namespaces) % n}")
    return Route(
        kind=HTTP_ROUTE,
        namespace=ns,
        name=f"route-{i}",
        parents=(ParentRef(me, 80),),
        rules=(
            RouteRule(
                matches=(RouteMatch(
                    path=PathMatch(MatchType.PREFIX, "/v2"),
                    headers=(ValueMatch("x-version", "v2"),),
                ),),
                backends=(BackendRef(other, 80),),
                request_timeout=5.0,
            ),
            RouteRule(
                backends=(BackendRef(me, 80, 100 - canary), BackendRef(other, 80, canary)),
            ),
        ),
        created="2026-01-01T00:00:00Z",
    )


def traffic_policy(i: int, namespaces: int) -> TrafficPolicy:
    spec = parse_traffic_policy_spec({
        "targetRef": {"name": f"svc-{i}"},
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {"tcp": {"maxConnections": 100}, "http": {"http1MaxPendingRequests": 50}},
        "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s"},
        "retries": {"attempts": 2, "perTryTimeout": "1s"},
        "timeout": "3s",
    })
    return TrafficPolicy(namespace=namespace_of(i, namespaces), name=f"policy-{i}", spec=spec,
                         created="2026-01-01T00:00:00Z")


def mesh_objects(n: int, namespaces: int, endpoints: int) -> list:
    objects: list = [Namespace(f"ns-{k}") for k in range(namespaces)]
    for i in range(n):
        objects.append(service(i, namespaces))
        objects.append(endpoint_slice(i, namespaces, endpoints))
        objects.extend(pods(i, namespaces, endpoints))
        if i % 10 == 0:
            objects.append(http_route(i, n, namespaces))
        if i % 10 == 5:
            objects.append(traffic_policy(i, namespaces))
    return objects


def proxy_node(namespace: str, pod: str, ip: str) -> base_pb2.Node:
    node = base_pb2.Node(id=f"{pod}.{namespace}", cluster=namespace)
    node.metadata.update({
        "namespace": namespace, "pod": pod, "pod_ip": ip, "service_account": "default",
        # The explicit mode, as the numbers recorded before capture mode existed; capture
        # mode adds pod-IP chains to each namespace's listeners (bench/capture_bench.py).
        "interception": "explicit",
    })
    return node


# Measuring ----------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current RSS (from /proc: ru_maxrss is only the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


class Counter:
    """Cache writes per change: how many resources of each type a change touched."""

    def __init__(self, cache: ResourceCache) -> None:
        self.names: dict[str, int] = {}
        cache.add_listener(self._on_change)

    def _on_change(self, change: Change) -> None:
        short = change.type_url.rsplit(".", 1)[-1]
        self.names[short] = self.names.get(short, 0) + len(change.names)

    def take(self) -> dict[str, int]:
        out, self.names = self.names, {}
        return out


class Phase:
    """Per-change CPU samples of one kind of change, optionally under cProfile."""

    def __init__(self, name: str, profile_dir: Path | None, size: int) -> None:
        self.name = name
        self.samples_ms: list[float] = []
        self.translations: list[int] = []
        self.writes: list[dict[str, int]] = []
        self._profile = cProfile.Profile() if profile_dir is not None else None
        self._path = profile_dir / f"translate-N={size}-{name}.prof" if profile_dir else None

    def run(self, controller: MeshController, counter: Counter, fn: Callable[[], object]) -> float:
        t0 = controller.translations
        counter.take()
        if self._profile is not None:
            self._profile.enable()
        c0 = time.process_time_ns()
        fn()
        c1 = time.process_time_ns()
        if self._profile is not None:
            self._profile.disable()
        ms = (c1 - c0) / 1e6
        self.samples_ms.append(ms)
        self.translations.append(controller.translations - t0)
        self.writes.append(counter.take())
        return ms

    def summary(self) -> dict:
        s = self.samples_ms
        out = {
            "changes": len(s),
            "cpu_ms": {
                "p50": pct(s, 50), "p99": pct(s, 99), "max": max(s), "mean": statistics.fmean(s),
            },
            "translations_median": statistics.median(self.translations),
            "writes_median": {
                k: statistics.median(w.get(k, 0) for w in self.writes)
                for k in sorted({k for w in self.writes for k in w})
            },
        }
        if self._profile is not None and self._path is not None:
            self._profile.dump_stats(self._path)
            text = io.StringIO()
            pstats.Stats(self._profile, stream=text).sort_stats("tottime").print_stats(20)
            log(f"profile {self._path}:\n{text.getvalue()}")
            out["profile"] = str(self._path)
        return out


def measure(args: argparse.Namespace) -> dict:
    """One size, in this process."""
    n, namespaces, endpoints = args.child, args.namespaces, args.endpoints
    profile_dir = Path(args.cprofile) if args.cprofile else None
    gc.collect()
    rss_start = rss_mb()
    objects = mesh_objects(n, namespaces, endpoints)
    gc.collect()
    rss_model = rss_mb()

    store = MeshStore()
    cache = ResourceCache()
    controller = MeshController(store, cache)
    counter = Counter(cache)
    nodes = []
    for k in range(namespaces):
        i = k  # the first service of namespace ns-k; its first pod runs the proxy
        nodes.append(proxy_node(namespace_of(i, namespaces), pod_name(i, 0), _ip(11, i * endpoints)))

    # (a) Full build: proxies connect to the empty controller, then one sync of everything.
    build = Phase("build", profile_dir, n)
    connect = Phase("connect", None, n)

    def connect_all() -> None:
        for node in nodes:
            controller.view_for(verified(node))

    connect.run(controller, counter, connect_all)
    build.run(controller, counter, lambda: store.sync(SOURCE, objects))
    rss_built = rss_mb()
    peak = peak_rss_mb()
    counts = {t.rsplit(".", 1)[-1]: len(cache.resources(t)) for t in cache.type_urls()}
    log(f"N={n}: build {build.samples_ms[0] / 1000:.2f} s CPU, peak RSS {peak:.0f} MB, {counts}")

    # (b) Endpoint changes: flip one endpoint's readiness in one service's slice.
    slices = {i: endpoint_slice(i, namespaces, endpoints) for i in range(n)} if args.endpoint_changes else {}
    endpoint = Phase("endpoint", profile_dir, n)
    for step in range(args.warmup + args.endpoint_changes if args.endpoint_changes else 0):
        i = (step * 7919 + 3) % n
        old = slices[i]
        j = step % endpoints
        changed = list(old.endpoints)
        changed[j] = dataclasses.replace(changed[j], ready=not changed[j].ready)
        new = dataclasses.replace(old, endpoints=tuple(changed))
        slices[i] = new
        if step < args.warmup:
            store.put(SOURCE, new)
            continue
        endpoint.run(controller, counter, lambda new=new: store.put(SOURCE, new))

    # (c) HTTPRoute changes: move the canary weight of one route.
    route_ids = [i for i in range(n) if i % 10 == 0]
    route = Phase("route", profile_dir, n)
    for step in range(args.warmup + args.route_changes if args.route_changes else 0):
        i = route_ids[(step * 7) % len(route_ids)]
        new = http_route(i, n, namespaces, canary=10 + (step % 2) * 10 + step % 7)
        if step < args.warmup:
            store.put(SOURCE, new)
            continue
        route.run(controller, counter, lambda new=new: store.put(SOURCE, new))

    # (d) A Service added (pods untimed), then its EndpointSlice.
    add_service = Phase("service", profile_dir, n)
    add_slice = Phase("service_slice", profile_dir, n)
    for step in range(args.warmup + args.service_adds if args.service_adds else 0):
        i = n + step  # a new index: new name, new IPs
        for workload in pods(i, namespaces, endpoints):
            store.put(SOURCE, workload)
        new_service, new_slice = service(i, namespaces), endpoint_slice(i, namespaces, endpoints)
        if step < args.warmup:
            store.put(SOURCE, new_service)
            store.put(SOURCE, new_slice)
            continue
        add_service.run(controller, counter, lambda new_service=new_service: store.put(SOURCE, new_service))
        add_slice.run(controller, counter, lambda new_slice=new_slice: store.put(SOURCE, new_slice))

    # (e) The first proxy of a new namespace (with one service of its own) connects.
    new_proxy = Phase("proxy", profile_dir, n)
    for step in range(args.warmup + args.proxy_connects if args.proxy_connects else 0):
        ns = f"new-ns-{step}"
        store.put(SOURCE, Namespace(ns))
        node = proxy_node(ns, f"client-{step}", _ip(12, step))
        if step < args.warmup:
            controller.view_for(verified(node))
            continue
        new_proxy.run(controller, counter, lambda node=node: controller.view_for(verified(node)))

    return {
        "services": n,
        "namespaces": namespaces,
        "endpoints_per_service": endpoints,
        "objects": len(objects),
        "resources": counts,
        "build": {
            "cpu_s": build.samples_ms[0] / 1000,
            "connect_cpu_ms": connect.samples_ms[0],
            "translations": build.translations[0],
            "rss_start_mb": rss_start,
            "rss_model_mb": rss_model,
            "rss_built_mb": rss_built,
            "peak_rss_mb": peak,
            **({"profile": build.summary().get("profile")} if profile_dir else {}),
        },
        "endpoint": endpoint.summary() if endpoint.samples_ms else None,
        "route": route.summary() if route.samples_ms else None,
        "service": add_service.summary() if add_service.samples_ms else None,
        "service_slice": add_slice.summary() if add_slice.samples_ms else None,
        "proxy": new_proxy.summary() if new_proxy.samples_ms else None,
    }


# The whole run ------------------------------------------------------------------------------


def wait_quiet(args: argparse.Namespace, label: str) -> float:
    """Wait (up to --quiet-wait s) until other processes use less than --quiet-below cores:
    process time is steadier than wall time under load, but shared caches and hyperthreads
    still slow a busy machine down. Returns the last load seen (in cores)."""
    deadline = time.monotonic() + args.quiet_wait
    warned = False
    while True:
        b0, w0 = system_busy(), time.monotonic()
        time.sleep(1.0)
        load = (system_busy() - b0) / (time.monotonic() - w0)
        if load <= args.quiet_below or time.monotonic() >= deadline:
            if load > args.quiet_below:
                log(f"{label}: machine still busy ({load:.2f} cores), measuring anyway")
            return load
        if not warned:
            log(f"{label}: machine busy ({load:.2f} cores used by others), waiting")
            warned = True


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(n: int, args: argparse.Namespace, out_dir: Path) -> dict:
    argv = [
        sys.executable, str(Path(__file__).resolve()), f"--child={n}",
        f"--namespaces={args.namespaces}", f"--endpoints={args.endpoints}",
        f"--endpoint-changes={args.endpoint_changes}", f"--route-changes={args.route_changes}",
        f"--service-adds={args.service_adds}", f"--proxy-connects={args.proxy_connects}",
        f"--warmup={args.warmup}",
    ]
    if args.cprofile:
        argv.append(f"--cprofile={out_dir}")
    load_before = wait_quiet(args, f"N={n}") if args.quiet_wait > 0 else float("nan")
    log(f"N={n}: running in a child process")
    busy0, child0, wall0 = system_busy(), children_cpu(), time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"N={n}: child exited with {proc.returncode}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # CPU used by anything else while the child ran, in cores (noisy rows show it).
    wall = time.monotonic() - wall0
    result["other_load_cores"] = max(0.0, (system_busy() - busy0 - (children_cpu() - child0)) / wall)
    result["load_before_cores"] = load_before
    return result


def verdicts(results: list[dict]) -> dict:
    """Targets (at TARGET_AT services, or the largest size run) and constancy 1k -> 10k."""
    if not results:
        return {}
    by_n = {r["services"]: r for r in results}
    big = by_n.get(TARGET_AT) or by_n[max(by_n)]
    small = by_n[min(by_n)]
    out: dict = {"at": big["services"], "exact": big["services"] == TARGET_AT}
    build_s = big["build"]["cpu_s"]
    out["full_build"] = {
        "target_s": TARGET_FULL_BUILD_S, "cpu_s": build_s, "met": build_s <= TARGET_FULL_BUILD_S,
        "ratio": build_s / TARGET_FULL_BUILD_S,
    }
    if big["endpoint"] is not None:
        p50, p99 = big["endpoint"]["cpu_ms"]["p50"], big["endpoint"]["cpu_ms"]["p99"]
        out["endpoint_change"] = {
            "target_ms": TARGET_ENDPOINT_CHANGE_MS, "p50_ms": p50, "p99_ms": p99,
            "met": p50 <= TARGET_ENDPOINT_CHANGE_MS, "p99_met": p99 <= TARGET_ENDPOINT_CHANGE_MS,
            "ratio": p50 / TARGET_ENDPOINT_CHANGE_MS,
        }
        if small is not big and small["endpoint"] is not None:
            ratio = p50 / small["endpoint"]["cpu_ms"]["p50"]
            out["endpoint_constant"] = {
                "from": small["services"], "to": big["services"], "p50_ratio": ratio,
                "constant": ratio <= 1.5,  # 10x the services; O(1) means well under 10x
            }
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    a = report["args"]
    out = [
        f"## {report['date']}: translation (`bench/translate_bench.py`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']}; "
        f"Python {m['python']}, protobuf {m['protobuf']}, xds-protos {m['xds-protos']}.",
        f"Mesh: N services in {a['namespaces']} namespaces, one HTTP port each, one EndpointSlice "
        f"of {a['endpoints']} endpoints (meshed pods) per service, an HTTPRoute on 10 % and a "
        f"TrafficPolicy on 10 % of the services, one connected proxy per namespace. CPU is process "
        f"time of the one `MeshStore` call (store + controller + cache writes, no server), GC on. "
        f"{a['endpoint_changes']} endpoint changes, {a['route_changes']} route changes, "
        f"{a['service_adds']} services added, {a['proxy_connects']} new-namespace proxies "
        f"(+{a['warmup']} warm-up each).",
        "",
        "| N | build CPU s | peak RSS MB (model only) | endpoint p50 / p99 ms | route p50 / p99 ms "
        "| service add p50 / p99 ms | its slice p50 ms | new-namespace proxy p50 ms | other load (cores) "
        "| resources |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def pair(section: dict | None) -> str:
        if section is None:
            return "-"
        return f"{fmt(section['cpu_ms']['p50'], '.3f')} / {fmt(section['cpu_ms']['p99'], '.3f')}"

    def one(section: dict | None) -> str:
        return "-" if section is None else fmt(section["cpu_ms"]["p50"], ".3f")

    for r in report["results"]:
        b = r["build"]
        res = ", ".join(f"{v} {k}" for k, v in sorted(r["resources"].items()))
        out.append(
            f"| {r['services']} | {fmt(b['cpu_s'], '.2f')} | {fmt(b['peak_rss_mb'], '.0f')} "
            f"({fmt(b['rss_model_mb'], '.0f')}) | {pair(r['endpoint'])} | {pair(r['route'])} "
            f"| {pair(r['service'])} | {one(r['service_slice'])} | {one(r['proxy'])} "
            f"| {fmt(r.get('other_load_cores'), '.2f')} | {res} |"
        )
    out += ["", "Resources written to the cache per change (median, by type):", ""]
    for r in report["results"]:
        parts = []
        for key in ("endpoint", "route", "service", "service_slice", "proxy"):
            if r.get(key):
                writes = ", ".join(f"{v:g} {k}" for k, v in r[key]["writes_median"].items()) or "none"
                parts.append(f"{key}: {writes}")
        out.append(f"- N={r['services']}: " + "; ".join(parts))
    v = report.get("verdicts") or {}
    if v:
        at = f"{v['at']:,} services" + ("" if v["exact"] else " (the largest size run, not the target's)")
        out += ["", f"Targets (at {at}):", ""]
        fb = v["full_build"]
        out.append(
            f"- Full build ≤ {fb['target_s']:g} s CPU: **{'met' if fb['met'] else 'missed'}** "
            f"({fb['cpu_s']:.2f} s, {fb['ratio']:.2f}x the target)."
        )
        ec = v.get("endpoint_change")
        if ec:
            out.append(
                f"- One endpoint change ≤ {ec['target_ms']:g} ms CPU: **{'met' if ec['met'] else 'missed'}** "
                f"(p50 {ec['p50_ms']:.3f} ms, {ec['ratio']:.2f}x the target; p99 {ec['p99_ms']:.3f} ms, "
                f"{'within' if ec['p99_met'] else 'over'} the target)."
            )
        const = v.get("endpoint_constant")
        if const:
            out.append(
                f"- Endpoint change constant from {const['from']:,} to {const['to']:,} services: "
                f"**{'yes' if const['constant'] else 'no'}** (p50 ratio {const['p50_ratio']:.2f})."
            )
    if report.get("errors"):
        out += ["", "Errors:", ""] + [f"- {e}" for e in report["errors"]]
    out.append("")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="1000,10000", help="service counts, comma-separated")
    ap.add_argument("--namespaces", type=int, default=NAMESPACES)
    ap.add_argument("--endpoints", type=int, default=ENDPOINTS, help="endpoints per service")
    ap.add_argument("--endpoint-changes", type=int, default=200)
    ap.add_argument("--route-changes", type=int, default=30)
    ap.add_argument("--service-adds", type=int, default=30)
    ap.add_argument("--proxy-connects", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured changes before each kind")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per size")
    ap.add_argument("--quiet-below", type=float, default=0.2, help="idle means others use < this many cores")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="longest wait for idle per size (0: don't)")
    ap.add_argument("--cprofile", default="", help=argparse.SUPPRESS)  # child: profile dir
    ap.add_argument("--profile", action="store_true", help="cProfile every phase (slower numbers)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, few changes, temp dir")
    ap.add_argument("--out-dir", default="", help="default bench/out (smoke: a temp dir)")
    ap.add_argument("--results", default="", help="markdown to append to (default bench/RESULTS.md; smoke: out-dir)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)  # measure one size here
    args = ap.parse_args()

    if args.child:
        print(json.dumps(measure(args)))
        return

    if args.smoke:
        args.n = "40,120"
        args.endpoint_changes, args.route_changes, args.service_adds, args.proxy_connects = 20, 3, 3, 2
        args.warmup = 1
        args.quiet_wait = 0.0
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="translate-bench-")) if args.smoke else BENCH / "out"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.profile:
        args.cprofile = str(out_dir)
    results_md = Path(args.results) if args.results else (
        out_dir / "RESULTS.md" if args.smoke else BENCH / "RESULTS.md"
    )

    results: list[dict] = []
    errors: list[str] = []
    for n in [int(x) for x in str(args.n).split(",") if x]:
        try:
            r = run_child(n, args, out_dir)
        except Exception as e:  # keep going: one failed size must not lose the others
            log(f"FAILED N={n}: {type(e).__name__}: {e}")
            errors.append(f"N={n}: {type(e).__name__}: {e}")
            continue
        results.append(r)
        log(
            f"N={n}: build {r['build']['cpu_s']:.2f} s, peak RSS {r['build']['peak_rss_mb']:.0f} MB, "
            f"endpoint p50 {r['endpoint']['cpu_ms']['p50']:.3f} ms" if r["endpoint"] else f"N={n} done"
        )
    report = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k in (
            "n", "namespaces", "endpoints", "endpoint_changes", "route_changes", "service_adds",
            "proxy_connects", "warmup", "profile")},
        "results": results,
        "verdicts": verdicts(results),
        "errors": errors,
    }
    publish(report, "translate", out_dir, results_md, markdown(report))


if __name__ == "__main__":
    main()
