"""RE2, the regular-expression engine Envoy and gRPC use, for every regex the server checks
or runs: route matches from users (a pattern RE2 rejects would make every proxy NACK the whole
route configuration) and CSDS node matchers from callers (RE2 runs in linear time, so a
hostile pattern cannot stall the server the way backtracking can).

Only the `google-re2` binding is imported here, so every layer may use it.
"""

from __future__ import annotations

from typing import Any

import re2

__all__ = ["RegexError", "compile_re2", "re2_error"]

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # errors are ours to report, not lines on stderr


class RegexError(ValueError):
    """A pattern RE2 does not accept; the message says why."""


def compile_re2(pattern: str) -> Any:
    """The compiled pattern (has `fullmatch`, `search`). Raises RegexError."""
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as err:
        reason = err.args[0] if err.args else err
        text = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise RegexError(text) from None


def re2_error(pattern: str) -> str | None:
    """Why RE2 rejects `pattern`, or None when it accepts it."""
    try:
        compile_re2(pattern)
    except RegexError as err:
        return str(err)
    return None
