"""The push benchmark harness runs end to end (tiny N, one round) against both servers.

Only that it completes and reports sane numbers: no timing thresholds (timing belongs in the
benchmark's own report, bench/RESULTS.md, not in test assertions).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SMOKE_STREAMS = 20


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_push_bench_smoke(tmp_path: Path) -> None:
    if importlib.util.find_spec("xds_server.xds.server") is None:
        pytest.skip("xds_server.xds.server is not there yet")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "push_bench.py"),
            "--smoke",
            "--require-ours",
            f"--out-dir={tmp_path}",
        ],
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
    assert report["machine"]["cores"] and report["machine"]["grpcio"] != "-"

    rows = {(r["server"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {(s, m) for s in ("ours", "floor") for m in ("sotw", "delta")}
    for (server, mode), r in rows.items():
        label = f"{server}/{mode}"
        assert r["streams"] == SMOKE_STREAMS, label
        assert r["all_acked"], f"{label}: not every stream ACKed every push"
        assert r["rounds_measured"] >= 1, label
        for round_ in r["rounds"]:
            assert round_["acked"] == SMOKE_STREAMS, label
        lat = r["latency_last_ack_ms"]
        assert _finite(lat["p50"]) and _finite(lat["p99"]), label
        # Causality: the last ACK comes after the change, and p99 is not below p50.
        assert 0 < lat["p50"] <= lat["p99"], label
        assert _finite(r["latency_per_stream_ms"]["p99"]), label
        assert _finite(r["cpu_per_push_ms"]["mean"]) and r["cpu_per_push_ms"]["mean"] >= 0, label
        assert _finite(r["rss_per_stream_kb"]), label
        assert r["rss0_mb"] > 0 and r["rss_n_mb"] > 0, label
        # Both servers pushed the changed CLA and nothing else.
        assert r["push_mean_resources"] >= 1, label

    ratios = {x["mode"]: x["ratios"] for x in report["ratios"]}
    assert set(ratios) == {"sotw", "delta"}
    for mode, rs in ratios.items():
        for key in ("latency_last_ack_p50", "latency_last_ack_p99", "cpu_per_push", "rss_per_stream"):
            assert key in rs, f"{mode}: ratio {key} missing"
        for key in ("latency_last_ack_p50", "latency_last_ack_p99"):
            assert _finite(rs[key]) and rs[key] > 0, f"{mode}: ratio {key} = {rs[key]}"

    md = Path(summary["markdown"]).read_text()
    assert "Ours / floor" in md
