"""The pieces of stream authentication and SDS that need no network: how a node's claim is
read (it must agree with the translator's reading, or a proxy could be authenticated as one
identity and configured as another), which peers count as loopback, how failures are named,
and how a stream's view maps secret names."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import struct_pb2

from xds_server.ca.authority import CertificateAuthority
from xds_server.ca.svid import SvidIssuer
from xds_server.ca.workloads import WorkloadCertificates
from xds_server.model.identity import Identity
from xds_server.sds import SdsSecrets, identity_key
from xds_server.redaction import redact
from xds_server.xds import types
from xds_server.xds.auth import _peer_is_loopback, failure_reason
from xds_server.xds.cache import FullView, ResourceCache
from xds_server.xds.node import proxy_claim


def _node(node_id: str, **metadata: str) -> base_pb2.Node:
    node = base_pb2.Node(id=node_id)
    if metadata:
        struct = struct_pb2.Struct()
        struct.update(metadata)
        node.metadata.CopyFrom(struct)
    return node


@pytest.mark.parametrize("node, expected", [
    (_node("web-1.shop", namespace="shop", service_account="web", pod="web-1"), ("shop", "web", "web-1")),
    (_node("web-1.shop"), ("shop", "default", "web-1")),
    (_node("web-1.shop", service_account="web"), ("shop", "web", "web-1")),
    (_node("plain"), ("default", "default", "plain")),
    (_node("a.b.c", namespace="x"), ("x", "default", "a.b.c")),
    (_node("", pod="p"), ("default", "default", "p")),
])
def test_one_parse_of_the_node_claim(node: base_pb2.Node, expected: tuple[str, str, str]) -> None:
    """Authentication and scoping both read `proxy_claim`: metadata first, else the id
    `<pod>.<namespace>`, and `default` for what is missing."""
    claim = proxy_claim(node)
    assert (claim.namespace, claim.service_account, claim.pod) == expected
    assert claim.identity.namespace == expected[0] and claim.identity.pod == expected[2]


@pytest.mark.parametrize("peer, loopback", [
    ("ipv4:127.0.0.1:5000", True), ("ipv4:127.9.8.7:1", True), ("ipv6:[::1]:5000", True),
    ("unix:/tmp/xds.sock", True), ("ipv4:10.0.0.1:5000", False), ("ipv6:[2001:db8::1]:1", False),
    ("ipv4:localhost:1", False), ("", False),
])
def test_loopback_peers(peer: str, loopback: bool) -> None:
    assert _peer_is_loopback(peer) is loopback


@pytest.mark.parametrize("reason, counter", [
    ("missing 'authorization: Bearer <token>' metadata", "missing-token"),
    ("token expired at 2024-01-01T00:00:00+00:00", "expired"),
    ("token abc was revoked", "revoked"),
    ("bad signature: the token was not signed by this server's key", "bad-signature"),
    ("the token is bound to pod a, the node claims b", "pod-mismatch"),
    ("the token proves a/b but the node claims a/c", "identity-mismatch"),
    ("token refused by TokenReview: token not valid for audiences xds-server", "wrong-audience"),
    ("token review unavailable: 500", "review-unavailable"),
    ("malformed token: not a compact JWT", "malformed"),
    ("something new", "refused"),
])
def test_failure_reasons(reason: str, counter: str) -> None:
    assert failure_reason(reason) == counter


def test_a_view_maps_default_to_its_own_identity_only(tmp_path: Path) -> None:
    cache = ResourceCache()
    raw = secret_pb2.Secret(name="raw")
    raw.generic_secret.secret.inline_string = "x"
    cache.set_type(types.SECRET, [raw])
    authority = CertificateAuthority(tmp_path / "ca")
    provider = SdsSecrets(cache, WorkloadCertificates(
        SvidIssuer(authority, default_ttl=timedelta(hours=1))))
    web, db = Identity("shop", "web"), Identity("shop", "db")
    web_key, db_key = provider.acquire(web), provider.acquire(db)
    assert web_key == identity_key("spiffe://cluster.local/ns/shop/sa/web")
    view = provider.view(FullView(cache), web)

    assert view.cache_key(types.SECRET, "default") == web_key
    assert view.get(types.SECRET, "default") is cache.get(types.SECRET, web_key)
    assert view.get(types.SECRET, "ROOTCA") is cache.get(types.SECRET, provider.bundle_key)
    for stolen in (db_key, "spiffe://cluster.local/ns/shop/sa/db", provider.bundle_key):
        assert view.get(types.SECRET, stolen) is None
    assert view.get(types.SECRET, "raw") is not None  # raw resources as the inner view says
    assert view.may_see(types.SECRET, web_key) and not view.may_see(types.SECRET, db_key)
    visible = {(r.name, r.cache_key) for r in view.visible(types.SECRET)}
    assert visible == {("raw", "raw"), ("default", web_key), ("ROOTCA", provider.bundle_key)}
    assert view.cache_key(types.CLUSTER, "default") == "default"  # other types untouched

    # Nothing in a resource's repr or a redacted copy shows the key.
    secret = cache.get(types.SECRET, web_key)
    key_pem = secret.unpack(secret_pb2.Secret).tls_certificate.private_key.inline_bytes
    body = b"".join(key_pem.splitlines()[1:-1]).decode()
    shown = secret.unpack(secret_pb2.Secret)
    assert redact(shown)  # the one redaction (redaction.py), as admin dumps and CSDS use it
    assert body not in repr(secret) and body not in str(shown)
    assert shown.tls_certificate.private_key.inline_string == "[redacted]"

    provider.release(web_key)
    assert cache.get(types.SECRET, web_key) is None and cache.get(types.SECRET, db_key) is not None
