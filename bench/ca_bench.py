"""CA benchmark: SVIDs issued per second on one core, and a rotation storm.

Part 1, issuance (in-process, one thread): `SvidIssuer.issue_for_identity` for ECDSA P-256
(the default) and RSA 2048, a distinct identity each time: key generation + leaf signing +
PEM encoding + the registry entry, what SDS pays per certificate. Reported: issuances per
second and µs per issuance (wall and CPU), the median of `--repeats` batches.

Part 2, the rotation storm (the real code path): `ca_server_proc.py` runs `XdsServer` with
`Security.build(--auth insecure-node-metadata)` attached and `Security.run` going, as
`xds-server serve` does; `sds_loadclient.py` processes open N SotW ADS streams, each its own
identity (node metadata over loopback), each subscribed to SDS `default` + `ROOTCA` and three
EDS names, ACKing everything. Once every stream has its certificate:

  baseline   `--rounds` EDS changes (one CLA every stream watches), no storm: t0 (just before
             the cache update) to the last stream's receipt
  storm      every identity's certificate falls due at once (the provider's own renewal
             schedule: `RenewalSchedule.mark_due()` + a wake-up, the path a signing-root change
             takes); t0 to the moment the last stream received its new `default`. Meanwhile,
             `--push-delay` s after t0, one EDS change: its t0 to the last stream's receipt.
             Repeated `--storms` times.

Results: bench/out/ca-*.json and a dated section of bench/RESULTS.md. `--smoke`: tiny sizes,
a temp dir.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from bench import mesh
from bench.publish import publish
from bench.push_bench import KeepingProc, Proc, cpu_seconds, fmt, machine, pct, wait_quiet

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PY = sys.executable


def log(msg: str) -> None:
    print(f"[ca_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# Part 1: issuance ---------------------------------------------------------------------------


def bench_issuance(algorithm: str, n: int, repeats: int) -> dict:
    from xds_server.ca.authority import CertificateAuthority
    from xds_server.model.identity import Identity
    from xds_server.ca.svid import SvidIssuer

    with tempfile.TemporaryDirectory(prefix="ca-bench-") as d:
        authority = CertificateAuthority(d)  # an EC P-256 root signs (the default CA)
        issuer = SvidIssuer(authority, key_algorithm=algorithm)
        for i in range(min(20, n)):  # warm-up
            issuer.issue_for_identity(Identity("warm", f"sa-{i}"))
        walls, cpus = [], []
        for r in range(repeats):
            ids = [Identity("bench", f"sa-{r}-{i}") for i in range(n)]
            w0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            for ident in ids:
                issued = issuer.issue_for_identity(ident, proxy="bench")
            walls.append((time.perf_counter_ns() - w0) / n / 1000)
            cpus.append((time.thread_time_ns() - c0) / n / 1000)
            assert issued.key_pem
    wall_us, cpu_us = statistics.median(walls), statistics.median(cpus)
    res = {
        "algorithm": algorithm, "n": n, "repeats": repeats,
        "wall_us": wall_us, "cpu_us": cpu_us, "per_second": 1e6 / wall_us,
        "wall_us_batches": walls,
    }
    log(f"issuance {algorithm}: {res['per_second']:.0f}/s, {wall_us:.1f} µs wall, {cpu_us:.1f} µs CPU")
    return res


# Part 2: the storm --------------------------------------------------------------------------


def last_ms(marks: list[dict], t0: int) -> float:
    return max((m["base_ns"] + max(m["recv_us"]) * 1000 - t0) / 1e6 for m in marks if m["recv_us"])


def all_ms(marks: list[dict], t0: int) -> list[float]:
    return [(m["base_ns"] + u * 1000 - t0) / 1e6 for m in marks for u in m["recv_us"]]


async def eds_round(server: Proc, clients: list[Proc], r: int, timeout: float) -> dict:
    name = mesh.service_name(0)
    for c in clients:
        c.send(cmd="mark", kind="eds", name=name, id=r, timeout=timeout)
    await asyncio.gather(*(c.expect("eds_armed", 30) for c in clients))
    server.send(cmd="push", round=r)
    pushed, *marks = await asyncio.gather(server.expect("pushed", 30),
                                          *(c.expect("eds_marked", timeout + 30) for c in clients))
    missing = sum(m["missing"] for m in marks)
    return {"round": r, "last_ms": last_ms(marks, pushed["t0_ns"]), "missing": missing,
            "p50_ms": pct(all_ms(marks, pushed["t0_ns"]), 50)}


async def run_storm(n: int, args: argparse.Namespace) -> dict:
    label = f"storm/N={n}"
    load_before = await wait_quiet(args, label) if args.quiet_wait > 0 else float("nan")
    server_log = Path(args.out_dir_path) / f"ca-server-N={n}.log"
    logf = server_log.open("wb")
    proc = await asyncio.create_subprocess_exec(
        PY, str(BENCH / "ca_server_proc.py"), f"--key-algorithm={args.storm_algorithm}",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=logf,
        cwd=str(ROOT), limit=1 << 26,
    )
    server = KeepingProc("ca-server", proc)
    clients: list[Proc] = []
    try:
        ready = await server.expect("ready", 60)
        ps = psutil.Process(ready["pid"])
        k = max(1, math.ceil(n / args.streams_per_client))
        sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
        t_sync = time.monotonic()
        for i, size in enumerate(sizes):
            clients.append(await KeepingProc.start(f"client{i}", [
                PY, str(BENCH / "sds_loadclient.py"), f"--target=127.0.0.1:{ready['port']}",
                f"--streams={size}", f"--node-prefix=s{i}", f"--sync-timeout={args.sync_timeout}",
            ]))
        synced = await asyncio.gather(*(c.expect("synced", args.sync_timeout + 60) for c in clients))
        sync_s = time.monotonic() - t_sync
        if not all(s["complete"] for s in synced):
            raise RuntimeError(f"{label}: not every stream synced: {synced}")
        failures = sum(s["failures"] for s in synced)
        server.send(cmd="sds_stats")
        st0 = await server.expect("sds_stats", 30)
        log(f"{label}: {n} streams synced in {sync_s:.1f}s, {st0['identities']} identities, "
            f"{st0['issued']} issued ({failures} stream failures)")
        await asyncio.sleep(args.idle)

        baseline = []
        for r in range(1, args.rounds + 1):
            baseline.append(await eds_round(server, clients, r, args.round_timeout))
            await asyncio.sleep(args.gap)
        log(f"{label}: baseline EDS last-receipt median "
            f"{statistics.median(b['last_ms'] for b in baseline):.1f} ms")

        storms = []
        rnd = args.rounds
        for s in range(1, args.storms + 1):
            await asyncio.sleep(args.idle)
            rnd += 1
            for c in clients:
                c.send(cmd="mark", kind="sds", id=s, timeout=args.storm_timeout)
            await asyncio.gather(*(c.expect("sds_armed", 30) for c in clients))
            cpu0, wall0 = cpu_seconds(ps), time.monotonic()
            server.send(cmd="storm")
            storm_ev = await server.expect("storm", 30)
            await asyncio.sleep(args.push_delay)
            eds = await eds_round(server, clients, rnd, args.round_timeout)
            sds_marks = await asyncio.gather(
                *(c.expect("sds_marked", args.storm_timeout + 30) for c in clients))
            cpu = cpu_seconds(ps) - cpu0
            wall = time.monotonic() - wall0
            t0 = storm_ev["t0_ns"]
            missing = sum(m["missing"] for m in sds_marks)
            got = all_ms(sds_marks, t0)
            row = {
                "storm": s, "identities": storm_ev["identities"], "missing": missing,
                "all_renewed_ms": last_ms(sds_marks, t0),
                "first_renewed_ms": min(got) if got else float("nan"),
                "renewed_p50_ms": pct(got, 50),
                "eds_push_delay_ms": args.push_delay * 1000,
                "eds_before_all_renewed": args.push_delay * 1000 < last_ms(sds_marks, t0),
                "eds_last_ms": eds["last_ms"], "eds_p50_ms": eds["p50_ms"], "eds_missing": eds["missing"],
                "server_cpu_s": cpu, "wall_s": wall,
            }
            storms.append(row)
            log(f"{label} storm {s}: all renewed in {row['all_renewed_ms']:.0f} ms "
                f"(missing {missing}); EDS change during it: last receipt {eds['last_ms']:.1f} ms")
            await asyncio.sleep(args.gap)
        server.send(cmd="sds_stats")
        st1 = await server.expect("sds_stats", 30)
        res = {
            "streams": n, "clients": k, "sync_seconds": sync_s, "stream_failures": failures,
            "identities": st0["identities"], "issued_at_sync": st0["issued"],
            "renewed": st1["renewed"], "issue_failures": st1["issue_failures"],
            "load_before_cores": load_before,
            "baseline": baseline,
            "baseline_last_ms": {"p50": pct([b["last_ms"] for b in baseline], 50),
                                 "max": max(b["last_ms"] for b in baseline)},
            "storms": storms,
            "all_renewed_ms": {"p50": pct([x["all_renewed_ms"] for x in storms], 50),
                               "max": max(x["all_renewed_ms"] for x in storms)},
            "eds_during_storm_ms": {"p50": pct([x["eds_last_ms"] for x in storms], 50),
                                    "max": max(x["eds_last_ms"] for x in storms)},
            "server_log": str(server_log),
        }
        return res
    finally:
        await asyncio.gather(*(c.stop() for c in clients), return_exceptions=True)
        await server.stop()
        logf.close()


# Report -------------------------------------------------------------------------------------


def markdown(report: dict) -> str:
    m, a = report["machine"], report["args"]
    out = [
        f"## CA: issuance and rotation storm, {report['date']}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB RAM, {m['os']}; "
        f"Python {m['python']}, grpcio {m['grpcio']}, protobuf {m['protobuf']}, "
        f"cryptography {report['cryptography']}. `bench/ca_bench.py`"
        + (" --smoke" if a.get("smoke") else "") + ".",
        "",
        "Issuance, one thread, in-process (`SvidIssuer.issue_for_identity`: key generation + "
        "signing by the EC P-256 root + PEM + registry entry; median of "
        f"{a['repeats']} batches):",
        "",
        "| key | N per batch | issuances/s | µs per issuance (wall) | µs CPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["issuance"]:
        out.append(f"| {r['algorithm']} | {r['n']} | {fmt(r['per_second'], '.0f')} "
                   f"| {fmt(r['wall_us'])} | {fmt(r['cpu_us'])} |")
    if report["storms"]:
        out += [
            "",
            f"Rotation storm: the real server (`Security` with `--auth insecure-node-metadata`, "
            f"{a['storm_algorithm']} workload keys), N SotW streams, one identity each, subscribed "
            f"to `default` + `ROOTCA` + 3 EDS names; every certificate falls due at once "
            f"(`RenewalSchedule.mark_due`). All renewed: storm t0 to the last stream's receipt of "
            f"its new `default`. EDS: one CLA every stream watches, changed {a['push_delay']} s "
            f"into the storm, t0 to the last stream's receipt; baseline: the same change without "
            f"a storm ({a['rounds']} rounds). {a['storms']} storms per N.",
            "",
            "| N | sync s | all renewed ms (p50 / max) | first renewed ms | renewal rate /s "
            "| server CPU per storm s | EDS during storm ms (p50 / max) | EDS baseline ms (p50 / max) "
            "| other load (cores) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in report["storms"]:
            first = statistics.median(x["first_renewed_ms"] for x in r["storms"])
            rate = r["streams"] / (r["all_renewed_ms"]["p50"] / 1000)
            cpu = statistics.median(x["server_cpu_s"] for x in r["storms"])
            out.append(
                f"| {r['streams']} | {fmt(r['sync_seconds'])} "
                f"| {fmt(r['all_renewed_ms']['p50'], '.0f')} / {fmt(r['all_renewed_ms']['max'], '.0f')} "
                f"| {fmt(first, '.0f')} | {fmt(rate, '.0f')} | {fmt(cpu, '.2f')} "
                f"| {fmt(r['eds_during_storm_ms']['p50'])} / {fmt(r['eds_during_storm_ms']['max'])} "
                f"| {fmt(r['baseline_last_ms']['p50'])} / {fmt(r['baseline_last_ms']['max'])} "
                f"| {fmt(r['load_before_cores'], '.2f')} |"
            )
    if report.get("errors"):
        out += ["", "Errors:", ""] + [f"- {e}" for e in report["errors"]]
    out.append("")
    return "\n".join(out) + "\n"


async def run_storms(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    results, errors = [], []
    for n in [int(x) for x in str(args.n).split(",") if x]:
        try:
            results.append(await run_storm(n, args))
        except Exception as e:  # keep going: one failed row must not lose the others
            msg = f"storm/N={n}: {type(e).__name__}: {e}"
            log("FAILED " + msg)
            errors.append(msg)
    return results, errors


def main() -> None:
    import importlib.metadata

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--issue-n", default="ec-p256=2000,rsa-2048=100",
                    help="issuance batches: ALGORITHM=N, comma-separated ('' skips part 1)")
    ap.add_argument("--repeats", type=int, default=5, help="issuance batches per algorithm")
    ap.add_argument("--n", default="1000,2000,5000", help="storm stream counts ('' skips part 2)")
    ap.add_argument("--storm-algorithm", default="ec-p256")
    ap.add_argument("--storms", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=10, help="baseline EDS changes")
    ap.add_argument("--push-delay", type=float, default=0.1, help="s after the storm starts")
    ap.add_argument("--streams-per-client", type=int, default=2500)
    ap.add_argument("--idle", type=float, default=1.0)
    ap.add_argument("--gap", type=float, default=0.2)
    ap.add_argument("--sync-timeout", type=float, default=300.0)
    ap.add_argument("--round-timeout", type=float, default=120.0)
    ap.add_argument("--storm-timeout", type=float, default=300.0)
    ap.add_argument("--quiet-below", type=float, default=0.2)
    ap.add_argument("--quiet-wait", type=float, default=60.0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, results in a temp dir")
    ap.add_argument("--out-dir", default="")
    ap.add_argument("--results", default="")
    args = ap.parse_args()
    if args.smoke:
        args.issue_n, args.repeats = "ec-p256=20,rsa-2048=2", 1
        args.n, args.storms, args.rounds = "20", 1, 2
        args.idle, args.gap, args.quiet_wait = 0.2, 0.0, 0.0
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="ca-bench-")) if args.smoke else BENCH / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir_path = str(out_dir)
    results_md = Path(args.results) if args.results else (
        out_dir / "RESULTS.md" if args.smoke else BENCH / "RESULTS.md")

    issuance = []
    for spec in [s for s in args.issue_n.split(",") if s]:
        alg, _, n = spec.partition("=")
        issuance.append(bench_issuance(alg, int(n), args.repeats))
    storms, errors = asyncio.run(run_storms(args)) if args.n else ([], [])
    report = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "cryptography": importlib.metadata.version("cryptography"),
        "args": {k: v for k, v in vars(args).items() if k != "out_dir_path"},
        "issuance": issuance,
        "storms": storms,
        "errors": errors,
    }
    publish(report, "ca", out_dir, results_md, markdown(report))


if __name__ == "__main__":
    main()
