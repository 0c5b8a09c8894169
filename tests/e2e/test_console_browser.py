"""The approver's console in real Chromium, signed in at a real OpenID provider.

bob opens the console, is sent to the IdP (npm's oidc-provider: authorization code + PKCE,
its own login and consent pages), sees alice's agent asking to merge, approves it; the agent's
long poll returns and its retry mints a real (stand-in) GitHub installation token. dave, named
as an approver but without merge himself, sees the buttons disabled with the reason. alice
reads her session's timeline (the chain verifies), revokes the capability and ends the session.
Screenshots of each page land in a scratch folder; `make screenshots` refreshes docs/screenshots/.

One database (SQLite) here: the console's SQL is the services', run on both by the rest of the suite.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker, free_port
from tests.support.browser import DESKTOP, PHONE, screenshot
from tests.support.github_standin import GitHubStandIn
from tests.support.oidc import OidcProvider

POLICY = STANDARD_TIERS.replace("approvers: [group:maintainers]", "approvers: [group:maintainers, dave@example.com]") + """\
resources:
  - match: "github://acme/*"
    provider: github
    access:
      read:  {tier: read, permissions: {contents: read, metadata: read}}
      merge: {tier: merge_deploy, permissions: {contents: write, pull_requests: write}}
humans:
  alice@example.com: {grants: [{resource: "github://acme/*", access: [read, merge]}]}
  dave@example.com: {grants: [{resource: "github://acme/*", access: [read]}]}
groups:
  maintainers:                      # bob is one through his IdP's groups claim; alice through the policy
    members: [alice@example.com]
    grants: [{resource: "github://acme/*", access: [read, merge]}]
agents:
  claude-code: {max_tier: merge_deploy}
