"""The server process: sources feeding the cache, the xDS server reading it, one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .admin.settings import AdminSettings
from .config import is_loopback, parse_address
from .model.security import SecuritySettings
from .model.store import MeshStore
from .gc_policy import DrainCollector
from .sources.reading import ReadLimits
from .translate.controller import MeshController
from .translate.scope import ScopeSettings
from .xds.auth import AuthMode
from .xds.cache import ResourceCache
from .xds.lrs import LoadReportingService, LrsSettings
from .xds.server import ServerSettings, XdsServer

if TYPE_CHECKING:
    from .inject.settings import WebhookSettings
    from .security import SecurityConfig
    from .sources.kubernetes import KubeSettings

log = logging.getLogger("xds_server")


@dataclass
class KubernetesConfig:
    """Where the mesh comes from when it comes from a cluster (`--kubeconfig`, `--in-cluster`)."""

    kubeconfig: Path | None = None  # None: in-cluster in a pod, else $KUBECONFIG/~/.kube/config
    in_cluster: bool = False
    namespace_selector: str | None = None  # a label selector on Namespaces
    lease_namespace: str | None = None  # None: the pod's own namespace (or "default")
    # Watch, status and leader-election tuning (its namespace selector and Lease namespace
    # are the two fields above); None: KubeSettings' defaults.
    watch: KubeSettings | None = None


@dataclass
class AppConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    source: Path | None = None  # a directory of Kubernetes-shaped YAML (the mesh)
    resources: Path | None = None  # a directory of raw Envoy resources (YAML/JSON)
    # Bounds on reading both directories (file size, symbolic links).
    source_limits: ReadLimits = field(default_factory=ReadLimits)
    scope: ScopeSettings = field(default_factory=ScopeSettings)
    kubernetes: KubernetesConfig | None = None  # the mesh from a Kubernetes API server
    admin: AdminSettings | None = None  # the admin HTTP API, when set
    # False in `--workers` workers other than 0: the admin settings still authorize CSDS,
    # but only worker 0 listens on the admin port (workers.py).
    serve_admin: bool = True
    security: SecurityConfig | None = None  # authentication, CA and SDS (--auth ...)
    # Mesh mTLS/authorization defaults (--mtls-mode, --root-namespace, --default-deny); mTLS
    # itself is on only when proxies can get certificates (see `mesh_security`).
    mesh_security: SecuritySettings | None = None
    # The sidecar-injection admission webhook (HTTPS, a mesh-CA certificate), when set.
    webhook: WebhookSettings | None = None
    # LRS: sidecars' load reports, aggregated per Service (load_reports.py).
    load_reports: LrsSettings = field(default_factory=LrsSettings)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running server.

    A push allocates many short-lived objects per stream, and with thousands of streams the
    default gen-0 threshold (700) triggers collections that keep walking the same long-lived
    stream state. Freezing what exists after start-up takes it out of every later collection,
    and a higher gen-0 threshold makes collections rarer. Measured in bench/RESULTS.md.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@dataclass
class RunningApp:
    """The pieces of a started server process: what `serve` runs until a signal, and what
    `xds-server demo` runs in-process next to its sidecars and backends."""

    server: XdsServer
    cache: ResourceCache
    store: MeshStore | None  # the mesh from --source, when given
    stop_event: asyncio.Event
    tasks: list[asyncio.Task]
    kubernetes: Any = None  # the KubernetesSource, when the mesh comes from a cluster
    sources: dict[str, Any] = field(default_factory=dict)  # name -> source (has `.errors`)
    admin: Any = None  # the AdminServer, when the admin API runs
    # security.Security: the CA (authority, issuer, registry, rotation), authentication and
    # SDS; `status()` and `start_root_rotation()` for the admin API.
    ca: Any = None
    webhook: Any = None  # the inject.webhook.WebhookServer, when the webhook runs
    load: Any = None  # load_reports.LoadAggregator: what the sidecars' load reports say

    @property
    def address(self) -> str:
        """The xDS address actually bound (a configured port 0 is resolved)."""
        return self.server.address

    async def close(self, grace: float | None = None) -> None:
        """Stop serving (streams end with UNAVAILABLE), then stop the sources."""
        self.stop_event.set()
        if self.admin is not None:
            await self.admin.close()
        if self.webhook is not None:
            await self.webhook.close()
        await self.server.stop(grace)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def start_app(config: AppConfig) -> RunningApp:
    """Load the sources, start watching them and start the xDS server; return at once."""
    host, _ = parse_address(config.server.address, "--xds-address")
    admin_socket = None
    if config.admin is not None and config.serve_admin:
        from .admin.server import bind_admin

        # Taken before anything starts: a busy admin port stops the start-up here, not after
        # the xDS server has accepted streams it would then cut.
        admin_socket = bind_admin(config.admin.address,
                                  any_port_if_taken=config.admin.any_port_if_taken)
    try:
        return await _start(config, host, admin_socket)
    except BaseException:
        if admin_socket is not None:
            admin_socket.close()
        raise


async def _start(config: AppConfig, host: str, admin_socket: Any) -> RunningApp:
    from .sources.resource_files import ResourceDirectory  # imports every Envoy proto: lazily
    from .translate.raw import RawResources

    check_plaintext(config, host)
    cache = ResourceCache()
    tasks: list[asyncio.Task] = []
    sources: dict[str, Any] = {}
    stop = asyncio.Event()
    if config.resources is not None:
        directory = ResourceDirectory(config.resources, RawResources(cache), config.source_limits)
        sources["resources"] = directory
        errors = directory.load()
        log.info(
            "loaded raw resources",
            extra={"directory": str(config.resources), "errors": len(errors),
                   "resources": sum(len(cache.resources(t)) for t in cache.type_urls())},
        )
        tasks.append(asyncio.create_task(directory.run(stop), name="resource-files"))

    view_for = release = None
    store: MeshStore | None = None
    controller: MeshController | None = None
    if config.source is not None or config.kubernetes is not None:
        store = MeshStore()
        controller = MeshController(store, cache, config.scope, mesh_security(config),
                                    collector=DrainCollector())
        view_for, release = controller.view_for, controller.release
        # Translation runs in time-slices from here on: no store change holds the loop.
        tasks.append(controller.start())
        if config.source is not None:
            from .sources.mesh_files import MeshDirectory

            mesh = MeshDirectory(config.source, store, limits=config.source_limits)
            sources["files"] = mesh
            mesh_errors = mesh.load()
            log.info(
                "loaded mesh",
                extra={"directory": str(config.source), "errors": len(mesh_errors),
                       "services": len(store.all("Service"))},
            )
            tasks.append(asyncio.create_task(mesh.run(stop), name="mesh-files"))

    server = XdsServer(cache, config.server, view_for=view_for, release_view=release)
    if config.admin is not None:
        server.csds_authorize = _csds_authorizer(config.admin)
    security = None
    load = None
    kube = None
    try:
        if config.kubernetes is not None:
            assert store is not None
            # First: in a cluster the CA lives in a Secret the Lease holder creates, so leader
            # election runs before the CA is obtained.
            kube = await _start_kubernetes(config.kubernetes, store, stop, tasks)
        if config.security is not None:
            from .security import Security

            # The CA is loaded (or its root generated) in a worker thread, off the loop.
            security = await Security.create(config.security, cache, config.server.address,
                                             kubernetes=config.kubernetes,
                                             is_leader=_lease_holder(kube))
            security.attach(server)
            if controller is not None:  # the stream bound is fair per pod it can verify
                security.guard.pods = controller.pod_of
            tasks.append(asyncio.create_task(security.run(stop), name="security"))
        load = attach_load_reports(server, store, config.load_reports, security)
        if controller is not None:
            # Serve only once the first build is in the cache: no proxy sees a partial mesh.
            await controller.settled()
        await server.start()
    except BaseException:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    running = RunningApp(server, cache, store, stop, tasks, kube, sources, ca=security,
                         load=load)
    if config.webhook is not None:
        try:
            running.webhook = await _start_webhook(config, security, stop, tasks)
        except BaseException:
            await running.close(0)
            raise
    if config.admin is not None and config.serve_admin:
        from .admin.server import start_admin

        try:
            running.admin = await start_admin(running, config.admin, sock=admin_socket)
        except BaseException:
            await running.close(0)
            raise
    return running


async def _start_webhook(config: AppConfig, security: Any, stop: asyncio.Event,
                         tasks: list[asyncio.Task]) -> Any:
    """The injection webhook, with a certificate from the mesh CA; with a cluster, the
    MutatingWebhookConfiguration's caBundle kept on the CA's roots."""
    from .config import ConfigError
    from .inject.webhook import on_ca_change, start_webhook

    assert config.webhook is not None
    authority = getattr(security, "authority", None)
    if authority is None:
        raise ConfigError("--webhook-address: the webhook's certificate comes from the mesh CA: "
                          "run with --auth tokens or insecure-node-metadata")
    key_algorithm = config.security.key_algorithm if config.security is not None else "ec-p256"
    webhook = await start_webhook(config.webhook, authority, registry=security.registry,
                                  key_algorithm=key_algorithm)
    if config.kubernetes is not None and config.webhook.configuration:
        from .inject.ca_bundle import CaBundleSync
        from .sources.kube_api import KubeApi, make_api_client

        try:
            api = KubeApi(make_api_client(config.kubernetes.kubeconfig,
                                          in_cluster=config.kubernetes.in_cluster or None))
        except BaseException:
            await webhook.close()
            raise
        sync = CaBundleSync(api, config.webhook.configuration, lambda: authority.trust_bundle_pem)
        on_ca_change(authority, sync.bundle_changed)
        webhook.ca_bundle = sync

        async def keep_ca_bundle() -> None:
            try:
                await sync.run(stop)
            finally:
                api.close()

        tasks.append(asyncio.create_task(keep_ca_bundle(), name="webhook-ca-bundle"))
    return webhook


def attach_load_reports(server: XdsServer, store: MeshStore | None, settings: LrsSettings,
                        security: Any = None) -> Any:
    """Serve LRS on the xDS ports (before `server.start()`): reports from proxies proven as
    their xDS streams are, aggregated per destination Service."""
    from .load_reports import LoadAggregator

    aggregator = LoadAggregator(store, settings.interval)
    authenticator = getattr(getattr(security, "guard", None), "authenticator", None)
    service = LoadReportingService(
        lambda: server.connections, aggregator, settings,
        authenticate=authenticator.authenticate if authenticator is not None else None,
        reportable=aggregator.reportable)
    aggregator.lrs_stats = service.stats
    server.extra_handlers.append(service.handler())
    return aggregator


def _lease_holder(kube: Any) -> Any:
    """Whether this replica holds the Lease now (always, without leader election)."""
    if kube is None:
        return None
    elector = getattr(kube, "elector", None)
    return (lambda: elector.is_leader) if elector is not None else (lambda: True)


def check_plaintext(config: AppConfig, host: str) -> None:
    """No secret in clear off the host: with `--auth tokens`, a plaintext xDS address beyond
    loopback would carry service-account tokens and SDS private keys across the network
    unencrypted. Refused (ConfigError) unless the lab opt-out is given, which is logged."""
    if is_loopback(host):
        return
    tokens = config.security is not None and AuthMode(config.security.auth) is AuthMode.TOKENS
    address = config.server.address
    if tokens and not config.server.allow_plaintext_tokens_off_host:
        from .config import ConfigError

        raise ConfigError(
            f"--auth tokens with the plaintext --xds-address {address} (not loopback) would "
            "send bearer tokens and SDS private keys in clear over the network. Serve proxies "
            "over TLS instead: --xds-tls-address HOST:15012 (mutual TLS) and "
            "--xds-tls-token-address HOST:15013 (tokens over TLS), with --xds-address on "
            "127.0.0.1. For a lab only: --allow-plaintext-tokens-off-host.")
    if tokens:
        log.warning(
            "INSECURE: --allow-plaintext-tokens-off-host: bearer tokens cross the network in "
            "clear on the plaintext xDS address (SDS private keys are still only sent over TLS "
            "or on this host). Lab use only.", extra={"address": address})
    else:
        log.warning(
            "xDS listening beyond loopback without TLS: only do this on a trusted network",
            extra={"address": address},
        )


def mesh_security(config: AppConfig) -> SecuritySettings:
    """The controller's security settings: mTLS needs SDS certificates, which need a proven
    identity (any --auth but none); the trust domain is the CA's."""
    settings = config.mesh_security or SecuritySettings()
    security = config.security
    certificates = security is not None and AuthMode(security.auth) is not AuthMode.NONE
    trust_domain = (security.trust_domain if security is not None else "") or settings.trust_domain
    return dataclasses.replace(settings, mtls=certificates, trust_domain=trust_domain)


