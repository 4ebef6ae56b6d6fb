"""The xDS-over-TLS benchmark runs end to end at a tiny size: each transport (plaintext,
mutual TLS by grpc core, mutual TLS through the Python TLS front) opens its
streams, pushes reach every stream, and every stream is still served after the server's
certificate is swapped. No timing thresholds (timings belong in bench/RESULTS.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tls_bench_smoke() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tls_bench.py"), "--n", "20", "--channels", "4",
         "--rounds", "1", "--clusters", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in table[1:]]
    assert [row["transport"] for row in rows] == ["plaintext", "mtls-grpc", "mtls-python"]
    for row in rows:
        assert row["streams"] == row["streams_after_swap"] == "20"
        assert float(row["opens_per_s"]) > 0 and float(row["push_last_ms"]) > 0
