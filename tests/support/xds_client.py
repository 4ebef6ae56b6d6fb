"""A scripted raw xDS client for protocol tests.

Why this exists: conformance tests must drive the server with *exact* request sequences
(nonces, versions, subscriptions, error details) and look at every response it sends, which a
real xDS client hides. This is a thin layer over `grpc.aio`: it opens ADS or per-type
streams, state-of-the-world or delta, sends the requests a test spells out, and reads the
responses with a timeout. It can also assert that *no* response arrives within a short window,
and open a stream that sends arbitrary bytes.

Reading happens in a background task per stream (started on demand), feeding a queue: a
`grpc.aio` read that is cancelled cancels the whole RPC, so a timed-out `wait_for(read())`
cannot be used. A stream created with `read=False` does not read at all until
`start_reading()`; that is how a test plays a client that stopped reading.

Usage:

    async with XdsClient(server.address) as client:
        ads = client.ads()
        await ads.request(CLUSTER)                 # wildcard CDS
        cds = await ads.recv()
        await ads.ack(cds)
        await ads.expect_silence()
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

# Importing the modules registers the message types used to decode `Any`s.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2

from xds_server.xds import types

__all__ = [
    "DEFAULT_TIMEOUT",
    "SILENCE",
    "DeltaStream",
    "RawStream",
    "SotwStream",
    "StreamClosed",
    "XdsClient",
    "cluster",
    "delta_resources",
    "endpoints",
    "eventually",
    "listener",
    "method",
    "route",
    "secret",
    "sotw_names",
    "sotw_resources",
]

DEFAULT_TIMEOUT = 5.0  # how long to wait for a response that must come
SILENCE = 0.3  # how long to listen for a response that must not come

MESSAGE_CLASSES: dict[str, type[Message]] = {
    types.CLUSTER: cluster_pb2.Cluster,
    types.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    types.LISTENER: listener_pb2.Listener,
    types.ROUTE: route_pb2.RouteConfiguration,
    types.SECRET: secret_pb2.Secret,
}

# type URL -> (service, method name suffix) as in the xDS API.
SERVICES: dict[str | None, tuple[str, str]] = {
    None: ("envoy.service.discovery.v3.AggregatedDiscoveryService", "AggregatedResources"),
    types.CLUSTER: ("envoy.service.cluster.v3.ClusterDiscoveryService", "Clusters"),
    types.ENDPOINT: ("envoy.service.endpoint.v3.EndpointDiscoveryService", "Endpoints"),
    types.LISTENER: ("envoy.service.listener.v3.ListenerDiscoveryService", "Listeners"),
    types.ROUTE: ("envoy.service.route.v3.RouteDiscoveryService", "Routes"),
    types.SECRET: ("envoy.service.secret.v3.SecretDiscoveryService", "Secrets"),
}


def method(type_url: str | None, delta: bool) -> str:
    service, suffix = SERVICES[type_url]
    return f"/{service}/{'Delta' if delta else 'Stream'}{suffix}"


def decode(any_message) -> Message:
    cls = MESSAGE_CLASSES[any_message.type_url]
    return cls.FromString(any_message.value)


def sotw_resources(response: discovery_pb2.DiscoveryResponse) -> dict[str, Message]:
    """name -> decoded resource, in response order."""
    out: dict[str, Message] = {}
    for any_message in response.resources:
        message = decode(any_message)
        out[types.resource_name(message)] = message
    return out


def sotw_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    return sorted(sotw_resources(response))


def delta_resources(response: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, Message]:
    """name -> decoded resource; also checks each entry's name matches its content."""
    out: dict[str, Message] = {}
    for entry in response.resources:
        message = decode(entry.resource)
        assert types.resource_name(message) == entry.name, (entry.name, message)
        out[entry.name] = message
    return out