"""

MERGE = {"resource": "github://acme/widgets", "access": "merge", "ttl_seconds": 600, "tool": "gh pr merge",
         "parameters": {"pull_request": 42, "method": "squash", "base": "main"},
         "purpose": "merge PR #42 (fix rounding in invoice totals) after green CI"}


@dataclass
class Console:
    api: Api
    url: str


@pytest.fixture
def console(tmp_path: Path, oidc_provider: OidcProvider, github_standin: GitHubStandIn) -> Iterator[Console]:
    github_standin.reset()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client_id, client_secret = oidc_provider.register_web_client(url + "/console/auth/callback")
    oidc = {k.removeprefix("BROKER_").lower(): v for k, v in oidc_provider.broker_env().items()}
    secrets_ = BrokerSecrets()
    broker = build_broker(
        tmp_path, f"sqlite:///{tmp_path}/broker.db", secrets_, POLICY, **oidc, issuer=url, public_url=url,
        console_oidc_client_id=client_id, console_oidc_client_secret=client_secret,
        console_oidc_resource="api://jit-broker",
        github_api_url=github_standin.url, github_app_id=github_standin.app_id,
        github_private_key_file=github_standin.private_key_path,
    )
    with LiveServer(broker, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Console(Api(server.base_url, secrets_, broker, client), url)


def sign_in(page: Any, console: Console, login: str, start: str = "/console/approvals") -> None:
    """The person at the browser: the console sends them to the IdP, they sign in and consent."""
    page.goto(console.url + start)
    page.wait_for_url("**/console/signin**")
    page.click("#signin-idp")
    login_form = "form:has(input[name=prompt][value=login])"  # the provider's own login page
    page.wait_for_selector(login_form)
    assert not page.url.startswith(console.url)
    page.fill(f"{login_form} input[name=login]", login)
    page.fill(f"{login_form} input[name=password]", "any-password")
    page.click(f"{login_form} button[type=submit]")
    consent = "form:has(input[name=prompt][value=consent]) button[type=submit]"  # its consent page
    page.wait_for_selector(consent)
    page.click(consent)
    page.wait_for_url(console.url + start)


def test_approve_a_merge_in_the_browser_and_the_agent_mints(console: Console, chromium: Any,
                                                            github_standin: GitHubStandIn) -> None:
    api = console.api
    session = api.new_session(human="alice@example.com", task_id="acme/widgets#42", repository="acme/widgets",
                              scope=[{"resource": "github://acme/widgets", "access": ["read", "merge"]}])
    assert api.request(session, {"resource": "github://acme/widgets", "access": "read"}).status_code == 201
    asked = api.request(session, MERGE)
    assert asked.status_code == 202, asked.text
    aid = asked.json()["approval_id"]

    # The agent waits on its approval with the long poll, then asks again with it.
    agent_steps: dict[str, Any] = {}

    def agent() -> None:
        auth = {"Authorization": f"Bearer {session['session_token']}"}
        with httpx.Client(base_url=api.base_url, timeout=90) as http:
            while True:
                polled = http.get(f"/v1/approvals/{aid}", params={"wait": 60}, headers=auth)
                if polled.status_code != 200 or polled.json()["status"] != "pending":
                    break
            agent_steps["decided"] = polled.json()
            agent_steps["minted"] = http.post("/v1/capabilities", headers=auth, json={**MERGE, "approval_id": aid})

    waiting = threading.Thread(target=agent, daemon=True)
    waiting.start()

    # The sign-in page itself, as a person first sees it.
    first = chromium.new_context(viewport=DESKTOP)
    try:
        page = first.new_page()
        page.goto(console.url + "/console/approvals")
        page.wait_for_selector("#signin-idp")
        screenshot(page, "signin")
    finally:
        first.close()

    # dave is named as an approver but does not hold merge: both reasons are on the card.
    dave = chromium.new_context(viewport=PHONE)
    try:
        page = dave.new_page()
        sign_in(page, console, "nogroups")  # the provider's account for dave@example.com
        card = page.locator(f"#card-{aid}")
        assert card.locator("button.approve").is_disabled()
        assert "Approve is disabled: an approver must hold the access themselves" in card.inner_text()
        screenshot(page, "approvals-disabled-phone")
    finally:
        dave.close()

    # bob, a maintainer by his IdP groups, sees the card and approves.
    bob = chromium.new_context(viewport=DESKTOP)
    try:
        page = bob.new_page()
        sign_in(page, console, "bob")
        card = page.locator(f"#card-{aid}")
        text = card.inner_text()
        for shown in ("alice@example.com", "claude-code", "acme/widgets#42", "github://acme/widgets", "merge_deploy",
                      "10 min", "gh pr merge", '"pull_request": 42', "read on github://acme/widgets",
                      "the tier needs a person's approval", "tiers.merge_deploy", "left"):
            assert shown in text, shown
        assert card.locator("a.task-link").get_attribute("href") == "https://github.com/acme/widgets/issues/42"
        assert card.locator("button.approve").is_enabled()
        screenshot(page, "approvals")
        page.set_viewport_size(PHONE)
        screenshot(page, "approvals-phone")
        page.set_viewport_size(DESKTOP)
        page.fill(f"#reason-{aid}", "CI green, diff reviewed")
        card.locator("button.approve").click()
        page.wait_for_url(f"{console.url}/console/approvals/{aid}")
        assert "Approved: merge on github://acme/widgets" in page.inner_text("main")
        screenshot(page, "approval-decided")
    finally:
        bob.close()

    waiting.join(120)
    assert agent_steps["decided"]["status"] == "approved" and agent_steps["decided"]["decided_by"] == "bob@example.com"
    minted = agent_steps["minted"]
    assert minted.status_code == 201, minted.text
    assert minted.json()["credential"]["type"] == "github_token" and minted.json()["tier"] == "merge_deploy"
    capability_id = minted.json()["capability_id"]

    # alice, whose authority it is, reads the story and takes it back.
    alice = chromium.new_context(viewport=DESKTOP)
    try:
        page = alice.new_page()
        sign_in(page, console, "alice", start="/console/sessions")
        block = page.locator(f"#session-{session['session_id']}")
        assert "merge on github://acme/widgets" in block.inner_text()
        screenshot(page, "sessions")
        page.goto(f"{console.url}/console/sessions/{session['session_id']}")
        assert "The chain verifies" in page.inner_text("#chain")
        types = page.locator("li.event").evaluate_all("els => els.map(e => e.dataset.type)")
        assert types == ["session.created", "capability.minted", "capability.pending", "approval.decided",
                         "capability.minted"], types
        story = page.inner_text("ol.timeline")
        assert "Approved by bob@example.com" in story and "CI green, diff reviewed" in story
        assert f"under approval {aid} by bob@example.com" in story
        screenshot(page, "timeline")

        page.goto(console.url + "/console/sessions")
        page.locator(f"#session-{session['session_id']} li.cap-active", has_text="merge").locator("button").click()
        page.wait_for_url(f"**/console/sessions/{session['session_id']}")
        assert f"Capability {capability_id} (merge on github://acme/widgets): revoked" in page.inner_text("main")
        assert github_standin.requests("DELETE", "/installation/token")
        page.click("form.end button")
        page.wait_for_selector("p.flash")
        assert "Session ended" in page.inner_text("main")
        types = page.locator("li.event").evaluate_all("els => els.map(e => e.dataset.type)")
        assert types[-3:] == ["capability.revoked", "session.ended", "capability.revoked"], types
        assert "The chain verifies" in page.inner_text("#chain")
        screenshot(page, "timeline-ended")
        page.set_viewport_size(PHONE)
        screenshot(page, "timeline-phone")
    finally:
        alice.close()
