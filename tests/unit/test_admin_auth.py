"""Admin API tokens (file and environment, hashes only, errors that never show a token) and
the redaction of secrets in config dumps."""

from __future__ import annotations

from tests.support.pem import fake_private_key_pem
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from xds_server.admin.auth import ENV_TOKENS, Role, TokenStore, digest, parse_bearer
from xds_server.admin.views import REDACTED, redact, resource_json
from xds_server.config import ConfigError
from xds_server.xds.resource import Resource

ADMIN = "an-admin-token-0123456789"
READER = "a-read-token-0123456789ab"


def test_tokens_from_a_file_with_hashes_and_plain_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    path.write_text(
        "tokens:\n"
        f"  - {{name: ops, role: admin, token_sha256: {digest(ADMIN).hex()}}}\n"
        f"  - {{name: grafana, role: read, token: {READER}}}\n"
    )
    store = TokenStore.load(path, environ={})
    assert store.names == ["ops", "grafana"]
    assert store.authenticate(ADMIN).role is Role.ADMIN
    reader = store.authenticate(READER)
    assert reader.name == "grafana" and reader.may(Role.READ) and not reader.may(Role.ADMIN)
    assert store.authenticate("wrong-token-0123456789") is None
    assert store.authenticate("") is None
    # Only digests are kept: the plain token is nowhere in the object.
    assert READER not in repr(store.__dict__) and READER.encode() not in b"".join(
        e.digest for e in store._entries)


def test_tokens_from_the_environment_merge_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"tokens": [{"name": "ops", "role": "admin", "token": ADMIN}]}))
    env = {ENV_TOKENS: json.dumps({"tokens": [{"name": "ci", "role": "read", "token": READER}]})}
    store = TokenStore.load(path, environ=env)
    assert store.names == ["ops", "ci"]
    clash = {ENV_TOKENS: json.dumps({"tokens": [{"name": "ops", "role": "read", "token": READER}]})}
    with pytest.raises(ConfigError, match="'ops' is defined twice"):
        TokenStore.load(path, environ=clash)


@pytest.mark.parametrize("document, field", [
    ({"tokens": [{"name": "x", "role": "root", "token": READER}]}, "tokens.0.role"),
    ({"tokens": [{"name": "x", "role": "read", "token": "short-secret"}]}, "tokens.0.token"),
    ({"tokens": [{"name": "x", "role": "read"}]}, "tokens.0"),
    ({"tokens": [{"name": "x", "role": "read", "token": READER, "token_sha256": "00" * 32}]}, "tokens.0"),
    ({"tokens": [{"name": "x", "role": "read", "token_sha256": "xyz"}]}, "tokens.0.token_sha256"),
    ({"tokens": [{"name": "x", "role": "read", "token": READER, "extra": 1}]}, "tokens.0.extra"),
    ({"tokenz": []}, "tokenz"),
])
def test_bad_token_documents_name_the_field_and_never_the_token(document: dict, field: str) -> None:
    with pytest.raises(ConfigError) as err:
        TokenStore.parse(json.dumps(document), "--admin-tokens-file t.json")
    message = str(err.value)
    assert message.startswith("--admin-tokens-file t.json: ") and field in message, message
    assert READER not in message and "short-secret" not in message


def test_unparsable_token_document() -> None:
    with pytest.raises(ConfigError, match=r"\$XDS_SERVER_ADMIN_TOKENS: not valid YAML or JSON"):
        TokenStore.parse("tokens: [", f"${ENV_TOKENS}")


def test_bearer_header_parsing() -> None:
    assert parse_bearer(None) == (None, "missing")
    assert parse_bearer("Basic abc") == (None, "malformed")
    assert parse_bearer("Bearer ") == (None, "malformed")
    assert parse_bearer("bearer  tok ") == ("tok", None)


def test_admin_token_create_prints_the_hash_entry_and_the_token_once() -> None:
    from xds_server.cli import main

    result = CliRunner().invoke(main, ["admin-token", "create", "--name", "ops", "--role", "admin"])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    token = result.stderr.rsplit(" ", 1)[-1].strip()
    assert entry["name"] == "ops" and entry["role"] == "admin"
    assert entry["token_sha256"] == digest(token).hex() and token not in result.stdout
    assert TokenStore.parse(json.dumps({"tokens": [entry]}), "x").authenticate(token).name == "ops"


# Redaction ---------------------------------------------------------------------------------------

KEY_PEM = fake_private_key_pem("MHcCAQEEIFAKEKEYMATERIAL", "EC")


def test_secret_private_keys_are_redacted() -> None:
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

    secret = secret_pb2.Secret(name="default", tls_certificate=common_pb2.TlsCertificate(
        certificate_chain={"inline_string": "-----BEGIN CERTIFICATE-----\nCHAIN\n"},
        private_key={"inline_string": KEY_PEM},
        password={"inline_bytes": b"hunter2"},
    ))
    rendered = resource_json(Resource.from_message(secret))
    text = json.dumps(rendered)
    assert "FAKEKEY" not in text and "hunter2" not in text and "aHVudGVyMg" not in text
    assert rendered["tls_certificate"]["private_key"] == {"inline_string": REDACTED}
    assert rendered["tls_certificate"]["password"] == {"inline_string": REDACTED}
    assert "CHAIN" in rendered["tls_certificate"]["certificate_chain"]["inline_string"]


def test_keys_inside_nested_typed_configs_are_redacted() -> None:
    """A raw listener with an inline key in its transport socket (an Any inside an Any)."""
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
    from google.protobuf import any_pb2

    tls = tls_pb2.DownstreamTlsContext()
    cert = tls.common_tls_context.tls_certificates.add()
    cert.private_key.inline_string = KEY_PEM
    packed = any_pb2.Any()
    packed.Pack(tls)
    listener = listener_pb2.Listener(name="ingress")
    chain = listener.filter_chains.add()
    chain.transport_socket.name = "envoy.transport_sockets.tls"
    chain.transport_socket.typed_config.CopyFrom(packed)
    rendered = json.dumps(resource_json(Resource.from_message(listener)))
    assert "FAKEKEY" not in rendered and REDACTED in rendered


def test_redact_leaves_messages_without_secrets_alone() -> None:
    from envoy.config.cluster.v3 import cluster_pb2

    message = cluster_pb2.Cluster(name="web")
    assert redact(message) is False and message.name == "web"
