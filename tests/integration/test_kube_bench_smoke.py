"""bench/kube_bench.py runs end to end at tiny sizes (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def test_kube_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "kube.json"
    done = subprocess.run(
        [sys.executable, "bench/kube_bench.py", "--smoke", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())["report"]
    assert report["proxies_synced"] == report["proxies"]
    assert report["samples"] >= 1 and report["missing_acks"] == 0
    assert report["push_p50_ms"] is not None and report["rss_peak_mb"] > 0
    assert report["updates"] > report["samples"]  # the background churn ran
