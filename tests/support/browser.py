"""A real headless browser for web pages: Debian's chromium driven by Playwright (its own
browser download is never used). `make setup` installs chromium as root; without it the
tests fail saying what is missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any


def chromium_path() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("no chromium: the /ui tests need Debian's chromium "
                           "(apt-get install chromium; `make setup` installs it as root)")
    return path


@asynccontextmanager
async def browser_page(width: int = 1440, height: int = 900) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # --no-sandbox: the tests run as root, where chromium's sandbox refuses to start.
        browser = await playwright.chromium.launch(
            executable_path=chromium_path(), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            await browser.close()
