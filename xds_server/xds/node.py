"""The one place a node's claim is read from its `envoy.config.core.v3.Node`."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from ..model.identity import ProxyClaim

# The stock grpcio xDS client announces this; Envoy never does (translate/proxyless.py).
GRPC_FEATURE = "envoy.lb.does_not_support_overprovisioning"


def is_proxyless(node: base_pb2.Node) -> bool:
    agent = node.user_agent_name.lower()
    if agent == "envoy":
        return False
    return agent.startswith("grpc") or GRPC_FEATURE in node.client_features


def _port(meta: dict[str, struct_pb2.Value], key: str, default: int) -> int:
    value = meta.get(key)
    if value is None:
        return default
    if value.HasField("number_value"):
        number = int(value.number_value)
    else:
        try:
            number = int(value.string_value)
        except ValueError:
            return default
    return number if 0 < number < 65536 else default


def proxy_claim(node: base_pb2.Node) -> ProxyClaim:
    """Metadata `namespace`, `service_account`, `pod`, `pod_ip`, `labels`, `inbound_port`,
    `outbound_port` (written by `xds-server bootstrap`), else an id `<pod>.<namespace>`."""
    meta = dict(node.metadata.fields) if node.HasField("metadata") else {}

    def text(key: str) -> str:
        value = meta.get(key)
        return value.string_value if value is not None else ""

    namespace, pod = text("namespace"), text("pod")
    if not namespace and "." in node.id:
        pod, namespace = node.id.rsplit(".", 1)
    labels: tuple[tuple[str, str], ...] = ()
    if "labels" in meta and meta["labels"].HasField("struct_value"):
        labels = tuple(sorted(
            (k, v.string_value) for k, v in meta["labels"].struct_value.fields.items()
        ))
    extra = tuple(sorted(
        (k, v.string_value) for k, v in meta.items() if v.HasField("string_value")
    ))
    return ProxyClaim(
        node_id=node.id,
        namespace=namespace or "default",
        service_account=text("service_account") or "default",
        pod=pod or node.id,
        ip=text("pod_ip"),
        labels=labels,
        proxyless=is_proxyless(node),
        inbound_port=_port(meta, "inbound_port", 15006),
        outbound_port=_port(meta, "outbound_port", 15001),
        capture=text("interception") != "explicit",
        metadata=extra,
    )
