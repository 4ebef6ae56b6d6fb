"""The admin API's interactive docs (`--admin-docs`) in a real headless browser (the system's
chromium, driven by Playwright) against the real `serve` process: Swagger UI and ReDoc render
the API, and every request the pages make goes to the admin server itself (issue 13: they
used to load scripts and fonts from public CDNs, which breaks offline and tells third parties
who opens them). Requests elsewhere are refused by the browser and would fail the test."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.integration.test_admin_api import Served
from tests.support.admin import Tokens

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(base: str) -> dict[str, object]:
    """Open /docs and /redoc; return what they showed and every URL they asked for."""
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    refused: list[str] = []
    seen: dict[str, object] = {"requested": requested, "refused": refused}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context()

            def route(r) -> None:  # type: ignore[no-untyped-def]
                url = r.request.url
                requested.append(url)
                if url.startswith(base):
                    r.continue_()
                else:  # offline, as the issue asks: nothing leaves for a third party
                    refused.append(url)
                    r.abort()

            context.route("**/*", route)
            page = context.new_page()
            page.on("console", lambda message: seen.setdefault("console", []).append(message.text))  # type: ignore[union-attr]
            page.goto(f"{base}/docs")
            page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
            seen["swagger_title"] = page.inner_text(".swagger-ui .info .title")
            page.get_by_text("/api/v1/proxies", exact=False).first.wait_for(timeout=30_000)
            page.goto(f"{base}/redoc")
            page.wait_for_selector("h1", timeout=30_000)
            seen["redoc_title"] = page.inner_text("h1")
            page.get_by_text("/api/v1/proxies", exact=False).first.wait_for(timeout=30_000)
        finally:
            browser.close()
    return seen


async def test_docs_pages_render_from_this_server_only(tmp_path: Path) -> None:
    assert CHROMIUM is not None, "chromium not found: `make setup` installs it as root (apt-get install chromium)"
    served = await Served(tmp_path, Tokens(), "--admin-docs").start()
    try:
        seen = await asyncio.to_thread(_browse, served.admin_url)
    finally:
        assert await served.stop() == 0
    assert "xds-server admin API" in str(seen["swagger_title"])
    assert "xds-server admin API" in str(seen["redoc_title"])
    # Nothing was even asked of another host (the pages' policy keeps the bundles' few
    # outside URLs, such as ReDoc's footer logo, from being fetched).
    assert seen["refused"] == [], seen["refused"]
    requested = [str(url) for url in seen["requested"]]  # type: ignore[attr-defined]
    assert any(url.endswith("/docs-assets/swagger-ui-bundle.js") for url in requested), requested
    assert any(url.endswith("/docs-assets/redoc.standalone.js") for url in requested), requested
