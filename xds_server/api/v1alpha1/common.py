"""What every kind of `mesh.xds-server.io/v1alpha1` shares: the group, the base of every
spec model, and the duration grammar its fields use.

The models validate what users write (in YAML files or custom resources), name the field of
any error, and generate the CRD schemas, so the three can never disagree.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.functional_validators import BeforeValidator

GROUP = "mesh.xds-server.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DURATION_PATTERN = re.compile(r"^(?:(\d+(?:\.\d+)?)(h|ms|m|s))+$")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(value: object) -> float:
    """Gateway API / Istio style durations ('1.5s', '100ms', '1m30s') to seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '2s' or '150ms'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if not isinstance(value, str) or not DURATION_PATTERN.match(value.strip()):
        raise ValueError(f"invalid duration {value!r}: expected e.g. '2s', '150ms', '1m30s'")
    return sum(float(n) * _UNIT[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s)", value))


Duration = Annotated[float, BeforeValidator(parse_duration)]
# Where zero means nothing sensible (a connect timeout, a check interval), Envoy rejects it:
# refused here, with the field named, rather than by every proxy.
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Percent = Annotated[float, Field(ge=0, le=100)]


class Spec(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )
