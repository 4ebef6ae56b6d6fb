"""Entries sealed with the state key: AES-256-GCM (`cryptography`), authenticated.

    b"XS1" | key id (8) | nonce (12) | ciphertext + tag

The associated data binds the entry's name and the key id, so an entry copied under another
name, written under another key, truncated or altered fails to open; the caller counts and
reports it and never trusts it. A random 96-bit nonce per seal: entries are written a few
times a day (CA changes), far from the 2^32 messages a key may seal this way.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .statekey import KEY_ID_BYTES, StateKey

MAGIC = b"XS1"
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER = len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES


class SealError(Exception):
    """An entry that must not be trusted. `reason` is a metric label: malformed, other-key,
    forged."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _aad(name: str, key_id: bytes) -> bytes:
    return b"xds-server shared state v1\0" + name.encode() + b"\0" + key_id


def seal(key: StateKey, name: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + key.key_id + nonce + AESGCM(key.secret).encrypt(nonce, plaintext, _aad(name, key.key_id))


def unseal(key: StateKey, name: str, blob: bytes) -> bytes:
    if not isinstance(blob, bytes) or len(blob) < _HEADER + TAG_BYTES or not blob.startswith(MAGIC):
        raise SealError("malformed", f"shared entry {name!r} is not a sealed entry")
    key_id = blob[len(MAGIC):len(MAGIC) + KEY_ID_BYTES]
    if key_id != key.key_id:
        raise SealError("other-key", f"shared entry {name!r} was sealed with another state key "
                        f"(id {key_id.hex()}, ours {key.key_id_hex})")
    nonce = blob[len(MAGIC) + KEY_ID_BYTES:_HEADER]
    try:
        return AESGCM(key.secret).decrypt(nonce, blob[_HEADER:], _aad(name, key_id))
    except InvalidTag:
        raise SealError("forged", f"shared entry {name!r} failed authentication (altered, "
                        "truncated or moved from another name)") from None
