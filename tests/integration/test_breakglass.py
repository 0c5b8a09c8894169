"""Break-glass (issue 26, acceptance 1): refused without a justification, with one approver where
two are needed, by the delegator for their own agent, after its TTL, on second use; one member of
the break-glass group suffices; each use opens a post-review that a named reviewer closes, and an
overdue one shows in /metrics and the audit. Real broker over HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import html
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select
from typer.testing import CliRunner

from broker.audit.service import query
from broker.cli.main import app as cli
from broker.db import transaction, utcnow
from broker.lifecycle.sweeper import sweep_once
from broker.models import Approval, BreakGlassReview, Lease, OutboxMessage
from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.console import ConsoleBrowser
from tests.support.hostile_text import ALL, ids, marked

POLICY = STANDARD_TIERS + """\
resources:
  - match: "jwt://svc/*"
    provider: native
    access:
      read: {tier: read}
      drop:
        tier: destructive
        break_glass: {approvers: [group:sre], group: oncall, max_ttl: 10m, reviewers: [group:security],
                      review_within: 1h}
humans:
  alice@example.com: {grants: [{resource: "jwt://svc/*", access: [read, drop]}]}
groups:
  sre:
    members: [alice@example.com, bob@example.com, carol@example.com, dave@example.com]
    grants: [{resource: "jwt://svc/*", access: [read, drop]}]
  oncall: {members: [dave@example.com]}
  security: {members: [erin@example.com]}
agents:
  ops-bot: {max_tier: destructive}
