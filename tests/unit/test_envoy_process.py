"""The shared Envoy process helper (xds_server/envoy_process.py), without starting Envoy:
finding the binary, distinct base ids, the command line, bootstrap files."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from xds_server.envoy_process import EnvoyProcess, find_envoy, unique_base_id, write_bootstrap


def test_envoy_binary_override_must_be_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "envoy"
    script.write_text("#!/bin/sh\n")
    monkeypatch.setenv("ENVOY_BINARY", str(script))
    assert find_envoy() is None  # not executable: not an Envoy we can run
    script.chmod(0o755)
    assert find_envoy() == str(script)


def test_the_pinned_wheel_binary_is_found_without_importing_envoy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENVOY_BINARY", raising=False)
    path = find_envoy()
    assert path is not None
    with open(path, "rb") as binary:
        assert binary.read(4) == b"\x7fELF"  # the real binary, not the Python wrapper


def test_base_ids_are_distinct() -> None:
    ids = {unique_base_id() for _ in range(100)}
    assert len(ids) == 100


def test_bootstrap_is_json_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = write_bootstrap(tmp_path / "b.json", {"node": {"id": "n"}})
    assert json.loads(path.read_text()) == {"node": {"id": "n"}}  # "n" stays a string
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_command_line(tmp_path: Path) -> None:
    envoy = EnvoyProcess({}, tmp_path, name="p", binary="/bin/envoy", log_level="info",
                         extra_args=["--mode", "validate"])
    command = envoy.command()
    assert command[:3] == ["/bin/envoy", "-c", str(tmp_path / "p-bootstrap.json")]
    assert "--disable-hot-restart" in command
    assert command[command.index("--concurrency") + 1] == "1"
    assert command[command.index("-l") + 1] == "info"
    assert command[command.index("--base-id") + 1] == str(envoy.base_id)
    assert command[-2:] == ["--mode", "validate"]
    assert envoy.pid is None and not envoy.running and envoy.stop() is None
