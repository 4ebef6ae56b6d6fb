"""One resource as the server keeps it: serialized once, shared by every stream that gets it.

Responses are assembled from pre-encoded protobuf fields. Concatenating serialized protobuf
messages merges them (repeated fields append), so a `DiscoveryResponse` is the bytes of its
`resources` entries followed by a few small per-stream fields (version, type URL, nonce).
That keeps the per-stream cost of a push at a byte join instead of a protobuf copy.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import cast

from google.protobuf import any_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from .types import CLUSTER, PREFIX, resource_name


def content_version(body: bytes) -> str:
    """A version derived from content: equal bytes give equal versions on every replica."""
    return hashlib.blake2b(body, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True, eq=False)
class Resource:
    name: str
    type_url: str
    version: str
    # The deterministic serialization of the resource message. Kept out of repr: an SDS
    # secret's body holds a private key, and a repr ends up in logs and tracebacks.
    body: bytes = field(repr=False)
    sotw_entry: bytes = field(repr=False)  # DiscoveryResponse.resources[] field, encoded
    delta_entry: bytes = field(repr=False)  # DeltaDiscoveryResponse.resources[] field, encoded
    # An EDS cluster that Envoy (re)creates waits ("warms") for its ClusterLoadAssignment, even
    # an unchanged one: the name of that assignment, so a push of the cluster can re-send it.
    warms_with: str | None = None
    # Where the cache keeps it, when that differs from the name on the wire: every proxy asks
    # for the SDS secret "default", but each identity's "default" is its own resource.
    key: str = ""

    @property
    def cache_key(self) -> str:
        return self.key or self.name

    @classmethod
    def from_message(
        cls, message: Message, name: str | None = None, *, key: str = ""
    ) -> Resource:
        body = message.SerializeToString(deterministic=True)
        type_url = PREFIX + message.DESCRIPTOR.full_name
        warms_with = None
        if type_url == CLUSTER:
            cluster = cast(cluster_pb2.Cluster, message)
            if cluster.type == cluster.EDS:
                warms_with = cluster.eds_cluster_config.service_name or cluster.name
        return cls.from_bytes(
            type_url, name if name is not None else resource_name(message), body, warms_with,
            key=key,
        )

    @classmethod
    def from_bytes(
        cls, type_url: str, name: str, body: bytes, warms_with: str | None = None, *, key: str = ""
    ) -> Resource:
        # Interned, so a resumed stream's copy of a version (delta.py) is this same string.
        version = sys.intern(content_version(body))
        packed = any_pb2.Any(type_url=type_url, value=body)
        sotw_entry = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
        delta_entry = discovery_pb2.DeltaDiscoveryResponse(
            resources=[discovery_pb2.Resource(name=name, version=version, resource=packed)]
        ).SerializeToString()
        return cls(name, type_url, version, body, sotw_entry, delta_entry, warms_with, key)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Resource)
            and self.type_url == other.type_url
            and self.name == other.name
            and self.key == other.key
            and self.version == other.version
        )

    def __hash__(self) -> int:
        return hash((self.type_url, self.cache_key, self.version))

    def unpack(self, message_class: type[Message]) -> Message:
        return message_class.FromString(self.body)


def set_version(resources: dict[str, str]) -> str:
    """A version for a set of resources (SotW `version_info`): a hash of names and versions."""
    digest = hashlib.blake2b(digest_size=8)
    for name in sorted(resources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(resources[name].encode())
        digest.update(b"\n")
    return digest.hexdigest()
