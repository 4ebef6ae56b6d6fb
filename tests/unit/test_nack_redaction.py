"""A NACK quotes the rejected resource; for a Secret that includes its private key. The server
keeps the error and drops the key before logs, metrics, CSDS or the admin API see it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.support.pem import fake_private_key_pem
from tests.support.xds_client import XdsClient, secret
from xds_server.xds import types
from xds_server.xds.cache import ResourceCache
from xds_server.xds.server import ServerSettings, XdsServer
from xds_server.xds.stream import redact_key_material

KEY = fake_private_key_pem("MHcCAQEEIKEYBYTESKEYBYTES", "EC", newline="\\n")
ENVOY_STYLE_NACK = (
    'name: "default"\ntls_certificate {\n  private_key {\n    inline_string: "' + KEY + '"\n  }\n}\n'
    ": Proto constraint validation failed (SecretValidationError.TlsCertificate: bad)"
)


def test_redaction_keeps_the_error_and_drops_the_key() -> None:
    text = redact_key_material(ENVOY_STYLE_NACK)
    assert "KEYBYTES" not in text and "PRIVATE KEY" not in text
    assert "Proto constraint validation failed" in text and 'name: "default"' in text


async def test_nacked_secret_key_never_reaches_state_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    cache = ResourceCache()
    cache.set_type(types.SECRET, [secret("default")])
    server = XdsServer(cache, ServerSettings(address="127.0.0.1:0", debounce_quiet=0))
    await server.start()
    caplog.set_level(logging.DEBUG)
    try:
        async with XdsClient(server.address, node_id="sds-proxy") as client:
            stream = client.ads()
            await stream.request(types.SECRET, ["default"])
            response = await stream.recv()
            await stream.nack(response, ENVOY_STYLE_NACK)
            for _ in range(100):
                (conn,) = server.connections
                state = conn.state.types[types.SECRET]
                if state.nack is not None:
                    break
                await asyncio.sleep(0.01)
            assert state.nack is not None and "Proto constraint validation failed" in state.nack.message
            assert "KEYBYTES" not in state.nack.message
        assert "KEYBYTES" not in caplog.text
    finally:
        await server.stop(0.2)
