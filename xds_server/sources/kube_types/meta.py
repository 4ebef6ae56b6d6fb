"""meta/v1: ObjectMeta, the part of every object the mesh reads."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, PlainValidator, StrictStr

from .base import Invalid, KubeModel, check, is_dns_label, is_dns_subdomain


def _timestamp(value: Any) -> str:
    # Unquoted timestamps in YAML arrive as datetimes; keep the API server's RFC 3339 spelling
    # so ordering by this string is ordering by time.
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return value if isinstance(value, str) else ""


def _name(value: str) -> None:
    if value == "":
        raise Invalid("required")
    if not is_dns_subdomain(value):
        raise Invalid(f"{value!r} is not a DNS name (a-z, 0-9, '-', '.')")


def _label_name(value: str) -> None:
    if value == "":
        raise Invalid("required")
    if not is_dns_label(value):
        raise Invalid(f"{value!r} is not a DNS label (a-z, 0-9, '-'; 63 at most)")


def _namespace(value: str) -> None:
    if value and not is_dns_label(value):
        raise Invalid(f"{value!r} is not a valid namespace name")


def _null_is_empty(value: Any) -> Any:
    return "" if value is None else value


Timestamp = Annotated[str, PlainValidator(_timestamp)]
# Label and annotation values: a null reads as empty, as the API server stores it.
MapValue = Annotated[StrictStr, BeforeValidator(_null_is_empty)]


class ObjectMeta(KubeModel):
    """Name (a DNS subdomain), namespace (empty: the source's default), labels, annotations."""

    name: Annotated[StrictStr, check(_name)] = Field(default="", validate_default=True)
    namespace: Annotated[StrictStr, check(_namespace)] = ""
    labels: dict[StrictStr, MapValue] = Field(default_factory=dict)
    annotations: dict[StrictStr, MapValue] = Field(default_factory=dict)
    creation_timestamp: Timestamp = ""


class LabelNamedMeta(ObjectMeta):
    """For kinds whose names become DNS labels (Namespace, Service)."""

    name: Annotated[StrictStr, check(_label_name)] = Field(default="", validate_default=True)
