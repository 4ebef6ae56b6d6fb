"""Envoy SDS `Secret`s from plain certificate material: pure functions, no I/O.

Two secret names, the ones Envoy configurations (and Istio users) know, referenced by the
transport sockets `tls.py` builds:

- `default`: a workload's X.509-SVID chain and its private key (`tls_certificate`).
- `ROOTCA`: the trust bundle (`validation_context.trusted_ca`), the same for every proxy.

`ROOTCA` carries the bundle only. The trust domain is enforced by the SPIFFE IDs the
transport sockets match (the mTLS translation): SAN matchers put in this secret would be
merged (OR-ed) with those of a combined validation context and could only widen them.

Every identity's `default` is its own resource: the cache keeps it under `cache_key` (see the
SDS glue, `xds_server/sds.py`, which maps a stream's wire name to its identity's key).
"""

from __future__ import annotations

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

from ..xds.resource import Resource
from .tls import SDS_CERTIFICATE, SDS_ROOT

__all__ = [
    "DEFAULT_SECRET",
    "ROOTCA_SECRET",
    "bundle_resource",
    "bundle_secret",
    "workload_resource",
    "workload_secret",
]

DEFAULT_SECRET = SDS_CERTIFICATE
ROOTCA_SECRET = SDS_ROOT


def workload_secret(chain_pem: bytes, key_pem: bytes) -> secret_pb2.Secret:
    """`default`: a workload's certificate chain (leaf + intermediates) and its key."""
    if not key_pem:
        raise ValueError("a workload secret needs the server-generated key")
    secret = secret_pb2.Secret(name=DEFAULT_SECRET)
    secret.tls_certificate.certificate_chain.inline_bytes = chain_pem
    secret.tls_certificate.private_key.inline_bytes = key_pem
    return secret


def bundle_secret(bundle_pem: bytes) -> secret_pb2.Secret:
    """`ROOTCA`: the trust bundle (every trusted root, PEM)."""
    secret = secret_pb2.Secret(name=ROOTCA_SECRET)
    secret.validation_context.trusted_ca.inline_bytes = bundle_pem
    return secret


def workload_resource(cache_key: str, chain_pem: bytes, key_pem: bytes) -> Resource:
    """The `default` secret of one identity, cached under its own key."""
    return Resource.from_message(workload_secret(chain_pem, key_pem), name=DEFAULT_SECRET,
                                 key=cache_key)


def bundle_resource(cache_key: str, bundle_pem: bytes) -> Resource:
    return Resource.from_message(bundle_secret(bundle_pem), name=ROOTCA_SECRET, key=cache_key)