class StreamClosed(Exception):
    """The server ended the stream (or it broke) while a response was expected."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"stream closed: {code.name}: {details}")
        self.code = code
        self.details = details


_END = object()


class _Stream:
    """One bidirectional stream; subclasses know how to build requests."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        method_name: str,
        serializer,
        deserializer,
        *,
        read: bool = True,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        self.method = method_name
        self.call = channel.stream_stream(
            method_name, request_serializer=serializer, response_deserializer=deserializer
        )(metadata=metadata)
        self._responses: asyncio.Queue = asyncio.Queue()
        self._reader: asyncio.Task | None = None
        self.received: list = []  # every response, in order
        if read:
            self.start_reading()

    def start_reading(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_all())

    async def _read_all(self) -> None:
        try:
            while True:
                message = await self.call.read()
                if message is grpc.aio.EOF:
                    break
                self.received.append(message)
                self._responses.put_nowait(message)
        except grpc.aio.AioRpcError:
            pass
        except asyncio.CancelledError:
            raise
        finally:
            self._responses.put_nowait(_END)

    async def _write(self, message) -> None:
        await self.call.write(message)

    async def recv(self, timeout: float = DEFAULT_TIMEOUT):
        """The next response; fails if none arrives within `timeout` or the stream ends."""
        self.start_reading()
        try:
            item = await asyncio.wait_for(self._responses.get(), timeout)
        except TimeoutError:
            raise AssertionError(f"no response on {self.method} within {timeout}s") from None
        if item is _END:
            self._responses.put_nowait(_END)  # stay ended for later callers
            raise StreamClosed(await self.call.code(), await self.call.details())
        return item

    async def maybe_recv(self, window: float = SILENCE):
        """The next response if one arrives within `window`, else None."""
        self.start_reading()
        try:
            item = await asyncio.wait_for(self._responses.get(), window)
        except TimeoutError:
            return None
        if item is _END:
            self._responses.put_nowait(_END)
            raise StreamClosed(await self.call.code(), await self.call.details())
        return item

    async def expect_silence(self, window: float = SILENCE) -> None:
        """Assert that no response arrives within `window` seconds."""
        self.start_reading()
        try:
            item = await asyncio.wait_for(self._responses.get(), window)
        except TimeoutError:
            return
        if item is _END:
            self._responses.put_nowait(_END)
            raise StreamClosed(await self.call.code(), await self.call.details())
        raise AssertionError(f"unexpected response on {self.method}: {item}")

    async def closed_with(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[grpc.StatusCode, str]:
        """Wait for the server to end the stream; returns (status code, details)."""
        self.start_reading()

        async def ended():
            while True:
                item = await self._responses.get()
                if item is _END:
                    self._responses.put_nowait(_END)
                    return

        await asyncio.wait_for(ended(), timeout)
        return await self.call.code(), await self.call.details()

    async def done_writing(self) -> None:
        await self.call.done_writing()

    async def cancel(self) -> None:
        self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass


def default_node(node_id: str = "test-proxy") -> base_pb2.Node:
    return base_pb2.Node(id=node_id, cluster="test")


class SotwStream(_Stream):
    """A state-of-the-world stream (ADS if `type_url` is None, else a per-type service)."""

    def __init__(self, channel, type_url: str | None, *, node: base_pb2.Node, read: bool = True,
                 metadata: Sequence[tuple[str, str]] | None = None):
        super().__init__(
            channel,
            method(type_url, delta=False),
            discovery_pb2.DiscoveryRequest.SerializeToString,
            discovery_pb2.DiscoveryResponse.FromString,
            read=read,
            metadata=metadata,
        )
        self.node = node
        self._sent_node = False
        self.names: dict[str, list[str]] = {}  # last subscription sent per type

    async def send(self, request: discovery_pb2.DiscoveryRequest) -> None:
        await self._write(request)

    async def request(
        self,
        type_url: str = "",
        names: Iterable[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: str | None = None,
        node: base_pb2.Node | bool | None = True,
    ) -> discovery_pb2.DiscoveryRequest:
        """Send one DiscoveryRequest. The node goes with the first request only, unless
        `node` is a Node (sent as given) or False (never sent)."""
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            version_info=version,
            response_nonce=nonce,
        )
        if isinstance(node, base_pb2.Node):
            request.node.CopyFrom(node)
        elif node is True and not self._sent_node:
            request.node.CopyFrom(self.node)
        self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.names[type_url] = list(names)
        await self._write(request)
        return request

    async def ack(
        self,
        response: discovery_pb2.DiscoveryResponse,
        names: Iterable[str] | None = None,
        *,
        type_url: str | None = None,
    ) -> None:
        """ACK `response`, repeating the current subscription unless `names` is given."""
        t = response.type_url if type_url is None else type_url
        if names is None:
            names = self.names.get(t, self.names.get("", []))
        await self.request(t, names, version=response.version_info, nonce=response.nonce)

    async def nack(
        self,
        response: discovery_pb2.DiscoveryResponse,
        message: str,
        *,
        accepted_version: str = "",
        names: Iterable[str] | None = None,
    ) -> None:
        """NACK `response`: version_info is the last *accepted* version, as Envoy sends it."""
        t = response.type_url
        if names is None:
            names = self.names.get(t, [])
        await self.request(
            t, names, version=accepted_version, nonce=response.nonce, error=message
        )


class DeltaStream(_Stream):
    """An incremental (delta) stream (ADS if `type_url` is None, else a per-type service)."""

    def __init__(self, channel, type_url: str | None, *, node: base_pb2.Node, read: bool = True,
                 metadata: Sequence[tuple[str, str]] | None = None):
        super().__init__(
            channel,
            method(type_url, delta=True),
            discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            discovery_pb2.DeltaDiscoveryResponse.FromString,
            read=read,
            metadata=metadata,
        )
        self.node = node
        self._sent_node = False

    async def send(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        await self._write(request)

    async def request(
        self,
        type_url: str = "",
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str = "",
        initial: Mapping[str, str] | None = None,
        error: str | None = None,
        node: base_pb2.Node | bool | None = True,
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        request = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
            initial_resource_versions=dict(initial or {}),
        )
        if isinstance(node, base_pb2.Node):
            request.node.CopyFrom(node)
        elif node is True and not self._sent_node:
            request.node.CopyFrom(self.node)
        self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        await self._write(request)
        return request

    async def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> None:
        await self.request(response.type_url, nonce=response.nonce)

    async def nack(self, response: discovery_pb2.DeltaDiscoveryResponse, message: str) -> None:
        await self.request(response.type_url, nonce=response.nonce, error=message)


class RawStream(_Stream):
    """A stream that sends raw bytes (for garbage input) and returns raw response bytes."""

    def __init__(self, channel, method_name: str):
        super().__init__(channel, method_name, lambda b: b, lambda b: b)

    async def send(self, data: bytes) -> None:
        await self._write(data)


class XdsClient:
    """One gRPC channel to the server; streams are opened on it as tests need them."""

    def __init__(
        self, address: str, *, node_id: str = "test-proxy",
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        """`metadata` goes with every stream opened (e.g. `authorization: Bearer ...`) unless
        a stream is given its own."""
        self.address = address
        self.node = default_node(node_id)
        self.metadata = metadata
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", 256 * 1024 * 1024),
                # A separate connection per client object, so one client's flow control
                # never involves another's.
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self._streams: list[_Stream] = []

    async def __aenter__(self) -> XdsClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _track(self, stream):
        self._streams.append(stream)
        return stream

    def _metadata(self, metadata):
        return self.metadata if metadata is None else metadata

    def ads(self, *, node: base_pb2.Node | None = None, read: bool = True,
            metadata: Sequence[tuple[str, str]] | None = None) -> SotwStream:
        return self._track(SotwStream(self.channel, None, node=node or self.node, read=read,
                                      metadata=self._metadata(metadata)))

    def sotw(self, type_url: str, *, node: base_pb2.Node | None = None, read: bool = True,
             metadata: Sequence[tuple[str, str]] | None = None) -> SotwStream:
        return self._track(SotwStream(self.channel, type_url, node=node or self.node, read=read,
                                      metadata=self._metadata(metadata)))

    def ads_delta(self, *, node: base_pb2.Node | None = None, read: bool = True,
                  metadata: Sequence[tuple[str, str]] | None = None) -> DeltaStream:
        return self._track(DeltaStream(self.channel, None, node=node or self.node, read=read,
                                       metadata=self._metadata(metadata)))

    def delta(self, type_url: str, *, node: base_pb2.Node | None = None, read: bool = True,
              metadata: Sequence[tuple[str, str]] | None = None) -> DeltaStream:
        return self._track(DeltaStream(self.channel, type_url, node=node or self.node, read=read,
                                       metadata=self._metadata(metadata)))

    def raw(self, method_name: str) -> RawStream:
        return self._track(RawStream(self.channel, method_name))

    async def close(self) -> None:
        for stream in self._streams:
            await stream.cancel()
        await self.channel.close()


# Small resource builders for protocol tests ---------------------------------------------------


def cluster(name: str, *, connect_timeout_ms: int = 1000, stat_name: str = "") -> cluster_pb2.Cluster:
    """An EDS cluster (its endpoints come from a ClusterLoadAssignment of the same name)."""
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS, alt_stat_name=stat_name)
    c.connect_timeout.FromMilliseconds(connect_timeout_ms)
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def endpoints(name: str, *ports: int, ip: str = "127.0.0.1") -> endpoint_pb2.ClusterLoadAssignment:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    locality = cla.endpoints.add()
    for port in ports:
        address = locality.lb_endpoints.add().endpoint.address.socket_address
        address.address = ip
        address.port_value = port
    return cla


def route(name: str, cluster_name: str, *, prefix: str = "/") -> route_pb2.RouteConfiguration:
    config = route_pb2.RouteConfiguration(name=name)
    host = config.virtual_hosts.add(name="all", domains=["*"])
    entry = host.routes.add()
    entry.match.prefix = prefix
    entry.route.cluster = cluster_name
    return config


def listener(name: str, port: int, route_name: str | None = None) -> listener_pb2.Listener:
    """A listener; `route_name` is recorded in its stat prefix (enough for protocol tests)."""
    lis = listener_pb2.Listener(name=name, stat_prefix=route_name or name)
    address = lis.address.socket_address
    address.address = "127.0.0.1"
    address.port_value = port
    return lis


def secret(name: str, value: str = "s3cret") -> secret_pb2.Secret:
    s = secret_pb2.Secret(name=name)
    s.generic_secret.secret.inline_string = value
    return s


# Waiting on server-side state ------------------------------------------------------------------


async def eventually(predicate, timeout: float = DEFAULT_TIMEOUT, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned), or fail after `timeout`.

    For server-side state that follows a request which gets no response (an ACK, a NACK),
    where there is nothing on the wire to wait for.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)
