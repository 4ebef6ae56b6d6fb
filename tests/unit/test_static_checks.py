"""The checks a reviewer would run, held in CI: ruff, mypy (strict for model/, translate/
and xds/) and the import contract that keeps the pipeline's rooms apart (.importlinter).

Each runs the real tool on the working tree, as `make check` does; a failure prints the
tool's own report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.xdist_group("static-checks")


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_is_clean() -> None:
    result = run(str(BIN / "ruff"), "check", "xds_server", "tests", "bench")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    result = run(str(BIN / "mypy"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_import_contract_is_kept() -> None:
    result = run(str(BIN / "lint-imports"), "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_layout_names_every_package_and_module() -> None:
    """The README's Layout is the map a newcomer reads first: every package and top-level
    module of xds_server/ is on it, and nothing it names is gone."""
    readme = (ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("```", 2)[1]
    package = ROOT / "xds_server"
    present = {f"{p.name}/" for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    present |= {p.name for p in package.glob("*.py") if p.stem != "__init__"}
    missing = sorted(name for name in present if name not in layout)
    assert not missing, f"README Layout does not name: {missing}"
    named = {
        word.rstrip("/").removesuffix(".py")
        for word in layout.replace(",", " ").split()
        if word.startswith("xds_server/")
    }
    gone = sorted(n for n in named if not (ROOT / n).exists() and not (ROOT / f"{n}.py").exists())
    assert not gone, f"README Layout names what does not exist: {gone}"
