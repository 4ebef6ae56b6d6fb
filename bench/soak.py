"""Soak under sustained churn (issue 15): one server process, thousands of streams, streams
dropping and reconnecting, endpoints changing and clusters coming and going, for minutes.

    .venv/bin/python bench/soak.py                        # the issue's hour: 2,000 delta + 500 SotW, 10 min
    .venv/bin/python bench/soak.py --delta 500 --sotw 100 --duration 60
    .venv/bin/python bench/soak.py --storm 5000           # plus a reconnect storm after the churn
    .venv/bin/python bench/soak.py --smoke                # 40 streams, 8 s, results in a temp dir

The server is `soak_server.py` (what `xds-server serve` composes: admission at its production
defaults, the admin API), serving `mesh.py`'s 100 clusters. Load clients (`loadclient.py
--resume --give-up`) open the streams and sync; then for `--duration` s the server makes
`--eds-per-second` EDS changes and adds or removes a cluster every `--cluster-every` s, while
every 1 s a group of streams (`--churn-per-second` a second in all) drops its connection and
reconnects at once (delta streams resuming with initial_resource_versions, SotW streams
re-requesting with their last versions). Every `--sample-every`-th stream records when it got
each change. Measured:

  delivery      per change, t0 (server, just before the cache write) to each sampled stream's
                receipt of it (or of a newer generation), over the streams whose connection
                held its full config at t0; removals and additions separately; a change a
                connected stream never got counts as missed
  reconnect     drop (or first try) to full config, across refusals and backoffs
  gave up       connections the client cancelled while waiting (--give-up s without config)
  connected     per second, the share of streams whose connection holds its full config
  memory        server RSS with every stream synced, and again `--settle` s after the churn
                with the same streams connected (and, with --tracemalloc, where it grew)
  cpu           server process CPU during the churn; a py-spy profile of `--profile` s of it
  admin         /healthz and /api/v1/server latency, polled every 0.5 s throughout
  storm         (--storm N) N streams dropped at once: time until every one is back at full
                config, refusals, admin latency meanwhile

Results: bench/out/soak-*.json and a dated section appended to bench/RESULTS.md (with
--smoke, a temporary directory). The load clients share the machine with the server: their
CPU is reported next to the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime as dt
import json
import os
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench.push_bench import PY, KeepingProc, cpu_seconds_fine, pct, system_busy

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# A read token for the admin API, made per run and given to the server in its environment.
ADMIN_TOKEN = os.urandom(16).hex()


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def q(values: list[float]) -> dict:
    return {"n": len(values), "p50": round(pct(values, 50), 1), "p99": round(pct(values, 99), 1),
            "max": round(max(values), 1) if values else None}


class AdminProbe:
    """Polls /healthz and /api/v1/server every `interval` s; keeps (t, ms, ok) per path."""

    def __init__(self, port: int, interval: float = 0.5) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.interval = interval
        self.samples: dict[str, list[tuple[float, float, bool]]] = {"/healthz": [], "/api/v1/server": []}
        self.last_server: dict = {}
        self.task: asyncio.Task | None = None

    def _get(self, path: str) -> tuple[float, bool, bytes]:
        t = time.monotonic()
        request = urllib.request.Request(self.base + path,
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                body = r.read()
                ok = r.status == 200
        except Exception:
            body, ok = b"", False
        return (time.monotonic() - t) * 1000, ok, body

    async def run(self) -> None:
        while True:
            for path in self.samples:
                ms, ok, body = await asyncio.to_thread(self._get, path)
                self.samples[path].append((time.time(), ms, ok))
                if path == "/api/v1/server" and ok:
                    self.last_server = json.loads(body)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    def window(self, t0: float, t1: float) -> dict:
        out = {}
        for path, rows in self.samples.items():
            sel = [r for r in rows if t0 <= r[0] <= t1]
            out[path] = {**q([r[1] for r in sel]), "failed": sum(not r[2] for r in sel)}
        return out


def delivery(changes: list[list], reports: list[dict], bound_ms: float, t_end: int) -> dict:
    """Per change, each sampled connection that held its full config at t0: the time to its
    receipt of the change (or a newer generation of that assignment)."""
    conns = []  # (t_full, t_closed or inf, eds: name -> ([t], [gen]), cds: (name, sign) -> t)
    for rep in reports:
        sampled = set(rep["sampled"])
        eds: dict[tuple, dict] = defaultdict(lambda: defaultdict(lambda: ([], [])))
        cds: dict[tuple, dict] = defaultdict(dict)
        for sid, conn, kind, name, val, t in rep["receipts"]:
            if kind == "e":
                ts, gens = eds[(sid, conn)][name]
                ts.append(t)
                gens.append(val)
            else:
                cds[(sid, conn)].setdefault((name, val), t)
        for sid, conn, _want, _open, t_full, t_closed, _b, _how in rep["connections"]:
            if sid in sampled and t_full:
                conns.append((t_full, t_closed or float("inf"), eds.get((sid, conn), {}),
                              cds.get((sid, conn), {})))
    conns.sort(key=lambda c: c[0])
    starts = [c[0] for c in conns]
    out: dict[str, dict] = {}
    for kind in ("eds", "add", "remove"):
        lat: list[float] = []
        missed = interrupted = late = 0
        for _kind, name, gen, t0 in (c for c in changes if c[0] == kind):
            for _t_full, t_closed, eds, cds in conns[: bisect.bisect_left(starts, t0)]:
                if t_closed <= t0:
                    continue
                got = None
                if kind == "eds":
                    ts, gens = eds.get(name, ((), ()))
                    for t, g in zip(ts, gens, strict=True):
                        if g >= gen and t >= t0 - 5_000_000:
                            got = t
                            break
                else:
                    got = cds.get((name, 1 if kind == "add" else -1))
                if got is None:
                    if t_closed != float("inf"):
                        interrupted += 1
                    else:
                        missed += 1
                        lat.append((t_end - t0) / 1e6)
                    continue
                ms = max(0.0, (got - t0) / 1e6)
                lat.append(ms)
                late += ms > bound_ms
        out[kind] = {**q(lat), "missed": missed, "interrupted": interrupted,
                     f"over_{bound_ms / 1000:g}s": late,
                     "changes": sum(1 for c in changes if c[0] == kind)}
    return out


def reconnects(reports: list[dict], t0: int, t1: int) -> dict:
    """Drop (or first try) to full config, for connections that reached it in [t0, t1]."""
    lat, b_delta, b_sotw = [], [], []
    for rep in reports:
        for _sid, _conn, want, _open, t_full, _closed, nbytes, _how in rep["connections"]:
            if t_full and t0 <= t_full <= t1:
                lat.append((t_full - want) / 1e6)
                (b_delta if rep["mode"] == "delta" else b_sotw).append(nbytes)
    return {"ms": q(lat),
            "bytes_delta_mean": round(sum(b_delta) / len(b_delta)) if b_delta else None,
            "bytes_sotw_mean": round(sum(b_sotw) / len(b_sotw)) if b_sotw else None}


def connected(reports: list[dict], n: int, t0: int, t1: int) -> dict:
    """Per second (all clients' samples summed): the share of streams at full config."""
    by_sec: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for rep in reports:
        for t, _open, full, *_ in rep["samples"]:
            if t0 <= t <= t1:
                sec = (t - t0) // 1_000_000_000
                by_sec[sec][0] += full
                by_sec[sec][1] += 1
    k = len(reports)
    fr = [v[0] / n for v in by_sec.values() if v[1] == k]
    return {"min": round(min(fr), 3) if fr else None, "p50": round(pct(fr, 50), 3) if fr else None,
            "seconds": len(fr)}


async def wait_all_full(clients: list[KeepingProc], n: int, timeout: float) -> float | None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        for c in clients:
            c.send(cmd="stats")
        stats = await asyncio.gather(*(c.expect("stats", 30) for c in clients))
        if sum(s["full"] for s in stats) == n:
            return time.monotonic() - t
        await asyncio.sleep(0.25)
    return None


async def server_state(server: KeepingProc) -> dict:
    server.send(cmd="state")
    return await server.expect("state", 60)


async def run(args: argparse.Namespace, out_dir: Path) -> dict:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    argv = [PY, str(BENCH / "soak_server.py")] + [f"--setting={s}" for s in args.setting]
    if args.tracemalloc:
        argv.append(f"--tracemalloc={args.tracemalloc}")
    os.environ["XDS_SERVER_ADMIN_TOKENS"] = json.dumps(
        {"tokens": [{"name": "soak", "token": ADMIN_TOKEN, "role": "read"}]})
    server = await KeepingProc.start("server", argv)
    del os.environ["XDS_SERVER_ADMIN_TOKENS"]
    clients: list[KeepingProc] = []
    report: dict = {"args": vars(args), "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "loadavg_start": os.getloadavg()}
    probe = None
    try:
        ready = await server.expect("ready", 120)
        ps = psutil.Process(ready["pid"])
        port = ready["port"]
        probe = AdminProbe(ready["admin_port"])
        probe.start()
        await asyncio.sleep(1.0)
        report["rss_empty_mb"] = round(ps.memory_info().rss / 2**20, 1)

        plan = []  # (mode, streams) per client process
        for mode, n in (("delta", args.delta), ("sotw", args.sotw)):
            k = max(1, -(-n // args.streams_per_client)) if n else 0
            plan += [(mode, n // k + (1 if i < n % k else 0)) for i in range(k)]
        n_total = sum(s for _, s in plan)
        t_sync = time.monotonic()
        for i, (mode, size) in enumerate(plan):
            clients.append(await KeepingProc.start(f"client{i}-{mode}", [
                PY, str(BENCH / "loadclient.py"), f"--target=127.0.0.1:{port}", f"--streams={size}",
                f"--mode={mode}", f"--node-prefix=s{i}", f"--sync-timeout={args.sync_timeout}",
                "--resume", f"--give-up={args.give_up}", f"--sample-every={args.sample_every}",
                # Proxies do not take turns: every stream may be opening at once.
                f"--open-concurrency={size}"]))
        synced = await asyncio.gather(*(c.expect("synced", args.sync_timeout + 60) for c in clients))
        report["initial_sync"] = {
            "seconds": round(time.monotonic() - t_sync, 2),
            "synced": sum(s["synced"] for s in synced), "streams": n_total,
            "refusals": sum(s["refusals"] for s in synced)}
        log(f"initial sync: {report['initial_sync']}")
        await asyncio.sleep(args.settle)
        if args.tracemalloc:
            server.send(cmd="snapshot", label="synced")
            await server.expect("snapshotted", 300)
        st = await server_state(server)
        report["rss_synced_mb"] = round(st["rss"] / 2**20, 1)
        report["streams_synced_server"] = st["streams"]
        log(f"synced: RSS {report['rss_synced_mb']} MB, {st['streams']} streams on the server")

        # The churn ---------------------------------------------------------------------
        client_ps = [psutil.Process(c.proc.pid) for c in clients]
        cpu0 = cpu_seconds_fine(ps)
        ccpu0 = sum(cpu_seconds_fine(p) for p in client_ps)
        busy0 = system_busy()
        t_churn0_ns, w0 = time.time_ns(), time.monotonic()
        changes_file = out_dir / f"soak-changes-{stamp}.json"
        server.send(cmd="churn", eds_per_second=args.eds_per_second, cluster_every=args.cluster_every,
                    duration=args.duration, log=str(changes_file))
        for c, (_mode, size) in zip(clients, plan, strict=True):
            share = args.churn_per_second * size / n_total
            c.send(cmd="churn", per_second=share, group=max(1, round(share)), duration=args.duration)
        spy = None
        states = []
        if args.profile > 0:
            spy_out = out_dir / f"soak-py-spy-{stamp}.txt"
            await asyncio.sleep(min(args.duration / 3, 30))
            spy = await asyncio.create_subprocess_exec(
                str(Path(PY).with_name("py-spy")), "record", "--pid", str(ps.pid), "--rate", "100",
                "--format", "raw", "--nonblocking", "--duration", str(int(args.profile)),
                "--output", str(spy_out), stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL)
        while time.monotonic() - w0 < args.duration:
            await asyncio.sleep(min(10.0, max(0.1, args.duration - (time.monotonic() - w0))))
            s = await server_state(server)
            states.append({"t": round(time.monotonic() - w0, 1), "rss_mb": round(s["rss"] / 2**20, 1),
                           "streams": s["streams"], **s["overload"]})
            log(f"churn {states[-1]}")
        churned = await server.expect("churned", 120)
        t_churn1_ns, w1 = time.time_ns(), time.monotonic()
        for c in clients:
            await c.expect("churned", 60)
        report["churn"] = {
            "seconds": round(w1 - w0, 1), "changes": churned["changes"],
            "server_cpu_cores": round((cpu_seconds_fine(ps) - cpu0) / (w1 - w0), 2),
            "clients_cpu_cores": round((sum(cpu_seconds_fine(p) for p in client_ps) - ccpu0) / (w1 - w0), 2),
            "machine_busy_cores": round((system_busy() - busy0) / (w1 - w0), 2),
            "loadavg": os.getloadavg(), "server_states": states}
        all_full = await wait_all_full(clients, n_total, 120)
        report["after_churn_all_full_s"] = round(all_full, 2) if all_full is not None else None
        log(f"churn done: {report['churn']['server_cpu_cores']} cores server, "
            f"{report['churn']['clients_cpu_cores']} clients; all full {all_full} s after")
        if spy is not None:
            try:
                await asyncio.wait_for(spy.wait(), 60)
            except TimeoutError:
                spy.kill()
            summary = await asyncio.create_subprocess_exec(
                PY, str(BENCH / "spy_summary.py"), str(spy_out), "--top", "15",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
            report["profile"] = (await summary.communicate())[0].decode()

        # Memory after the churn, same streams --------------------------------------------
        await asyncio.sleep(args.settle)
        st = await server_state(server)
        report["rss_after_mb"] = round(st["rss"] / 2**20, 1)
        report["streams_after_server"] = st["streams"]
        report["server_stats"] = st["stats"]
        report["overload_after"] = st["overload"]
        if args.tracemalloc:
            server.send(cmd="snapshot", label="after")
            await server.expect("snapshotted", 300)
            mem_file = out_dir / f"soak-tracemalloc-{stamp}.txt"
            server.send(cmd="compare", a="synced", b="after", file=str(mem_file), top=20)
            await server.expect("compared", 300)
            report["tracemalloc"] = str(mem_file)
        log(f"RSS synced {report['rss_synced_mb']} MB, after churn {report['rss_after_mb']} MB")

        # A reconnect storm ----------------------------------------------------------------
        if args.storm:
            left = args.storm
            t_storm = time.time_ns()
            ws = time.time()
            dropping = []
            for c, (_mode, size) in zip(clients, plan, strict=True):
                take = min(size, left)
                left -= take
                if take:
                    c.send(cmd="drop", count=take)
                    dropping.append(c)
            await asyncio.gather(*(c.expect("dropped", 60) for c in dropping))
            back = await wait_all_full(clients, n_total, 300)
            we = time.time()
            after = (await server_state(server))["stats"]
            report["storm"] = {"streams": args.storm - left,
                               "all_back_s": round(back, 2) if back is not None else None,
                               "admin": probe.window(ws, we),
                               "refused": {k: after[k] - report["server_stats"][k]
                                           for k in ("refused_open_rate", "refused_initializing")}}
            log(f"storm: {report['storm']}")
        t_end = time.time_ns()

        reports = []
        for i, c in enumerate(clients):
            f = out_dir / f"soak-client{i}-{stamp}.json"
            c.send(cmd="report", file=str(f))
            await c.expect("reported", 120)
            reports.append(json.loads(f.read_text()))
            if not args.keep_raw:
                f.unlink()
        changes = json.loads(changes_file.read_text())
        if not args.keep_raw:
            changes_file.unlink()
        report["delivery_ms"] = delivery(changes, reports, args.bound * 1000, t_churn1_ns)
        report["reconnect_during_churn"] = reconnects(reports, t_churn0_ns, t_churn1_ns)
        report["connected_during_churn"] = connected(reports, n_total, t_churn0_ns, t_churn1_ns)
        if args.storm:
            report["storm"]["reconnect"] = reconnects(reports, t_storm, t_end)
        report["clients"] = {k: sum(r[k] for r in reports)
                             for k in ("regressions", "refusals", "gave_up", "failures", "drops")}
        report["admin_during_churn"] = probe.window(t_churn0_ns / 1e9, t_churn1_ns / 1e9)
        report["streams"] = {"delta": args.delta, "sotw": args.sotw, "client_processes": len(clients)}
        return report
    finally:
        if probe is not None and probe.task is not None:
            probe.task.cancel()
        await asyncio.gather(*(c.stop(30) for c in clients), return_exceptions=True)
        await server.stop(30)


def markdown(r: dict) -> str:
    a = r["args"]
    d = r["delivery_ms"]
    lines = [
        f"## {r['started']}: soak under churn (`bench/soak.py`, issue 15)", "",
        f"{r['streams']['delta']} delta + {r['streams']['sotw']} SotW streams in "
        f"{r['streams']['client_processes']} load-client processes, {a['duration']:g} s of churn: "
        f"{a['eds_per_second']:g} EDS changes/s, a cluster added or removed every "
        f"{a['cluster_every']:g} s, {a['churn_per_second']:g} streams/s dropping and reconnecting "
        f"(resume). Server: `bench/soak_server.py` (serve's composition, admission defaults"
        f"{', ' + ', '.join(a['setting']) if a['setting'] else ''}). Load average at start "
        f"{r['loadavg_start'][0]:.2f}, during churn {r['churn']['loadavg'][0]:.2f}; machine busy "
        f"{r['churn']['machine_busy_cores']} cores, of which server {r['churn']['server_cpu_cores']}"
        f" and load clients {r['churn']['clients_cpu_cores']}.", "",
        "| measure | value |", "|---|---|",
        f"| initial sync | {r['initial_sync']['synced']}/{r['initial_sync']['streams']} streams in "
        f"{r['initial_sync']['seconds']} s ({r['initial_sync']['refusals']} opens refused) |",
    ]
    for kind, label in (("eds", "EDS change"), ("add", "cluster added"), ("remove", "cluster removed")):
        v = d[kind]
        over = v[f"over_{a['bound']:g}s"]
        lines.append(f"| {label} -> sampled connected streams (ms) | p50 {v['p50']}, p99 {v['p99']}, "
                     f"max {v['max']}; {over} of {v['n']} over {a['bound']:g} s, "
                     f"{v['missed']} missed ({v['changes']} changes) |")
    rc = r["reconnect_during_churn"]
    lines += [
        f"| reconnect to full config during churn (ms) | p50 {rc['ms']['p50']}, p99 {rc['ms']['p99']}, "
        f"max {rc['ms']['max']} ({rc['ms']['n']}); bytes to full config: delta {rc['bytes_delta_mean']}, "
        f"SotW {rc['bytes_sotw_mean']} |",
        f"| cancelled by clients while waiting (> {a['give_up']:g} s) | {r['clients']['gave_up']} |",
        f"| opens refused (UNAVAILABLE) | {r['clients']['refusals']} |",
        f"| streams at full config during churn | min {r['connected_during_churn']['min']}, "
        f"p50 {r['connected_during_churn']['p50']} |",
        f"| all streams at full config after churn | {r['after_churn_all_full_s']} s |",
        f"| versions delivered after a newer one | {r['clients']['regressions']} |",
        f"| server RSS: empty / synced / {a['settle']:g} s after churn | {r['rss_empty_mb']} / "
        f"{r['rss_synced_mb']} / {r['rss_after_mb']} MB "
        f"({(r['rss_after_mb'] / r['rss_synced_mb'] - 1) * 100:+.1f} %) |",
        f"| NACKs | {r['server_stats'].get('nacks')} |",
    ]
    for path, v in r["admin_during_churn"].items():
        lines.append(f"| admin {path} during churn (ms) | p50 {v['p50']}, p99 {v['p99']}, max {v['max']}, "
                     f"{v['failed']} failed |")
    if "storm" in r:
        s = r["storm"]
        lines.append(f"| storm: {s['streams']} streams dropped at once | all back at full config in "
                     f"{s['all_back_s']} s; reconnect p50 {s['reconnect']['ms']['p50']}, p99 "
                     f"{s['reconnect']['ms']['p99']} ms; server refusals {s['refused']} |")
        for path, v in s["admin"].items():
            lines.append(f"| admin {path} during the storm (ms) | p50 {v['p50']}, p99 {v['p99']}, "
                         f"max {v['max']}, {v['failed']} failed |")
    if r.get("profile"):
        lines += ["", "Server CPU profile during the churn (py-spy, "
                  f"{a['profile']:g} s):", "", "```", r["profile"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delta", type=int, default=2000)
    ap.add_argument("--sotw", type=int, default=500)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--eds-per-second", type=float, default=10)
    ap.add_argument("--cluster-every", type=float, default=10)
    ap.add_argument("--churn-per-second", type=float, default=20)
    ap.add_argument("--give-up", type=float, default=30, help="a client cancels a connection without config after this")
    ap.add_argument("--sample-every", type=int, default=10)
    ap.add_argument("--streams-per-client", type=int, default=1000)
    ap.add_argument("--sync-timeout", type=float, default=300)
    ap.add_argument("--settle", type=float, default=20, help="quiet seconds before each RSS reading")
    ap.add_argument("--bound", type=float, default=3.0, help="delivery bound to count against, s")
    ap.add_argument("--storm", type=int, default=0, help="after the churn, drop this many streams at once")
    ap.add_argument("--profile", type=float, default=20, help="py-spy seconds during the churn (0: off)")
    ap.add_argument("--tracemalloc", type=int, default=0, help="frames: trace server allocations")
    ap.add_argument("--setting", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep-raw", action="store_true", help="keep the per-client and change files")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out-dir", default="")
    ap.add_argument("--results", default="")
    args = ap.parse_args()
    if args.smoke:
        args.delta, args.sotw, args.duration, args.settle = 30, 10, 8, 1
        args.cluster_every, args.churn_per_second, args.sample_every = 2, 4, 2
        args.profile, args.sync_timeout = 0, 60
    out_dir = Path(args.out_dir or (tempfile.mkdtemp(prefix="soak-") if args.smoke else BENCH / "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(run(args, out_dir))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"soak-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1))
    md = markdown(report)
    results = Path(args.results) if args.results else (out_dir / "RESULTS.md" if args.smoke else BENCH / "RESULTS.md")
    with results.open("a") as f:
        f.write("\n" + md)
    print(md, file=sys.stderr)
    print(json.dumps({"json": str(json_path), "markdown": str(results)}))


if __name__ == "__main__":
    main()
