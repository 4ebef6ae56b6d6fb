"""The proxy a test node stands for, as the server hands it to the view provider."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2

from xds_server.model.identity import VerifiedProxy
from xds_server.xds.node import proxy_claim


def verified(node: base_pb2.Node) -> VerifiedProxy:
    """The node's claim with no proof (what `--auth none` admits): scoping reads the claim."""
    return VerifiedProxy.unverified(proxy_claim(node))
