"""Parsing and checking operator input shared by the CLI and the app."""

from __future__ import annotations

import ipaddress


class ConfigError(ValueError):
    """Operator input that cannot be used; the message names the setting."""


def parse_address(value: str, setting: str) -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT). Port 0 asks the OS for a free port."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{setting}: expected HOST:PORT, got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{setting}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{setting}: port {port} is out of range")
    return host.strip("[]"), port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
