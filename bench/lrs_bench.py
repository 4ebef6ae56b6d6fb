"""LRS aggregation benchmark (issue 14): what load reports cost the server, and what the live
mesh page's update costs.

The mesh: `--services` Services (10 namespaces, 10 ready endpoints each) in a `MeshStore`, an
outbound cluster per Service in the `ResourceCache`. `--proxies` proxies, each an xDS stream
state holding the wildcard CDS (as `XdsServer` keeps it) and an open LRS stream, each calling
`--clusters-per-proxy` Services (the same ones for the pods of one Service); every proxy reports every `--interval` s (Envoy's report:
one ClusterStats per cluster, one locality). A report is taken as the server takes it off the
wire: `LoadStatsRequest.FromString` of the bytes Envoy would send, then
`LoadReportingService.take` (interval check, the proxy's xDS stream, every count checked, the
aggregator's windows and counters updated, the cluster list compared).

Reported, all in this process, in the same run:
  floor            parsing the report alone (`FromString`): what any server pays
  per report       CPU per report of the full path, and its ratio to the floor
  load             CPU share of one core at `--proxies` reports every `--interval` s
  memory           tracemalloc: what the aggregation holds after every proxy reported
                   (windows, counters), per proxy
  scrape           CPU of one `/metrics` collection of the load families
  page             CPU of one /api/v1/ui/mesh build (`mesh_graph.build` + JSON encoding),
                   what each open page costs every 2 s

Output: a table on stderr, a JSON report in `--out-dir` (default bench/out/), and a last stdout
line of JSON ({"json": path, "rows": ...}). `--smoke`: 100 proxies, 20 services, few rounds,
results in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc
import types as pytypes
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.service.load_stats.v3 import lrs_pb2  # noqa: E402

from xds_server.admin import mesh_graph  # noqa: E402
from xds_server.load_reports import LoadAggregator  # noqa: E402
from xds_server.model.mesh import (  # noqa: E402
    AppProtocol, Endpoint, EndpointPort, EndpointSlice, Service, ServiceKey, ServicePort, Workload,
)
from xds_server.model.store import MeshStore  # noqa: E402
from xds_server.translate.names import cluster_name  # noqa: E402
from xds_server.xds import types  # noqa: E402
from xds_server.xds.cache import FullView, ResourceCache  # noqa: E402
from xds_server.xds.connection import Connection  # noqa: E402
from xds_server.xds.lrs import LoadReportingService, LrsSettings, _Reporter  # noqa: E402
from xds_server.xds.node import proxy_claim  # noqa: E402
from xds_server.xds.stream import Variant, new_stream  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402


class _Context:
    """The gRPC call's write, as the service uses it (a response is rare: the cluster list)."""

    def __init__(self) -> None:
        self.writes = 0

    async def write(self, _message: Any) -> None:
        self.writes += 1


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def build(services: int, proxies: int, per_proxy: int, interval: float, seed: int = 1):
    rng = random.Random(seed)
    store = MeshStore()
    objects: list[Any] = []
    keys = []
    for i in range(services):
        ns, name = f"ns-{i % 10}", f"svc-{i}"
        keys.append(ServiceKey(ns, name))
        objects.append(Service(ns, name, ports=(ServicePort(80, "http", 8080, AppProtocol.HTTP),)))
        endpoints = tuple(Endpoint(f"10.{i // 250}.{i % 250}.{k + 1}", pod=f"{name}-{k}") for k in range(10))
        objects.append(EndpointSlice(ns, f"{name}-1", name, (EndpointPort("http", 8080),), endpoints))
        for k in range(10):
            objects.append(Workload(ns, f"{name}-{k}", f"10.{i // 250}.{i % 250}.{k + 1}", name, meshed=True))
    store.sync("bench", objects)
    cache = ResourceCache()
    cache.set_type(types.CLUSTER, [cluster_pb2.Cluster(name=cluster_name(k, 80)) for k in keys])
    view = FullView(cache)
    connections: set[Connection] = set()
    clock = _Clock()
    aggregator = LoadAggregator(store, interval, clock=clock)
    service = LoadReportingService(lambda: connections, aggregator, LrsSettings(interval=interval),
                                   reportable=aggregator.reportable, clock=clock)
    aggregator.lrs_stats = service.stats
    reporters, payloads = [], []
    for p in range(proxies):
        home = keys[p % services]
        node = base_pb2.Node(id=f"{home.name}-{p // services}.{home.namespace}")
        node.metadata.update({"namespace": home.namespace, "service_account": home.name,
                              "pod": f"{home.name}-{p // services}"})
        state = new_stream(Variant.DELTA, p + 1)
        state.node = node
        state.view = view
        cds = state._type_state(types.CLUSTER)  # what a wildcard CDS subscription leaves
        cds.wildcard = True
        cds.sent_version = cds.acked_version = "v1"
        conn = Connection(state, "ipv4:127.0.0.1:1", "bench")
        connections.add(conn)
        claim = proxy_claim(node)
        entry = [1, float("-inf")]
        service._proxies[claim.node_id] = entry
        reporters.append(_Reporter(claim, None, entry))
        # The pods of one Service call the same Services (as a Deployment's replicas do).
        targets = random.Random(f"{seed}-{p % services}").sample(keys, per_proxy)
        request = lrs_pb2.LoadStatsRequest()
        for key in targets:
            stats = request.cluster_stats.add(cluster_name=cluster_name(key, 80))
            stats.load_report_interval.FromSeconds(int(interval))
            locality = stats.upstream_locality_stats.add()
            locality.locality.zone = "zone-a"
            locality.total_successful_requests = rng.randint(100, 5000)
            locality.total_error_requests = rng.randint(0, 20)
            locality.total_issued_requests = locality.total_successful_requests
            locality.total_requests_in_progress = rng.randint(0, 10)
        payloads.append(request.SerializeToString())
    return store, service, aggregator, clock, reporters, payloads, connections


