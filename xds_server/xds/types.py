"""xDS resource type URLs and the facts the server needs about each."""

from __future__ import annotations

from google.protobuf.message import Message

PREFIX = "type.googleapis.com/"

LISTENER = PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Make-before-break push order for ADS (CONFORMANCE rule 6): clusters before the endpoints
# they need, both before the listeners and routes that point at them. Unknown types go last.
PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

# In state-of-the-world, absence from a Listener or Cluster response means deletion, so those
# responses always carry the complete visible set (CONFORMANCE rule 10).
FULL_STATE_TYPES: frozenset[str] = frozenset({LISTENER, CLUSTER})

SHORT_NAMES: dict[str, str] = {
    LISTENER: "LDS",
    ROUTE: "RDS",
    CLUSTER: "CDS",
    ENDPOINT: "EDS",
    SECRET: "SDS",
}


def order_key(type_url: str) -> int:
    try:
        return PUSH_ORDER.index(type_url)
    except ValueError:
        return len(PUSH_ORDER)


def short_name(type_url: str) -> str:
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def resource_name(message: Message) -> str:
    """The name Envoy knows a resource by (ClusterLoadAssignment names itself cluster_name)."""
    descriptor = message.DESCRIPTOR
    if descriptor.full_name == "envoy.config.endpoint.v3.ClusterLoadAssignment":
        field = "cluster_name"
    elif "name" in descriptor.fields_by_name:
        field = "name"
    else:
        raise ValueError(f"{descriptor.full_name} has no name field")
    name: str = getattr(message, field)  # a string field of a message type not known statically
    return name
