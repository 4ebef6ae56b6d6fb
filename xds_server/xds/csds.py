"""Client Status Discovery Service (CSDS): each connected proxy's config status, per resource.

Served on the xDS port (`envoy.service.status.v3.ClientStatusDiscoveryService`), so standard
xDS tooling (`grpcurl`, Envoy's and gRPC's CSDS clients, istioctl-like status tools) can ask
the control plane what every proxy was sent and whether it accepted it. The answer comes from
the streams' protocol state (`stream.TypeState`), not from the proxies: one `ClientConfig` per
proxy (node id), with a `generic_xds_configs` entry per resource:

    what the server knows                          config_status  client_status
    sent and ACKed                                 SYNCED         ACKED
    sent, response not yet answered                STALE          UNKNOWN
    sent and NACKed (the resources the NACK        ERROR          NACKED  + error_state
      concerns: those it names, else all the
      response(s) since the last ACK changed)
    subscribed, exists, not sent yet               NOT_SENT       REQUESTED
    subscribed, the server has no such resource    NOT_SENT       DOES_NOT_EXIST

`version_info` is the resource's own version on delta streams and the version of the (type's)
response on state-of-the-world streams (the last ACKed one, the one in flight, or the one
rejected). Secrets are never included (no `xds_config`, no `failed_configuration`; name,
version and status only), and fields that Envoy's API marks `sensitive` are redacted from
every other resource, as Envoy's own config dump does. Envoy's NACK text quotes the rejected
resource verbatim, so it is withheld when that resource holds anything sensitive.
`exclude_resource_contents` leaves all contents out. `node_matchers` (OR-ed) select proxies
by node id and metadata.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf import any_pb2, struct_pb2, timestamp_pb2
from grpc import aio

from envoy.admin.v3 import config_dump_shared_pb2 as dump_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2, string_pb2, struct_pb2 as struct_matcher_pb2, value_pb2

from .. import redaction
from ..regex import RegexError, compile_re2
from . import types
from .resource import Resource
from .stream import TypeState, Variant

if TYPE_CHECKING:
    from .server import Connection

SERVICE_NAME = csds_pb2.DESCRIPTOR.services_by_name["ClientStatusDiscoveryService"].full_name

GenericXdsConfig: TypeAlias = csds_pb2.ClientConfig.GenericXdsConfig
ConfigStatus = csds_pb2.ConfigStatus
ClientResourceStatus = dump_pb2.ClientResourceStatus

WITHHELD = (
    "rejected by the client; its message is withheld because it may quote key material "
    "(see the proxy's own logs)"
)

# Proxies answered between yields to the event loop: a large answer never stalls the pushes.
_PROXIES_PER_SLICE = 50


class MatcherError(ValueError):
    """A node matcher this server cannot evaluate (bad regex, custom extension, empty)."""


# Node matching ------------------------------------------------------------------------------

NodePredicate = Callable[[base_pb2.Node], bool]
_ValuePredicate = Callable[[struct_pb2.Value], bool]


def compile_node_matchers(matchers: Iterable[node_pb2.NodeMatcher]) -> NodePredicate:
    """One predicate for a request's `node_matchers`: any of them (none: every node)."""
    compiled = [_node_matcher(m) for m in matchers]
    if not compiled:
        return lambda node: True
    return lambda node: any(match(node) for match in compiled)


def _node_matcher(matcher: node_pb2.NodeMatcher) -> NodePredicate:
    id_match = _string_matcher(matcher.node_id) if matcher.HasField("node_id") else None
    metadata = [_struct_matcher(m) for m in matcher.node_metadatas]

    def match(node: base_pb2.Node) -> bool:
        if id_match is not None and not id_match(node.id):
            return False
        return all(m(node.metadata) for m in metadata)

    return match


