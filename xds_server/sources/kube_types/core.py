"""core/v1: Namespace, Service and Pod, the fields the mesh reads, checked as the API
server checks them."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import Field, PlainValidator, StrictStr, model_validator

from .base import Invalid, KubeModel, Port, Step
from .meta import LabelNamedMeta, ObjectMeta

Protocol = Literal["TCP", "UDP", "SCTP"]
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # IANA_SVC_NAME, plus "a letter"


class Namespace(KubeModel):
    metadata: LabelNamedMeta


# Service -------------------------------------------------------------------------------------


def _target_port(value: Any) -> int | str:
    """IntOrString: a port number, or a container port's name (IANA_SVC_NAME)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise Invalid(f"expected a port number or name, got {value!r}")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise Invalid(f"{value} is out of range [1, 65535]")
        return value
    if value.isdigit():  # the API server treats "8080" as a name and rejects it
        raise Invalid(f"{value!r} is a string: write the port number without quotes")
    if not _PORT_NAME.match(value) or len(value) > 15 or not re.search("[a-z]", value):
        raise Invalid(f"{value!r} is not a port name (lowercase letters, digits, '-'; 15 at most)")
    return value


class ServicePort(KubeModel):
    port: Port
    name: StrictStr = ""
    protocol: Protocol = "TCP"
    app_protocol: StrictStr = ""
    target_port: Annotated[int | str, PlainValidator(_target_port)] | None = None


class ServiceSpec(KubeModel):
    ports: list[ServicePort] = Field(default_factory=list)
    cluster_ip: StrictStr = Field(default="", alias="clusterIP")

    @model_validator(mode="after")
    def _unique_tcp_ports(self) -> ServiceSpec:
        seen: set[int] = set()
        for i, port in enumerate(self.ports):
            if port.protocol != "TCP":
                continue
            if port.port in seen:
                raise Invalid(f"duplicate port {port.port}", at=("ports", i, "port"))
            seen.add(port.port)
        return self


class Service(KubeModel):
    metadata: LabelNamedMeta
    spec: ServiceSpec = Field(default_factory=ServiceSpec)


# Pod -----------------------------------------------------------------------------------------


class ContainerPort(KubeModel):
    container_port: Port
    name: StrictStr = ""
    protocol: Protocol = "TCP"


class Container(KubeModel):
    name: StrictStr = ""
    restart_policy: StrictStr = ""
    ports: list[ContainerPort] = Field(default_factory=list)


class PodSpec(KubeModel):
    service_account_name: StrictStr = ""
    service_account: StrictStr = ""  # the deprecated spelling, still honoured
    init_containers: list[Container] = Field(default_factory=list)
    containers: list[Container] = Field(default_factory=list)


class PodIP(KubeModel):
    ip: StrictStr = ""


class PodStatus(KubeModel):
    pod_ip: StrictStr = Field(default="", alias="podIP")
    pod_ips: list[PodIP] = Field(default_factory=list, alias="podIPs")
    phase: StrictStr = ""

    @model_validator(mode="after")
    def _an_ip(self) -> PodStatus:
        # The sidecar's listeners bind to it: Envoy would reject them all for a typo.
        address = self.pod_ip
        at: tuple[Step, ...] = ("podIP",)
        if not address and self.pod_ips:
            address, at = self.pod_ips[0].ip, ("podIPs", 0, "ip")
        if address:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise Invalid(f"{address!r} is not an IP address", at=at) from None
        return self

    @property
    def ip(self) -> str:
        return self.pod_ip or (self.pod_ips[0].ip if self.pod_ips else "")


class Pod(KubeModel):
    metadata: ObjectMeta
    spec: PodSpec = Field(default_factory=PodSpec)
    status: PodStatus = Field(default_factory=PodStatus)
