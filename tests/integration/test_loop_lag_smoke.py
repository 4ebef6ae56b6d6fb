"""The event-loop lag benchmark runs end to end (500 services, 50 proxies, a small storm).

Only that it completes and reports its four scenarios with sane numbers: no timing
thresholds (timing belongs in bench/RESULTS.md, not in test assertions).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ["build", "namespace", "root_policy", "storm"]


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_loop_lag_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "loop_lag.py"), "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(summary["json"]).parent == tmp_path  # the smoke never writes under bench/
    assert [row["scenario"] for row in summary["rows"]] == SCENARIOS

    report = json.loads(Path(summary["json"]).read_text())
    assert report["machine"]["cores"]
    rows = report["result"]["rows"]
    assert [row["scenario"] for row in rows] == SCENARIOS
    for row in rows:
        name = row["scenario"]
        assert row["samples"] >= 1, name
        for key in ("max_stall_ms", "p99_lag_ms", "wall_s", "cpu_s"):
            assert _finite(row[key]) and row[key] >= 0, (name, key)
        assert row["p99_lag_ms"] <= row["max_stall_ms"] + 1e-9, name
        assert row["cache_writes"], f"{name}: the scenario wrote nothing to the cache"
        assert f"| {row['label']} |" in proc.stderr, name  # the table's four rows
    by_name = {row["scenario"]: row for row in rows}
    # Each scenario did its work: everything built, the storm renewed secrets.
    assert by_name["build"]["cache_writes"]["ClusterLoadAssignment"] >= 500
    assert by_name["storm"]["cache_writes"]["Secret"] >= 200
