"""The console without a browser: sign-in with a local human token, the cookie, the headers,
CSRF, and forged form posts for what belongs to someone else. The browser itself (and the IdP
sign-in) is tests/e2e/test_console_browser.py."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import select
from starlette.testclient import TestClient

from broker.app import create_app
from broker.db import transaction
from broker.models import BrowserSession, OutboxMessage
from tests.support.approvals import DEPLOY, open_broker
from tests.support.brokers import Api
from tests.support.console import ConsoleBrowser, csrf_of


def _pending(api: Api, **session: Any) -> tuple[dict[str, Any], str]:
    s = api.new_session(task_id="acme/payments#42", labels={"team": "payments"}, **session)
    r = api.request(s, DEPLOY)
    assert r.status_code == 202, r.text
    return s, r.json()["approval_id"]


def _shown_hash(api: Api, approval_id: str) -> str:
    """The request hash the approval's card carries in its form."""
    return str(api.client.get(f"/v1/approvals/{approval_id}", headers=api.as_admin()).json()["request_hash"])


def _status(api: Api, approval_id: str) -> str:
    r = api.client.get(f"/v1/approvals/{approval_id}", headers=api.as_admin())
    return str(r.json()["status"])


def _browser(api: Api, email: str) -> ConsoleBrowser:
    b = ConsoleBrowser(api.base_url)
    b.sign_in_with_token(api.secrets.human_tokens[email])
    return b


def test_sign_in_with_a_local_token_sets_a_random_http_only_cookie(humans_api: Api) -> None:
    api = humans_api
    with httpx.Client(base_url=api.base_url, timeout=30) as anonymous:
        r = anonymous.get("/console/approvals")
        assert r.status_code == 303 and r.headers["location"] == "/console/signin?next=/console/approvals"
    with ConsoleBrowser(api.base_url) as b:
        page = b.http.get("/console/signin")
        anonymous_cookie = page.headers["set-cookie"]
        assert "HttpOnly" in anonymous_cookie and "SameSite=Lax" in anonymous_cookie
        assert "Secure" not in anonymous_cookie  # plain http on loopback
        before = b.http.cookies["jitb_console"]
        r = b.post("/console/signin/token", csrf_token=csrf_of(page.text), token=api.secrets.human_tokens["bob@example.com"],
                   next="/console/sessions")
        assert r.status_code == 303 and r.headers["location"] == "/console/sessions"
        after = b.http.cookies["jitb_console"]
        assert after != before  # a new id at sign-in: no fixation
        with transaction(api.broker.engine) as db:
            rows = db.exec(select(BrowserSession)).all()
            by_hash = {row.id_hash: row for row in rows}
        # The cookie is only a random id; the table has its SHA-256, never the value.
        assert hashlib.sha256(after.encode()).hexdigest() in by_hash
        assert by_hash[hashlib.sha256(after.encode()).hexdigest()].principal == "bob@example.com"
        assert hashlib.sha256(before.encode()).hexdigest() not in by_hash
        assert all(after not in json.dumps(row.model_dump(mode="json")) for row in rows)
        assert b.http.get("/console/sessions").status_code == 200

        # Sign-out ends it on the server: the old cookie opens nothing.
        r = b.post("/console/signout", csrf_token=b.csrf())
        assert r.status_code == 303
    with httpx.Client(base_url=api.base_url, timeout=30, cookies={"jitb_console": after}) as replay:
        assert replay.get("/console/approvals").status_code == 303


def test_wrong_tokens_and_outside_redirects_are_refused(humans_api: Api) -> None:
    api = humans_api
    with ConsoleBrowser(api.base_url) as b:
        page = b.http.get("/console/signin")
        for token in ("jbhum_not-a-token", api.secrets.admin_token, api.secrets.orchestrator_key):
            r = b.post("/console/signin/token", csrf_token=csrf_of(page.text), token=token)
            assert r.status_code == 401 and "not a local human token" in r.text
        r = b.post("/console/signin/token", csrf_token=csrf_of(page.text), token=api.secrets.human_tokens["bob@example.com"],
                   next="https://evil.example/console/x")
        assert r.headers["location"] == "/console/approvals"


def test_security_headers_on_every_console_answer(humans_api: Api) -> None:
    api = humans_api
    with _browser(api, "bob@example.com") as b:
        for path in ("/console/signin", "/console/approvals", "/console/sessions", "/console/static/console.css",
                     "/console/approvals/apr_missing"):
            r = b.http.get(path)
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp, path
            assert "frame-ancestors 'none'" in csp and r.headers["x-frame-options"] == "DENY", path
            assert r.headers["referrer-policy"] == "same-origin" and r.headers["x-content-type-options"] == "nosniff"
        page = b.http.get("/console/approvals").text
        # No inline script or style for the CSP to refuse: every script is a file of the broker.
        assert re.findall(r"<script[^>]*>", page) == ['<script src="/console/static/console.js" defer>']
        assert " style=" not in page and "http://" not in page.replace(api.base_url, "")


def test_cookie_is_secure_outside_loopback(tmp_path: Path, database_url: str) -> None:
    broker, _secrets = open_broker(tmp_path, database_url, public_url="https://broker.example.com")
    with TestClient(create_app(broker=broker, background=False), base_url="https://broker.example.com") as client:
        r = client.get("/console/signin")
        cookie = r.headers["set-cookie"]
        assert cookie.startswith("__Host-jitb_console=") and "; Secure" in cookie and "HttpOnly" in cookie
        assert "SameSite=Lax" in cookie and "Path=/" in cookie and "Domain" not in cookie


