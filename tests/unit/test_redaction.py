"""The one redaction (xds_server/redaction.py): what the admin API, CSDS and logs never show."""

from __future__ import annotations

import json
import logging

from google.protobuf import any_pb2, struct_pb2

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, grpc_service_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from tests.support.pem import fake_private_key_pem
from xds_server import logs, protos
from xds_server.redaction import (
    REDACTED,
    CachedRedactor,
    Redactor,
    is_credential_key,
    redact,
    redact_text,
)

KEY = fake_private_key_pem("MHcCAQEEIFAKEKEYMATERIAL", "EC")


def _tls_listener() -> listener_pb2.Listener:
    """A listener with an inline key in its transport socket: an Any inside the listener."""
    tls = tls_pb2.DownstreamTlsContext()
    cert = tls.common_tls_context.tls_certificates.add()
    cert.private_key.inline_string = KEY
    cert.certificate_chain.inline_string = "CHAIN"
    listener = listener_pb2.Listener(name="ingress")
    chain = listener.filter_chains.add()
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    chain.transport_socket.typed_config.Pack(tls)
    return listener


def test_sensitive_fields_of_a_secret_are_redacted_and_the_rest_kept() -> None:
    secret = secret_pb2.Secret(name="default", tls_certificate=common_pb2.TlsCertificate(
        certificate_chain={"inline_string": "CHAIN"},
        private_key={"inline_bytes": KEY.encode()},
        password={"filename": "/etc/key-password"},
    ))
    assert redact(secret) is True
    certificate = secret.tls_certificate
    assert certificate.private_key == base_pb2.DataSource(inline_string=REDACTED)
    assert certificate.password == base_pb2.DataSource(inline_string=REDACTED)
    assert certificate.certificate_chain.inline_string == "CHAIN"
    generic = secret_pb2.Secret(name="api", generic_secret={"secret": {"inline_string": "s3cret"}})
    assert redact(generic) and generic.generic_secret.secret.inline_string == REDACTED


def test_keys_inside_anys_are_redacted() -> None:
    listener = _tls_listener()
    assert redact(listener) is True
    shown = tls_pb2.DownstreamTlsContext()
    listener.filter_chains[0].transport_socket.typed_config.Unpack(shown)
    certificate = shown.common_tls_context.tls_certificates[0]
    assert certificate.private_key.inline_string == REDACTED
    assert certificate.certificate_chain.inline_string == "CHAIN"
    assert b"FAKEKEY" not in listener.SerializeToString()


def test_an_any_of_an_unresolvable_type_is_never_passed_through() -> None:
    cluster = cluster_pb2.Cluster(name="web")
    cluster.transport_socket.name = "custom"
    cluster.transport_socket.typed_config.CopyFrom(any_pb2.Any(
        type_url="type.googleapis.com/example.unknown.v1.SecretHolder",
        value=b"\n\x0bFAKEKEY-raw",
    ))
    assert redact(cluster) is True
    packed = cluster.transport_socket.typed_config
    assert packed.type_url.endswith("example.unknown.v1.SecretHolder")  # what was withheld
    assert packed.value == b""
    assert b"FAKEKEY" not in cluster.SerializeToString()


def test_an_any_that_does_not_parse_is_withheld() -> None:
    cluster = cluster_pb2.Cluster(name="web")
    cluster.transport_socket.typed_config.type_url = (
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
    cluster.transport_socket.typed_config.value = b"\xff\xff\xff FAKEKEY"
    assert redact(cluster) is True
    assert cluster.transport_socket.typed_config.value == b""


def test_an_unregistered_type_resolves_through_the_wider_resolver() -> None:
    """Only registered types resolve by default; `protos.message_class` imports the rest."""
    assert protos.message_class("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext")
    assert protos.message_class("example.unknown.v1.Nothing") is None
    listener = _tls_listener()
    assert Redactor(protos.message_class).redact(listener)
    assert b"FAKEKEY" not in listener.SerializeToString()


def test_token_like_metadata_is_redacted() -> None:
    service = grpc_service_pb2.GrpcService()
    service.envoy_grpc.cluster_name = "authz"
    service.initial_metadata.add(key="authorization", value="Bearer abc.def.ghi")
    service.initial_metadata.add(key="x-tenant", value="blue")
    node = base_pb2.Node(id="p")
    node.metadata.update({"namespace": "web", "auth": {"api_token": "t0ken"},
                          "items": [{"password": "pw"}]})
    assert redact(service) and redact(node)
    assert service.initial_metadata[0].value == REDACTED
    assert service.initial_metadata[1].value == "blue"
    assert node.metadata["namespace"] == "web"
    assert node.metadata["auth"]["api_token"] == REDACTED
    assert node.metadata["items"][0]["password"] == REDACTED
    assert is_credential_key("Proxy-Authorization") and is_credential_key("X-API-Key")
    assert not is_credential_key("tokenizer") and not is_credential_key("app")


def test_messages_without_secrets_are_left_alone() -> None:
    cluster = cluster_pb2.Cluster(name="web")
    cluster.metadata.filter_metadata["envoy.lb"].update({"zone": "a"})
    before = cluster.SerializeToString(deterministic=True)
    assert redact(cluster) is False
    assert cluster.SerializeToString(deterministic=True) == before
    assert redact(struct_pb2.Struct()) is False


def test_cached_redactor_redacts_serialized_resources_once_per_version() -> None:
    listener = _tls_listener()
    body = listener.SerializeToString(deterministic=True)
    type_url = "type.googleapis.com/envoy.config.listener.v3.Listener"
    redactor = CachedRedactor(capacity=2)
    shown, sensitive = redactor.packed_version(type_url, "v1", body)
    assert sensitive and shown is not None and b"FAKEKEY" not in shown
    assert redactor.packed_version(type_url, "v1", b"") == (shown, True)  # remembered
    plain = cluster_pb2.Cluster(name="web").SerializeToString()
    assert redactor.packed(
        "type.googleapis.com/envoy.config.cluster.v3.Cluster", plain) == (plain, False)
    assert redactor.packed("type.googleapis.com/example.Unknown", b"FAKEKEY") == (None, True)


def test_text_keeps_the_error_and_drops_keys_and_tokens() -> None:
    nack = (f'tls_certificate {{ private_key {{ inline_string: "{KEY}" }} }}: invalid; '
            'password { inline_bytes: "aHVudGVyMg==" } authorization: Bearer eyJhbGc.eyJzdWI.sig')
    text = redact_text(nack)
    assert "FAKEKEY" not in text and "PRIVATE KEY" not in text
    assert "aHVudGVyMg" not in text and "eyJhbGc" not in text
    assert "invalid" in text and "Bearer [redacted]" in text


def test_log_lines_go_through_the_redaction() -> None:
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "NACK: %s", (KEY,), None)
    record.detail = 'inline_string: "s3cret"'
    for formatter in (logs.JsonFormatter(), logs.TextFormatter()):
        line = formatter.format(record)
        assert "FAKEKEY" not in line and "s3cret" not in line and "NACK" in line
    # The JSON formatter still writes valid JSON.
    assert json.loads(logs.JsonFormatter().format(record))["msg"].startswith("NACK")
