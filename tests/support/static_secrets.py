"""SDS references made static, so `envoy --mode validate` can check TLS contexts.

Envoy 1.40's validate mode crashes (SIGSEGV) on an SDS config served over ADS, which it does
not run anyway (FIELD-NOTES). For validation only, every SDS reference becomes a reference to
a static secret of the same name (`default`, `ROOTCA`), defined in the bootstrap with a
throwaway self-signed certificate: everything else of the TLS contexts is validated as
generated.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from google.protobuf.message import Message

from tests.support.envoy import SECRET_TYPE
from xds_server.translate import tls
from xds_server.xds import types


def _self_signed() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "validate")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


def _make_static(socket: base_pb2.TransportSocket) -> None:
    for cls in (tls_pb2.DownstreamTlsContext, tls_pb2.UpstreamTlsContext):
        if socket.typed_config.Is(cls.DESCRIPTOR):
            context = cls()
            socket.typed_config.Unpack(context)
            common = context.common_tls_context
            for sds in common.tls_certificate_sds_secret_configs:
                sds.ClearField("sds_config")
            common.combined_validation_context.validation_context_sds_secret_config.ClearField("sds_config")
            socket.typed_config.Pack(context)


def with_static_secrets(resources: Mapping[str, Sequence[Message]]) -> dict[str, list[Message]]:
    """A copy of `resources` (type URL -> messages) whose TLS contexts name static secrets,
    with those secrets added. The inputs are not modified."""
    out: dict[str, list[Message]] = {}
    for type_url, messages in resources.items():
        out[type_url] = []
        for original in messages:
            copy = type(original)()
            copy.CopyFrom(original)
            out[type_url].append(copy)
    for listener in out.get(types.LISTENER, []):
        for chain in [*listener.filter_chains, listener.default_filter_chain]:  # type: ignore[attr-defined]
            if chain.HasField("transport_socket"):
                _make_static(chain.transport_socket)
    for cluster in out.get(types.CLUSTER, []):
        for match in cluster.transport_socket_matches:  # type: ignore[attr-defined]
            _make_static(match.transport_socket)
        if cluster.HasField("transport_socket"):
            _make_static(cluster.transport_socket)  # type: ignore[attr-defined]
    cert, key = _self_signed()
    default = secret_pb2.Secret(name=tls.SDS_CERTIFICATE)
    default.tls_certificate.certificate_chain.inline_string = cert
    default.tls_certificate.private_key.inline_string = key
    root = secret_pb2.Secret(name=tls.SDS_ROOT)
    root.validation_context.trusted_ca.inline_string = cert
    out[SECRET_TYPE] = [default, root]
    return out
