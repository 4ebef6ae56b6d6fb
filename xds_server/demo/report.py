"""What the demo prints: the pods it runs, one table row per round, and the summary."""

from __future__ import annotations

from typing import TextIO

from .apps import HttpApp
from .pods import PodPlan
from .traffic import RoundResult, percentile


def count(n: int, one: str, many: str = "") -> str:
    """`1 request`, `2 requests`, `3 retries`."""
    return f"{n} {one if n == 1 else many or one + 's'}"


class Table:
    """One row per round, columns fixed once the versions are known; and a summary."""

    def __init__(self, versions: list[str], out: TextIO) -> None:
        self.versions = versions
        self.out = out
        self.rounds = 0

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def header(self) -> None:
        cells = [f"{'round':>5}", f"{'requests':>8}"]
        cells += [f"{v:>15}" for v in self.versions]
        cells += [f"{'errors':>6}", f"{'upstream 5xx':>12}", f"{'retries':>7}", f"{'retried ok':>10}",
                  f"{'db round trips':>14}", f"{'p50 ms':>7}", f"{'p99 ms':>7}"]
        line = "  ".join(cells)
        self._print(line)
        self._print("-" * len(line))

    def row(self, label: str, result: RoundResult) -> str:
        answered = sum(result.versions.values())
        cells = [f"{label:>5}", f"{result.requests:>8}"]
        for version in self.versions:
            count = result.versions.get(version, 0)
            share = 100.0 * count / answered if answered else 0.0
            cells.append(f"{count:>5} ({share:5.1f} %)")
        db = f"{result.db_ok}/{result.db_trips} OK" if result.db_ok == result.db_trips else \
            f"{result.db_ok}/{result.db_trips} FAIL"
        cells += [f"{result.errors:>6}", f"{result.upstream_5xx:>12}", f"{result.retries:>7}",
                  f"{result.retries_ok:>10}", f"{db:>14}",
                  f"{percentile(result.latencies, 0.5) * 1000:>7.1f}",
                  f"{percentile(result.latencies, 0.99) * 1000:>7.1f}"]
        line = "  ".join(cells)
        self._print(line)
        return line


def describe(plans: list[PodPlan], traffic: list[str]) -> list[str]:
    """Each pod (address, sidecar, apps), then what traffic the rounds send and the legend."""
    lines = []
    for plan in plans:
        w = plan.workload
        apps = []
        for app in plan.apps:
            if isinstance(app, HttpApp):
                text = f"HTTP :{app.port}" + (f" answers {app.version}" if app.version else "")
                if app.fail_every:
                    text += f", 503 to every {app.fail_every}th request"
            else:
                text = f"TCP echo :{app.port}"
            apps.append(text)
        sidecar = f"sidecar pid {plan.sidecar.pid} LIVE" if plan.sidecar else "no sidecar"
        lines.append(f"  {w.namespace}/{w.name:<12} {w.ip:<12} {sidecar:<24} {'; '.join(apps)}")
    lines.append("")
    lines += traffic
    lines.append(
        "errors: what the app saw; upstream 5xx / retries / retried ok: what its sidecar "
        "hid (Envoy stats). Ctrl-C stops."
    )
    return lines


def summary(versions: list[str], total: RoundResult, failed: int, plans: list[PodPlan],
            caller: str) -> list[str]:
    """The lines after the last round: totals, injected failures, rounds that failed."""
    lines = [""]
    answered = sum(total.versions.values())
    shares = ", ".join(
        f"{v} {total.versions.get(v, 0)} ({100.0 * total.versions.get(v, 0) / answered:.1f} %)"
        for v in versions
    ) if answered else "no answers"
    lines.append(
        f"total: {count(total.requests, 'request')} ({shares}), "
        f"{count(total.errors, 'error')}"
        + (f" {dict(total.error_kinds)}" if total.errors else "")
        + f", {total.upstream_5xx} upstream 5xx, {count(total.retries, 'retry', 'retries')} "
        f"({total.retries_ok} succeeded), db round trips {total.db_ok}/{total.db_trips} OK, "
        f"p50 {percentile(total.latencies, 0.5) * 1000:.1f} ms"
    )
    injected = sum(a.failures for p in plans for a in p.apps if isinstance(a, HttpApp))
    if injected:
        lines.append(f"the apps answered {count(injected, 'request')} with an injected 503; "
                     f"{caller}'s app saw {count(total.errors, 'error')}")
    if failed:
        lines.append(f"{count(failed, 'round')} had errors or failed db round trips")
    return lines
