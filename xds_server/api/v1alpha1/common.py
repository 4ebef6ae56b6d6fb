"""What every kind of `mesh.xds-server.io/v1alpha1` shares: the group, the base of every
spec model, and the duration types its fields use (the grammar is config.py's).

The models validate what users write (in YAML files or custom resources), name the field of
any error, and generate the CRD schemas, so the three can never disagree.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.functional_validators import BeforeValidator

from ...config import DURATION_PATTERN as DURATION_PATTERN  # the one duration grammar
from ...config import parse_duration as parse_duration

GROUP = "mesh.xds-server.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

Duration = Annotated[float, BeforeValidator(parse_duration)]
# Where zero means nothing sensible (a connect timeout, a check interval), Envoy rejects it:
# refused here, with the field named, rather than by every proxy.
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Percent = Annotated[float, Field(ge=0, le=100)]


class Spec(BaseModel):
    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True
    )
