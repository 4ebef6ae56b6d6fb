"""The LRS benchmark runs end to end (100 proxies, 20 services): every report accepted (the
benchmark checks it), every measure present and finite. No timing thresholds: numbers
belong in bench/RESULTS.md."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lrs_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "lrs_bench.py"), "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(summary["json"]).parent == tmp_path
    report = json.loads(Path(summary["json"]).read_text())
    assert report["machine"]["cores"] and len(report["machine"]["loadavg"]) == 3
    rows = report["result"]["rows"]
    assert len(rows) == 6
    for row in rows:
        assert math.isfinite(row["value"]) and row["value"] > 0, row
    assert rows[1]["ratio_to_floor"] > 0
    assert rows[5]["bytes"] > 0  # the page's document
