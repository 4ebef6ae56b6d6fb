"""The NetworkPolicy benchmark runs end to end (tiny sizes): only that it completes and reports
sane numbers; no timing thresholds (those belong in bench/RESULTS.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_netpol_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "netpol_bench.py"), "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(summary["json"]).parent == tmp_path and Path(summary["markdown"]).parent == tmp_path
    report = json.loads(Path(summary["json"]).read_text())
    assert [r["pods"] for r in report["results"]] == [100, 200]
    for r in report["results"]:
        for side in ("ours", "floor"):
            for kind in ("peer-label", "unrelated", "endpoint"):
                cpu = r[side][kind]
                assert math.isfinite(cpu["p50"]) and 0 < cpu["p50"] <= cpu["p99"], (r["pods"], side, kind)
    assert "NetworkPolicy translation (`bench/netpol_bench.py`)" in Path(summary["markdown"]).read_text()
