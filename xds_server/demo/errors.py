"""The demo's one error type: something the user has to fix or know about."""

from __future__ import annotations


class DemoError(RuntimeError):
    """Something the user has to fix or know about; the message says what and how."""
