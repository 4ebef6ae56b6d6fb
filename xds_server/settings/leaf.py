"""What one setting is: a leaf of the tree with its value type, its flag and its variable.

`setting()` declares a leaf; `Leaf` reads one back (flag, variable, help, kind of value) for
the command line, the environment and the README.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, JsonValue
from pydantic.fields import FieldInfo

from ..config import parse_address, parse_duration

ENV_PREFIX = "XDS_SERVER_"


def setting(default: Any, flag: str, help: str, *, repeatable: bool = False,
            required: bool = False, default_text: str = "", **constraints: Any) -> Any:
    """A leaf of the tree: its default, its flag (the variable follows) and its help.
    `repeatable`: the flag may be given more than once (a list). `required`: `serve` refuses
    to start without it (the tree itself can be built without, for tools and tests).
    `default_text`: what a None default means."""
    extra: dict[str, JsonValue] = {"flag": flag, "repeatable": repeatable,
                                   "required": required, "default_text": default_text}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


# Value types ------------------------------------------------------------------------------


def _seconds(value: object) -> float:
    return parse_duration(value, settings_form=True)


def _timedelta(value: object) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=_seconds(value))


def _address(value: str) -> str:
    parse_address(value)
    return value


def _optional_address(value: object) -> object:
    """'off' (or none, disabled, empty) turns a listener off."""
    if value is None or str(value).strip().lower() in ("", "off", "none", "disabled"):
        return None
    return value


def _word_list(value: object) -> object:
    """A comma- or space-separated list, as flags and environment variables carry one."""
    if isinstance(value, str):
        return tuple(v for v in value.replace(",", " ").split() if v)
    if isinstance(value, (list, tuple)):
        return tuple(w for item in value for w in str(item).replace(",", " ").split() if w)
    return value


def upper_case(value: object) -> object:
    """For enums spelled in capitals (MtlsMode) that operators may write in any case."""
    return value.upper() if isinstance(value, str) else value


Seconds = Annotated[float, BeforeValidator(_seconds)]
Lifetime = Annotated[timedelta, BeforeValidator(_timedelta)]
Address = Annotated[str, AfterValidator(_address)]
Words = Annotated[tuple[str, ...], BeforeValidator(_word_list)]
OptionalAddress = Annotated[Address | None, BeforeValidator(_optional_address)]


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")



@dataclass(frozen=True)
class Leaf:
    """One setting: `section.name` in the tree, `flag` on the command line, `env`."""

    section: str
    name: str
    info: FieldInfo

    @property
    def flag(self) -> str:
        return str(self._extra["flag"])

    @property
    def repeatable(self) -> bool:
        return bool(self._extra.get("repeatable"))

    @property
    def required(self) -> bool:
        return bool(self._extra.get("required"))

    @property
    def _extra(self) -> dict[str, Any]:
        extra = self.info.json_schema_extra
        assert isinstance(extra, dict)
        return extra

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.removeprefix("--").upper().replace("-", "_")

    @property
    def path(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def help(self) -> str:
        return self.info.description or ""

    @property
    def default(self) -> Any:
        return self.info.get_default(call_default_factory=True)

    @property
    def kind(self) -> str:
        """What the value is, for the command line: flag (a boolean), choice, duration,
        address, integer, number, path, list or text."""
        validators = {getattr(m, "func", None) for m in self.info.metadata}
        if _seconds in validators or _timedelta in validators:
            return "duration"
        if _address in validators or _optional_address in validators:
            return "address"
        if _word_list in validators:
            return "list"
        base = _base_type(self.info.annotation)
        if base is bool:
            return "flag"
        if self.choices():
            return "choice"
        for kind, types in (("integer", int), ("number", float), ("path", Path)):
            if isinstance(base, type) and issubclass(base, types):
                return kind
        return "text"

    def choices(self) -> tuple[str, ...]:
        base = _base_type(self.info.annotation)
        if get_origin(base) is Literal:
            return tuple(str(a) for a in get_args(base))
        if isinstance(base, type) and issubclass(base, Enum):
            return tuple(str(m.value) for m in base)
        return ()

    @property
    def shown_default(self) -> str:
        """The default as an operator writes it."""
        value = self.default
        if self.required:
            return "required"
        if value is None and self._extra.get("default_text"):
            return str(self._extra["default_text"])
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, Enum):
            return str(value.value)
        if isinstance(value, timedelta):
            return format_duration(value.total_seconds())
        if self.kind == "duration":
            return format_duration(float(value))
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


def _base_type(annotation: Any) -> Any:
    """`X` of `X | None` and of `Annotated[X, ...]`."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        annotation = args[0]
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def format_duration(seconds: float) -> str:
    """Seconds as the grammar writes them: 24h, 30s, 0.8s, 100ms."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if (seconds >= 2 * size and seconds % size == 0) or seconds == size < 86400:
            return f"{int(seconds // size)}{unit}"
    if 0 < seconds < 1 and (seconds * 1000) == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


