"""Real Chromium for the console's browser tests: Debian's `chromium` package (installed by
`scripts/ensure-chromium`, which `make test` runs), driven by Playwright for Python through
`executable_path`. Playwright never downloads a browser here (`playwright install` is not used).

Fixture `chromium` (session): one headless browser; each test opens a context per person, so
each person has their own cookies, as on their own machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Screenshots go to a scratch folder so that a test run leaves the tracked tree as it found it;
# `make screenshots` sets BROKER_SCREENSHOTS_DIR=docs/screenshots to refresh the README's pictures.
SCREENSHOTS = Path(os.environ.get("BROKER_SCREENSHOTS_DIR") or Path(tempfile.gettempdir()) / "jit-broker-screenshots")
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium", path="/usr/bin")
    if found is None:
        pytest.fail("Debian's chromium is missing: run scripts/ensure-chromium (make test does)")
    return found


# Module scope, not session: Playwright's sync API keeps an event loop running on the test's
# thread while it is open, and a later test in the same worker calling asyncio.run() would find it.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    """Write NAME.png into SCREENSHOTS (docs/screenshots/ under `make screenshots`); the whole page."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