def _string_matcher(matcher: string_pb2.StringMatcher) -> Callable[[str], bool]:
    kind = matcher.WhichOneof("match_pattern")
    fold = matcher.ignore_case
    if kind in ("exact", "prefix", "suffix", "contains"):
        pattern: str = getattr(matcher, kind)
        if fold:
            pattern = pattern.lower()
        tests: dict[str, Callable[[str], bool]] = {
            "exact": lambda s: s == pattern,
            "prefix": lambda s: s.startswith(pattern),
            "suffix": lambda s: s.endswith(pattern),
            "contains": lambda s: pattern in s,
        }
        test = tests[kind]
        return (lambda s: test(s.lower())) if fold else test
    if kind == "safe_regex":
        try:  # RE2, as Envoy: linear time, so a caller's pattern cannot stall the server
            regex = compile_re2(matcher.safe_regex.regex)
        except RegexError as err:
            raise MatcherError(f"invalid regex {matcher.safe_regex.regex!r}: {err}") from None
        return lambda s: regex.fullmatch(s) is not None
    if kind is None:
        raise MatcherError("a StringMatcher must set one of exact, prefix, suffix, safe_regex, contains")
    raise MatcherError(f"StringMatcher {kind!r} is not supported")


def _struct_matcher(matcher: struct_matcher_pb2.StructMatcher) -> Callable[[struct_pb2.Struct], bool]:
    path = [segment.key for segment in matcher.path]
    if not path:
        raise MatcherError("a node metadata matcher needs a path")
    value_match = _value_matcher(matcher.value)

    def match(metadata: struct_pb2.Struct) -> bool:
        # As Envoy: a path that is not there is an unset value (only present_match: false
        # and negations of it match).
        value = struct_pb2.Value()
        current: struct_pb2.Struct | None = metadata
        for key in path:
            if current is None or key not in current.fields:
                value = struct_pb2.Value()
                break
            value = current.fields[key]
            current = value.struct_value if value.WhichOneof("kind") == "struct_value" else None
        return value_match(value)

    return match


def _value_matcher(matcher: value_pb2.ValueMatcher) -> _ValuePredicate:
    kind = matcher.WhichOneof("match_pattern")
    if kind == "null_match":
        return lambda v: v.WhichOneof("kind") == "null_value"
    if kind == "double_match":
        double = matcher.double_match
        if double.WhichOneof("match_pattern") == "range":
            start, end = double.range.start, double.range.end
            return lambda v: v.WhichOneof("kind") == "number_value" and start <= v.number_value < end
        exact = double.exact
        return lambda v: v.WhichOneof("kind") == "number_value" and v.number_value == exact
    if kind == "string_match":
        string_match = _string_matcher(matcher.string_match)
        return lambda v: v.WhichOneof("kind") == "string_value" and string_match(v.string_value)
    if kind == "bool_match":
        expected = matcher.bool_match
        return lambda v: v.WhichOneof("kind") == "bool_value" and v.bool_value == expected
    if kind == "present_match":
        expected = matcher.present_match
        return lambda v: (v.WhichOneof("kind") is not None) == expected
    if kind == "list_match":
        element = _value_matcher(matcher.list_match.one_of)
        return lambda v: v.WhichOneof("kind") == "list_value" and any(
            element(item) for item in v.list_value.values
        )
    if kind == "or_match":
        alternatives = [_value_matcher(m) for m in matcher.or_match.value_matchers]
        return lambda v: any(alt(v) for alt in alternatives)
    raise MatcherError("a ValueMatcher must set a match pattern")


# Redaction ----------------------------------------------------------------------------------


class Redactor:
    """Resource contents as CSDS shows them: Secrets never; every other resource through the
    one redaction (`xds_server.redaction`), scanned once per (type, version)."""

    def __init__(self, capacity: int = 4096) -> None:
        self._scan = redaction.CachedRedactor(capacity)

    def content(self, resource: Resource) -> any_pb2.Any | None:
        """The resource as CSDS may show it, or None (a Secret, or not inspectable)."""
        if resource.type_url == types.SECRET:
            return None
        body = self._scan.packed_version(resource.type_url, resource.version, resource.body)[0]
        return None if body is None else any_pb2.Any(type_url=resource.type_url, value=body)

    def sensitive(self, resource: Resource) -> bool:
        """Whether the resource holds data that must not be shown (a Secret, a sensitive
        field, or content that cannot be inspected)."""
        if resource.type_url == types.SECRET:
            return True
        return self._scan.packed_version(resource.type_url, resource.version, resource.body)[1]


# Status -------------------------------------------------------------------------------------


def _timestamp(unix: float) -> timestamp_pb2.Timestamp | None:
    if not unix:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix * 1e9))
    return stamp


_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]")


def _mentions(text: str, name: str) -> bool:
    """Whether `text` names `name` as a whole word (cluster_1 is not in "cluster_10")."""
    start = text.find(name)
    while start >= 0:
        end = start + len(name)
        before = text[start - 1] if start > 0 else ""
        after = text[end] if end < len(text) else ""
        if not (before and _NAME_CHARS.match(before)) and not (after and _NAME_CHARS.match(after)):
            return True
        start = text.find(name, start + 1)
    return False


