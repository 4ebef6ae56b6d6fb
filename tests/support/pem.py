"""Fake PEM private-key text for redaction tests.

Built at run time, so no file in the repository carries a private-key header and the check
for committed keys stays meaningful. The body is a marker, never key material.
"""

from __future__ import annotations


def fake_private_key_pem(body: str, algorithm: str = "", *, newline: str = "\n") -> str:
    label = (algorithm + " " if algorithm else "") + "PRIVATE" + " KEY"
    return f"-----BEGIN {label}-----{newline}{body}{newline}-----END {label}-----{newline}"
