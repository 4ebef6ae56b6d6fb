"""CSDS (every proxy's config) is behind the admin API's authentication (issue 13): a local
caller is served; a caller off the host needs an admin token in its call metadata, and is
refused with UNAUTHENTICATED otherwise; a wrong token is no better than none."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from xds_server.admin.settings import AdminSettings
from xds_server.app import _csds_authorizer


class Aborted(Exception):
    pass


class Context:
    """What the authorizer reads of a gRPC call: its peer and metadata; abort raises."""

    def __init__(self, peer: str, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self._peer, self._metadata = peer, metadata
        self.code: grpc.StatusCode | None = None

    def peer(self) -> str:
        return self._peer

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str) -> Any:
        self.code = code
        raise Aborted(details)


def authorizer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("XDS_SERVER_ADMIN_TOKENS", raising=False)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"name": "ops", "role": "read", "token": "s3cret-read-token"}]}))
    return _csds_authorizer(AdminSettings(tokens_file=tokens))


def test_local_callers_and_admin_tokens_are_served_others_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    authorize = authorizer(tmp_path, monkeypatch)
    for peer in ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/run/xds.sock"):
        asyncio.run(authorize(Context(peer)))  # no token needed on this host
    remote = "ipv4:10.1.2.3:40000"
    asyncio.run(authorize(Context(remote, (("authorization", "Bearer s3cret-read-token"),))))
    for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "Basic x"),)):
        context = Context(remote, metadata)
        with pytest.raises(Aborted, match="admin token"):
            asyncio.run(authorize(context))
        assert context.code is grpc.StatusCode.UNAUTHENTICATED