class StatusBuilder:
    """Builds `ClientStatusResponse`s from the server's live connections."""

    def __init__(self, connections: Callable[[], Iterable[Connection]]) -> None:
        self._connections = connections
        self.redactor = Redactor()

    async def response(self, request: csds_pb2.ClientStatusRequest) -> csds_pb2.ClientStatusResponse:
        matches = compile_node_matchers(request.node_matchers)
        include = not request.exclude_resource_contents
        # Streams by proxy: a proxy may hold several (per-type services, or a reconnect
        # overlapping the stream it replaces).
        proxies: dict[str, list[Connection]] = {}
        for conn in list(self._connections()):
            node = conn.state.node
            if node is not None and conn.state.view is not None:
                proxies.setdefault(node.id, []).append(conn)
        response = csds_pb2.ClientStatusResponse()
        for count, node_id in enumerate(sorted(proxies)):
            if count and count % _PROXIES_PER_SLICE == 0:
                await asyncio.sleep(0)
            conns = sorted(proxies[node_id], key=lambda c: c.state.id)
            node = conns[-1].state.node
            if node is None or not matches(node):
                continue
            config = response.config.add()
            config.node.CopyFrom(node)
            redaction.redact(config.node)  # credentials a proxy put in its node metadata
            self._fill(config, conns, include)
        return response

    def _fill(self, config: csds_pb2.ClientConfig, conns: list[Connection], include: bool) -> None:
        # A proxy may have a stream per type (or per EDS cluster) and, briefly, a new stream
        # overlapping the one it replaces: per resource, the newest stream that has it wins.
        merged: dict[tuple[str, str], GenericXdsConfig] = {}
        for conn in conns:  # oldest first
            for type_state in list(conn.state.types.values()):
                for entry in self._type_entries(conn, type_state, include):
                    merged[(entry.type_url, entry.name)] = entry
        for key in sorted(merged, key=lambda k: (types.order_key(k[0]), k[0], k[1])):
            config.generic_xds_configs.append(merged[key])

    def _type_entries(self, conn: Connection, t: TypeState, include: bool) -> list[GenericXdsConfig]:
        state = conn.state
        view = state.view
        type_url = t.type_url
        delta = state.variant is Variant.DELTA
        in_flight = t.pending_nonce is not None
        # The NACK that stands: the latest response was rejected and nothing newer is in flight.
        nack = t.nack if not in_flight else None
        rejected = nack is not None
        changes = {r.name: r for r in t.last_changes} if (in_flight or rejected) else {}
        failed: set[str] = set()
        details = ""
        if nack is not None and changes:
            # Envoy applies each resource on its own and names the failing ones in the
            # message; when it names none of them, all the changes count as rejected.
            named = {n for n in changes if _mentions(nack.message, n)}
            failed = named or set(changes)
            # Envoy's NACK text quotes the rejected resource (its debug string, sensitive
            # fields included): not shown when the rejected responses carried anything sensitive.
            details = redaction.redact_text(nack.message)
            if any(self.redactor.sensitive(r) for r in changes.values()):
                details = WITHHELD

        if state.variant is Variant.SOTW and t.full_state:
            sent: dict[str, tuple[str, Resource | None]] = {
                n: (r.version, r) for n, r in t.last_full.items()
            }
        else:
            sent = {n: (v, None) for n, v in t.known.items()}

        entries: list[GenericXdsConfig] = []
        for name in sorted(sent):
            resource_version, resource = sent[name]
            change = changes.get(name)
            if change is not None and change.version == resource_version:
                resource = change
            if resource is None and view is not None:
                current = view.get(type_url, name)
                if current is not None and current.version == resource_version:
                    resource = current  # the server's copy is still what was sent
            entry = GenericXdsConfig(type_url=type_url, name=name)
            if change is not None and in_flight:
                entry.config_status = ConfigStatus.STALE
                entry.client_status = ClientResourceStatus.UNKNOWN
                entry.version_info = resource_version if delta else t.pending_version
                stamp = _timestamp(t.sent_at)
            elif name in failed:
                assert nack is not None  # only a standing NACK fails resources
                entry.config_status = ConfigStatus.ERROR
                entry.client_status = ClientResourceStatus.NACKED
                # ERROR shows the rejected config (the server's latest), as the API says.
                entry.version_info = resource_version if delta else nack.version
                error = entry.error_state
                error.details = details
                error.version_info = entry.version_info
                if (when := _timestamp(nack.at)) is not None:
                    error.last_update_attempt.CopyFrom(when)
                if include and resource is not None:
                    content = self.redactor.content(resource)
                    if content is not None:
                        error.failed_configuration.CopyFrom(content)
                stamp = _timestamp(nack.at)
            else:
                entry.config_status = ConfigStatus.SYNCED
                entry.client_status = ClientResourceStatus.ACKED
                if delta:
                    entry.version_info = resource_version
                elif change is not None and nack is not None:
                    entry.version_info = nack.version  # applied from the rejected response
                else:
                    entry.version_info = t.acked_version or t.sent_version
                stamp = _timestamp(t.acked_at)
            if stamp is not None:
                entry.last_updated.CopyFrom(stamp)
            if include and resource is not None:
                content = self.redactor.content(resource)
                if content is not None:
                    entry.xds_config.CopyFrom(content)
            entries.append(entry)

        for name in sorted(t.names - sent.keys()):
            exists = view is not None and view.get(type_url, name) is not None
            entries.append(
                GenericXdsConfig(
                    type_url=type_url,
                    name=name,
                    config_status=ConfigStatus.NOT_SENT,
                    client_status=ClientResourceStatus.REQUESTED
                    if exists
                    else ClientResourceStatus.DOES_NOT_EXIST,
                )
            )
        return entries


