"""Applying and removing the capture rules (capture/rules.py) in the current network
namespace, with the Debian `iptables` package's tools (nft backend).

Applying is idempotent: the jumps into our chains are removed first, then one
`iptables-restore --noflush` declares our chains (which empties them) and fills them, so a
second run leaves exactly the same rules. A rule the kernel refuses fails the whole restore
(nothing half-applied), and the error names that rule: an init container that runs this fails
visibly, and the pod never runs uncaptured.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence

from .rules import CHAINS, JUMPS, CaptureSettings, nat_rules

__all__ = ["CaptureError", "apply", "cleanup", "installed_rules"]

# (argv, stdin) -> (exit status, output): subprocess by default, replaceable in tests.
Runner = Callable[[Sequence[str], str | None], tuple[int, str]]

_FAILED_LINE = re.compile(r"line:? (\d+) failed|Error occurred at line: (\d+)")
MISSING = ("iptables-restore not found: install the Debian package `iptables` "
           "(apt-get install iptables); `make setup` does it when run as root")


class CaptureError(Exception):
    """The rules could not be applied or removed; the message names the rule or the tool."""


def _run(argv: Sequence[str], stdin: str | None) -> tuple[int, str]:
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise CaptureError(MISSING) from None
    output = done.stdout if done.returncode == 0 else (done.stderr or done.stdout)
    return done.returncode, output.strip()


def _require_tools() -> None:
    if shutil.which("iptables-restore") is None or shutil.which("iptables") is None:
        raise CaptureError(MISSING)


def _remove_jumps(run: Runner) -> None:
    for chain, rule in JUMPS:
        for _ in range(16):  # every copy (an older tool may have added several)
            status, _output = run(["iptables", "-w", "-t", "nat", "-D", chain, *rule.split()], None)
            if status != 0:
                break


def apply(settings: CaptureSettings, *, run: Runner = _run) -> list[str]:
    """Install the rules; returns them. Raises CaptureError naming what failed."""
    if run is _run:
        _require_tools()
    rules = nat_rules(settings)
    _remove_jumps(run)
    status, output = run(["iptables-restore", "-w", "--noflush"], "\n".join(rules) + "\n")
    if status != 0:
        raise CaptureError(_explain(output, rules))
    return rules


def cleanup(*, run: Runner = _run) -> None:
    """Remove every rule `apply` installs (absent ones are fine)."""
    if run is _run:
        _require_tools()
    _remove_jumps(run)
    for chain in CHAINS:
        run(["iptables", "-w", "-t", "nat", "-F", chain], None)
    for chain in CHAINS:
        run(["iptables", "-w", "-t", "nat", "-X", chain], None)


def installed_rules(*, run: Runner = _run) -> list[str]:
    """The nat table's rules now (`iptables-save` lines, counters left out)."""
    if run is _run:
        _require_tools()
    status, output = run(["iptables-save", "-t", "nat"], None)
    if status != 0:
        raise CaptureError(f"iptables-save failed: {output}")
    return [line for line in output.splitlines() if line.startswith(("-A", ":", "*", "COMMIT"))]


def _explain(output: str, rules: list[str]) -> str:
    match = _FAILED_LINE.search(output)
    if match:
        number = int(match.group(1) or match.group(2))
        if 1 <= number <= len(rules):
            return f"iptables-restore refused rule {number}: {rules[number - 1]!r}: {output}"
    return f"iptables-restore failed: {output or 'no output'}"
