"""The demo's runner: start the server, the apps and the sidecars, send rounds of traffic,
print the table, and stop everything (the app, Envoys by PID, the apps, the pods' network
namespaces, then the server, then the temp workdir).

Two modes (netns.choose_mode): capture, where the pods are network namespaces, the mesh is a
rewritten copy (meshcopy.py) and the app dials names; explicit, the loopback fallback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from ..admin.auth import document_for
from ..admin.settings import AdminSettings
from ..app import AppConfig, RunningApp, start_app
from ..config import parse_address
from ..envoy_process import find_envoy
from ..inject.settings import InjectorSettings
from ..inject.template import InjectionError, capture_command
from ..security import SecurityConfig
from ..xds.auth import AuthMode
from ..xds.server import ServerSettings
from .apps import HttpApp
from .errors import DemoError
from .meshcopy import MeshCopy
from .netns import (
    PROXY_UID,
    WORKDIR_PREFIX,
    NetPod,
    PodNetwork,
    choose_mode,
    sweep_leftovers,
    xds_server_command,
)
from .pods import CALLS_ENV, PodPlan, check_bindable, check_free, plan_pods, start_apps, tcp_targets
from .report import Table, describe, summary
from .sidecar import INSTALL_HINT, PodSidecar, Sidecar
from .traffic import DB_TRIPS_PER_ROUND, LoopbackTraffic, PodTraffic, RoundResult

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
    mode: str = "auto"  # auto: capture when this machine can (netns.choose_mode); capture; explicit
    # The admin API with the live mesh page (/ui), a read token made for this run; None: off.
    # A busy port falls back to any free one (the page's address is printed).
    admin_address: str | None = "127.0.0.1:15014"


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
        self.mode = "explicit"
        self.copy: MeshCopy | None = None  # capture: the mesh the server reads
        self.network: PodNetwork | None = None
        self.netpods: dict[tuple[str, str], NetPod] = {}
        self.traffic: LoopbackTraffic | PodTraffic | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def _on_signal(self) -> None:
        if self.stop.is_set():
            self.say("(still stopping...)")
        self.stop.set()
        self.halt.set()
        if isinstance(self.traffic, PodTraffic):
            self.traffic.interrupt()  # a round in progress is dropped, as in explicit mode

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal)
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
        self.mode, why_not = choose_mode(self.options.mode, binary)
        capture = self.mode == "capture"

        host, port = parse_address(self.options.xds_address, "--xds-address")
        if port:
            check_free(host, port, "the xDS server", "another xds-server (or demo) running? "
                        "Stop it, or pass --xds-address 127.0.0.1:0 for any free port.")
        # Sidecars prove who they are with workload tokens this server issues (as a VM or
        # a laptop outside Kubernetes would), and get their certificates over SDS.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-"))
        security = SecurityConfig(auth=AuthMode.TOKENS, ca_dir=self.workdir / "ca")
        server = ServerSettings(address=self.options.xds_address)
        served = source
        if capture:
            # The proxy UID reaches its own files and the server's socket in here.
            self.workdir.chmod(0o755)
            await asyncio.to_thread(sweep_leftovers, self.workdir.parent)
            self.copy = MeshCopy(source, self.workdir / "mesh")
            await asyncio.to_thread(self.copy.render)
            served = self.copy.target
            server = ServerSettings(address=self.options.xds_address,
                                    unix_socket=str(self.workdir / "xds.sock"))
        admin, page_token = self._admin()
        try:
            self.app = await start_app(AppConfig(server=server, source=served, security=security,
                                                 admin=admin))
        except RuntimeError as err:  # grpc's "Failed to bind to address"
            raise DemoError(f"cannot start the xDS server on {self.options.xds_address}: {err}") from None
        assert self.app.store is not None
        self.plans = plan_pods(self.app.store, served)
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
        if not capture:
            check_bindable(self.plans)

        self.say(f"xds-server demo: mesh from {source}, xDS server on {self.app.address}")
        if self.app.admin is not None:
            self.say(f"live mesh page: {self.app.admin.url}/ui#token={page_token}")
        if capture:
            self.say(f"pods: network namespaces, traffic captured by iptables (xds-server iptables "
                     f"in each pod), sidecars as UID {PROXY_UID}; the app calls "
                     f"{self._calls(client)} by name")
            await asyncio.to_thread(self._make_pods)
        else:
            self.say(f"pods on loopback addresses (explicit mode): {why_not}")
        for plan in self.plans:
            pod = self.netpods.get((plan.workload.namespace, plan.workload.name))
            await start_apps(plan, pod.netns if pod else None)

        xds_address = f"unix:{self.workdir / 'xds.sock'}" if capture else self.app.address
        for plan in self.plans:
            if plan.workload.meshed:
                token = self.app.ca.tokens.create(plan.workload.namespace,
                                                  plan.workload.service_account, TOKEN_TTL)
                pod = self.netpods.get((plan.workload.namespace, plan.workload.name))
                if pod is not None:
                    plan.sidecar = PodSidecar(binary, plan.workload, xds_address, self.workdir,
                                              pod, token=token)
                else:
                    plan.sidecar = Sidecar(binary, plan.workload, xds_address, self.workdir,
                                           token=token)
                try:
                    plan.sidecar.start()
                except OSError as err:
                    raise DemoError(f"cannot run Envoy ({binary}): {err}\n{INSTALL_HINT}") from None
        await self._wait_live()
        if self.stop.is_set():
            return None
        client_pod = self.netpods.get((client.workload.namespace, client.workload.name))
        if client_pod is not None:
            self.traffic = PodTraffic(client_pod, client.env[CALLS_ENV], tcp_targets(client), self.halt)
            self.tasks.append(asyncio.create_task(self._follow_source()))
        else:
            self.traffic = LoopbackTraffic(client, client.env[CALLS_ENV], self.halt)
        traffic = [self.traffic.describe(self.options.requests, client.workload.name)]
        if isinstance(self.traffic, PodTraffic):
            names = [self.traffic.host] + [h for h, _ in self.traffic.tcp_targets]
            resolved = await asyncio.to_thread(self.traffic.resolve, names)
            traffic.append("  names as its getaddrinfo gives them (its /etc/hosts): "
                           + ", ".join(f"{n} -> {a}" for n, a in resolved.items())
                           + " (ClusterIPs: no interface has them; iptables hand the "
                           "connections to its sidecar)")
        for line in describe(self.plans, traffic):
            self.say(line)
        self.say("")
        await self._warm_up()
        return None if self.stop.is_set() else client

    def _admin(self) -> tuple[AdminSettings | None, str]:
        """The admin API's settings with a read token of this run (its hash in the run's
        directory, 0600), or None when turned off."""
        address = self.options.admin_address
        if address is None:
            return None, ""
        assert self.workdir is not None
        parse_address(address, "--admin-address")  # a malformed address is named here
        token = secrets.token_urlsafe(24)
        tokens = self.workdir / "admin-tokens.yaml"
        tokens.touch(mode=0o600)
        tokens.write_text(document_for({"demo-page": (token, "read")}))
        # Another server (or demo) may have the port: any free one then (the URL is printed).
        return AdminSettings(address=address, tokens_file=tokens, any_port_if_taken=True), token

    @staticmethod
    def _calls(client: PodPlan) -> str:
        targets = [f"http://{client.env[CALLS_ENV]}/"] + [f"{h}:{p}" for h, p in tcp_targets(client)]
        return " and ".join(targets)

    def _make_pods(self) -> None:
        """Capture mode: a network namespace per pod, hosts files naming the Services, and in
        each meshed pod the capture rules of the injector's own init container command."""
        assert self.copy is not None
        self.network = PodNetwork()
        self.network.start()
        self.network.services = sorted(self.copy.services())
        xds_server = xds_server_command()
        settings = InjectorSettings()
        for plan in self.plans:
            w = plan.workload
            pod = self.network.add_pod(w.name, w.namespace, w.ip)
            self.netpods[(w.namespace, w.name)] = pod
            if not (w.meshed and w.capture):
                continue
            try:
                argv = capture_command(self.copy.pods[(w.namespace, w.name)], settings)
            except InjectionError as err:
                raise DemoError(f"pod {w.namespace}/{w.name}: {err}") from None
            done = subprocess.run(pod.command([*xds_server, *argv[1:]]), capture_output=True,
                                  text=True, timeout=30)
            if done.returncode != 0:
                raise DemoError(f"{' '.join(argv)} failed in pod {w.name} ({done.returncode}): "
                                f"{done.stderr.strip()}")

    async def _follow_source(self) -> None:
        """Capture mode: the user edits their mesh files; re-render the copy the server reads
        (which it then hot-reloads) and the pods' hosts files."""
        from ..sources.mesh_files import mesh_files

        def signature() -> list[tuple[str, int, int]]:
            out = []
            assert self.copy is not None
            for path in mesh_files(self.copy.source):
                with contextlib.suppress(OSError):
                    st = path.stat()
                    out.append((str(path), st.st_mtime_ns, st.st_size))
            return out

        seen = await asyncio.to_thread(signature)
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 0.5)
            now = await asyncio.to_thread(signature)
            if now != seen and self.copy is not None and self.network is not None:
                seen = now
                await asyncio.to_thread(self.copy.render)
                await asyncio.to_thread(self.network.set_services, self.copy.services())

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

    async def _warm_up(self) -> None:
        """LIVE means configured; wait until a request and each TCP target get through."""
        traffic = self.traffic
        assert traffic is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.ready_timeout
        while not self.stop.is_set():
            probe = await asyncio.to_thread(traffic.run, 1, 1, 1)
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
        traffic = self.traffic
        assert traffic is not None
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

    async def _round(self, traffic: LoopbackTraffic | PodTraffic, sidecar: Sidecar) -> RoundResult:
        stats = "^cluster\\.outbound\\|.*\\.upstream_rq_(retry|retry_success|5xx)$"
        before = await asyncio.to_thread(sidecar.counters, stats)
        started = time.perf_counter()
        result = await asyncio.to_thread(traffic.run, self.options.requests,
                                         self.options.concurrency, DB_TRIPS_PER_ROUND)
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
        """Each step runs even if an earlier one failed; the first failure is raised last."""
        self.halt.set()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.traffic is not None:
            await asyncio.to_thread(self.traffic.close)
        sidecars = [p.sidecar for p in self.plans if p.sidecar is not None and p.sidecar.started]
        if sidecars:
            await asyncio.gather(*(asyncio.to_thread(s.stop) for s in sidecars), return_exceptions=True)
        for plan in self.plans:
            for app in plan.apps:
                await app.close()
        namespaces = len(self.network.pods) if self.network is not None else 0
        if self.network is not None:
            await asyncio.to_thread(self.network.close)
        if self.app is not None:
            await self.app.close(grace=1.0)
        if sidecars:
            pids = ", ".join(str(s.pid) for s in sidecars)
            pods = f", {namespaces} pod network namespaces and the node's" if namespaces else ""
            self.say(f"stopped: {len(sidecars)} Envoy sidecars (pids {pids}), "
                     f"{sum(len(p.apps) for p in self.plans)} apps{pods}, the xDS server")
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
