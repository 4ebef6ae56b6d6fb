"""NetworkPolicy translation cost: CPU per model change with policies against the same mesh
without them (the floor, measured in the same run).

The mesh, for each size P (pods; default 1,000 and 10,000): P/10 services in 10 namespaces,
10 meshed capture-mode pods each (labels app=svc-i, service account svc-i), one connected
capture proxy per namespace plus `--isolated` proxies (default 20) in namespace ns-0 that
policies select: ingress from pods `app=svc-1` (every pod of an account: principals) and
egress to pods `app=svc-2` (pod IPs and the ClusterIP). Measured, per change, the CPU of the
one `MeshStore.put` (store + controller + cache writes):

  peer-label   a pod of svc-1 loses its label and gets it back (a peer change: every
               isolated proxy is rebuilt)
  unrelated    a pod of a service no peer names changes its label (nothing is rebuilt)
  endpoint     an EndpointSlice's endpoint flips readiness

The floor is the same mesh and the same changes with no NetworkPolicy. CPU is process time,
GC on. Results: JSON under bench/out/ and a section appended to bench/RESULTS.md (`--smoke`:
tiny sizes, a temporary directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.config.core.v3 import base_pb2

from bench.publish import publish
from bench.push_bench import machine, pct, system_busy
from tests.support.proxies import verified
from xds_server.model.mesh import (
    AppProtocol, Endpoint, EndpointPort, EndpointSlice, Namespace, Service, ServicePort, Workload,
)
from xds_server.model.netpol import LabelSelector, NetworkPolicy, Peer, PolicyPort, PolicyRule
from xds_server.model.security import SecuritySettings
from xds_server.model.store import MeshStore
from xds_server.translate.controller import MeshController
from xds_server.xds.cache import ResourceCache

NAMESPACES = 10
PODS_PER_SERVICE = 10
SOURCE = "bench"


def ns(i: int) -> str:
    return f"ns-{i % NAMESPACES}"


def build(pods: int, isolated: int, policies: bool) -> tuple[MeshStore, MeshController]:
    store, cache = MeshStore(), ResourceCache()
    controller = MeshController(store, cache, security=SecuritySettings(mtls=True))
    objects: list[Any] = [Namespace(f"ns-{k}") for k in range(NAMESPACES)]
    for i in range(pods // PODS_PER_SERVICE):
        name = f"svc-{i}"
        workloads = [
            Workload(ns(i), f"{name}-{j}", ip=f"10.{i // 250}.{i % 250}.{j + 1}", service_account=name,
                     labels=(("app", name),), meshed=True)
            for j in range(PODS_PER_SERVICE)
        ]
        objects += workloads
        objects.append(Service(ns(i), name, (ServicePort(80, "http", 8080, AppProtocol.HTTP),),
                               cluster_ip=f"10.96.{i // 250}.{i % 250}"))
        objects.append(EndpointSlice(ns(i), f"{name}-x", name, (EndpointPort("http", 8080, AppProtocol.HTTP),),
                                     tuple(Endpoint(w.ip, pod=w.name) for w in workloads)))
    for k in range(isolated):
        objects.append(Workload("ns-0", f"guarded-{k}", ip=f"10.200.0.{k + 1}", service_account="guarded",
                                labels=(("app", "guarded"),), meshed=True))
    if policies:
        objects.append(NetworkPolicy(
            "ns-0", "guarded", LabelSelector((("app", "guarded"),)), frozenset({"Ingress", "Egress"}),
            ingress=(PolicyRule(peers=(Peer(pod_selector=LabelSelector((("app", "svc-1"),)),
                                            namespace_selector=LabelSelector()),)),),
            egress=(PolicyRule(peers=(Peer(pod_selector=LabelSelector((("app", "svc-2"),)),
                                           namespace_selector=LabelSelector()),),
                               ports=(PolicyPort(port=8080),)),),
        ))
    store.sync(SOURCE, objects)
    for k in range(NAMESPACES):
        controller.view_for(verified(node(f"ns-{k}", f"svc-{k}-0", f"10.0.{k}.1")))
    for k in range(isolated):
        controller.view_for(verified(node("ns-0", f"guarded-{k}", f"10.200.0.{k + 1}")))
    return store, controller


def node(namespace: str, pod: str, ip: str) -> base_pb2.Node:
    n = base_pb2.Node(id=f"{pod}.{namespace}")
    n.metadata.update({"namespace": namespace, "pod": pod, "pod_ip": ip})
    return n


def timed(fn: Any) -> float:
    start = time.process_time_ns()
    fn()
    return (time.process_time_ns() - start) / 1e6


def measure(pods: int, isolated: int, changes: int, policies: bool) -> dict[str, Any]:
    started = time.process_time()
    store, _ = build(pods, isolated, policies)
    build_s = time.process_time() - started
    out: dict[str, Any] = {"build_cpu_s": build_s}
    peer = store.get("Pod", ns(1), "svc-1-3")
    other = store.get("Pod", ns(5), "svc-5-3")
    slice_ = store.get("EndpointSlice", ns(7), "svc-7-x")
    samples: dict[str, list[float]] = {"peer-label": [], "unrelated": [], "endpoint": []}
    for k in range(changes):
        if k % 2 == 0:
            samples["peer-label"].append(timed(lambda: store.put(SOURCE, dataclasses.replace(peer, labels=()))))
            samples["unrelated"].append(timed(lambda: store.put(SOURCE, dataclasses.replace(other, labels=()))))
        else:
            samples["peer-label"].append(timed(lambda: store.put(SOURCE, peer)))
            samples["unrelated"].append(timed(lambda: store.put(SOURCE, other)))
        eps = tuple(dataclasses.replace(e, ready=(k % 2 == 1)) if i == 0 else e for i, e in enumerate(slice_.endpoints))
        changed = dataclasses.replace(slice_, endpoints=eps)
        samples["endpoint"].append(timed(lambda c=changed: store.put(SOURCE, c)))
    for kind, values in samples.items():
        out[kind] = {"p50": statistics.median(values), "p99": pct(values, 99)}
    return out


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"\n## {report['when']}: NetworkPolicy translation (`bench/netpol_bench.py`)\n",
        f"Machine: {m.get('cpu', '?')}, {m['cores']} cores; Python {sys.version.split()[0]}. "
        f"{report['isolated']} isolated proxies (ingress from the 10 pods of one account, egress to the "
        f"10 pods and ClusterIP of another), one proxy per namespace besides; {report['changes']} changes "
        f"of each kind. Floor: the same mesh and changes without the NetworkPolicy. Other load during the "
        f"run: {report['other_load']:.2f} cores.\n",
        "| pods | build CPU s (ours / floor) | peer-label change p50 / p99 ms | floor p50 | ratio p50 | "
        "unrelated pod p50 ms | floor p50 | ratio | endpoint p50 ms | floor p50 | ratio |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        ours, floor = r["ours"], r["floor"]

        def ratio(kind: str, o: dict[str, Any] = ours, f: dict[str, Any] = floor) -> str:
            return f"{o[kind]['p50'] / f[kind]['p50']:.2f}" if f[kind]["p50"] > 0 else "-"

        lines.append(
            f"| {r['pods']} | {ours['build_cpu_s']:.2f} / {floor['build_cpu_s']:.2f} | "
            f"{ours['peer-label']['p50']:.2f} / {ours['peer-label']['p99']:.2f} | {floor['peer-label']['p50']:.2f} | "
            f"{ratio('peer-label')} | {ours['unrelated']['p50']:.3f} | {floor['unrelated']['p50']:.3f} | "
            f"{ratio('unrelated')} | {ours['endpoint']['p50']:.3f} | {floor['endpoint']['p50']:.3f} | {ratio('endpoint')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--isolated", type=int, default=20)
    parser.add_argument("--changes", type=int, default=40)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.pods, args.isolated, args.changes = [100, 200], 3, 4
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.smoke else Path(__file__).parent / "out")
    out_dir.mkdir(parents=True, exist_ok=True)
    results_md = out_dir / "RESULTS.md" if args.smoke or args.out_dir else Path(__file__).parent / "RESULTS.md"
    busy0, wall0 = system_busy(), time.monotonic()
    own0 = time.process_time()
    results = [{"pods": p, "ours": measure(p, args.isolated, args.changes, True),
                "floor": measure(p, args.isolated, args.changes, False)} for p in args.pods]
    elapsed = time.monotonic() - wall0
    other = max(0.0, (system_busy() - busy0 - (time.process_time() - own0)) / elapsed)
    report = {
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "machine": machine(),
        "isolated": args.isolated, "changes": args.changes, "other_load": other, "results": results,
        "errors": [],
    }
    publish(report, "netpol", out_dir, results_md, markdown(report))


if __name__ == "__main__":
    main()
