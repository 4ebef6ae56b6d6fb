"""The state key and sealed shared-state entries: what Redis holds is encrypted and
authenticated with the operator's key, bound to the entry's name; anything else is refused."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from xds_server.cli import main
from xds_server.config import ConfigError
from xds_server.shared.sealed import SealError, seal, unseal
from xds_server.shared.statekey import StateKey, load_state_key, parse_state_key


def test_sealed_entry_opens_only_with_its_key_and_name() -> None:
    key = StateKey.generate()
    # What the CA entry holds: a private key in PEM, made here (none is committed).
    secret = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    blob = seal(key, "xds-server:ca", secret)
    assert b"PRIVATE" not in blob and secret.splitlines()[1] not in blob
    assert unseal(key, "xds-server:ca", blob) == secret

    with pytest.raises(SealError) as other:
        unseal(StateKey.generate(), "xds-server:ca", blob)
    assert other.value.reason == "other-key"
    with pytest.raises(SealError) as moved:
        unseal(key, "xds-server:tokens", blob)  # copied under another name
    assert moved.value.reason == "forged"
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(SealError) as forged:
        unseal(key, "xds-server:ca", tampered)
    assert forged.value.reason == "forged"
    for junk in (b"", b"XS1", b"plain text in redis", blob[:20]):
        with pytest.raises(SealError) as malformed:
            unseal(key, "xds-server:ca", junk)
        assert malformed.value.reason == "malformed"


def test_each_seal_uses_a_fresh_nonce() -> None:
    key = StateKey.generate()
    assert seal(key, "n", b"same") != seal(key, "n", b"same")


def test_state_key_file_errors_name_the_file(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    with pytest.raises(ConfigError, match=r"--state-key-file .*short: decodes to 16 bytes"):
        load_state_key(short)
    junk = tmp_path / "junk"
    junk.write_text("not base64 !!")
    with pytest.raises(ConfigError, match="not base64"):
        load_state_key(junk)
    with pytest.raises(ConfigError, match="cannot read"):
        load_state_key(tmp_path / "missing")
    key = StateKey.generate()
    assert parse_state_key(key.encoded() + "\n") == key
    assert key.encoded() not in repr(key)


def test_state_key_create_writes_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "state.key"
    runner = CliRunner()
    result = runner.invoke(main, ["state-key", "create", "--out", str(path)])
    assert result.exit_code == 0, result.output
    key = load_state_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.encoded() not in result.output  # the key is in the file only
    assert key.key_id_hex in result.output
    again = runner.invoke(main, ["state-key", "create", "--out", str(path)])
    assert again.exit_code != 0 and "exists" in again.output
    assert load_state_key(path) == key
