"""The live mesh page (/ui) in a real headless browser over the demo's mesh with real Envoy
sidecars: it draws the services and the canary route, an edge's request rate follows the
traffic, and a proxy that rejects config shows as NACKED with Envoy's error within seconds.

`UPDATE_SCREENSHOTS=1` also writes the README's screenshot (docs/mesh-ui.png)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from envoy.config.core.v3 import health_check_pb2

from tests.support.admin import AdminStack
from tests.support.browser import browser_page
from tests.support.mesh import MeshHarness
from tests.support.programmable import programmable_pod
from tests.support.xds_client import cluster
from xds_server.translate.raw import RawResources
from xds_server.xds import types
from xds_server.xds.lrs import LrsSettings

pytestmark = [pytest.mark.xdist_group("envoy"), pytest.mark.envoy, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROUTE = """
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: api-canary, namespace: demo }
spec:
  parentRefs: [{ group: "", kind: Service, name: api, port: 80 }]
  rules:
    - backendRefs:
        - { name: api-v1, port: 80, weight: 90 }
        - { name: api-v2, port: 80, weight: 10 }
"""
EDGE = '#graph g.edge.traffic[data-source="demo/frontend"][data-target="demo/api-v1"]'


class Traffic:
    """Threads sending requests from frontend's app to `api` until stopped."""

    def __init__(self, pod) -> None:
        self.pod = pod
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def add(self, pause: float) -> None:
        def run() -> None:
            while not self.stop.is_set():
                try:
                    self.pod.request("api", timeout=5)
                except OSError:
                    pass
                time.sleep(pause)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(10)


async def _edge_rps(page) -> float | None:
    value = await page.evaluate(
        f"() => {{ const e = document.querySelector('{EDGE}'); return e && e.getAttribute('data-rps'); }}")
    return None if value is None else float(value)


async def _until(probe, timeout: float, message: str):
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {message} (last: {value!r})"
        await asyncio.sleep(0.25)


async def test_mesh_page_shows_traffic_routes_and_nacks(tmp_path):
    mesh = MeshHarness(tmp_path / "mesh", load_reports=LrsSettings(interval=1.0))
    await mesh.start()
    frontend = mesh.pod("demo", "frontend", service_account="frontend")
    v1, _ = programmable_pod(mesh, "demo", "api-v1-0", service_account="api")
    v2, v2_app = programmable_pod(mesh, "demo", "api-v2-0", service_account="api", fail_fraction=0.2)
    mesh.service("demo", "frontend", 80, pods=[frontend])
    mesh.service("demo", "api", 80, target_port=8080)
    mesh.service("demo", "api-v1", 80, pods=[v1])
    mesh.service("demo", "api-v2", 80, pods=[v2])
    mesh.write("routes.yaml", ROUTE)
    await asyncio.gather(*(mesh.sidecar(p) for p in (frontend, v1, v2)))
    stack = await AdminStack(server=mesh.server, cache=mesh.cache, store=mesh.store,
                             load=mesh.load).start()
    traffic = Traffic(frontend)
    try:
        await mesh.until(lambda: frontend.request("api").status in (200, 503), 20, "api routed")
        async with browser_page() as page:
            await page.goto(f"{stack.url}/ui#token={stack.tokens.read}")
            # The demo's services, and the canary route's weights.
            for service in ("frontend", "api", "api-v1", "api-v2"):
                await page.wait_for_selector(f'#graph g.node[data-id="demo/{service}"]', timeout=15_000)
            route = page.locator('#graph g.edge.route[data-source="demo/api"][data-target="demo/api-v1"]')
            assert "90 %" in await route.locator("title").text_content()
            assert "token" not in page.url  # the token left the address bar

            # Slow traffic, then more: the edge's rate follows.
            traffic.add(pause=0.2)
            slow = await _until(lambda: _edge_rps(page), 30, "a rate on frontend -> api-v1")
            await asyncio.sleep(3)  # a few reports of the slow rate
            slow = await _edge_rps(page) or slow
            for _ in range(3):
                traffic.add(pause=0.0)
            fast = await _until(lambda: _rps_above(page, slow * 2), 30, "the rate to rise")
            assert fast > slow * 2
            # The flaky canary's errors show on its edge.
            await _until(lambda: _attr(page, '#graph g.edge.traffic[data-source="demo/frontend"][data-target="demo/api-v2"]',
                                       "data-error-ratio", lambda v: float(v) > 0), 30, "api-v2's errors")
            assert v2_app.requests_total > 0
            if os.environ.get("UPDATE_SCREENSHOTS"):
                await page.screenshot(path=str(ROOT / "docs" / "mesh-ui.png"), full_page=True)
            await page.screenshot(path=str(tmp_path / "mesh-ui.png"), full_page=True)

            # A cluster Envoy rejects: every sidecar NACKs, and the page says so, with the error.
            broken = cluster("broken")
            broken.health_checks.append(health_check_pb2.HealthCheck())
            RawResources(mesh.cache).publish({types.CLUSTER: [broken]})
            row = page.locator('#proxies tr[data-proxy="frontend.demo"][data-status="NACKED"]')
            await row.wait_for(timeout=20_000)
            nack = page.locator('#nacks .nack[data-proxy="frontend.demo"]')
            assert "CDS" in await nack.text_content()
            text = (await nack.locator("code").text_content()).lower()
            assert "health" in text or "interval" in text, text
    finally:
        traffic.close()
        await stack.admin.close()
        await mesh.stop()


async def _rps_above(page, floor: float) -> float | None:
    value = await _edge_rps(page)
    return value if value is not None and value > floor else None


async def _attr(page, selector: str, name: str, check) -> bool:
    value = await page.evaluate(
        f"() => {{ const e = document.querySelector('{selector}'); return e && e.getAttribute('{name}'); }}")
    return value is not None and check(value)
