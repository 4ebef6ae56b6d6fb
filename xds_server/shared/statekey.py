"""The operator's state key: 32 random bytes, base64 in a file (`--state-key-file`).

Every secret a replica puts in shared state (the CA's keys, the token-signing key) is sealed
with it (sealed.py), so whoever can read Redis still learns nothing and can forge nothing.
`xds-server state-key create` writes one. The key never appears in logs: it is named by its
id, a one-way digest that tells keys apart without revealing them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ConfigError

KEY_BYTES = 32  # AES-256-GCM
KEY_ID_BYTES = 8
MAX_FILE_BYTES = 4096


@dataclass(frozen=True)
class StateKey:
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise ConfigError(f"a state key is {KEY_BYTES} bytes, got {len(self.secret)}")

    @property
    def key_id(self) -> bytes:
        """A digest of the key under its own label: equal ids, equal keys (with overwhelming
        odds); the id reveals nothing of the key."""
        return hashlib.sha256(b"xds-server state key id\0" + self.secret).digest()[:KEY_ID_BYTES]

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    @classmethod
    def generate(cls) -> StateKey:
        return cls(secrets.token_bytes(KEY_BYTES))

    def encoded(self) -> str:
        return base64.b64encode(self.secret).decode("ascii")


def parse_state_key(text: str, source: str = "the state key") -> StateKey:
    try:
        raw = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{source}: not base64 (expected {KEY_BYTES} random bytes, base64; "
                          "`xds-server state-key create` writes one)") from None
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"{source}: decodes to {len(raw)} bytes, a state key is {KEY_BYTES}")
    return StateKey(raw)


def load_state_key(path: Path) -> StateKey:
    """Read `--state-key-file` (raises ConfigError naming the file and the problem)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"--state-key-file {path}: cannot read: {err.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"--state-key-file {path}: too large to be a state key")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"--state-key-file {path}: not base64 text") from None
    return parse_state_key(text, f"--state-key-file {path}")


def write_state_key(path: Path, key: StateKey) -> None:
    """Create `path` (0600, refused if it exists: a key replaced by mistake makes every
    sealed entry unreadable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.encoded() + "\n")