async def _start_kubernetes(
    config: KubernetesConfig, store: MeshStore, stop: asyncio.Event, tasks: list[asyncio.Task]
) -> Any:
    """Start following the cluster and wait for its first full sync: serving xDS before it
    would hand proxies a partial mesh (Services without endpoints, routes without policies)."""
    from .sources.kube_api import in_cluster_namespace, make_api_client
    from .sources.kubernetes import KubernetesSource, KubeSettings

    api = make_api_client(config.kubeconfig, in_cluster=config.in_cluster or None)  # ConfigError
    settings = config.watch or KubeSettings()
    leader = settings.leader
    if leader is not None:
        leader = dataclasses.replace(leader,
                                     namespace=config.lease_namespace or in_cluster_namespace())
    settings = dataclasses.replace(settings, namespace_selector=config.namespace_selector,
                                   leader=leader)
    kube = KubernetesSource(store, api, settings=settings)
    task = asyncio.create_task(kube.run(stop), name="kubernetes")
    tasks.append(task)
    log.info("waiting for the first sync with the Kubernetes API server",
             extra={"server": api.configuration.host})
    synced = asyncio.create_task(kube.wait_synced())
    await asyncio.wait({synced, task}, return_when=asyncio.FIRST_COMPLETED)
    if not synced.done():
        synced.cancel()
        task.result()  # the source ended before syncing: raise what ended it
    return kube


async def serve(config: AppConfig, *, started: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    app = await start_app(config)
    tune_gc()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, app.stop_event.set)
    log.info("serving", extra={"xds_address": app.address})
    if started is not None:
        started.set()
    try:
        await app.stop_event.wait()
    finally:
        log.info("shutting down", extra={"grace_seconds": config.server.shutdown_grace})
        await app.close()


def _csds_authorizer(settings: AdminSettings) -> Any:
    """CSDS behind the admin API's authentication: a local caller, or any admin token (the
    read role is enough: CSDS only reads) in the call's `authorization: Bearer` metadata."""
    import grpc

    from .admin.auth import TokenStore, parse_bearer
    from .xds.server import local_caller

    tokens = TokenStore.load(settings.tokens_file)

    async def authorize(context: Any) -> None:
        if local_caller(context):
            return
        metadata = dict(context.invocation_metadata() or ())
        token, problem = parse_bearer(metadata.get("authorization"))
        principal = tokens.authenticate(token) if token is not None else None
        if principal is None:
            log.warning("client status refused", extra={"peer": context.peer(), "reason": problem or "unknown token"})
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "client status needs an admin token (authorization: Bearer ...) off this host")

    return authorize
