"""The Kubernetes source at scale: initial sync, then sustained EndpointSlice churn.

  1. The fake API server (tests/support/fake_apiserver.py) is filled with `--services`
     Services, one EndpointSlice of `--endpoints` endpoints each, then the real
     `xds-server serve --kubeconfig ... --auth none --debounce-quiet 0.1` starts as a
     subprocess: time from exec to gRPC health SERVING (it serves only once synced), and the
     server's peak RSS (psutil, sampled every 50 ms) over the whole run.
  2. `--proxies` simulated proxies (bench/loadclient.py, delta ADS: CDS wildcard, EDS for
     every cluster) sync; then for `--duration` s a thread updates `--rate` EndpointSlices per
     second at the API while the harness samples push latency: it arms a loadclient mark on one
     slice's CLA (a slice the background churn never touches), stamps t0 = time.time_ns() and
     updates that slice at the API; latency = ACK send time at each proxy - t0 (update at the
     API -> watch -> store -> translation -> debounce -> push -> ACK). p50/p99 pooled over
     every proxy of every sample.

    .venv/bin/python bench/kube_bench.py                # 10,000 services, 60 s
    .venv/bin/python bench/kube_bench.py --smoke        # tiny, a few seconds, no RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.push_bench import Proc, machine, pct
from tests.support.fake_apiserver import FakeApiServer
from tests.support.net import free_port

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NAMESPACES = 10
LEASE_NAMESPACE = "xds-system"


def log(msg: str) -> None:
    print(f"[kube_bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ns_of(i: int) -> str:
    return f"ns-{i % NAMESPACES}"


def service(i: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": f"svc-{i}", "namespace": ns_of(i)},
            "spec": {"clusterIP": f"10.{96 + i // 65536}.{(i // 256) % 256}.{i % 256}",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}


def endpoint_slice(i: int, endpoints: int, generation: int = 0) -> dict:
    base = (i * endpoints + generation) % (1 << 20)
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"svc-{i}-1", "namespace": ns_of(i),
                     "labels": {"kubernetes.io/service-name": f"svc-{i}"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [f"10.{(base + k) >> 16 & 255}.{(base + k) >> 8 & 255}.{(base + k) & 255}"],
             "conditions": {"ready": True}}
            for k in range(endpoints)
        ],
    }


def cla_name(i: int) -> str:
    return f"outbound|80||svc-{i}.{ns_of(i)}.svc.cluster.local"


async def wait_serving(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                r = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.02)
    raise TimeoutError(f"server not SERVING within {timeout}s")


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.last = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.last = self.proc.memory_info().rss
                self.peak = max(self.peak, self.last)
            except psutil.Error:
                return
            self._stop.wait(0.05)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def churn(fake: FakeApiServer, args: argparse.Namespace, stop: threading.Event,
          counter: list[int]) -> None:
    """`args.rate` EndpointSlice updates per second, over slices 1.. (slice 0 is the probe's)."""
    interval = 1.0 / args.rate
    nxt = time.monotonic()
    n = 0
    while not stop.is_set():
        i = 1 + n % max(1, args.services - 1)
        fake.update(endpoint_slice(i, args.endpoints, generation=n + 1))
        n += 1
        counter[0] = n
        nxt += interval
        delay = nxt - time.monotonic()
        if delay > 0:
            stop.wait(delay)


async def run(args: argparse.Namespace) -> dict:
    report: dict = {"services": args.services, "endpoints_per_slice": args.endpoints,
                    "proxies": args.proxies, "rate": args.rate, "duration": args.duration}
    with FakeApiServer(bookmark_interval=5.0) as fake, tempfile.TemporaryDirectory() as tmp:
        fake.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": LEASE_NAMESPACE}})
        for n in range(NAMESPACES):
            fake.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"ns-{n}"}})
        t = time.monotonic()
        for i in range(args.services):
            fake.create(service(i))
            fake.create(endpoint_slice(i, args.endpoints))
        report["fill_seconds"] = round(time.monotonic() - t, 2)
        log(f"fake filled: {args.services} services + slices in {report['fill_seconds']} s")

        kubeconfig = fake.kubeconfig(Path(tmp) / "kubeconfig", user="bench")
        port = free_port()
        t0 = time.monotonic()
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xds_server.cli", "--log-level", "warning", "serve",
            "--xds-address", f"127.0.0.1:{port}", "--auth", "none",
            "--kubeconfig", str(kubeconfig), "--debounce-quiet", "0.1",
            cwd=str(ROOT), env={**os.environ, "POD_NAMESPACE": LEASE_NAMESPACE},
        )
        rss = RssSampler(server.pid).start()
        clients: list[Proc] = []
        stop = threading.Event()
        churner: threading.Thread | None = None
        try:
            await wait_serving(port, args.ready_timeout)
            report["ready_seconds"] = round(time.monotonic() - t0, 2)
            report["rss_ready_mb"] = round(rss.last / 2**20, 1)
            log(f"server SERVING after {report['ready_seconds']} s, RSS {report['rss_ready_mb']} MB")

            per_client = max(1, args.proxies // args.clients)
            t = time.monotonic()
            for c in range(args.clients):
                clients.append(await Proc.start(f"client-{c}", [
                    sys.executable, str(BENCH / "loadclient.py"), "--target", f"127.0.0.1:{port}",
                    "--streams", str(per_client), "--mode", "delta",
                    "--sync-timeout", str(args.ready_timeout), "--node-prefix", f"kb{c}",
                ]))
            synced = await asyncio.gather(*(c.expect("synced", args.ready_timeout + 30)
                                            for c in clients))
            report["proxies_synced"] = sum(s["synced"] for s in synced)
            report["proxy_sync_seconds"] = round(time.monotonic() - t, 2)
            log(f"{report['proxies_synced']} proxies synced in {report['proxy_sync_seconds']} s")

            counter = [0]
            churner = threading.Thread(target=churn, args=(fake, args, stop, counter), daemon=True)
            started = time.monotonic()
            churner.start()
            latencies_ms: list[float] = []
            samples = missing = 0
            gen = 1_000_000
            while time.monotonic() - started < args.duration:
                gen += 1
                mark = f"m{gen}"
                for c in clients:
                    c.send(cmd="mark", name=cla_name(0), id=gen, timeout=args.mark_timeout)
                    await c.proc.stdin.drain()  # type: ignore[union-attr]
                await asyncio.gather(*(c.expect("armed", 10) for c in clients))
                t_update = time.time_ns()
                await asyncio.to_thread(fake.update, endpoint_slice(0, args.endpoints, gen))
                marks = await asyncio.gather(*(c.expect("marked", args.mark_timeout + 10)
                                               for c in clients))
                samples += 1
                for m in marks:
                    missing += m["missing"]
                    latencies_ms += [(m["base_ns"] + a * 1000 - t_update) / 1e6
                                     for a in m["ack_us"]]
                del mark
            stop.set()
            churner.join(10)
            elapsed = time.monotonic() - started
            report.update(
                updates=counter[0] + samples,
                update_rate=round((counter[0] + samples) / elapsed, 1),
                samples=samples, missing_acks=missing,
                push_p50_ms=round(pct(latencies_ms, 50), 1) if latencies_ms else None,
                push_p99_ms=round(pct(latencies_ms, 99), 1) if latencies_ms else None,
                push_max_ms=round(max(latencies_ms), 1) if latencies_ms else None,
                rss_end_mb=round(rss.last / 2**20, 1),
            )
        finally:
            stop.set()
            if churner is not None:
                churner.join(10)
            for c in clients:
                await c.stop()
            rss.stop()
            report["rss_peak_mb"] = round(rss.peak / 2**20, 1)
            if server.returncode is None:
                server.terminate()
                try:
                    await asyncio.wait_for(server.wait(), 15)
                except TimeoutError:
                    server.kill()
                    await server.wait()
    log(json.dumps(report))
    return report


def markdown(report: dict, mach: dict) -> str:
    r = report
    return "\n".join([
        f"## Kubernetes source at scale — {dt.date.today().isoformat()}",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gb']} GB, {mach['os']}, "
        f"Python {mach['python']}, grpcio {mach['grpcio']}. `bench/kube_bench.py "
        f"--services {r['services']} --endpoints {r['endpoints_per_slice']} --proxies "
        f"{r['proxies']} --rate {r['rate']} --duration {r['duration']}`: fake API server "
        "(tests/support/fake_apiserver.py, in the bench process) + real `xds-server serve "
        "--kubeconfig --auth none --debounce-quiet 0.1` subprocess + delta load clients.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Services / EndpointSlices / endpoints | {r['services']} / {r['services']} / "
        f"{r['services'] * r['endpoints_per_slice']} |",
        f"| filling the fake (not the server) | {r.get('fill_seconds')} s |",
        f"| exec -> gRPC health SERVING (list + sync + first build) | {r.get('ready_seconds')} s |",
        f"| server RSS at ready / peak (whole run) | {r.get('rss_ready_mb')} / "
        f"{r.get('rss_peak_mb')} MB |",
        f"| {r['proxies']} proxies synced (CDS wildcard + EDS of every cluster) | "
        f"{r.get('proxy_sync_seconds')} s |",
        f"| EndpointSlice updates at the API | {r.get('updates')} in {r['duration']} s "
        f"({r.get('update_rate')}/s) |",
        f"| push latency p50 / p99 / max (update at API -> ACK, all proxies, "
        f"{r.get('samples')} samples) | {r.get('push_p50_ms')} / {r.get('push_p99_ms')} / "
        f"{r.get('push_max_ms')} ms |",
        f"| ACKs missing (mark timeout) | {r.get('missing_acks')} |",
        "",
    ]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--endpoints", type=int, default=5, help="endpoints per EndpointSlice")
    ap.add_argument("--proxies", type=int, default=100)
    ap.add_argument("--clients", type=int, default=2, help="load-client processes")
    ap.add_argument("--rate", type=float, default=100.0, help="EndpointSlice updates per second")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--ready-timeout", type=float, default=600.0)
    ap.add_argument("--mark-timeout", type=float, default=20.0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--out", default="", help="write the JSON report here")
    ap.add_argument("--no-results", action="store_true", help="do not append to RESULTS.md")
    args = ap.parse_args()
    if args.smoke:
        args.services, args.endpoints, args.proxies, args.clients = 20, 2, 4, 1
        args.rate, args.duration, args.ready_timeout, args.mark_timeout = 20.0, 2.0, 60.0, 10.0
        args.no_results = True
    report = asyncio.run(run(args))
    mach = machine()
    if args.out:
        Path(args.out).write_text(json.dumps({"report": report, "machine": mach}, indent=2))
    if not args.no_results:
        with open(BENCH / "RESULTS.md", "a") as f:
            f.write("\n" + markdown(report, mach))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
