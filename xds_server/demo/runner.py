"""The demo's runner: start the server, the apps and the sidecars, send rounds of traffic,
print the table, and stop everything (Envoys by PID, then the apps, then the server)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TextIO

from ..app import AppConfig, RunningApp, start_app
from ..config import parse_address
from ..envoy_process import find_envoy
from ..security import SecurityConfig
from ..xds.auth import AuthMode
from ..xds.server import ServerSettings
from .apps import HttpApp
from .errors import DemoError
from .pods import CALLS_ENV, PodPlan, check_bindable, check_free, plan_pods, start_apps
from .report import Table, describe, summary
from .sidecar import INSTALL_HINT, Sidecar
from .traffic import DB_TRIPS_PER_ROUND, RoundResult, Traffic

TOKEN_TTL = timedelta(days=1)  # a demo runs for minutes; tokens die with its CA directory


@dataclass
class DemoOptions:
    source: Path
    xds_address: str = "127.0.0.1:15010"
    rounds: int | None = None  # None: until Ctrl-C
    requests: int = 200
    concurrency: int = 4
    interval: float = 1.0
    ready_timeout: float = 30.0


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.out = out
        self.stop = asyncio.Event()
        self.halt = threading.Event()  # for the traffic threads
        self.app: RunningApp | None = None
        self.plans: list[PodPlan] = []
        self.workdir: Path | None = None
        self.keep_logs = False
        self.caller = ""
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking client code (the app's sockets) off the loop that serves xDS."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            self.say("(still stopping...)")
        self.stop.set()
        self.halt.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            self.options.concurrency + 2, thread_name_prefix="demo-traffic")
        try:
            client = await self._start()
            if client is None:  # interrupted while starting
                return 0
            return await self._rounds(client)
        except DemoError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            return 1
        finally:
            await self._shutdown()
            self.pool.shutdown(wait=True, cancel_futures=True)

    # Start-up -------------------------------------------------------------------------------

    async def _start(self) -> PodPlan | None:
        from ..sources.validate import format_errors, has_errors, validate_directory

        source = self.options.source
        binary = find_envoy()
        if binary is None:
            raise DemoError(INSTALL_HINT)
        errors = validate_directory(source)
        if has_errors(errors):
            raise DemoError(f"{source} has problems; fix them and run again:\n{format_errors(errors)}")

        host, port = parse_address(self.options.xds_address, "--xds-address")
        if port:
            check_free(host, port, "the xDS server", "another xds-server (or demo) running? "
                        "Stop it, or pass --xds-address 127.0.0.1:0 for any free port.")
        # Sidecars prove who they are with workload tokens this server issues (as a VM or
        # a laptop outside Kubernetes would), and get their certificates over SDS.
        self.workdir = Path(tempfile.mkdtemp(prefix="xds-server-demo-"))
        security = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=self.workdir / "ca")
        try:
            self.app = await start_app(AppConfig(
                server=ServerSettings(address=self.options.xds_address), source=source,
                security=security,
            ))
        except RuntimeError as err:  # grpc's "Failed to bind to address"
            raise DemoError(f"cannot start the xDS server on {self.options.xds_address}: {err}") from None
        assert self.app.store is not None
        self.plans = plan_pods(self.app.store, source)
        callers = [p for p in self.plans if p.env.get(CALLS_ENV)]
        if not callers:
            raise DemoError(
                f"no pod in {source} has {CALLS_ENV} in its app container's env: the demo sends "
                f"its traffic from that pod to that Host (e.g. {CALLS_ENV}=api)"
            )
        client = callers[0]
        self.caller = client.workload.name
        if not client.workload.meshed:
            raise DemoError(f"pod {client.workload.name} ({CALLS_ENV}) has no sidecar to send through")
        check_bindable(self.plans)

        self.say(f"xds-server demo: mesh from {source}, xDS server on {self.app.address}")
        for plan in self.plans:
            await start_apps(plan)

        for plan in self.plans:
            if plan.workload.meshed:
                token = self.app.ca.tokens.create(plan.workload.namespace,
                                                  plan.workload.service_account, TOKEN_TTL)
                plan.sidecar = Sidecar(binary, plan.workload, self.app.address, self.workdir,
                                       token=token)
                try:
                    plan.sidecar.start()
                except OSError as err:
                    raise DemoError(f"cannot run Envoy ({binary}): {err}\n{INSTALL_HINT}") from None
        await self._wait_live()
        if self.stop.is_set():
            return None
        for line in describe(self.plans, client, self.options.requests):
            self.say(line)
        await self._warm_up(client)
        return None if self.stop.is_set() else client

    async def _wait_live(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_timeout
        pending = [p.sidecar for p in self.plans if p.sidecar is not None]
        while pending and not self.stop.is_set():
            for sidecar in list(pending):
                if not sidecar.running:
                    self.keep_logs = True
                    raise DemoError(
                        f"the Envoy of {sidecar.workload.name} exited with {sidecar.returncode} "
                        f"while starting; its log ({sidecar.log_path}) ends with:\n{sidecar.log_tail()}"
                    )
                if await asyncio.to_thread(sidecar.state) == "LIVE":
                    pending.remove(sidecar)
            if loop.time() > deadline:
                self.keep_logs = True
                names = ", ".join(f"{s.workload.name} ({s.state()})" for s in pending)
                raise DemoError(f"sidecars not LIVE after {self.options.ready_timeout:.0f}s: {names}; "
                                f"logs in {self.workdir}")
            if pending:
                await asyncio.sleep(0.05)

    async def _warm_up(self, client: PodPlan) -> None:
        """LIVE means configured; wait until a request and each TCP binding get through."""
        traffic = Traffic(client, client.env[CALLS_ENV], self.halt)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_timeout
        while not self.stop.is_set():
            probe = RoundResult()
            await self._in_thread(traffic.http_worker, 1, probe, threading.Lock())
            await self._in_thread(traffic.db_worker, 1, probe, threading.Lock())
            if probe.ok:
                return
            if loop.time() > deadline:
                self.keep_logs = True
                raise DemoError(
                    f"traffic does not get through after {self.options.ready_timeout:.0f}s "
                    f"(HTTP: {dict(probe.error_kinds) or 'ok'}, db {probe.db_ok}/{probe.db_trips}); "
                    f"sidecar logs in {self.workdir}"
                )
            await asyncio.sleep(0.2)

    # Rounds ---------------------------------------------------------------------------------

    async def _rounds(self, client: PodPlan) -> int:
        traffic = Traffic(client, client.env[CALLS_ENV], self.halt)
        sidecar = client.sidecar
        assert sidecar is not None
        versions = sorted({p.version for p in self.plans if p.version and any(
            isinstance(a, HttpApp) for a in p.apps)})
        table = Table(versions, self.out)
        table.header()
        total = RoundResult()
        failed = 0
        for number in itertools.count(1):
            if self.options.rounds is not None and number > self.options.rounds:
                break
            result = await self._round(traffic, sidecar)
            if result.interrupted:
                break
            for dead in (p.sidecar for p in self.plans if p.sidecar and not p.sidecar.running):
                self.keep_logs = True
                raise DemoError(f"the Envoy of {dead.workload.name} exited with "
                                f"{dead.returncode}; its log ends with:\n{dead.log_tail()}")
            if set(result.versions) - set(table.versions):
                table.versions = sorted(set(table.versions) | set(result.versions))
                table.header()
            table.row(str(number), result)
            total.add(result)
            failed += not result.ok
            if self.options.rounds is not None and number >= self.options.rounds:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.options.interval)
            if self.stop.is_set():
                break
        if total.requests:
            for line in summary(table.versions, total, failed, self.plans, self.caller):
                self.say(line)
        if self.stop.is_set():
            return 0  # Ctrl-C: the user asked to stop; a clean stop is success
        return 0 if failed == 0 and total.requests else 1

    async def _round(self, traffic: Traffic, sidecar: Sidecar) -> RoundResult:
        stats = "^cluster\\.outbound\\|.*\\.upstream_rq_(retry|retry_success|5xx)$"
        before = await asyncio.to_thread(sidecar.counters, stats)
        result = RoundResult()
        lock = threading.Lock()
        workers = max(1, min(self.options.concurrency, self.options.requests))
        shares = [self.options.requests // workers + (i < self.options.requests % workers)
                  for i in range(workers)]
        started = time.perf_counter()
        await asyncio.gather(
            *(self._in_thread(traffic.http_worker, n, result, lock) for n in shares),
            self._in_thread(traffic.db_worker, DB_TRIPS_PER_ROUND, result, lock),
        )
        result.seconds = time.perf_counter() - started
        # Envoy charges some counters (retry success) just after the response went out.
        await asyncio.sleep(0.1)
        after = await asyncio.to_thread(sidecar.counters, stats)
        delta = {name: value - before.get(name, 0) for name, value in after.items()}
        result.retries = sum(v for k, v in delta.items() if k.endswith(".upstream_rq_retry"))
        result.retries_ok = sum(v for k, v in delta.items() if k.endswith(".upstream_rq_retry_success"))
        result.upstream_5xx = sum(v for k, v in delta.items() if k.endswith(".upstream_rq_5xx"))
        return result

    # Shutdown -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.halt.set()
        sidecars = [p.sidecar for p in self.plans if p.sidecar is not None and p.sidecar.started]
        if sidecars:
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in sidecars))
        for plan in self.plans:
            for app in plan.apps:
                await app.close()
        if self.app is not None:
            await self.app.close(grace=1.0)
        if sidecars:
            pids = ", ".join(str(s.pid) for s in sidecars)
            self.say(f"stopped: {len(sidecars)} Envoy sidecars (pids {pids}), "
                     f"{sum(len(p.apps) for p in self.plans)} apps, the xDS server")
        if self.workdir is not None:
            if self.keep_logs:
                self.say(f"Envoy bootstraps and logs kept in {self.workdir}")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


def default_source() -> Path:
    """examples/demo of the current directory, else of the source tree this package is in."""
    here = Path("examples/demo")
    if here.is_dir():
        return here
    tree = Path(__file__).resolve().parents[2] / "examples" / "demo"
    return tree if tree.is_dir() else here


def run(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo until Ctrl-C or its rounds are done; the process exit code."""
    return asyncio.run(Demo(options, out).run())
