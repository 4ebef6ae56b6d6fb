"""The capture benchmark runs end to end: 2 s of load through two capture-mode sidecars
(pods as network namespaces, real Envoys) and without a mesh, then the config a sidecar
receives at 100 and 1,000 services in capture and explicit mode.

Only that it completes and reports sane numbers and properties (no failed request, both
sidecars on the mesh path, sizes that grow with the mesh): no timing thresholds (timing belongs
in bench/RESULTS.md, not in test assertions). As root with iproute2/iptables/setpriv, like
tests/e2e/test_capture.py; elsewhere the bench fails saying what is missing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_capture_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "capture_bench.py"), "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(summary["json"]).parent == tmp_path  # the smoke never writes under bench/
    assert Path(summary["markdown"]).parent == tmp_path
    assert summary["errors"] == 0
    report = json.loads(Path(summary["json"]).read_text())
    assert report["errors"] == []
    assert report["machine"]["cores"]

    lat = report["latency"]
    for key in ("no_mesh", "mesh"):
        path = lat[key]
        assert path["sent"] == 400, key  # 200/s for 2 s
        assert path["failed"] == 0 and path["ok"] == path["sent"], (key, path["errors"])
        ms = path["latency_ms"]
        assert _positive(ms["p50"]) and ms["p50"] <= ms["p90"] <= ms["p99"] <= ms["max"], key
    assert lat["mesh"]["url"] == "http://echo/"  # by service name, captured
    # Both sidecars served every measured request (plus warm-up and readiness probes).
    assert lat["sidecar_requests"]["client"] >= lat["mesh"]["sent"]
    assert lat["sidecar_requests"]["server"] >= lat["mesh"]["sent"]
    assert all(math.isfinite(lat["added_ms"][k]) for k in ("p50", "p90", "p99"))

    sizes = {r["services"]: r for r in report["sizes"]}
    assert sorted(sizes) == [100, 1000]
    for n, r in sizes.items():
        for mode in ("capture", "explicit"):
            entry = r[mode]
            for short in ("LDS", "RDS", "CDS", "EDS"):
                assert entry["types"][short]["count"] > 0 and entry["types"][short]["bytes"] > 0, (n, mode, short)
            assert entry["total_bytes"] == sum(t["bytes"] for t in entry["types"].values())
            assert entry["total_wire"] > entry["total_bytes"]
            assert entry["types"]["CDS"]["count"] >= n and entry["types"]["EDS"]["count"] == n
        outbound = r["capture"]["outbound_listener"]
        # Capture mode: a ClusterIP chain per visible service, and the endpoints' pod IPs.
        assert outbound["service_chains"] == n
        assert outbound["prefix_ranges"] >= n * r["endpoints_per_service"]
        assert outbound["bytes"] > r["explicit"]["outbound_listener"]["bytes"]
    small, big = sizes[100]["capture"], sizes[1000]["capture"]
    assert big["outbound_listener"]["bytes"] > small["outbound_listener"]["bytes"]
    assert big["total_bytes"] > small["total_bytes"]

    md = Path(summary["markdown"]).read_text()
    assert "capture-mode sidecars (`bench/capture_bench.py`)" in md
    assert "added by the two sidecars" in md
