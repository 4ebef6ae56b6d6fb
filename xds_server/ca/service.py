"""The CSR signing endpoint: gRPC unary `/xds_server.ca.v1.CertificateService/Sign`.

For workloads that keep their own key (proxyless gRPC, scripts; `xds-server agent`).
Messages are JSON (no .proto to compile and ship; the method is tiny and stable):

    request   {"csr": "<PEM CSR>", "ttl_seconds": 86400}          (ttl optional)
    response  {"certificate_chain": "<PEM leaf + intermediates>",
               "trust_bundle": "<PEM roots>", "spiffe_id": "...", "serial": "<hex>",
               "not_before": ISO 8601, "not_after": ISO 8601, "issued_at": ISO 8601}

The caller proves who it is with its verified client certificate (on the mutual-TLS xDS port:
renewing an SVID with the SVID) or with `authorization: Bearer <token>` metadata; a pluggable
`Authenticator` turns the token into an `Identity` or raises `AuthError`
(-> UNAUTHENTICATED). The certificate's SPIFFE ID comes from that identity only, never from
the CSR. Bad requests (unparsable JSON or CSR, TTL above the maximum) -> INVALID_ARGUMENT.

Add it to a `grpc.aio` server with `server.add_generic_rpc_handlers((service.handler(),))`.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import timedelta

import grpc
from grpc import aio

from ..bearer import bearer_token
from ..model.identity import AuthError, Identity
from .svid import IssueError, SvidIssuer

log = logging.getLogger("xds_server.ca")

SERVICE_NAME = "xds_server.ca.v1.CertificateService"
SIGN_METHOD = f"/{SERVICE_NAME}/Sign"
MAX_REQUEST_BYTES = 128 * 1024

Authenticator = Callable[[str], "Identity | Awaitable[Identity]"]
# (the call's auth context, its peer): the peer names the TLS front's relay (xds/tls.py).
CertificateIdentity = Callable[[Mapping[str, Iterable[bytes]], str], "Identity | None"]


def encode_json(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode_json(data: bytes) -> dict:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    return message


async def authenticate(authenticator: Authenticator, metadata) -> Identity:
    token = bearer_token(metadata)
    if token is None:
        raise AuthError("missing 'authorization: Bearer <token>' metadata")
    result = authenticator(token)
    if inspect.isawaitable(result):
        result = await result
    return result


class CertificateService:
    """Signs CSRs for authenticated callers with an `SvidIssuer`."""

    def __init__(self, issuer: SvidIssuer, authenticator: Authenticator,
                 certificate_identity: CertificateIdentity | None = None) -> None:
        self.issuer = issuer
        self.authenticator = authenticator
        # On a mutual-TLS port: the identity of the client certificate grpc verified (from
        # the call's auth context), or None without one; raises AuthError for a certificate
        # that proves no workload identity. A renewal then needs no token.
        self.certificate_identity = certificate_identity
        # Refused requests by reason, for the metrics (`xds_server_auth_failures{surface="ca"}`).
        self.failures: Counter[str] = Counter()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Sign": grpc.unary_unary_rpc_method_handler(
                self.sign,
                request_deserializer=None,  # raw bytes: a bad body becomes INVALID_ARGUMENT
                response_serializer=encode_json,
            ),
        })

    def add_to(self, server: aio.Server) -> None:
        server.add_generic_rpc_handlers((self.handler(),))

    async def sign(self, request: bytes, context: aio.ServicerContext) -> dict:
        peer = context.peer()
        try:
            identity = None
            if self.certificate_identity is not None:
                identity = self.certificate_identity(context.auth_context(), context.peer())
            if identity is None:
                identity = await authenticate(self.authenticator, context.invocation_metadata())
        except AuthError as err:
            log.warning("CSR rejected: not authenticated: %s", err.reason, extra={"peer": peer})
            self.failures["unauthenticated"] += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, err.reason)
        if len(request) > MAX_REQUEST_BYTES:
            self.failures["too-large"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request too large")
        try:
            message = decode_json(request)
            csr = message.get("csr")
            if not isinstance(csr, str) or not csr:
                raise ValueError("'csr' (a PEM string) is required")
            ttl_seconds = message.get("ttl_seconds")
            ttl = None
            if ttl_seconds is not None:
                if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float)):
                    raise ValueError("'ttl_seconds' must be a number")
                if not math.isfinite(ttl_seconds) or ttl_seconds <= 0:
                    raise ValueError("'ttl_seconds' must be a positive, finite number of seconds")
                limit = self.issuer.max_ttl.total_seconds()
                if ttl_seconds > limit:  # (also keeps timedelta from overflowing)
                    raise ValueError(f"'ttl_seconds' {ttl_seconds:g} exceeds the maximum {limit:g}")
                ttl = timedelta(seconds=ttl_seconds)
            issued = self.issuer.sign_csr(csr, identity, ttl=ttl, proxy=peer)
        except (ValueError, IssueError) as err:
            log.warning("CSR rejected: %s", err, extra={"peer": peer, "identity": str(identity)})
            self.failures["invalid-request"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Exception:
            log.exception("CSR signing failed", extra={"peer": peer})
            await context.abort(grpc.StatusCode.INTERNAL, "signing failed")
        return {
            "certificate_chain": issued.chain_pem.decode(),
            "trust_bundle": self.issuer.authority.trust_bundle_pem.decode(),
            "spiffe_id": issued.spiffe_id,
            "serial": issued.serial_hex,
            "not_before": issued.not_before.isoformat(),
            "not_after": issued.not_after.isoformat(),
            "issued_at": issued.issued_at.isoformat(),
        }
