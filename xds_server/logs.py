"""Structured logs: one line per event, JSON when not on a terminal, always naming the proxy.

Callers pass context with `extra={"proxy": ..., ...}`; every extra field is emitted. Secrets
never go into `extra`: log what an object is (name, serial, SPIFFE ID), not its bytes. As a
last line of defence every formatted line goes through the one redaction (`redaction`):
a private key, an inline secret or a bearer token quoted by some error never reaches the log.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from .redaction import redact_text

# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        # Strings before encoding (JSON escapes the quotes the patterns look for), the whole
        # line after (values that became strings through `default=str`).
        entry.update((k, redact_text(v) if isinstance(v, str) else v) for k, v in _extras(record).items())
        if record.exc_info:
            entry["error"] = redact_text(self.formatException(record.exc_info))
        return redact_text(json.dumps(entry, default=str))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.getMessage()}"
        if fields:
            line += f"  {fields}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact_text(line)


def configure(level: str = "info", fmt: str = "auto") -> None:
    """Configure the root logger. fmt: 'json', 'text', or 'auto' (text on a terminal)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpc's own chatter is not ours to print at info.
    logging.getLogger("grpc").setLevel(logging.WARNING)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
