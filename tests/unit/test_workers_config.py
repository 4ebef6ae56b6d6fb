"""`--workers N` refuses what N processes cannot share, naming the setting to change."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from xds_server.config import ConfigError
from xds_server.settings import ServeSettings
from xds_server.workers import check_workers, worker_config


def settings(tmp_path: Path, **xds: object) -> ServeSettings:
    key = tmp_path / "state.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode())
    return ServeSettings.load({
        "auth": {"mode": "tokens"}, "ca": {"ca_dir": str(tmp_path / "ca")},
        "shared": {"redis_url": "redis://127.0.0.1:6390/0", "state_key_file": str(key),
                   "replica_id": "pod-a"},
        "xds": {"address": "127.0.0.1:15010", "tls_address": "127.0.0.1:15012",
                "tls_token_address": "127.0.0.1:15013", "workers": 2, **xds},
        "admin": {"address": "127.0.0.1:9901"},
    }, environ={})


def test_a_fixed_port_is_needed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--xds-tls-address 127\.0\.0\.1:0: --workers 2"):
        check_workers(settings(tmp_path, tls_address="127.0.0.1:0").app_config(), 2)


def test_the_python_tls_front_and_unix_socket_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--xds-tls-frontend python"):
        check_workers(settings(tmp_path, tls_frontend="python").app_config(), 2)
    with pytest.raises(ConfigError, match="unix-socket"):
        check_workers(settings(tmp_path, unix_socket=str(tmp_path / "x.sock")).app_config(), 2)


def test_each_worker_shares_the_ports_with_its_own_name_and_only_worker_0_admin(tmp_path: Path) -> None:
    config = settings(tmp_path).app_config()
    check_workers(config, 2)
    first, second = worker_config(config, 0), worker_config(config, 1)
    assert first.server.reuse_port and second.server.reuse_port
    assert ("grpc.so_reuseport", 1) in second.server.grpc_options()
    assert ("grpc.so_reuseport", 0) in config.server.grpc_options()  # one process: never shared
    assert first.security is not None and first.security.shared is not None
    assert second.security is not None and second.security.shared is not None
    assert (first.security.shared.replica, second.security.shared.replica) == ("pod-a-w0", "pod-a-w1")
    assert first.serve_admin and not second.serve_admin
    assert second.admin is not None  # still authorizes CSDS on that worker's xDS port


def test_workers_are_bounded() -> None:
    with pytest.raises(ConfigError, match="--workers"):
        ServeSettings.load({"xds": {"workers": 0}}, environ={})
