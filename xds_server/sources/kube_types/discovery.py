"""discovery.k8s.io/v1: EndpointSlice, checked as the API server checks it."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictStr, model_validator

from .base import Invalid, KubeModel, Port, check
from .core import Protocol
from .meta import ObjectMeta

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def _some_addresses(addresses: list[str]) -> None:
    if not addresses:
        raise Invalid("required: at least one address")
    if len(addresses) > 100:
        raise Invalid("at most 100 addresses")


class EndpointConditions(KubeModel):
    # Per the EndpointSlice API: unset ready and serving mean true, unset terminating false.
    ready: StrictBool = True
    serving: StrictBool = True
    terminating: StrictBool = False


class ObjectReference(KubeModel):
    kind: StrictStr = ""
    name: StrictStr = ""
    namespace: StrictStr = ""


class Endpoint(KubeModel):
    addresses: Annotated[list[StrictStr], check(_some_addresses)] = Field(
        default_factory=list, validate_default=True
    )
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    target_ref: ObjectReference | None = None
    zone: StrictStr = ""
    node_name: StrictStr = ""


class EndpointPort(KubeModel):
    name: StrictStr = ""
    protocol: Protocol = "TCP"
    app_protocol: StrictStr = ""
    port: Port | None = None  # none: "every port" (rare, hand-made slices)


class EndpointSliceMeta(ObjectMeta):
    @model_validator(mode="after")
    def _owner(self) -> EndpointSliceMeta:
        if not self.labels.get(SERVICE_NAME_LABEL):
            message = "required: the name of the Service this slice belongs to"
            raise Invalid(message, at=("labels", SERVICE_NAME_LABEL))
        return self


class EndpointSlice(KubeModel):
    metadata: EndpointSliceMeta
    address_type: Literal["IPv4", "IPv6", "FQDN"] = "IPv4"
    ports: list[EndpointPort] = Field(default_factory=list, max_length=100)
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _addresses_of_its_type(self) -> EndpointSlice:
        if self.address_type == "FQDN":
            return self  # not read by the mesh: the source says so
        version = 4 if self.address_type == "IPv4" else 6
        for i, endpoint in enumerate(self.endpoints):
            for j, address in enumerate(endpoint.addresses):
                try:
                    parsed = ipaddress.ip_address(address)
                except ValueError:
                    parsed = None
                if parsed is None or parsed.version != version:
                    message = f"{address!r} is not an {self.address_type} address"
                    raise Invalid(message, at=("endpoints", i, "addresses", j))
        return self
