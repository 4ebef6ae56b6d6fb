"""The mesh end to end: YAML in, real sidecars, real requests through them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.mesh import MeshHarness

pytestmark = [pytest.mark.envoy, pytest.mark.slow]


@pytest.fixture
async def mesh(tmp_path: Path):
    harness = await MeshHarness(tmp_path / "mesh").start()
    yield harness
    await harness.stop()


async def test_request_reaches_service_through_both_sidecars(mesh: MeshHarness) -> None:
    api = mesh.pod("shop", "api-1", service_account="api")
    frontend = mesh.pod("shop", "frontend-1", service_account="frontend")
    mesh.service("shop", "api", 8080, pods=[api])
    await mesh.sidecar(api)
    await mesh.sidecar(frontend)
    for host in ("api", "api:8080", "api.shop", "api.shop.svc.cluster.local:8080"):
        response = await mesh.until(
            lambda h=host: (r := frontend.request(h, "/hello")).status == 200 and r, message=host
        )
        assert response.json["name"] == "api-1"
        assert response.json["path"] == "/hello"
    # It went through api's sidecar, not straight to the app.
    stats = await asyncio.to_thread(api.envoy.stats, "^http.inbound.downstream_rq_2xx$")
    assert stats["http.inbound.downstream_rq_2xx"] >= 4
