"""The CA benchmark runs end to end at tiny sizes: issuance for both key types, then a
rotation storm over 20 simulated proxies against the real server with the CA and SDS.

Only that it completes and reports sane numbers: no timing thresholds (timing belongs in
bench/RESULTS.md, not in test assertions).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_ca_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ca_bench.py"), "--smoke", f"--out-dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 0
    report = json.loads(Path(summary["json"]).read_text())

    algorithms = {r["algorithm"]: r for r in report["issuance"]}
    assert set(algorithms) == {"ec-p256", "rsa-2048"}
    for r in algorithms.values():
        assert _positive(r["per_second"]) and _positive(r["wall_us"]) and _positive(r["cpu_us"])
        assert math.isclose(r["per_second"], 1e6 / r["wall_us"])

    (row,) = report["storms"]
    assert row["streams"] == 20
    assert row["identities"] == 20  # one identity, one certificate per simulated proxy
    assert row["issued_at_sync"] == 20
    assert row["issue_failures"] == 0
    assert row["renewed"] >= 20 * len(row["storms"])
    assert all(b["missing"] == 0 and _positive(b["last_ms"]) for b in row["baseline"])
    for storm in row["storms"]:
        assert storm["identities"] == 20
        assert storm["missing"] == 0 and storm["eds_missing"] == 0
        assert _positive(storm["all_renewed_ms"]) and _positive(storm["eds_last_ms"])
        assert storm["first_renewed_ms"] <= storm["all_renewed_ms"]

    md = (tmp_path / "RESULTS.md").read_text()
    assert "## CA: issuance and rotation storm" in md and "| ec-p256 |" in md
