"""Admin API settings (no web framework imported: the CLI reads these on every start)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:15014"
# Write requests are tiny (a push, a rotation): a body past this is refused with 413.
MAX_BODY_BYTES = 64 * 1024


@dataclass
class AdminSettings:
    address: str = DEFAULT_ADDRESS
    tokens_file: Path | None = None
    mtls: bool = False  # require client certificates from the mesh CA
    # Interactive docs (/docs, /redoc), their files served by the admin server itself (app.py
    # `_add_docs`). Off by default; /openapi.json is always served.
    docs: bool = False
    # The largest request body, for every transfer encoding (a chunked body is counted as it
    # arrives), checked before the body is read or the caller authenticated.
    max_body_bytes: int = MAX_BODY_BYTES
    # A taken port falls back to any free one (the demo, which prints the address it got).
    any_port_if_taken: bool = False
    # The admin server's own identity when it serves mTLS (a SPIFFE ID under the trust domain).
    identity_namespace: str = "xds-system"
    identity_service_account: str = "xds-server"
