"""The one redaction of secrets, for everything the server shows: admin config dumps, CSDS, logs.

What is redacted, as Envoy's own /config_dump does and a little more:

- every field Envoy's API marks `(udpa.annotations.sensitive)` (private keys, key passwords,
  PKCS#12 bundles, generic secrets, session ticket keys, private key provider configs...):
  string and bytes leaves become "[redacted]", other scalars are cleared, and a `DataSource`
  becomes `inline_string: "[redacted]"` (clearer than Envoy's base64 of the same text);
- token-like metadata: a `HeaderValue` (gRPC initial metadata, headers to add) or a `Struct`
  entry (node and filter metadata) whose key names a credential (authorization, cookie,
  *token, *secret, *password, api keys);
- `Any`s are opened through the descriptor pool and redacted inside. An `Any` whose type
  cannot be resolved, or whose bytes do not parse, is never passed through: its `value` is
  emptied (the `type_url` stays, so a reader sees what was withheld).
- Free text (Envoy's NACK messages quote the rejected resource; log lines): PEM private keys,
  `inline_string`/`inline_bytes` values and bearer tokens.

Only protobuf and xds-protos are imported here, so every layer may use it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any as _Untyped, TypeAlias, cast

from google.protobuf import any_pb2, struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message
from udpa.annotations import sensitive_pb2

from .protos import registered_class, type_name

if TYPE_CHECKING:
    from envoy.config.core.v3 import base_pb2
    from google._upb import _message as _upb

    # A message's DESCRIPTOR is either kind (the upb backend's classes or the Python ones).
    _Descriptor: TypeAlias = Descriptor | _upb.Descriptor
    _Field: TypeAlias = FieldDescriptor | _upb.FieldDescriptor

__all__ = [
    "REDACTED",
    "CachedRedactor",
    "Redactor",
    "Resolver",
    "is_credential_key",
    "may_hold_sensitive",
    "redact",
    "redact_text",
]

REDACTED = "[redacted]"

# Message class by full name, or None when the type is unknown.
Resolver = Callable[[str], "type[Message] | None"]

_ANY = "google.protobuf.Any"
_STRUCT = "google.protobuf.Struct"
_HEADER_VALUE = "envoy.config.core.v3.HeaderValue"
_DATA_SOURCE = "envoy.config.core.v3.DataSource"

# Secret material redacted even if a descriptor were built without its `sensitive` option.
_ALWAYS_SENSITIVE = frozenset({
    "envoy.extensions.transport_sockets.tls.v3.TlsCertificate.private_key",
    "envoy.extensions.transport_sockets.tls.v3.TlsCertificate.password",
    "envoy.extensions.transport_sockets.tls.v3.TlsCertificate.pkcs12",
    "envoy.extensions.transport_sockets.tls.v3.GenericSecret.secret",
    "envoy.extensions.transport_sockets.tls.v3.GenericSecret.secrets",
    "envoy.extensions.transport_sockets.tls.v3.TlsSessionTicketKeys.keys",
})

# Header and metadata keys that carry credentials (case-insensitive, whole key or suffix).
_CREDENTIAL_KEY = re.compile(
    r"(?:^|[-_.])(?:authorization|proxy-authorization|cookie|set-cookie|token|secret|password|"
    r"passwd|credentials?|api[-_]?key|private[-_]?key)$",
    re.IGNORECASE,
)


def is_credential_key(key: str) -> bool:
    """Whether a header or metadata key names a credential (its value is redacted)."""
    return bool(_CREDENTIAL_KEY.search(key))


# Which fields and types can hold secrets -------------------------------------------------------

_sensitive_fields: dict[str, bool] = {}
_may_hold: dict[str, bool] = {}


def _sensitive(field: _Field) -> bool:
    known = _sensitive_fields.get(field.full_name)
    if known is None:
        known = field.full_name in _ALWAYS_SENSITIVE or bool(
            field.GetOptions().Extensions[sensitive_pb2.sensitive])
        _sensitive_fields[field.full_name] = known
    return known


def may_hold_sensitive(descriptor: _Descriptor) -> bool:
    """Whether a message of this type can contain anything redacted (an `Any` can, so can
    a `Struct` or a header). Memoized per type: most resources are skipped unparsed."""
    known = _may_hold.get(descriptor.full_name)
    if known is not None:
        return known
    # Reachability over the type graph (which has cycles); only whole answers are kept.
    seen = {descriptor.full_name}
    todo = [descriptor]
    result = False
    while todo and not result:
        current = todo.pop()
        if current.full_name in (_ANY, _STRUCT, _HEADER_VALUE):
            result = True
            break
        for field in current.fields:
            if _sensitive(field):
                result = True
                break
            nested = field.message_type
            if nested is None or nested.full_name in seen:
                continue
            done = _may_hold.get(nested.full_name)
            if done is False:
                continue
            if done:
                result = True
                break
            seen.add(nested.full_name)
            todo.append(nested)
    _may_hold[descriptor.full_name] = result
    return result


# Messages --------------------------------------------------------------------------------------


class Redactor:
    """Redacts messages in place. `resolve` finds the class of an `Any`'s type: by default
    only types already registered (cheap, fine on the event loop); pass
    `protos.message_class` to resolve any xds-protos type (imports them all once)."""

    def __init__(self, resolve: Resolver = registered_class) -> None:
        self._resolve = resolve

    def redact(self, message: Message) -> bool:
        """Redact `message` in place; True if anything was redacted or withheld."""
        name = message.DESCRIPTOR.full_name
        if name == _ANY:
            return self._redact_any(cast(any_pb2.Any, message))
        if name == _STRUCT:
            return _redact_struct(cast(struct_pb2.Struct, message))
        if name == _HEADER_VALUE:
            return _redact_header(cast("base_pb2.HeaderValue", message))
        changed = False
        for field, value in message.ListFields():
            if _sensitive(field):
                _scrub_field(message, field, value)
                changed = True
            elif field.message_type is not None and may_hold_sensitive(field.message_type):
                for item in _field_messages(field, value):
                    changed = self.redact(item) or changed
        return changed

    def packed(self, type_url: str, body: bytes) -> tuple[bytes | None, bool]:
        """A serialized message of `type_url` as it may be shown: (redacted bytes, or None
        when it cannot be inspected; whether anything was redacted or withheld)."""
        cls = self._resolve(type_name(type_url))
        if cls is None:
            return None, True  # a type we cannot inspect might hold anything
        if not may_hold_sensitive(cls.DESCRIPTOR):
            return body, False
        message = cls()
        try:
            message.ParseFromString(body)
        except DecodeError:
            return None, True
        if not self.redact(message):
            return body, False
        return message.SerializeToString(deterministic=True), True

    def _redact_any(self, packed: any_pb2.Any) -> bool:
        if not packed.value:
            return False
        cls = self._resolve(type_name(packed.type_url))
        if cls is None:
            return _withhold(packed)
        if not may_hold_sensitive(cls.DESCRIPTOR):
            return False
        inner = cls()
        try:
            inner.ParseFromString(packed.value)
        except DecodeError:
            return _withhold(packed)
        if not self.redact(inner):
            return False
        packed.value = inner.SerializeToString(deterministic=True)
        return True


def redact(message: Message, resolve: Resolver = registered_class) -> bool:
    """Redact `message` in place (see the module docstring); True if anything changed."""
    return Redactor(resolve).redact(message)


class CachedRedactor(Redactor):
    """`packed`, remembered per (type, version): content-hashed versions mean a resource
    shared by many proxies is scanned once, not once per proxy or request."""

    def __init__(self, capacity: int = 4096, resolve: Resolver = registered_class) -> None:
        super().__init__(resolve)
        self._capacity = capacity
        self._memo: OrderedDict[tuple[str, str], tuple[bytes | None, bool]] = OrderedDict()

    def packed_version(self, type_url: str, version: str, body: bytes) -> tuple[bytes | None, bool]:
        key = (type_url, version)
        memo = self._memo
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
        result = self.packed(type_url, body)
        memo[key] = result
        if len(memo) > self._capacity:
            memo.popitem(last=False)
        return result


def _withhold(packed: any_pb2.Any) -> bool:
    """An `Any` that cannot be opened: its contents are not shown."""
    packed.value = b""
    return True


def _redact_header(header: base_pb2.HeaderValue) -> bool:
    if not is_credential_key(getattr(header, "key", "")):
        return False
    changed = False
    if getattr(header, "value", ""):
        header.value = REDACTED
        changed = True
    if getattr(header, "raw_value", b""):
        header.raw_value = REDACTED.encode()
        changed = True
    return changed


def _redact_struct(struct: struct_pb2.Struct) -> bool:
    changed = False
    for key, value in struct.fields.items():
        if is_credential_key(key):
            if value.WhichOneof("kind") not in (None, "null_value"):
                value.string_value = REDACTED
                changed = True
        else:
            changed = _redact_value(value) or changed
    return changed


def _redact_value(value: struct_pb2.Value) -> bool:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return _redact_struct(value.struct_value)
    if kind == "list_value":
        changed = False
        for item in value.list_value.values:
            changed = _redact_value(item) or changed
        return changed
    return False


# Scrubbing a sensitive field --------------------------------------------------------------------


def _map_value(field: _Field) -> _Field | None:
    """The value field of a map field's entry type; None when `field` is not a map."""
    entry = field.message_type
    if entry is None or not entry.GetOptions().map_entry:
        return None
    return entry.fields_by_name["value"]


