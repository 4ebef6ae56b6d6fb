"""The xDS gRPC server: ADS and the per-type services, state-of-the-world and delta.

The server owns connections and scheduling; the protocol rules live in `stream.py` (shared),
`sotw.py` and `delta.py`. Authentication, SDS and observers follow streams through one
`StreamHooks` interface (`hooks.py`). Each
stream has a reader task (requests -> state) and a writer loop (state -> responses), so a
slow or stuck client only ever holds up itself (CONFORMANCE rule 8): its pending work is a
set of dirty flags recomputed from the cache's latest state, never a queue of old pushes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from envoy.service.discovery.v3 import discovery_pb2

from ..config import is_loopback
from ..model.identity import VerifiedProxy
from . import csds, types
from .cache import Change, FullView, ResourceCache, View
from .connection import Connection, proxy_label
from .hooks import HookChain, StreamHooks, StreamRefused
from .node import proxy_claim
from .push import Debouncer, Pending, PushSlots, SubscriptionIndex, TokenBucket
from .tls import TlsCredentials, peer_certificate, relayed, transport_of
from .tls_front import TlsFront
from .stream import MAX_TRACKED_CHANGES, Ack, ProtocolError, Request, Variant, new_stream

__all__ = ["Connection", "ServerSettings", "XdsServer", "proxy_label"]

log = logging.getLogger("xds_server.xds")

# gRPC service name -> (resource type it serves, or None for ADS; method name prefix)
SERVICES: dict[str, tuple[str | None, str]] = {
    "envoy.service.discovery.v3.AggregatedDiscoveryService": (None, "AggregatedResources"),
    "envoy.service.cluster.v3.ClusterDiscoveryService": (types.CLUSTER, "Clusters"),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": (types.ENDPOINT, "Endpoints"),
    "envoy.service.listener.v3.ListenerDiscoveryService": (types.LISTENER, "Listeners"),
    "envoy.service.route.v3.RouteDiscoveryService": (types.ROUTE, "Routes"),
    "envoy.service.secret.v3.SecretDiscoveryService": (types.SECRET, "Secrets"),
}


@dataclass
class ServerSettings:
    """Everything about the gRPC server an operator may tune. Defaults are production-safe."""

    address: str = "127.0.0.1:15010"  # loopback unless configured otherwise
    # Also listen on this Unix socket: local agents and sidecars of this host reach it from
    # any network namespace (as Istio's agent serves Envoy's xDS on a socket); not exposed
    # on the network. The socket file is made 0666: reaching it is what the path allows.
    unix_socket: str | None = None
    # xDS over TLS with the mesh CA's certificate (xds/tls.py), when the server has one
    # (`XdsServer.tls`): mutual TLS (client certificate required) on `tls_address`,
    # server-authenticated TLS for bearer tokens on `tls_token_address`. None: not served.
    tls_address: str | None = None
    tls_token_address: str | None = None
    # Who performs the mutual-TLS handshake on `tls_address`: "python", the TLS front
    # (xds/tls_front.py: refusals counted by reason, bytes relayed to an internal loopback
    # listener), or "grpc", grpc core's own TLS (refusals not seen by Python). grpc by
    # default: the front costs ~1.5x on push latency p50 and stream opens (bench/RESULTS.md).
    tls_frontend: str = "grpc"
    # `serve --workers N`: every worker process binds the same xDS ports (SO_REUSEPORT) and
    # the kernel spreads connections over them. Off otherwise: a second server on a port in
    # use must fail, not silently take half of its connections.
    reuse_port: bool = False
    # The front drops (and counts as "timeout") a client whose handshake is not done by then.
    tls_handshake_timeout: float = 10.0
    # `--auth tokens` on a plaintext address beyond loopback is refused at start (app.py)
    # unless this is set: tokens and SDS keys would cross the network in clear.
    allow_plaintext_tokens_off_host: bool = False
    debounce_quiet: float = 0.1  # seconds without a change before pushing; 0 = off
    debounce_max: float = 1.0  # longest a burst of changes may delay a push
    # Responses being written at once. Also the most writes one event-loop turn starts: gRPC
    # accepts new streams one per loop turn or two, so long turns starve reconnects before
    # admission even sees them (bench/soak.py at 5,000 streams: with 1,000, reconnects took
    # p50 10 s and p99 27 s under churn; with 64, p50 0.6 s and p99 2.0 s; bench/RESULTS.md).
    max_concurrent_pushes: int = 64
    slow_write_seconds: float = 1.0  # a write slower than this stops counting against the cap
    keepalive_time: float = 30.0  # server pings an idle connection this often
    keepalive_timeout: float = 10.0  # and closes it if the ping is not answered in time
    min_client_ping_interval: float = 10.0  # clients pinging more often are told off (GOAWAY)
    max_receive_message_bytes: int = 4 * 1024 * 1024  # requests are small
    max_send_message_bytes: int = 64 * 1024 * 1024  # a large mesh's CDS can be big
    max_concurrent_streams: int = 1024  # per HTTP/2 connection
    max_pending_streams: int = 50_000  # stream opens queued at once (bursts of reconnects)
    max_names_per_request: int = 20_000
    max_names_per_stream: int = 100_000  # subscribed at once, over all types of one stream
    # A stream that sends no request this long after opening is ended (DEADLINE_EXCEEDED):
    # an unauthenticated peer cannot hold streams open forever without saying who it is.
    first_request_timeout: float = 10.0
    # Overload control (issue 15), as istiod has it. A stream open is admitted while the open
    # rate allows (a token bucket: this many a second, `stream_open_burst` saved up; 0 = no
    # limit) and while fewer than `max_initializing_streams` streams are still being brought
    # to their first full config (0 = no cap); beyond either it is refused at once with
    # UNAVAILABLE, so its client backs off and retries, or another replica takes it. Pushes
    # that bring a stream to its first config are served before incremental pushes. A stream
    # that is not settled `first_config_timeout` after opening stops counting as initializing
    # (a client that never ACKs cannot hold an admission slot). The defaults let ordinary
    # meshes and restarts through untouched and stop a reconnect storm from starving streams.
    max_stream_opens_per_second: float = 500.0
    stream_open_burst: int = 1000
    max_initializing_streams: int = 1000
    first_config_timeout: float = 30.0
    shutdown_grace: float = 5.0
    control_plane_id: str = field(default_factory=lambda: f"xds-server@{socket.gethostname()}")

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.so_reuseport", 1 if self.reuse_port else 0),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", int(self.min_client_ping_interval * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.server.max_pending_requests", self.max_pending_streams),
            ("grpc.server.max_pending_requests_hard_limit", self.max_pending_streams * 2),
        ]


# Who sees what: the view of a verified proxy (and its release when its stream ends).
ViewProvider = Callable[[VerifiedProxy], View]
ViewRelease = Callable[[VerifiedProxy], None]

# The xDS methods as gRPC sees them: requests of either variant in, pre-encoded responses out.
# (Quoted: grpc's classes are generic in its type stubs only, not at run time.)
XdsContext: TypeAlias = "aio.ServicerContext[Request, bytes]"
XdsMethodHandler: TypeAlias = "grpc.RpcMethodHandler[Request, bytes]"
StreamBehavior: TypeAlias = "Callable[[AsyncIterator[Request], XdsContext], Awaitable[None]]"
FetchBehavior: TypeAlias = "Callable[[discovery_pb2.DiscoveryRequest, XdsContext], Awaitable[bytes]]"


def _identity(data: bytes) -> bytes:
    return data


def _same_view(view: View) -> ViewProvider:
    """A provider giving every proxy the one shared `view`."""
    return lambda _proxy: view


@dataclass
class ServerStats:
    """Counters the admin API and metrics read (issue 6 exports them to Prometheus)."""

    pushes: int = 0
    push_bytes: int = 0
    acks: int = 0
    nacks: int = 0
    streams_opened: int = 0
    protocol_errors: int = 0
    flushes: int = 0
    slow_writes: int = 0  # writes that outlived slow_write_seconds
    first_request_timeouts: int = 0  # streams ended for sending no request in time
    # Requests refused for a bound (names-per-request, names-per-stream): the stream ends.
    limits: Counter[str] = field(default_factory=Counter)
    csds_refusals: Counter[str] = field(default_factory=Counter)  # by the status they got
    refused_open_rate: int = 0  # stream opens refused: over max_stream_opens_per_second
    refused_initializing: int = 0  # stream opens refused: max_initializing_streams reached
    first_configs: int = 0  # streams brought to their first full config
    first_config_timeouts: int = 0  # streams not settled within first_config_timeout


class XdsServer:
    def __init__(
        self,
        cache: ResourceCache,
        settings: ServerSettings | None = None,
        *,
        view_for: ViewProvider | None = None,
        release_view: ViewRelease | None = None,
        hooks: Iterable[StreamHooks] = (),
    ) -> None:
        self.cache = cache
        # Everything that gates or follows streams: authentication and bounds (xds/auth.py),
        # SDS, metrics. Add more with `hooks.add()` before or after start.
        self.hooks = HookChain(hooks)
        # More gRPC services on the same port (the CA's CSR service), added at start().
        self.extra_handlers: list[grpc.GenericRpcHandler] = []
        self.settings = settings or ServerSettings()
        # Who sees what: called with the verified proxy of each new stream (and
        # `release_view` when the stream ends), so a mesh can scope proxies and build their
        # own resources.
        self._view_for: ViewProvider = view_for or _same_view(FullView(cache))
        self._release_view = release_view
        # Who may read every proxy's config over CSDS: local callers, and (set by the
        # composition root) whoever the admin API's tokens admit.
        self.csds_authorize: csds.Authorize = _loopback_only
        self.connections: set[Connection] = set()
        self.stats = ServerStats()
        self._index: SubscriptionIndex[Connection] = SubscriptionIndex()
        self._ids = itertools.count(1)
        self._debouncer = Debouncer(
            self.settings.debounce_quiet, self.settings.debounce_max, self._on_flush
        )
        self._push_slots = PushSlots(self.settings.max_concurrent_pushes)
        self._opens = TokenBucket(self.settings.max_stream_opens_per_second,
                                  self.settings.stream_open_burst)
        # Streams admitted and not yet holding their first full config.
        self.initializing: set[Connection] = set()
        self._writing: set[Connection] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._server: aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._remove_listener: Callable[[], None] | None = None
        self._closing = False
        self.port = 0
        # The TLS listeners' certificate and roots (set by security.py from the mesh CA);
        # without it the TLS addresses are not served.
        self.tls: TlsCredentials | None = None
        self.tls_port = 0  # mutual TLS, once started
        self.tls_token_port = 0  # server-authenticated TLS (tokens), once started
        # The mutual-TLS port's Python front, when `tls_frontend` is "python" (its refusal
        # counts are read by metrics), and its internal loopback plaintext port.
        self.tls_front: TlsFront | None = None
        self._front_internal_port = 0

    # Life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        server = aio.server(options=self.settings.grpc_options())
        server.add_generic_rpc_handlers([self._handlers()])
        for handler in self.extra_handlers:
            server.add_generic_rpc_handlers([handler])
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        csds.add_to_server(server, lambda: self.connections, self.csds_authorize,
                           self.stats.csds_refusals)
        service_names = list(SERVICES) + [
            csds.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(service_names, server)
        try:
            self.port = server.add_insecure_port(self.settings.address)
        except RuntimeError as err:  # grpc says "Failed to bind": name the address instead
            raise OSError(f"cannot listen on {self.settings.address}: address in use or not local") from err
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.address}")
        unix = self.settings.unix_socket
        if unix and server.add_insecure_port(f"unix:{unix}") == 0:
            raise OSError(f"cannot listen on the Unix socket {unix}")
        self._add_tls_ports(server)
        await server.start()
        if self._front_internal_port:
            await self._start_front()
        if self.settings.unix_socket:
            os.chmod(self.settings.unix_socket, 0o666)  # sidecars run as their own UID
        self._server = server
        self._remove_listener = self.cache.add_listener(self._on_change)
        self._sweeper = asyncio.create_task(self._sweep_slow_writes(), name="slow-write-sweeper")
        for name in [""] + list(SERVICES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("xDS server listening", extra={
            "address": self.address, "tls_address": self.tls_address or "",
            "tls_token_address": self.tls_token_address or ""})

    def _add_tls_ports(self, server: aio.Server) -> None:
        wanted = [(a, mutual) for a, mutual in ((self.settings.tls_address, True),
                                                 (self.settings.tls_token_address, False)) if a]
        if not wanted:
            return
        if self.tls is None:
            log.warning("xDS over TLS not served: no certificate (the mesh CA runs with --auth "
                        "tokens or insecure-node-metadata)",
                        extra={"address": ",".join(a for a, _ in wanted)})
            return
        for address, mutual in wanted:
            if mutual and self.settings.tls_frontend == "python":
                # Loopback only, never announced: reached through the front's relay.
                self._front_internal_port = server.add_insecure_port("127.0.0.1:0")
                if self._front_internal_port == 0:
                    raise OSError("cannot listen on 127.0.0.1 for the TLS front's relay")
                continue
            credentials = self.tls.server_credentials(client_certificates=mutual)
            try:
                port = server.add_secure_port(address, credentials)
            except RuntimeError as err:
                raise OSError(f"cannot listen on {address}: address in use or not local") from err
            if port == 0:
                raise OSError(f"cannot listen on {address}")
            if mutual:
                self.tls_port = port
            else:
                self.tls_token_port = port

    async def _start_front(self) -> None:
        assert self.tls is not None and self.settings.tls_address
        host, port = self.settings.tls_address.rsplit(":", 1)
        front = TlsFront(self.tls, ("127.0.0.1", self._front_internal_port),
                         handshake_timeout=self.settings.tls_handshake_timeout)
        try:
            self.tls_port = await front.start(host.strip("[]") or None, int(port))  # type: ignore[arg-type]
        except OSError as err:
            assert self._server is not None
            await self._server.stop(0)
            raise OSError(f"cannot listen on {self.settings.tls_address}: {err.strerror or err}") from err
        self.tls_front = front

    @property
    def address(self) -> str:
        host = self.settings.address.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def tls_address(self) -> str | None:
        """The mutual-TLS address actually bound, when served."""
        if not self.tls_port or not self.settings.tls_address:
            return None
        return f"{self.settings.tls_address.rsplit(':', 1)[0]}:{self.tls_port}"

    @property
    def tls_token_address(self) -> str | None:
        """The server-authenticated TLS address actually bound, when served."""
        if not self.tls_token_port or not self.settings.tls_token_address:
            return None
        return f"{self.settings.tls_token_address.rsplit(':', 1)[0]}:{self.tls_token_port}"

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: refuse new streams, finish in-flight responses, then close every
        stream with UNAVAILABLE so clients reconnect (to another replica)."""
        if self._server is None:
            return
        grace = self.settings.shutdown_grace if grace is None else grace
        self._closing = True
        await self._health.enter_graceful_shutdown()
        if self._remove_listener is not None:
            self._remove_listener()
        self._debouncer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.closing = True
            conn.wake.set()
        await self._server.stop(grace)
        self._server = None
        if self.tls_front is not None:
            await self.tls_front.stop()
        log.info("xDS server stopped")

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # Changes --------------------------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        self._debouncer.add(change)

    def _on_flush(self, pending: Pending, waited: float) -> None:
        self.stats.flushes += 1
        woken: set[Connection] = set()
        touched: set[Connection] = set()
        for type_url, names in pending.items():
            # A bulk change makes every affected stream recompute the type once, rather than
            # carry thousands of names each.
            tracked: set[str] | None = names if len(names) <= MAX_TRACKED_CHANGES else None
            for conn in self._index.affected(type_url, names):
                state = conn.state
                type_state = state.types.get(type_url)
                if type_state is None:
                    continue
                if type_state.wildcard and state.view is not None and not any(
                    state.view.may_see(type_url, n)
                    # ... or it has one it may no longer see (a visibility change): remove it
                    or n in type_state.known or n in type_state.last_full
                    for n in names
                ):
                    continue  # nothing this wildcard subscriber may see (or has) changed
                # Changed names are cache entries; where this view names them differently on
                # the wire (per-identity secrets), the stream re-checks the whole type.
                aliased = (type_state.wildcard or any(
                    state.view.cache_key(type_url, n) != n for n in type_state.names
                )) if type_url == types.SECRET and state.view is not None else False
                touched.add(conn)
                if state.mark_dirty(type_url, None if aliased else tracked):
                    woken.add(conn)
        for conn in woken:
            conn.wake.set()
        self.hooks.flushed(pending, waited, touched)

    @property
    def serving(self) -> bool:
        """Started and not shutting down (readiness)."""
        return self._server is not None and not self._closing

    @property
    def pending_changes(self) -> int:
        """Changed names waiting in the debouncer (a queue-depth gauge)."""
        return self._debouncer.pending

    @property
    def writes_in_flight(self) -> int:
        return len(self._writing)

    def overload(self) -> dict[str, int]:
        """Queue depths and admission state (metrics and the admin API read this)."""
        return {
            "initializing_streams": len(self.initializing),
            "max_initializing_streams": self.settings.max_initializing_streams,
            "pushes_waiting_first_config": self._push_slots.waiting_first,
            "pushes_waiting_incremental": self._push_slots.waiting_incremental,
            "pushes_in_flight": len(self._writing),
            "max_concurrent_pushes": self._push_slots.capacity,
            "refused_open_rate": self.stats.refused_open_rate,
            "refused_initializing": self.stats.refused_initializing,
        }

    def close_connection(self, conn: Connection, code: grpc.StatusCode, reason: str) -> None:
        """End one stream with a status (a revoked credential, an operator's request)."""
        if conn.error is None:
            conn.error = (code, reason)
        conn.closing = True
        conn.wake.set()

    def push_all(self) -> int:
        """Re-evaluate every stream now (a debugging aid; normal pushes follow changes)."""
        for conn in self.connections:
            for type_url in list(conn.state.types):
                conn.state.mark_dirty(type_url, None)
            conn.wake.set()
        return len(self.connections)

    # gRPC plumbing --------------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, XdsMethodHandler] = {}
        for service, (fixed_type, suffix) in SERVICES.items():
            stream_name = "Stream" + suffix
            delta_name = "Delta" + suffix
            handlers[f"/{service}/{stream_name}"] = grpc.stream_stream_rpc_method_handler(
                self._stream_handler(Variant.SOTW, fixed_type, stream_name),
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_identity,
            )
            handlers[f"/{service}/{delta_name}"] = grpc.stream_stream_rpc_method_handler(
                self._stream_handler(Variant.DELTA, fixed_type, delta_name),
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_identity,
            )
            if fixed_type is not None:
                handlers[f"/{service}/Fetch{suffix}"] = grpc.unary_unary_rpc_method_handler(
                    self._fetch_handler(fixed_type),
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_identity,
                )
        return _MethodTable(handlers)

    def _stream_handler(self, variant: Variant, fixed_type: str | None, method: str) -> StreamBehavior:
        async def handle(requests: AsyncIterator[Request], context: XdsContext) -> None:
            await self._serve_stream(variant, fixed_type, method, requests, context)

        return handle

    def _fetch_handler(self, type_url: str) -> FetchBehavior:
        async def fetch(request: discovery_pb2.DiscoveryRequest, context: XdsContext) -> bytes:
            state = new_stream(Variant.SOTW, next(self._ids), fixed_type=type_url,
                               control_plane=self.settings.control_plane_id,
                               max_names=self.settings.max_names_per_request)
            try:
                added = state.on_request(request).added
            except ProtocolError as err:
                if err.limit:
                    self.stats.limits[err.limit] += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            conn = Connection(state, context.peer(), f"Fetch {types.short_name(type_url)}")
            conn.metadata = tuple(context.invocation_metadata() or ())
            _read_transport(conn, context)
            hooks = self.hooks
            try:
                verified = await self._admit(conn)
            except StreamRefused as err:
                hooks.closed(conn)
                await context.abort(err.code, err.reason)
            try:
                state.view = hooks.viewing(conn, self._view_for(verified))
                try:
                    hooks.subscribed(conn, type_url, added, state.types[type_url].wildcard)
                    push = state.next_push()
                finally:
                    if self._release_view is not None:
                        self._release_view(verified)
            finally:
                hooks.closed(conn)
            if push is None:
                # REST-style fetch: "nothing new" is an empty response at the same version.
                empty: bytes = discovery_pb2.DiscoveryResponse(
                    version_info=request.version_info, type_url=type_url
                ).SerializeToString()
                return empty
            return push.data

        return fetch

    async def _admit(self, conn: Connection) -> VerifiedProxy:
        """Rule 18: who the proxy is, parsed once from its node and proven by the hooks,
        before it has a view (so before any response can even be computed)."""
        node = conn.state.node
        assert node is not None
        conn.verified = await self.hooks.admit(conn, VerifiedProxy.unverified(proxy_claim(node)))
        return conn.verified

    async def _serve_stream(
        self,
        variant: Variant,
        fixed_type: str | None,
        method: str,
        requests: AsyncIterator[Request],
        context: XdsContext,
    ) -> None:
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down")
        refusal = self._admission_refusal()
        if refusal is not None:
            # UNAVAILABLE, not RESOURCE_EXHAUSTED: gRPC documents UNAVAILABLE as "transient,
            # retry with a backoff", which is what a server-wide overload is (the client did
            # nothing wrong; RESOURCE_EXHAUSTED is kept for a client's own quotas, e.g. its
            # identity's stream budget). Envoy's xDS mux and gRPC's xDS client re-open a
            # failed stream with jittered exponential backoff whatever the status, and
            # UNAVAILABLE is also the status gRPC retry policies and L7 balancers in front of
            # several replicas retry on, so the retry may land on another replica.
            await context.abort(grpc.StatusCode.UNAVAILABLE, refusal)
        state = new_stream(
            variant,
            next(self._ids),
            fixed_type=fixed_type,
            control_plane=self.settings.control_plane_id,
            max_names=self.settings.max_names_per_request,
            max_stream_names=self.settings.max_names_per_stream,
        )
        conn = Connection(state, context.peer(), method)
        conn.metadata = tuple(context.invocation_metadata() or ())
        _read_transport(conn, context)
        self.connections.add(conn)
        self.stats.streams_opened += 1
        loop = asyncio.get_running_loop()
        conn.opened_at = loop.time()
        self.initializing.add(conn)
        conn.first_config_timer = loop.call_later(
            self.settings.first_config_timeout, self._first_config_overdue, conn
        )
        reader = asyncio.create_task(self._read(conn, requests))
        overdue = loop.call_later(
            self.settings.first_request_timeout, self._first_request_overdue, conn
        )
        try:
            await self._write_loop(conn, context)
        finally:
            overdue.cancel()
            reader.cancel()
            self._forget(conn)
            self.hooks.closed(conn)
            if state.node is not None:
                log.info(
                    "stream closed",
                    extra={"proxy": conn.proxy_id, "method": method, "stream": state.id},
                )
        if conn.error is not None:
            await context.abort(*conn.error)
        if conn.closing and self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server shutting down; reconnect")

    def _admission_refusal(self) -> str | None:
        """Why a new stream cannot be admitted now (counted), or None. Checked before the
        stream costs anything: no task, no state, no request read."""
        cap = self.settings.max_initializing_streams
        if cap > 0 and len(self.initializing) >= cap:
            self.stats.refused_initializing += 1
            return (f"overloaded: {cap} streams are still being brought to their first "
                    "config; retry with backoff")
        if not self._opens.take():
            self.stats.refused_open_rate += 1
            return (f"overloaded: more than {self.settings.max_stream_opens_per_second:g} "
                    "stream opens a second; retry with backoff")
        return None

    def _initialized(self, conn: Connection) -> None:
        """The stream holds its first full config: it leaves the first-config queue."""
        self.initializing.discard(conn)
        if conn.first_config_timer is not None:
            conn.first_config_timer.cancel()
            conn.first_config_timer = None
        self.stats.first_configs += 1
        elapsed = asyncio.get_running_loop().time() - conn.opened_at
        self.hooks.initialized(conn, max(0.0, elapsed))

    def _check_initialized(self, conn: Connection) -> None:
        state = conn.state
        if conn in self.initializing and state.view is not None and state.types and state.settled():
            self._initialized(conn)

    def _first_config_overdue(self, conn: Connection) -> None:
        conn.first_config_timer = None
        if conn in self.initializing:
            self.initializing.discard(conn)
            self.stats.first_config_timeouts += 1

    def _first_request_overdue(self, conn: Connection) -> None:
        if conn.state.node is not None or conn.closing:
            return
        self.stats.first_request_timeouts += 1
        log.warning("no first request in time, closing stream",
                    extra={"peer": conn.peer, "method": conn.method,
                           "timeout": self.settings.first_request_timeout})
        conn.error = (grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"no request within {self.settings.first_request_timeout:g}s of opening the stream")
        conn.closing = True
        conn.wake.set()

    async def _read(self, conn: Connection, requests: AsyncIterator[Request]) -> None:
        state = conn.state
        try:
            hooks = self.hooks
            async for request in requests:
                hooks.requested(conn)  # e.g. a bounded request rate (rule 19)
                first = state.node is None
                try:
                    result = state.on_request(request)
                except ProtocolError as err:
                    self.stats.protocol_errors += 1
                    if err.limit:
                        self.stats.limits[err.limit] += 1
                    log.warning(
                        "protocol error, closing stream: %s", err,
                        extra={"proxy": conn.proxy_id, "peer": conn.peer},
                    )
                    conn.error = (grpc.StatusCode.INVALID_ARGUMENT, str(err))
                    break
                if first:
                    verified = await self._admit(conn)
                    state.view = hooks.viewing(conn, self._view_for(verified))
                    log.info(
                        "stream opened",
                        extra={"proxy": conn.proxy_id, "peer": conn.peer, "method": conn.method,
                               "stream": state.id},
                    )
                type_state, ack, added, dropped = (
                    result.state, result.ack, result.added, result.dropped
                )
                if type_state is None:
                    continue  # stale nonce (rule 9)
                type_url = type_state.type_url
                view = state.view
                assert view is not None  # set when the first request was admitted
                key = view.cache_key
                # Indexed by cache entry: a change wakes exactly the streams that follow it.
                self._index.subscribe(conn, type_url, {key(type_url, n) for n in added})
                self._index.unsubscribe(conn, type_url, {key(type_url, n) for n in dropped})
                self._index.set_wildcard(conn, type_state.type_url, type_state.wildcard)
                if added or type_state.wildcard:
                    hooks.subscribed(conn, type_url, added, type_state.wildcard)
                if ack is not None:
                    self._record_ack(conn, ack)
                if state.wants_push():
                    conn.wake.set()
        except asyncio.CancelledError:
            raise
        except StreamRefused as err:
            conn.error = (err.code, err.reason)
        except DecodeError as err:
            # Bytes that are not a request of this method: the client gets a clear status
            # instead of a silent OK, and only its own stream ends.
            self.stats.protocol_errors += 1
            log.warning(
                "malformed request, closing stream: %s", err,
                extra={"proxy": conn.proxy_id, "peer": conn.peer},
            )
            conn.error = (grpc.StatusCode.INVALID_ARGUMENT, "malformed request: not a valid message")
        except Exception as err:  # a broken or garbage stream ends only itself
            if conn.error is None and not conn.closing:
                log.info("stream read ended: %s", err, extra={"proxy": conn.proxy_id})
        finally:
            conn.closing = True
            conn.wake.set()

    def _record_ack(self, conn: Connection, ack: Ack) -> None:
        if ack.nack is None:
            self.stats.acks += 1
        else:
            self.stats.nacks += 1
            log.warning(
                "config rejected (NACK): %s", ack.nack.message,
                extra={"proxy": conn.proxy_id, "type": types.short_name(ack.type_url),
                       "version": ack.nack.version},
            )
        self.hooks.acked(conn, ack)
        if conn in self.initializing:
            self._check_initialized(conn)

    async def _write_loop(self, conn: Connection, context: XdsContext) -> None:
        state = conn.state
        slots = self._push_slots
        loop = asyncio.get_running_loop()
        while True:
            await conn.wake.wait()
            conn.wake.clear()
            if conn.closing:
                return
            while state.view is not None and state.wants_push():
                # The cap is on writes in flight, and a stream still being brought to its
                # first config is served first. A write stuck behind a client that does not
                # read gives its slot back after `slow_write_seconds` (see
                # _sweep_slow_writes), so a stuck client holds up only itself. The response is
                # computed once the slot is ours: from the latest state, so changes made while
                # waiting coalesce into it.
                await slots.acquire(conn in self.initializing)
                conn.holds_slot = True
                try:
                    push = state.next_push()
                except BaseException:
                    conn.holds_slot = False
                    slots.release()
                    raise
                if push is None:
                    conn.holds_slot = False
                    slots.release()
                    break
                conn.write_started = loop.time()
                self._writing.add(conn)
                try:
                    await context.write(push.data)
                finally:
                    self._writing.discard(conn)
                    if conn.holds_slot:
                        conn.holds_slot = False
                        slots.release()
                self.stats.pushes += 1
                self.stats.push_bytes += len(push.data)
                self.hooks.pushed(conn, push)
                if conn.closing:
                    return
            if conn in self.initializing:
                self._check_initialized(conn)

    async def _sweep_slow_writes(self) -> None:
        slow = self.settings.slow_write_seconds
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(slow / 2)
            now = loop.time()
            for conn in list(self._writing):
                if conn.holds_slot and now - conn.write_started > slow:
                    conn.holds_slot = False
                    self._push_slots.release()
                    self.stats.slow_writes += 1

    def _forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.initializing.discard(conn)
        if conn.first_config_timer is not None:
            conn.first_config_timer.cancel()
            conn.first_config_timer = None
        view = conn.state.view
        for type_state in conn.state.types.values():
            names = type_state.names
            if view is not None:
                names = {view.cache_key(type_state.type_url, n) for n in names}
            self._index.unsubscribe(conn, type_state.type_url, names)
            self._index.set_wildcard(conn, type_state.type_url, False)
        if conn.state.view is not None and self._release_view is not None and conn.verified is not None:
            try:
                self._release_view(conn.verified)
            except Exception:
                log.exception("releasing a proxy's view failed", extra={"proxy": conn.proxy_id})


def _read_transport(conn: Connection, context: XdsContext) -> None:
    """What the call's transport proved: TLS or not, and the verified client certificate."""
    auth = context.auth_context()
    peer = context.peer()
    conn.transport = transport_of(auth, peer)
    conn.peer_certificate = peer_certificate(auth, peer)


def local_caller(context: aio.ServicerContext[Any, Any]) -> bool:
    peer = context.peer()  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:..."
    host = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]") if ":" in peer else ""
    if relayed(peer) is not None:
        return False  # the TLS front's relay: its client is wherever it came from
    return peer.startswith("unix:") or is_loopback(host)


async def _loopback_only(context: aio.ServicerContext[Any, Any]) -> None:
    """CSDS shows every proxy's config: without admin tokens, only callers on this host may
    read it (an operator with kubectl port-forward)."""
    if not local_caller(context):
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "client status is served to local callers only")


class _MethodTable(grpc.GenericRpcHandler):
    def __init__(self, handlers: dict[str, XdsMethodHandler]) -> None:
        self._handlers = handlers

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> XdsMethodHandler | None:
        return self._handlers.get(handler_call_details.method)

    def service_names(self) -> Iterable[str]:
        return list(SERVICES)