def cpu() -> float:
    return time.process_time()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    store, service, aggregator, clock, reporters, payloads, connections = build(
        args.services, args.proxies, args.clusters_per_proxy, args.interval)
    context = _Context()
    for reporter in reporters:  # each stream's first response: the clusters to report
        await service._ask(context, reporter)
    # Floor: parsing every report and reading every count (what any server must do).
    floor_runs = []
    for _ in range(args.rounds):
        start = cpu()
        for payload in payloads:
            total = 0
            for stats in lrs_pb2.LoadStatsRequest.FromString(payload).cluster_stats:
                for locality in stats.upstream_locality_stats:
                    total += locality.total_successful_requests + locality.total_error_requests
        floor_runs.append((cpu() - start) / len(payloads))
    runs = []
    for _ in range(args.rounds):
        clock.now += args.interval
        start = cpu()
        for reporter, payload in zip(reporters, payloads, strict=True):
            await service.take(context, reporter, lrs_pb2.LoadStatsRequest.FromString(payload))
        runs.append((cpu() - start) / len(payloads))
    # Memory: a fresh aggregation, every proxy reporting once, traced (tracing slows the
    # path above, so it is measured apart).
    aggregator.forget_all()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    clock.now += args.interval
    for reporter, payload in zip(reporters, payloads, strict=True):
        await service.take(context, reporter, lrs_pb2.LoadStatsRequest.FromString(payload))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert service.stats.reports == (args.rounds + 1) * len(payloads), service.stats
    assert not service.stats.ignored, service.stats.ignored

    scrape_runs, page_runs, page_bytes = [], [], 0
    ctx = pytypes.SimpleNamespace(store=store, load=aggregator, server=pytypes.SimpleNamespace(connections=connections),
                                  sources={}, registry=None, trust_domain="cluster.local")
    for _ in range(args.rounds):
        start = cpu()
        for family in aggregator.collect():
            list(family.samples)
        scrape_runs.append(cpu() - start)
        start = cpu()
        body = json.dumps(mesh_graph.build(ctx)).encode()
        page_runs.append(cpu() - start)
        page_bytes = len(body)
    per_report = sorted(runs)[len(runs) // 2]
    floor = sorted(floor_runs)[len(floor_runs) // 2]
    reports_per_second = args.proxies / args.interval
    rows = [
        {"measure": "floor: parse one report, read its counts", "value": floor * 1e6, "unit": "us CPU"},
        {"measure": "per report (parse, check, aggregate)", "value": per_report * 1e6, "unit": "us CPU",
         "ratio_to_floor": per_report / floor},
        {"measure": f"load at {args.proxies} proxies / {args.interval:g} s",
         "value": 100 * per_report * reports_per_second, "unit": "% of a core"},
        {"measure": "aggregation memory after every proxy reported", "value": held / 1024, "unit": "KiB",
         "per_proxy_bytes": held / args.proxies},
        {"measure": "one /metrics collection of the load families", "value": sorted(scrape_runs)[len(scrape_runs) // 2] * 1e3,
         "unit": "ms CPU"},
        {"measure": "one /ui update (build + JSON)", "value": sorted(page_runs)[len(page_runs) // 2] * 1e3,
         "unit": "ms CPU", "bytes": page_bytes},
    ]
    return {"rows": rows, "params": vars(args)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--services", type=int, default=100)
    parser.add_argument("--clusters-per-proxy", type=int, default=10)
    parser.add_argument("--interval", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.proxies, args.services, args.clusters_per_proxy, args.rounds = 100, 20, 5, 3
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "bench" / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run(args))
    for row in result["rows"]:
        extra = f"  ({row['ratio_to_floor']:.2f}x floor)" if "ratio_to_floor" in row else ""
        print(f"{row['measure']:<52} {row['value']:>10.2f} {row['unit']}{extra}", file=sys.stderr)
    load = os.getloadavg()
    report = {
        "benchmark": "lrs_bench",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "loadavg": load, "python": sys.version.split()[0]},
        "result": result,
    }
    path = out_dir / f"lrs_bench-{int(time.time())}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({"json": str(path), "rows": result["rows"]}))


if __name__ == "__main__":
    main()
