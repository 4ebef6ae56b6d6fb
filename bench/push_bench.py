"""Push benchmark: the real xds-server against the floor (a bare grpc.aio server).

For every (mode, N, server) it starts the server in its own process (`server_proc.py` for
ours, `floor_server.py` for the floor), N simulated Envoys in load-client processes
(`loadclient.py`), each subscribed to the whole benchmark mesh (100 clusters + 100 CLAs, see
`mesh.py`), then runs push rounds: arm the clients for the next change, tell the server to
change one CLA (it stamps t0 = time.time_ns() just before the change), and wait until every
stream has received and ACKed it. Measured per configuration:

  latency      t0 -> the last stream's ACK send time, per round (p50 / p99 over rounds); also
               every stream's own t0 -> ACK time, pooled over the rounds
  cpu/push     server process CPU (user+sys, psutil) from just before the push to a short
               settle after the last ACK (so the ACK reads count), minus the idle rate
  rss/stream   (server RSS with N synced streams - RSS with 0 streams) / N

Ours runs before the floor for each (mode, N), and the floor then pushes the same resources
ours did (if ours sends every CLA on a SotW EDS change, the floor does too).

Results: a JSON file under bench/out/ and a dated section appended to bench/RESULTS.md.
`--smoke` runs tiny N and one round and writes to a temporary directory (or --out-dir).
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any
import asyncio
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench import mesh

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable


def log(msg: str) -> None:
    print(f"[push_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Subprocesses speaking JSON lines -----------------------------------------------------------


class Proc:
    """A bench child process speaking the control protocol (bench/control.py). An event that
    arrives while another is awaited is logged and dropped, unless the class keeps it."""

    keeps_other_events = False

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.stash: list[dict] = []

    @classmethod
    async def start(cls, name: str, argv: list[str]) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # inherited: diagnostics show up in the harness's stderr
            cwd=str(ROOT),
            limit=1 << 26,
        )
        return cls(name, proc)

    def send(self, **cmd: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())

    async def expect(self, event: str, timeout: float) -> dict:
        for i, msg in enumerate(self.stash):
            if msg.get("event") == event:
                return self.stash.pop(i)
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {event!r} event within {timeout}s")
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), left)
            except TimeoutError:
                raise TimeoutError(f"{self.name}: no {event!r} event within {timeout}s") from None
            if not line:
                rc = await self.proc.wait()
                raise RuntimeError(f"{self.name} exited (rc={rc}) while waiting for {event!r}")
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                log(f"{self.name}: stray output {line[:200]!r}")
                continue
            if msg.get("event") == event:
                return msg
            if self.keeps_other_events:
                self.stash.append(msg)
            else:
                log(f"{self.name}: ignoring {str(msg)[:200]}")

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc.returncode is not None:
            return
        try:
            self.send(cmd="quit")
            await self.proc.stdin.drain()  # type: ignore[union-attr]
            self.proc.stdin.close()  # type: ignore[union-attr]
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            log(f"{self.name}: did not quit in {timeout}s, killing pid {self.proc.pid}")
            self.proc.kill()
            await self.proc.wait()


class KeepingProc(Proc):
    """A Proc whose events are never lost: one that arrives while another is awaited (a
    storm's marker racing a round's, the soak server's "churned" racing a "state" answer) is
    kept for the `expect` that wants it (one reader at a time)."""

    keeps_other_events = True


# Statistics ---------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    """Percentile with linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class ProcGroup:
    """`--workers N`: the server's worker processes, read as one (CPU and RSS summed)."""

    def __init__(self, pids: list[int]) -> None:
        self.members = [psutil.Process(pid) for pid in pids]
        self.pid = pids[0]

    def memory_info(self) -> Any:
        return SimpleNamespace(rss=sum(p.memory_info().rss for p in self.members))

    def cpu_times(self) -> Any:
        times = [p.cpu_times() for p in self.members]
        return SimpleNamespace(user=sum(t.user for t in times), system=sum(t.system for t in times))


def cpu_seconds(p: Any) -> float:
    """Process CPU (user + sys) in clock ticks (10 ms): coarse, but counts exited threads."""
    t = p.cpu_times()
    return t.user + t.system


ME = psutil.Process()


def system_busy() -> float:
    """Machine-wide busy CPU seconds (all cores)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def cpu_seconds_fine(p: Any) -> float:
    """Process CPU in ns resolution: the sum of every live thread's schedstat run time."""
    if isinstance(p, ProcGroup):
        return sum(cpu_seconds_fine(member) for member in p.members)
    total = 0
    try:
        for task in os.scandir(f"/proc/{p.pid}/task"):
            try:
                with open(f"{task.path}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return cpu_seconds(p)
    return total / 1e9 if total else cpu_seconds(p)


# One configuration --------------------------------------------------------------------------


async def wait_quiet(args: argparse.Namespace, label: str) -> float:
    """Wait (up to --quiet-wait s) until the machine is idle: other processes' CPU below
    --quiet-below cores. Returns the last load seen (in cores)."""
    deadline = time.monotonic() + args.quiet_wait
    warned = False
    while True:
        b0, w0 = system_busy(), time.monotonic()
        await asyncio.sleep(1.0)
        load = (system_busy() - b0) / (time.monotonic() - w0)
        if load <= args.quiet_below or time.monotonic() >= deadline:
            if load > args.quiet_below:
                log(f"{label}: machine still busy ({load:.2f} cores), measuring anyway")
            return load
        if not warned:
            log(f"{label}: machine busy ({load:.2f} cores used by others), waiting")
            warned = True


async def run_config(
    kind: str, mode: str, n: int, args: argparse.Namespace, floor_full: bool = False
) -> dict:
    label = f"{kind}/{mode}/N={n}"
    load_before = await wait_quiet(args, label) if args.quiet_wait > 0 else float("nan")
    if kind == "ours":
        argv = [PY, str(BENCH / "server_proc.py"), f"--workers={args.workers}"] + [
            f"--setting={s}" for s in args.setting]
    else:
        argv = [PY, str(BENCH / "floor_server.py")] + (["--sotw-eds-full"] if floor_full else [])
    server = await Proc.start(f"{kind}-server", argv)
    clients: list[Proc] = []
    try:
        ready = await server.expect("ready", 60)
        ps: Any = ProcGroup(ready.get("pids") or [ready["pid"]])
        port = ready["port"]
        await asyncio.sleep(args.idle)
        rss0 = ps.memory_info().rss

        k = max(1, math.ceil(n / args.streams_per_client))
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
        t_sync = time.monotonic()
        for i, size in enumerate(sizes):
            cargv = [
                PY,
                str(BENCH / "loadclient.py"),
                f"--target=127.0.0.1:{port}",
                f"--streams={size}",
                f"--mode={mode}",
                f"--node-prefix=c{i}",
                f"--sync-timeout={args.sync_timeout}",
            ]
            if args.channels:
                cargv.append(f"--channels={args.channels}")
            clients.append(await Proc.start(f"client{i}", cargv))
        synced = await asyncio.gather(*(c.expect("synced", args.sync_timeout + 60) for c in clients))
        sync_seconds = time.monotonic() - t_sync
        complete = all(s["complete"] for s in synced)
        if not complete:
            raise RuntimeError(f"{label}: not every stream synced: {synced}")
        failures = sum(s["failures"] for s in synced)
        log(f"{label}: {n} streams synced in {sync_seconds:.2f}s ({failures} stream failures)")

        await asyncio.sleep(args.idle)
        rss_n = ps.memory_info().rss
        if args.gc_freeze:
            server.send(cmd="gc_freeze")
            await server.expect("gc_frozen", 60)
        c0, w0 = cpu_seconds_fine(ps), time.monotonic()
        await asyncio.sleep(args.idle)
        idle_rate = max(0.0, (cpu_seconds_fine(ps) - c0) / (time.monotonic() - w0))

        rounds = []
        total = args.warmup + args.rounds
        window_cpu0 = window_wall0 = 0.0
        client_ps = [psutil.Process(c.proc.pid) for c in clients]
        spy = None
        for r in range(1, total + 1):
            if r == args.warmup + 1:
                if args.py_spy and kind in args.py_spy.split(","):
                    spy = await start_py_spy(ps.pid, label, args)
                window_cpu0, window_wall0 = cpu_seconds(ps), time.monotonic()
                client_cpu0 = sum(cpu_seconds(p) for p in client_ps)
                busy0, own0 = system_busy(), cpu_seconds(ME)
            _, name = mesh.push_target(r)
            for c in clients:
                c.send(cmd="mark", name=name, id=r, timeout=args.round_timeout)
            await asyncio.gather(*(c.expect("armed", 30) for c in clients))
            cpu_before, wall_before = cpu_seconds_fine(ps), time.monotonic()
            server.send(cmd="push", round=r)
            pushed, *marks = await asyncio.gather(
                server.expect("pushed", 30),
                *(c.expect("marked", args.round_timeout + 30) for c in clients),
            )
            await asyncio.sleep(args.settle)  # let the server read the last ACKs
            cpu_push = (
                cpu_seconds_fine(ps) - cpu_before - idle_rate * (time.monotonic() - wall_before)
            )
            missing = sum(m["missing"] for m in marks)
            if missing:
                raise RuntimeError(f"{label} round {r}: {missing} streams never ACKed the change")
            t0 = pushed["t0_ns"]
            acks = [(m["base_ns"] + a * 1000 - t0) / 1e6 for m in marks for a in m["ack_us"]]
            recvs = [(m["base_ns"] + a * 1000 - t0) / 1e6 for m in marks for a in m["recv_us"]]
            got = sum(m["got"] for m in marks)
            rd = {
                "round": r,
                "warmup": r <= args.warmup,
                "last_ack_ms": max(acks),
                "first_recv_ms": min(recvs),
                "stream_ack_p50_ms": pct(acks, 50),
                "cpu_ms": cpu_push * 1000,
                "acked": got,
                "mean_bytes": sum(m["mean_bytes"] * m["got"] for m in marks) / got,
                "mean_resources": sum(m["mean_resources"] * m["got"] for m in marks) / got,
                "_acks": acks,
            }
            rounds.append(rd)
            await asyncio.sleep(args.gap)

        # Headline CPU: per round, from every live thread's schedstat (ns resolution). Cross
        # check: the whole measured window by psutil (10 ms ticks, but it also counts threads
        # that exited), minus the idle rate, per round.
        window_cpu = (
            cpu_seconds(ps) - window_cpu0 - idle_rate * (time.monotonic() - window_wall0)
        ) / max(1, args.rounds)
        client_cpu = (sum(cpu_seconds(p) for p in client_ps) - client_cpu0) / max(1, args.rounds)
        # CPU used by anything else on the machine during the measured rounds (other test
        # runs sharing the cores make the numbers worse): in cores, averaged over the window.
        wall = time.monotonic() - window_wall0
        foreign = (
            system_busy() - busy0
            - (cpu_seconds(ps) - window_cpu0)
            - client_cpu * max(1, args.rounds)
            - (cpu_seconds(ME) - own0)
        ) / wall
        if spy is not None:
            await stop_py_spy(spy)
        measured = [rd for rd in rounds if not rd["warmup"]]
        last = [rd["last_ack_ms"] for rd in measured]
        pooled = [a for rd in measured for a in rd["_acks"]]
        cpu = [rd["cpu_ms"] for rd in measured]
        for rd in rounds:
            del rd["_acks"]
        res = {
            "server": kind if kind == "floor" or args.workers == 1 else f"ours/{args.workers} workers",
            "mode": mode,
            "streams": n,
            "clients": k,
            "floor_sotw_eds_full": floor_full if kind == "floor" else None,
            "sync_seconds": sync_seconds,
            "stream_failures": failures,
            "all_acked": all(rd["acked"] == n for rd in rounds),
            "rounds_measured": len(measured),
            "latency_last_ack_ms": {
                "p50": pct(last, 50),
                "p99": pct(last, 99),
                "max": max(last),
                "mean": statistics.fmean(last),
            },
            "latency_per_stream_ms": {"p50": pct(pooled, 50), "p99": pct(pooled, 99)},
            "cpu_per_push_ms": {
                "mean": statistics.fmean(cpu),
                "p50": pct(cpu, 50),
                "window_mean": window_cpu * 1000,
            },
            "cpu_per_stream_us": statistics.fmean(cpu) * 1000 / n,
            "client_cpu_per_push_ms": client_cpu * 1000,
            "foreign_cpu_cores": max(0.0, foreign),
            "load_before_cores": load_before,
            "idle_cpu_rate": idle_rate,
            "rss0_mb": rss0 / 2**20,
            "rss_n_mb": rss_n / 2**20,
            "rss_per_stream_kb": (rss_n - rss0) / n / 1024,
            "push_mean_bytes": statistics.fmean(rd["mean_bytes"] for rd in measured),
            "push_mean_resources": statistics.fmean(rd["mean_resources"] for rd in measured),
            "rounds": rounds,
        }
        log(
            f"{label}: last-ACK p50 {res['latency_last_ack_ms']['p50']:.1f} ms "
            f"p99 {res['latency_last_ack_ms']['p99']:.1f} ms, cpu/push "
            f"{res['cpu_per_push_ms']['mean']:.1f} ms, rss/stream {res['rss_per_stream_kb']:.1f} KB"
        )
        return res
    finally:
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        await server.stop()


async def start_py_spy(pid: int, label: str, args: argparse.Namespace):
    """Sample the server with py-spy during the measured rounds (it costs CPU: profile runs
    are for finding where time goes, not for the numbers)."""
    exe = Path(PY).with_name("py-spy")
    out = Path(args.out_dir_path) / ("py-spy-" + label.replace("/", "-") + ".txt")
    proc = await asyncio.create_subprocess_exec(
        str(exe), "record", "--pid", str(pid), "--rate", "250", "--format", "raw", *(["--native"] if args.py_spy_native else []),
        "--output", str(out), *([] if args.py_spy_native else ["--nonblocking"]),
        stdout=asyncio.subprocess.DEVNULL, stderr=None,
    )
    await asyncio.sleep(0.5)  # attach before the first measured push
    log(f"py-spy recording {label} -> {out}")
    return proc


async def stop_py_spy(proc) -> None:
    import signal

    if proc.returncode is None:
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()


# The whole run ------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float | None:
    if b is None or a is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def compare(ours: dict, floor: dict) -> dict:
    return {
        "latency_last_ack_p50": ratio(ours["latency_last_ack_ms"]["p50"], floor["latency_last_ack_ms"]["p50"]),
        "latency_last_ack_p99": ratio(ours["latency_last_ack_ms"]["p99"], floor["latency_last_ack_ms"]["p99"]),
        "latency_per_stream_p99": ratio(
            ours["latency_per_stream_ms"]["p99"], floor["latency_per_stream_ms"]["p99"]
        ),
        "cpu_per_push": ratio(ours["cpu_per_push_ms"]["mean"], floor["cpu_per_push_ms"]["mean"]),
        "rss_per_stream": ratio(ours["rss_per_stream_kb"], floor["rss_per_stream_kb"]),
    }


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "xds-protos": version("xds-protos"),
    }


def ours_available() -> bool:
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.util.find_spec("xds_server.xds.server") is not None
    except ModuleNotFoundError:
        return False


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown(report: dict) -> str:
    m = report["machine"]
    a = report["args"]
    out = [
        f"## {report['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']}; "
        f"Python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"xds-protos {m['xds-protos']}.",
        f"Mesh: {mesh.DEFAULT_SERVICES} clusters + {mesh.DEFAULT_SERVICES} CLAs "
        f"({mesh.ENDPOINTS_PER_SERVICE} endpoints each), every stream subscribed to all; a push "
        f"changes one CLA. Debounce off. {a['rounds']} measured rounds (+{a['warmup']} warm-up) "
        f"per row; up to {a['streams_per_client']} streams per load-client process.",
        "",
        "| mode | N | server | last-ACK p50 ms | last-ACK p99 ms | per-stream p99 ms "
        "| CPU/push ms | CPU/stream µs | RSS/stream KB | sync s | push bytes (res) | client CPU/push ms "
        "| other load (cores) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        out.append(
            f"| {r['mode']} | {r['streams']} | {r['server']} "
            f"| {fmt(r['latency_last_ack_ms']['p50'])} | {fmt(r['latency_last_ack_ms']['p99'])} "
            f"| {fmt(r['latency_per_stream_ms']['p99'])} | {fmt(r['cpu_per_push_ms']['mean'])} "
            f"| {fmt(r['cpu_per_stream_us'])} | {fmt(r['rss_per_stream_kb'])} "
            f"| {fmt(r['sync_seconds'], '.2f')} "
            f"| {fmt(r['push_mean_bytes'], '.0f')} ({fmt(r['push_mean_resources'], '.0f')}) "
            f"| {fmt(r['client_cpu_per_push_ms'])} | {fmt(r['foreign_cpu_cores'], '.2f')} |"
        )
    if report["ratios"]:
        out += [
            "",
            "Ours / floor:",
            "",
            "| mode | N | last-ACK p50 | last-ACK p99 | per-stream p99 | CPU/push | RSS/stream |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for x in report["ratios"]:
            r = x["ratios"]
            out.append(
                f"| {x['mode']} | {x['streams']} | {fmt(r['latency_last_ack_p50'], '.2f')} "
                f"| {fmt(r['latency_last_ack_p99'], '.2f')} | {fmt(r['latency_per_stream_p99'], '.2f')} "
                f"| {fmt(r['cpu_per_push'], '.2f')} | {fmt(r['rss_per_stream'], '.2f')} |"
            )
    if report.get("errors"):
        out += ["", "Errors:", ""] + [f"- {e}" for e in report["errors"]]
    out.append("")
    return "\n".join(out) + "\n"


async def run(args: argparse.Namespace) -> dict:
    servers = [s for s in args.servers.split(",") if s]
    if "ours" in servers and not ours_available():
        if args.require_ours:
            raise SystemExit("xds_server.xds.server is not importable; cannot bench ours")
        log("xds_server.xds.server does not exist yet: running the floor only")
        servers = [s for s in servers if s != "ours"]
    results: list[dict] = []
    ratios: list[dict] = []
    errors: list[str] = []
    for mode in args.modes.split(","):
        for n in [int(x) for x in str(args.n).split(",")]:
            got: dict[str, dict] = {}
            for kind in ("ours", "floor"):
                if kind not in servers:
                    continue
                floor_full = False
                if kind == "floor" and mode == "sotw" and "ours" in got:
                    floor_full = got["ours"]["push_mean_resources"] > 1.5
                try:
                    got[kind] = await run_config(kind, mode, n, args, floor_full)
                    results.append(got[kind])
                except Exception as e:  # keep going: one failed row must not lose the others
                    msg = f"{kind}/{mode}/N={n}: {type(e).__name__}: {e}"
                    log("FAILED " + msg)
                    errors.append(msg)
            if "ours" in got and "floor" in got:
                ratios.append({"mode": mode, "streams": n, "ratios": compare(got["ours"], got["floor"])})
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "args": {
            k: v for k, v in vars(args).items() if k in ("n", "modes", "servers", "rounds", "warmup", "streams_per_client", "gc_freeze", "setting")
        },
        "results": results,
        "ratios": ratios,
        "errors": errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="100,1000,5000", help="stream counts, comma-separated")
    ap.add_argument("--modes", default="sotw,delta")
    ap.add_argument("--servers", default="ours,floor")
    ap.add_argument("--rounds", type=int, default=20, help="measured push rounds per row")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--streams-per-client", type=int, default=2500)
    ap.add_argument("--channels", type=int, default=0, help="per client (default: 1 per 250 streams)")
    ap.add_argument("--idle", type=float, default=1.0, help="seconds to settle before RSS/idle-CPU reads")
    ap.add_argument("--settle", type=float, default=0.2, help="seconds after the last ACK before CPU read")
    ap.add_argument("--gap", type=float, default=0.1, help="seconds between rounds")
    ap.add_argument("--sync-timeout", type=float, default=180.0)
    ap.add_argument("--round-timeout", type=float, default=60.0)
    ap.add_argument("--setting", action="append", default=[], help="ServerSettings KEY=VALUE for ours")
    ap.add_argument("--workers", type=int, default=1,
                    help="ours as N processes on one port (SO_REUSEPORT), as `serve --workers N`")
    ap.add_argument("--py-spy", default="", help="profile these servers (ours,floor) into out-dir")
    ap.add_argument("--py-spy-native", action="store_true", help="py-spy --native (C/Cython frames)")
    ap.add_argument(
        "--gc-freeze",
        action="store_true",
        help="experiment: gc.freeze() in the server after the streams synced (both servers)",
    )
    ap.add_argument("--quiet-below", type=float, default=0.2, help="idle means others use < this many cores")
    ap.add_argument("--quiet-wait", type=float, default=120.0, help="longest wait for idle per row (0: don't)")
    ap.add_argument("--require-ours", action="store_true", help="fail if the real server is missing")
    ap.add_argument("--smoke", action="store_true", help="N=20, one round, results in a temp dir")
    ap.add_argument("--out-dir", default="", help="default bench/out (smoke: a temp dir)")
    ap.add_argument("--results", default="", help="markdown to append to (default bench/RESULTS.md; smoke: out-dir)")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.rounds, args.warmup = "20", 1, 0
        args.idle, args.settle, args.gap = 0.3, 0.05, 0.0
        args.quiet_wait = 0.0
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="push-bench-")) if args.smoke else BENCH / "out"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir_path = str(out_dir)
    results_md = Path(args.results) if args.results else (
        out_dir / "RESULTS.md" if args.smoke else BENCH / "RESULTS.md"
    )

    report = asyncio.run(run(args))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"push-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    md = markdown(report)
    if not results_md.exists():
        results_md.write_text("# Push benchmark results\n\nAppended by `bench/push_bench.py`.\n\n")
    with results_md.open("a") as f:
        f.write(md)
    print(md)
    print(json.dumps({"json": str(json_path), "markdown": str(results_md), "errors": len(report["errors"])}))
    if report["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
