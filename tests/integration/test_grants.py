"""Grants over real HTTP on SQLite and PostgreSQL: bounded by the granter's own permissions and
the tier's approvers, consumed one use per capability, never outliving themselves, audited."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.approvals import DEPLOY, agent
from tests.support.brokers import Api

ALICE, BOB, CAROL, DAVE, ERIN, MALLORY = (f"{n}@example.com" for n in ("alice", "bob", "carol", "dave", "erin", "mallory"))


def grant(api: Api, who: str | None, session: dict[str, Any], **body: Any) -> httpx.Response:
    headers = api.as_human(who) if who else api.as_admin()
    return api.client.post("/v1/grants", headers=headers, json={
        "session_id": session["session_id"], "resource": "jwt://payments-api", "access": "deploy",
        "ttl_seconds": 600, "uses": 2, **body})


def test_grant_is_consumed_one_use_per_capability(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    r = grant(api, BOB, session, ttl_seconds=120, reason="deploy window")
    assert r.status_code == 201, r.text
    g = r.json()
    assert g["grant_id"].startswith("grt_") and g["uses_left"] == 2 and g["granted_by"] == BOB
    assert g["tier"] == "merge_deploy"
    first = api.request(session, {**DEPLOY, "ttl_seconds": 600})
    assert first.status_code == 201, first.text
    # Nothing minted under a grant outlives it: asked 600 s, the grant had 120 s.
    from datetime import datetime
    expires = datetime.fromisoformat(first.json()["expires_at"].replace("Z", "+00:00"))
    assert expires <= datetime.fromisoformat(g["expires_at"].replace("Z", "+00:00"))
    # Other parameters are fine: a grant pre-approves (resource, access), not one invocation.
    second = api.request(session, {**DEPLOY, "parameters": {"env": "staging"}})
    assert second.status_code == 201, second.text
    third = api.request(session, DEPLOY)
    assert third.status_code == 202 and third.json()["status"] == "pending_approval"

    records = api.client.get("/v1/audit", params={"session_id": session["session_id"]},
                             headers=api.as_admin()).json()["records"]
    created = next(r for r in records if r["type"] == "grant.created")
    assert created["detail"]["granted_by"] == BOB and created["jit_grant"]["grant_id"] == g["grant_id"]
    minted = [r for r in records if r["type"] == "capability.minted"]
    assert [m["policy_decision"]["grant"]["grant_id"] for m in minted] == [g["grant_id"]] * 2


def test_grant_matches_only_its_session_resource_and_access(humans_api: Api) -> None:
    api = humans_api
    session, other = api.new_session(task_id="a"), api.new_session(task_id="b")
    assert grant(api, BOB, session).status_code == 201
    assert api.request(other, DEPLOY).status_code == 202  # another session: still waits
    rotate = api.request(session, {"resource": "jwt://payments-api", "access": "rotate"})
    assert rotate.status_code == 202  # another access: still waits


def test_grant_is_bounded_by_the_granters_permissions_and_the_tiers_approvers(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    r = grant(api, CAROL, session)  # a maintainer who does not hold deploy
    assert r.status_code == 403 and r.json()["error"]["code"] == "approver-lacks-permission"
    r = grant(api, ALICE, session)  # the delegator, without allow_self_approval
    assert r.status_code == 403 and r.json()["error"]["code"] == "self-approval-forbidden"
    r = grant(api, MALLORY, session)  # holds deploy, but no tier names her: the session is not hers
    assert r.status_code == 404 and r.json()["error"]["code"] == "session-not-found"
    r = grant(api, None, session)  # the admin token is not a person
    assert r.status_code == 403 and r.json()["error"]["code"] == "granter-must-be-human"
    r = api.client.post("/v1/grants", headers=agent(session), json={
        "session_id": session["session_id"], "resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 60})
    assert r.status_code == 403
    # Four-eyes tiers cannot be pre-approved by one person.
    r = grant(api, DAVE, session, access="rotate")
    assert r.status_code == 403 and r.json()["error"]["code"] == "needs-more-approvers"
    # A grant cannot lift a deny of another layer.
    r = grant(api, BOB, session, access="drop")
    assert r.status_code == 403 and r.json()["error"]["code"] == "agent-ceiling"  # claude-code stops at secret
    narrow = api.new_session(task_id="narrow", scope=[{"resource": "jwt://payments-api", "access": ["read"]}])
    r = grant(api, BOB, narrow)
    assert r.status_code == 403 and r.json()["error"]["code"] == "outside-task-scope"
    r = grant(api, BOB, {"session_id": "ses_" + "0" * 32})
    assert r.status_code == 404
    r = grant(api, BOB, session, uses=0)
    assert r.status_code == 422