budgets: {max_issued_per_session: 100, max_active_per_session: 100}
"""
WHY = "the staging table is corrupt and blocks the release; dropping it is the runbook's step 4"
DROP = {"resource": "jwt://svc/staging", "access": "drop"}


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    receivers = json.dumps([{"name": "siem", "url": "http://127.0.0.1:9/events", "audience": "https://siem.test"}])
    broker = build_broker(tmp_path, database_url, secrets_, POLICY, security_event_receivers=receivers,
                          approval_webhook_urls="http://127.0.0.1:9/approvals", approval_webhook_secret="s" * 32)
    with LiveServer(broker, outbox=False) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def session(api: Api) -> dict[str, Any]:
    return api.new_session(agent="ops-bot", scope=[{"resource": "jwt://svc/*", "access": ["read", "drop"]}])


def decide(api: Api, approval_id: str, who: str, decision: str = "approve") -> httpx.Response:
    return api.client.post(f"/v1/approvals/{approval_id}/{decision}", headers=api.as_human(who), json={})


def audit_types(api: Api, session_id: str) -> list[str]:
    with transaction(api.broker.engine) as db:
        return [json.loads(r.record)["type"] for r in query(db, session_id=session_id, limit=10_000)]


def audit_of(api: Api, session_id: str, type_: str) -> list[dict[str, Any]]:
    with transaction(api.broker.engine) as db:
        return [json.loads(r.record) for r in query(db, session_id=session_id, limit=10_000) if r.type == type_]


def pending(api: Api, s: dict[str, Any], justification: str = WHY) -> str:
    r = api.request(s, {**DROP, "justification": justification})
    assert r.status_code == 202, r.text
    assert r.json()["min_approvals"] == 2 and r.json()["reason"] == "break-glass-required"
    return str(r.json()["approval_id"])


def use(api: Api, s: dict[str, Any], approval_id: str) -> httpx.Response:
    return api.request(s, {**DROP, "justification": WHY, "approval_id": approval_id})


def test_without_a_justification_break_glass_is_refused(api: Api) -> None:
    s = session(api)
    for body in ({}, {"justification": None}):
        r = api.request(s, {**DROP, **body})
        assert r.status_code == 403 and r.json()["error"]["code"] == "break-glass-justification-required", r.text
    for short in ("", "because", "x" * 19):  # a written reason, not a word
        r = api.request(s, {**DROP, "justification": short})
        assert r.status_code in (400, 422), r.text
    # An access without break_glass on the same destructive tier stays plainly denied.
    assert "breakglass.requested" not in audit_types(api, s["session_id"])


def test_two_distinct_approvers_never_the_delegator_single_use_review_opened(api: Api) -> None:
    s = session(api)
    sid = s["session_id"]
    approval_id = pending(api, s)
    assert audit_types(api, sid).count("breakglass.requested") == 1
    # The delegator may not approve their own agent's break-glass, though they are in the group.
    r = decide(api, approval_id, "alice@example.com")
    assert r.status_code == 403 and r.json()["error"]["code"] == "self-approval-forbidden", r.text
    # One approver where two are needed: still pending, and the agent gets nothing.
    assert decide(api, approval_id, "bob@example.com").status_code == 200
    r = use(api, s, approval_id)
    assert r.status_code == 409 and r.json()["error"]["code"] == "approval-pending", r.text
    # The same person twice is still one.
    assert decide(api, approval_id, "bob@example.com").json()["error"]["code"] == "already-decided"
    r = decide(api, approval_id, "carol@example.com")
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert audit_of(api, sid, "breakglass.approved")[0]["detail"]["approved_by"] == [
        "bob@example.com", "carol@example.com"]
    r = use(api, s, approval_id)
    assert r.status_code == 201, r.text
    cap = r.json()
    with transaction(api.broker.engine) as db:
        lease = db.get(Lease, cap["capability_id"])
        assert lease is not None and lease.ttl_seconds <= 600  # max_ttl 10m, under the 15m ceiling
        reviews = db.exec(select(BreakGlassReview).where(BreakGlassReview.session_id == sid)).all()
        notes = {m.type for m in db.exec(select(OutboxMessage).where(OutboxMessage.kind == "approval")).all()}
        sets = [json.loads(m.body) for m in db.exec(select(OutboxMessage).where(OutboxMessage.kind == "set")).all()]
    glass = [c["events"]["https://jit-broker.dev/secevent/breakglass"] for c in sets
             if "https://jit-broker.dev/secevent/breakglass" in c["events"]]
    assert sorted(e["stage"] for e in glass) == ["approved", "requested", "used"], glass
    used_set = next(e for e in glass if e["stage"] == "used")
    assert used_set["capability_id"] == cap["capability_id"] and used_set["review_id"] == reviews[0].id
    assert all(c["aud"] == "https://siem.test" for c in sets)
    assert len(reviews) == 1 and reviews[0].capability_id == cap["capability_id"]
    assert reviews[0].approved_by == ["bob@example.com", "carol@example.com"] and reviews[0].justification == WHY
    assert {"breakglass.requested", "breakglass.approved", "breakglass.used"} <= notes
    used = audit_of(api, sid, "breakglass.used")
    assert len(used) == 1 and used[0]["detail"]["review_id"] == reviews[0].id
    # Single use.
    r = use(api, s, approval_id)
    assert r.status_code == 409 and r.json()["error"]["code"] == "approval-used", r.text


def test_a_break_glass_access_is_never_pre_approved_by_a_grant(api: Api) -> None:
    s = session(api)
    for who in ("alice@example.com", "bob@example.com", "dave@example.com"):
        r = api.client.post("/v1/grants", headers=api.as_human(who), json={
            "session_id": s["session_id"], **DROP, "ttl_seconds": 300, "uses": 1})
        assert r.status_code in (403, 404), (who, r.text)
    r = api.request(s, {**DROP, "justification": WHY})
    assert r.status_code == 202, r.text  # still waits for its approvers


def test_one_member_of_the_break_glass_group_suffices(api: Api) -> None:
    s = session(api)
    approval_id = pending(api, s)
    r = decide(api, approval_id, "dave@example.com")  # on call
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    assert use(api, s, approval_id).status_code == 201


def test_an_approval_past_its_time_is_refused(api: Api) -> None:
    s = session(api)
    approval_id = pending(api, s)
    decide(api, approval_id, "bob@example.com")
    decide(api, approval_id, "carol@example.com")
    with transaction(api.broker.engine) as db:
        approval = db.get(Approval, approval_id)
        assert approval is not None
        approval.expires_at = utcnow() - timedelta(seconds=1)
        db.add(approval)
    r = use(api, s, approval_id)
    assert r.status_code == 409 and r.json()["error"]["code"] == "approval-expired", r.text


def test_reviews_are_listed_for_and_closed_by_named_reviewers_and_overdue_ones_show(api: Api) -> None:
    s = session(api)
    approval_id = pending(api, s)
    decide(api, approval_id, "dave@example.com")
    cap = use(api, s, approval_id).json()
    erin, bob = api.as_human("erin@example.com"), api.as_human("bob@example.com")
    listed = api.client.get("/v1/reviews?status=open", headers=erin).json()
    assert [r["capability_id"] for r in listed] == [cap["capability_id"]]
    assert listed[0]["overdue"] is False and listed[0]["justification"] == WHY
    assert api.client.get("/v1/reviews", headers=bob).json() == []  # an approver is not a reviewer
    assert api.client.get("/v1/reviews", headers={"Authorization": f"Bearer {s['session_token']}"}).status_code == 403
    review_id = listed[0]["review_id"]
    # Overdue: past due, in /metrics and, once, in the audit.
    with transaction(api.broker.engine) as db:
        review = db.get(BreakGlassReview, review_id)
        assert review is not None
        review.due_at = utcnow() - timedelta(seconds=1)
        db.add(review)
    metrics = api.client.get("/metrics").text
    assert "broker_breakglass_reviews_overdue 1.0" in metrics, metrics
    sweep_once(api.broker)
    sweep_once(api.broker)
    assert audit_types(api, s["session_id"]).count("breakglass.review-overdue") == 1
    r = api.client.post(f"/v1/reviews/{review_id}/close", headers=bob, json={"verdict": "appropriate"})
    assert r.status_code == 404, r.text
    for bad in ({}, {"verdict": "fine"}, {"verdict": "appropriate", "note": ""}, {"verdict": ["appropriate"]}):
        r = api.client.post(f"/v1/reviews/{review_id}/close", headers=erin, json=bad)
        assert r.status_code in (400, 422), (bad, r.text)
    r = api.client.post(f"/v1/reviews/{review_id}/close", headers=erin,
                        json={"verdict": "appropriate", "note": "runbook step, confirmed with the on-call"})
    assert r.status_code == 200 and r.json()["status"] == "closed" and r.json()["closed_by"] == "erin@example.com"
    r = api.client.post(f"/v1/reviews/{review_id}/close", headers=erin, json={"verdict": "inappropriate"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "review-closed"
    reviewed = audit_of(api, s["session_id"], "breakglass.reviewed")
    assert len(reviewed) == 1 and reviewed[0]["detail"]["verdict"] == "appropriate"
    assert "broker_breakglass_reviews_overdue 0.0" in api.client.get("/metrics").text


def test_broker_cli_reviews_list_and_close(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    s = session(api)
    approval_id = pending(api, s)
    decide(api, approval_id, "dave@example.com")
    cap = use(api, s, approval_id).json()
    monkeypatch.setenv("BROKER_URL", api.base_url)
    monkeypatch.setenv("BROKER_TOKEN", api.secrets.human_tokens["erin@example.com"])
    out = CliRunner().invoke(cli, ["reviews", "list"])
    assert out.exit_code == 0, out.output
    assert "jwt://svc/staging drop" in out.output and WHY in out.output and "dave@example.com" in out.output
    listed = json.loads(CliRunner().invoke(cli, ["reviews", "list", "--json"]).output)
    assert [r["capability_id"] for r in listed] == [cap["capability_id"]]
    review_id = listed[0]["review_id"]
    bad = CliRunner().invoke(cli, ["reviews", "close", review_id, "--verdict", "meh"])
    assert bad.exit_code != 0
    out = CliRunner().invoke(cli, ["reviews", "close", review_id, "--verdict", "inappropriate", "--note", "not needed"])
    assert out.exit_code == 0 and f"{review_id} closed: inappropriate" in out.output, out.output
    assert "no reviews" in CliRunner().invoke(cli, ["reviews", "list"]).output


def test_the_console_shows_the_justification_and_closes_reviews(api: Api) -> None:
    s = session(api)
    approval_id = pending(api, s)
    with ConsoleBrowser(api.base_url) as bob:
        bob.sign_in_with_token(api.secrets.human_tokens["bob@example.com"])
        card = bob.http.get(f"/console/approvals/{approval_id}")
        assert card.status_code == 200 and WHY in html.unescape(card.text) and "Break-glass justification" in card.text
    decide(api, approval_id, "dave@example.com")
    cap = use(api, s, approval_id).json()
    with ConsoleBrowser(api.base_url) as erin:
        erin.sign_in_with_token(api.secrets.human_tokens["erin@example.com"])
        page = erin.http.get("/console/reviews")
        assert page.status_code == 200 and cap["capability_id"] in page.text and WHY in html.unescape(page.text)
        review_id = api.client.get("/v1/reviews", headers=api.as_human("erin@example.com")).json()[0]["review_id"]
        r = erin.post(f"/console/reviews/{review_id}/close", csrf_token=erin.csrf("/console/reviews"), verdict="")
        assert r.status_code == 400  # a verdict is required
        r = erin.post(f"/console/reviews/{review_id}/close", csrf_token="forged", verdict="appropriate")
        assert r.status_code == 403
        r = erin.post(f"/console/reviews/{review_id}/close", csrf_token=erin.csrf("/console/reviews"),
                      verdict="appropriate", note="fine")
        assert r.status_code == 303, r.text
        assert "No open reviews for you." in erin.http.get("/console/reviews").text
    assert api.client.get("/v1/reviews?status=closed", headers=api.as_human("erin@example.com")).json()[0][
        "verdict"] == "appropriate"


@pytest.mark.parametrize(("kind", "code"), ALL, ids=ids(ALL))
def test_a_hostile_justification_is_shown_marked_to_approvers(api: Api, kind: str, code: int) -> None:
    s = session(api)
    text = f"the table is corrupt{chr(code)} and blocks the release now"
    r = api.request(s, {**DROP, "justification": text})
    if r.status_code in (400, 422):  # refused at the door (NUL, lone controls): nothing opened
        assert "breakglass.requested" not in audit_types(api, s["session_id"])
        return
    assert r.status_code == 202, (kind, r.text)
    shown = api.client.get(f"/v1/approvals/{r.json()['approval_id']}", headers=api.as_human("bob@example.com"))
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["justification"] == text  # exactly what the agent sent
    assert marked(code) in body["display"]["justification"], (kind, body["display"])
