"""The base of operator input: the one configuration error type, addresses and the one
duration grammar. Every layer may import this module (it imports nothing of the project)."""

from __future__ import annotations

import ipaddress
import re


class ConfigError(ValueError):
    """Operator input that cannot be used; the message names the setting."""


def parse_address(value: str, setting: str = "") -> tuple[str, int]:
    """Parse HOST:PORT (IPv6 as [::1]:PORT). Port 0 asks the OS for a free port. `setting`
    names the field in the error (empty where pydantic names the field)."""
    prefix = f"{setting}: " if setting else ""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{prefix}expected HOST:PORT, got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{prefix}port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{prefix}port {port} is out of range")
    return host.strip("[]"), port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Durations ----------------------------------------------------------------------------------
#
# One grammar, Go's time.ParseDuration as Kubernetes, the Gateway API (GEP-2257) and Istio
# write it: one or more <decimal><unit> with units h, m, s, ms ('1.5s', '100ms', '1h30m').
# Every string it matches is also a Go/CEL duration, so CRD rules can compare it (crds.py).
# A plain number (YAML `5`, or `--shutdown-grace 2` on a command line) is seconds.
# Operator settings (`settings_form`) also take days ('7d': certificate and token lifetimes
# are written in days) and any case; API objects follow the Gateway API and do not.

DURATION_PATTERN = r"^(?:(\d+(?:\.\d+)?)(h|ms|m|s))+$"
_API_DURATION = re.compile(DURATION_PATTERN)
_SETTING_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(d|h|ms|m|s))+$")
_TERM = re.compile(r"(\d+(?:\.\d+)?)(d|h|ms|m|s)")
_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: object, *, setting: str = "", settings_form: bool = False) -> float:
    """A duration in seconds ('1.5s', '100ms', '1h30m', or a number of seconds).

    `setting` names the field in the error (a flag; empty where pydantic names the field).
    `settings_form` is the operator's form (flags, environment): also 'd', any case, and
    seconds as a string ('4'). Negative values and anything else raise ConfigError (a
    ValueError, so pydantic reports it on its field). Keyword-only extras: pydantic calls
    it as a one-argument validator."""
    prefix = f"{setting}: " if setting else ""
    if isinstance(value, bool):
        raise ConfigError(f"{prefix}expected a duration such as '2s' or '150ms'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{prefix}a duration cannot be negative")
        return float(value)
    grammar = _SETTING_DURATION if settings_form else _API_DURATION
    text = value.strip() if isinstance(value, str) else ""
    if settings_form:  # command lines and environment variables: '24H' as well, and plain seconds
        text = text.lower()
        if _NUMBER.match(text):
            return float(text)
    if not isinstance(value, str) or not grammar.match(text):
        examples = "'2s', '150ms', '1m30s'" + (", '7d'" if settings_form else "")
        raise ConfigError(f"{prefix}invalid duration {value!r}: expected e.g. {examples}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _TERM.findall(text))