def test_forms_without_the_session_csrf_token_change_nothing(humans_api: Api) -> None:
    api = humans_api
    _, aid = _pending(api)
    with _browser(api, "bob@example.com") as bob, _browser(api, "mallory@example.com") as mallory:
        mine = bob.csrf()
        for forged in ({}, {"csrf_token": ""}, {"csrf_token": "x" * 43}, {"csrf_token": mallory.csrf()}):
            r = bob.post(f"/console/approvals/{aid}/approve", request_hash=_shown_hash(api, aid), **forged)
            assert r.status_code == 403 and "csrf-failed" in r.text
            assert _status(api, aid) == "pending"
        r = bob.post("/console/signout")
        assert r.status_code == 403 and bob.http.get("/console/approvals").status_code == 200
        r = bob.post(f"/console/approvals/{aid}/approve", csrf_token=mine, reason="looked at the diff",
                     request_hash=_shown_hash(api, aid))
        assert r.status_code == 303 and r.headers["location"] == f"/console/approvals/{aid}"
        assert _status(api, aid) == "approved"
        card = bob.http.get(f"/console/approvals/{aid}").text
        assert "Approved: deploy on jwt://payments-api" in card and "looked at the diff" in card
    with httpx.Client(base_url=api.base_url, timeout=30) as stranger:  # no session at all
        page = stranger.get("/console/signin")
        r = stranger.post("/console/signin/token", data={"token": api.secrets.human_tokens["bob@example.com"]})
        assert r.status_code == 403 and page.status_code == 200


def test_forged_posts_for_someone_elses_approval_capability_or_session_are_refused(humans_api: Api) -> None:
    api = humans_api
    session, aid = _pending(api)
    read = api.request(session, {"resource": "jwt://payments-api", "access": "read"})
    assert read.status_code == 201
    cap = read.json()["capability_id"]
    refused = {
        "mallory@example.com": (404, "approval-not-found"),  # neither hers nor hers to approve
        "carol@example.com": (403, "approver-lacks-permission"),
        "alice@example.com": (403, "self-approval-forbidden"),
    }
    for email, (status, code) in refused.items():
        with _browser(api, email) as b:
            r = b.post(f"/console/approvals/{aid}/approve", csrf_token=b.csrf(), request_hash=_shown_hash(api, aid))
            assert (r.status_code, code in r.text) == (status, True), (email, r.text)
    assert _status(api, aid) == "pending"
    with _browser(api, "bob@example.com") as bob:  # an approver, but alice's session is not his
        token = bob.csrf()
        r = bob.post(f"/console/capabilities/{cap}/revoke", csrf_token=token)
        assert r.status_code == 404 and "capability-not-found" in r.text
        r = bob.post(f"/console/sessions/{session['session_id']}/end", csrf_token=token)
        assert r.status_code == 404 and "session-not-found" in r.text
        # He may read its timeline, being asked to decide on its request, but it offers him no action.
        timeline = bob.http.get(f"/console/sessions/{session['session_id']}")
        assert timeline.status_code == 200 and "asked to decide on its requests" in timeline.text
        assert "/end" not in timeline.text and "/revoke" not in timeline.text
    with _browser(api, "mallory@example.com") as mallory:  # named nowhere: the session does not exist for her
        assert mallory.http.get(f"/console/sessions/{session['session_id']}").status_code == 404
    got = api.client.get(f"/v1/sessions/{session['session_id']}", headers=api.as_admin()).json()
    assert got["status"] == "active" and [c["status"] for c in got["capabilities"]] == ["active"]


def test_cards_show_the_request_and_say_why_a_button_is_disabled(humans_api: Api) -> None:
    api = humans_api
    session, aid = _pending(api)
    with _browser(api, "carol@example.com") as carol:
        page = carol.http.get("/console/approvals").text
        assert f'id="card-{aid}"' in page
        for shown in ("alice@example.com", "claude-code", "https://github.com/acme/payments/issues/42", "deploy-cli",
                      "&#34;version&#34;: &#34;1.4.2&#34;", "merge_deploy", "5 min", "tiers.merge_deploy",
                      "the tier needs a person&#39;s approval", "left"):
            assert shown in page, shown
        assert re.search(r'class="approve"[^>]*disabled', page)
        assert "Approve is disabled: an approver must hold the access themselves" in page
    with _browser(api, "alice@example.com") as alice:
        page = alice.http.get(f"/console/approvals/{aid}").text
        assert "Approve is disabled: the delegating human may not approve their own agent" in page
        assert not re.search(r'class="deny"[^>]*disabled', page)  # she may always deny
    with _browser(api, "mallory@example.com") as mallory:
        assert f"card-{aid}" not in mallory.http.get("/console/approvals").text
        assert mallory.http.get(f"/console/approvals/{aid}").status_code == 404
    # What the session already holds is on the card (the escalation chain).
    assert api.request(session, {"resource": "jwt://payments-api", "access": "read"}).status_code == 201
    with _browser(api, "bob@example.com") as bob:
        held = bob.http.get(f"/console/approvals/{aid}").text
        assert re.search(r'class="held"><ul><li>.*read on <code>jwt://payments-api</code>', held)


def test_the_approval_notification_links_to_its_card(tmp_path: Path, database_url: str) -> None:
    broker, secrets_ = open_broker(tmp_path, database_url, public_url="https://broker.example.com/",
                                   approval_webhook_urls="http://127.0.0.1:9/hook", approval_webhook_secret="s3cret")
    with TestClient(create_app(broker=broker, background=False)) as client:
        api = Api(str(client.base_url), secrets_, broker, client)  # type: ignore[arg-type]
        _, aid = _pending(api)
        with transaction(broker.engine) as db:
            bodies = [json.loads(m.body) for m in db.exec(select(OutboxMessage)).all()]
    assert [b["url"] for b in bodies] == [f"https://broker.example.com/console/approvals/{aid}"]

