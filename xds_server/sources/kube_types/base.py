"""What every Kubernetes-shaped model shares: reading rules, checked value types, and how a
pydantic error becomes a field path and a message in the user's own spelling.

Reading rules are the API server's: unknown fields are ignored (it would prune them), a
`null` is the same as leaving the field out, and scalars are strict (the API server does not
turn "80" into 80, nor 80 into "80"). Field paths are camelCase with `[index]` into lists and
`[key]` into maps, as Kubernetes writes them: `metadata.annotations[xds-server.io/export-to]`,
`spec.rules[0].backendRefs[1].port`.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, StrictInt, StrictStr, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

T = TypeVar("T")
Step = str | int


class Invalid(ValueError):
    """A check that failed, `at` a field below the model (or value) that raised it."""

    def __init__(self, message: str, at: tuple[Step, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.at = at


class KubeModel(BaseModel):
    """A Kubernetes object, or a part of one, as the sources read it."""

    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


def check(function: Callable[[T], object]) -> AfterValidator:
    """A validator that runs `function` on the value (which raises Invalid) and keeps it."""

    def run(value: T) -> T:
        function(value)
        return value

    return AfterValidator(run)


def in_range(low: int, high: int) -> AfterValidator:
    def within(value: int) -> None:
        if not low <= value <= high:
            raise Invalid(f"{value} is out of range [{low}, {high}]")

    return check(within)


def _required(value: str) -> None:
    if value == "":
        raise Invalid("required")


def max_length(limit: int) -> AfterValidator:
    def short(value: str) -> None:
        if len(value) > limit:
            raise Invalid(f"longer than {limit} characters")

    return check(short)


Port = Annotated[StrictInt, in_range(1, 65535)]
RequiredText = Annotated[StrictStr, check(_required)]

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_dns_label(value: str) -> bool:
    return bool(DNS_LABEL.match(value)) and len(value) <= 63


def is_dns_subdomain(value: str) -> bool:
    return bool(DNS_SUBDOMAIN.match(value)) and len(value) <= 253


# Errors ----------------------------------------------------------------------------------------


def describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"number {value}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def problems(model: type[BaseModel], errors: list[ErrorDetails]) -> list[tuple[str, str]]:
    """(field path, message) of each error of validating `model`, in the user's spelling."""
    result = []
    for error in errors:
        at: tuple[Step, ...] = ()
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, Invalid):
            at = cause.at
        result.append((field_path(model, (*error["loc"], *at)), message(error)))
    return result


def message(error: ErrorDetails) -> str:
    kind, value = error["type"], error.get("input")
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, Invalid):
        return cause.message
    if kind == "missing" or (kind.endswith("_type") and value is None):
        return "required"
    if kind == "int_type":
        return f"expected an integer, got {describe(value)}"
    if kind == "string_type":
        hint = " (quote it)" if isinstance(value, (bool, int, float)) else ""
        return f"expected a string, got {describe(value)}{hint}"
    if kind == "bool_type":
        return f"expected true or false, got {describe(value)}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {describe(value)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a mapping, got {describe(value)}"
    if kind == "literal_error":
        expected = str((error.get("ctx") or {}).get("expected", ""))
        choices = expected.replace("'", "").replace(" or ", ", ")
        return f"{value!r} is not one of {choices}"
    if kind == "too_long":
        limit = (error.get("ctx") or {}).get("max_length")
        return f"at most {limit} items"
    text = error["msg"].removeprefix("Value error, ")
    return text[:1].lower() + text[1:]


def field_path(model: type[BaseModel], loc: tuple[Step, ...]) -> str:
    """A pydantic `loc` as Kubernetes spells a field: steps through a model are its
    (camelCase) field names, steps into a list `[index]`, steps into a map `[key]`."""
    path = ""
    node: Any = model
    for step in loc:
        node = _unwrap(node)
        origin = typing.get_origin(node)
        if isinstance(step, int) and origin in (list, tuple):
            path += f"[{step}]"
            node = typing.get_args(node)[0]
        elif origin is dict:
            path += f"[{step}]"
            node = typing.get_args(node)[1]
        elif isinstance(node, type) and issubclass(node, BaseModel) and isinstance(step, str):
            field = _field(node, step)
            if field is None and ("[" in step or "(" in step):
                continue  # pydantic's own step (a union member's tag): users never wrote it
            path = f"{path}.{step}" if path else step  # a field, or an unknown one
            node = field
        elif isinstance(step, int):
            path += f"[{step}]"
        elif "[" not in step and "(" not in step and node is None:
            path = f"{path}.{step}" if path else step  # below an unknown field
        # anything else is pydantic's own step
    return path


def _field(model: type[BaseModel], alias: str) -> Any:
    for name, info in model.model_fields.items():
        if alias in (info.alias, name):
            return info.rebuild_annotation()
    return None


def _unwrap(annotation: Any) -> Any:
    """The type under Annotated[...] and X | None."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation
