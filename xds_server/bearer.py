"""Reading a bearer token from gRPC call metadata: shared by the xDS stream guard and the CA's
CSR service (neither owns the other, so this sits below both)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["Metadata", "bearer_token"]

# gRPC invocation metadata: (key, value) pairs; binary values (`-bin` keys) are bytes.
Metadata = Iterable[tuple[str, str | bytes]]


def bearer_token(metadata: Metadata | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry (scheme case-insensitive)."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None
