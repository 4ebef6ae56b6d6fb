"""Where every benchmark's report goes: its JSON in the output directory, its markdown
appended to the results file (bench/RESULTS.md unless a smoke run points elsewhere), and a
last stdout line the smoke tests read."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def publish(report: dict[str, Any], prefix: str, out_dir: Path, results_md: Path, markdown: str) -> None:
    """Write the report; exit 1 when it holds errors (after writing it)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    json_path = out_dir / f"{prefix}-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    if not results_md.exists():
        results_md.write_text("# Benchmark results\n\n")
    with results_md.open("a") as f:
        f.write(markdown)
    print(markdown)
    errors = report.get("errors") or []
    print(json.dumps({"json": str(json_path), "markdown": str(results_md), "errors": len(errors)}))
    if errors:
        sys.exit(1)
