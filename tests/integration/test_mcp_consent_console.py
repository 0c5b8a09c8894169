"""The consent page in the console, driven as a browser drives it (cookies, the form's CSRF token):
the person signs in with the console's own sign-in, sees what the client asks for (agent-controlled
text escaped), answers, and is sent back to the client with a code that works once."""

from __future__ import annotations

import html
import re
from urllib.parse import parse_qs, urlsplit

import pytest
from sqlalchemy import func
from sqlmodel import select

from broker.db import transaction
from broker.models import Lease
from tests.integration.test_mcp_authorization import ALICE, CLIENT_ID
from tests.integration.test_mcp_authorization_refusals import MCP, World, _authorize, _pkce
from tests.integration.test_mcp_authorization_refusals import world as world  # the fixture
from tests.support.console import ConsoleBrowser, csrf_of

REFRESH = re.compile(r'<meta http-equiv="refresh" content="0; url=([^"]+)">')


def _consent_path(world: World, **overrides: str) -> str:
    r = _authorize(world, **overrides)
    assert r.status_code == 303, r.text
    return urlsplit(r.headers["location"]).path


def test_the_person_signs_in_sees_the_ask_and_approves_in_the_console(world: World) -> None:
    verifier, challenge = _pkce()
    path = _consent_path(world, code_challenge=challenge)
    with ConsoleBrowser(world.api.base_url) as browser:
        # Not signed in: the console's sign-in, and back here after it.
        first = browser.http.get(path)
        assert first.status_code == 303 and first.headers["location"] == "/console/signin?next=" + path
        browser.sign_in_with_token(world.api.secrets.human_tokens[ALICE])
        page = browser.http.get(path)
        assert page.status_code == 200
        for shown in (CLIENT_ID, MCP, "tools:read", "tier <code class=\"code\">read</code>"):
            assert shown in page.text
        # A form without this browser's CSRF token changes nothing.
        forged = browser.post(path, decision="approve", csrf_token="forged")
        assert forged.status_code == 403
        answer = browser.post(path, decision="approve", csrf_token=csrf_of(page.text))
        assert answer.status_code == 200, answer.text
        found = REFRESH.search(answer.text)
        assert found is not None
        location = html.unescape(found.group(1))
        assert location.startswith(world.redirect_uri + "?")
        query = parse_qs(urlsplit(location).query)
        assert query["state"] == ["st-1"] and query["iss"] == [world.api.broker.settings.issuer]
        # Answered: the page says so, and a second answer is refused.
        again = browser.post(path, decision="approve", csrf_token=csrf_of(page.text))
        assert again.status_code == 409
    r = world.api.client.post("/v1/oauth/token", data={
        "grant_type": "authorization_code", "code": query["code"][0], "client_id": CLIENT_ID,
        "redirect_uri": world.redirect_uri, "code_verifier": verifier})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("name", ['<script>alert(1)</script>', '"><img src=x onerror=alert(1)>',
                                  "{{ 7*7 }}", "Ａｐｐ &amp; co"])  # noqa: RUF001  # fullwidth letters, deliberately
def test_a_client_name_from_a_metadata_document_is_shown_as_text(world: World, name: str) -> None:
    url = world.docs.serve("/named/client.json", b"")
    world.docs.serve("/named/client.json", {"client_id": url, "client_name": name, "redirect_uris": [world.redirect_uri]})
    path = _consent_path(world, client_id=url)
    with ConsoleBrowser(world.api.base_url) as browser:
        browser.sign_in_with_token(world.api.secrets.human_tokens[ALICE])
        page = browser.http.get(path)
        assert page.status_code == 200
        main = page.text.split("<main>", 1)[1]
        if "<" in name:
            assert name not in main and "&lt;" in main  # markup arrives as text, never as tags
        else:
            assert html.escape(name, quote=False) in main  # as written: no template evaluation, & escaped


def test_denying_in_the_console_sends_access_denied_and_mints_nothing(world: World) -> None:
    path = _consent_path(world)
    with ConsoleBrowser(world.api.base_url) as browser:
        browser.sign_in_with_token(world.api.secrets.human_tokens[ALICE])
        page = browser.http.get(path)
        answer = browser.post(path, decision="deny", csrf_token=csrf_of(page.text))
        assert answer.status_code == 200
        found = REFRESH.search(answer.text)
        assert found is not None
        query = parse_qs(urlsplit(html.unescape(found.group(1))).query)
        assert query["error"] == ["access_denied"] and "code" not in query
    with transaction(world.api.broker.engine) as db:
        assert db.exec(select(func.count()).select_from(Lease)).one() == 0