# Called with the call's context before anything is answered; it aborts the call (e.g.
# PERMISSION_DENIED) when the caller may not read proxies' configuration.
# (Quoted: grpc's ServicerContext is generic in its type stubs only, not at run time.)
Authorize: TypeAlias = "Callable[[aio.ServicerContext[Any, Any]], Awaitable[None]]"

# The generated servicer base ships no type information (it only supplies UNIMPLEMENTED
# defaults for the methods below): mypy sees a plain object.
if TYPE_CHECKING:
    _Servicer = object
else:
    _Servicer = csds_pb2_grpc.ClientStatusDiscoveryServiceServicer


class ClientStatusService(_Servicer):
    """The gRPC servicer; `connections` returns the server's live xDS connections. Calls the
    authorizer refuses are counted in `refusals`, by the status they got."""

    def __init__(
        self, connections: Callable[[], Iterable[Connection]], authorize: Authorize | None = None,
        refusals: Counter[str] | None = None,
    ) -> None:
        self.builder = StatusBuilder(connections)
        self._authorize = authorize
        self.refusals: Counter[str] = refusals if refusals is not None else Counter()

    async def _check(self, context: aio.ServicerContext[Any, Any]) -> None:
        if self._authorize is None:
            return
        try:
            await self._authorize(context)
        except asyncio.CancelledError:
            raise
        except BaseException:  # the authorizer aborted the call (grpc raises to end it)
            code = context.code() if callable(getattr(context, "code", None)) else None
            self.refusals[code.name.lower() if isinstance(code, grpc.StatusCode) else "refused"] += 1
            raise

    async def FetchClientStatus(
        self,
        request: csds_pb2.ClientStatusRequest,
        context: aio.ServicerContext[csds_pb2.ClientStatusRequest, csds_pb2.ClientStatusResponse],
    ) -> csds_pb2.ClientStatusResponse:
        await self._check(context)
        try:
            return await self.builder.response(request)
        except MatcherError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            raise  # unreachable: abort raises

    async def StreamClientStatus(
        self,
        request_iterator: AsyncIterator[csds_pb2.ClientStatusRequest],
        context: aio.ServicerContext[csds_pb2.ClientStatusRequest, csds_pb2.ClientStatusResponse],
    ) -> AsyncIterator[csds_pb2.ClientStatusResponse]:
        await self._check(context)
        async for request in request_iterator:
            try:
                response = await self.builder.response(request)
            except MatcherError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
                return
            yield response


def add_to_server(
    server: aio.Server,
    connections: Callable[[], Iterable[Connection]],
    authorize: Authorize | None = None,
    refusals: Counter[str] | None = None,
) -> ClientStatusService:
    servicer = ClientStatusService(connections, authorize, refusals)
    csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(servicer, server)
    return servicer
