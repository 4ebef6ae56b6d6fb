"""The translation benchmark runs end to end (tiny sizes, a few changes of each kind).

Only that it completes and reports sane numbers: no timing thresholds (timing belongs in the
benchmark's own report, bench/RESULTS.md, not in test assertions).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOKE_SIZES = (40, 120)
NAMESPACES = 10


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_translate_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "translate_bench.py"), "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])

    # Results stay in the temp dir: the smoke never touches bench/RESULTS.md.
    assert Path(summary["json"]).parent == tmp_path
    assert Path(summary["markdown"]).parent == tmp_path
    assert summary["errors"] == 0
    report = json.loads(Path(summary["json"]).read_text())
    assert report["errors"] == []
    assert report["machine"]["cores"]

    assert [r["services"] for r in report["results"]] == list(SMOKE_SIZES)
    for r in report["results"]:
        n = r["services"]
        label = f"N={n}"
        # Everything is in the cache: a cluster and an assignment per service, plus each
        # connected proxy's own inbound cluster; a route configuration per namespace scope.
        assert r["resources"]["ClusterLoadAssignment"] == n, label
        assert r["resources"]["Cluster"] == n + NAMESPACES, label
        assert r["resources"]["RouteConfiguration"] >= NAMESPACES, label
        build = r["build"]
        assert _finite(build["cpu_s"]) and build["cpu_s"] > 0, label
        assert build["peak_rss_mb"] >= build["rss_model_mb"] > 0, label
        for kind in ("endpoint", "route", "service", "service_slice", "proxy"):
            section = r[kind]
            assert section is not None and section["changes"] >= 1, f"{label} {kind}"
            cpu = section["cpu_ms"]
            assert _finite(cpu["p50"]) and 0 < cpu["p50"] <= cpu["p99"] <= cpu["max"], f"{label} {kind}"
        # Incremental: an endpoint change writes one assignment and nothing else.
        assert r["endpoint"]["writes_median"] == {"ClusterLoadAssignment": 1}, label
        assert r["endpoint"]["translations_median"] == 1, label

    verdicts = report["verdicts"]
    assert verdicts["full_build"]["met"] in (True, False)
    assert _finite(verdicts["endpoint_change"]["p50_ms"])
    assert _finite(verdicts["endpoint_constant"]["p50_ratio"])
    assert "translation (`bench/translate_bench.py`)" in Path(summary["markdown"]).read_text()
