"""The MCP authorization code flow with the person's consent in real Chromium (Debian's, driven by
Playwright's async API inside the MCP SDK's own event loop): the SDK's OAuth client provider opens
the authorization URL; the person signs in to the console (a local human token, the embedded
default's sign-in), reads the ask, approves; the browser goes back to the client's redirect URI
(intercepted, as a native client's loopback listener would take it) and the SDK calls the tool.

This is the check that the way back works in a browser: the console's CSP says `form-action
'self'`, which Chromium also applies to a form's redirects, so the consent answer is a page that
navigates rather than a 303. One database (SQLite): the SQL is the services', tested on both."""

from __future__ import annotations

import asyncio
import concurrent.futures
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_mcp_authorization import ALICE, CLIENT_ID, Person, Storage, World, _call_tool, _registered
from tests.integration.test_mcp_authorization import world as world  # the fixture
from tests.support.browser import CHROMIUM_ARGS, chromium_path


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/broker.db"


class BrowserPerson(Person):
    """The person at a real browser."""

    async def redirect_handler(self, url: str) -> None:
        from playwright.async_api import async_playwright

        api = self.world.api
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                returned: list[str] = []

                async def client_listener(route: Any) -> None:
                    returned.append(route.request.url)
                    await route.fulfill(status=200, content_type="text/plain", body="you may close this tab")

                await page.route(self.world.redirect_uri + "?**", client_listener)
                await page.goto(url)
                await page.wait_for_url("**/console/signin?next=**")
                await page.fill("#token", api.secrets.human_tokens[self.human])
                await page.click("form.token button[type=submit]")
                await page.wait_for_url("**/console/oauth/authorize/az_*")
                shown = await page.inner_text("main")
                self.asked.append({"text": shown})
                await page.click("button[value=approve]")
                await page.wait_for_url(self.world.redirect_uri + "?**")
                assert len(returned) == 1
                self.redirect = returned[0]
            finally:
                await browser.close()


def test_the_sdk_client_and_a_person_in_chromium_complete_the_flow(world: World) -> None:
    storage = Storage(_registered())
    storage.client_info.redirect_uris = [world.redirect_uri]  # type: ignore[union-attr]
    person = BrowserPerson(world, ALICE)
    # Its own thread: a session-scoped sync Playwright (the console's browser tests) may hold this
    # thread's event loop, and asyncio.run refuses to nest in it.
    with concurrent.futures.ThreadPoolExecutor(1) as own:
        text = own.submit(asyncio.run, _call_tool(world, world.first, person, storage)).result()
    assert text == "files: ok"
    [asked] = person.asked
    for shown in ("SDK test client", CLIENT_ID, world.first.url, "tools:read", world.redirect_uri):
        assert shown in asked["text"]
