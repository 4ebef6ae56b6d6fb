"""The soak benchmark (issue 15) runs end to end at a tiny size: streams sync, churn drops and
resumes them, every change (EDS, cluster added, cluster removed) reaches every connected
sampled stream, versions never go backwards, a reconnect storm comes back, and the admin API
answers throughout. No timing thresholds (timings belong in bench/RESULTS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_soak_bench_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--smoke", "--storm", "20",
         "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(Path(json.loads(proc.stdout.splitlines()[-1])["json"]).read_text())
    assert report["initial_sync"]["synced"] == report["initial_sync"]["streams"] == 40
    for kind in ("eds", "add", "remove"):
        delivered = report["delivery_ms"][kind]
        assert delivered["changes"] > 0 and delivered["n"] > 0, (kind, delivered)
        assert delivered["missed"] == 0, (kind, delivered)
    assert report["reconnect_during_churn"]["ms"]["n"] > 0
    # Delta streams resumed with what they held: a reconnect costs far less than a full sync.
    assert report["reconnect_during_churn"]["bytes_delta_mean"] < report["reconnect_during_churn"]["bytes_sotw_mean"]
    assert report["clients"]["regressions"] == 0
    assert report["clients"]["gave_up"] == 0
    assert report["server_stats"]["nacks"] == 0
    assert report["after_churn_all_full_s"] is not None
    assert report["storm"]["streams"] == 20 and report["storm"]["all_back_s"] is not None
    assert report["storm"]["reconnect"]["ms"]["n"] >= 20
    for window in (report["admin_during_churn"], report["storm"]["admin"]):
        for path, stats in window.items():
            assert stats["failed"] == 0, (path, stats)
    assert report["admin_during_churn"]["/healthz"]["n"] > 0
    assert report["rss_synced_mb"] > 0 and report["rss_after_mb"] > 0