def _field_messages(field: _Field, value: _Untyped) -> Iterable[Message]:
    value_field = _map_value(field)
    if value_field is not None:
        return list(value.values()) if value_field.message_type is not None else []
    if field.is_repeated:
        return list(value)
    return [value]


def _scrub_field(message: Message, field: _Field, value: _Untyped) -> None:
    """Every leaf under a sensitive field: strings and bytes become "[redacted]", other
    scalars are cleared."""
    value_field = _map_value(field)
    if value_field is not None:
        for key in list(value):
            if value_field.message_type is not None:
                _scrub_all(value[key])
            elif value_field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
                value[key] = _redacted_scalar(value_field)
            else:
                del value[key]
        return
    if field.message_type is not None:
        for item in _field_messages(field, value):
            _scrub_all(item)
        return
    if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES):
        message.ClearField(field.name)
    elif field.is_repeated:
        value[:] = [_redacted_scalar(field)] * len(value)
    else:
        setattr(message, field.name, _redacted_scalar(field))


def _scrub_all(message: Message) -> None:
    name = message.DESCRIPTOR.full_name
    if name == _DATA_SOURCE:
        message.Clear()
        cast("base_pb2.DataSource", message).inline_string = REDACTED
        return
    if name == _ANY:
        cast(any_pb2.Any, message).value = b""
        return
    for field, value in message.ListFields():
        _scrub_field(message, field, value)


def _redacted_scalar(field: _Field) -> str | bytes:
    return REDACTED.encode() if field.type == FieldDescriptor.TYPE_BYTES else REDACTED


# Text -------------------------------------------------------------------------------------------

_PEM_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(-----END \1PRIVATE KEY-----|$)", re.S
)
_INLINE_SECRET = re.compile(r'(inline_(?:string|bytes)\s*:\s*)"(?:[^"\\]|\\.)*"')
_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9\-._~+/]+=*", re.IGNORECASE)


def redact_text(text: str) -> str:
    """Free text (a NACK's message, a log line) without key material or bearer tokens; the
    rest (the error itself) is kept."""
    if "PRIVATE KEY-----" in text:
        text = _PEM_KEY.sub("[redacted private key]", text)
    if "inline_" in text:
        text = _INLINE_SECRET.sub(r'\1"[redacted]"', text)
    return _BEARER.sub(r"\1[redacted]", text)
