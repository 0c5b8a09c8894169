"""Approvals over real HTTP on SQLite and PostgreSQL: the 202, the binding, each rule, and the
attacks of issue 9 (changed parameter, reuse, expiry, self-approval, approver without the
permission, one of two approvals, another session's approval)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import Session, select

from broker.db import transaction, utcnow
from broker.models import Approval, Lease
from tests.support.approvals import APPROVALS_POLICY, DEPLOY, agent, open_broker
from tests.support.brokers import Api, LiveServer

ALICE, BOB, CAROL, DAVE, ERIN, MALLORY = (f"{n}@example.com" for n in ("alice", "bob", "carol", "dave", "erin", "mallory"))


def ask(api: Api, session: dict[str, Any], body: dict[str, Any] = DEPLOY, **extra: Any) -> httpx.Response:
    return api.request(session, {**body, **extra})


def pending(api: Api, session: dict[str, Any], body: dict[str, Any] = DEPLOY) -> dict[str, Any]:
    r = ask(api, session, body)
    assert r.status_code == 202, r.text
    return r.json()  # type: ignore[no-any-return]


def decide(api: Api, approval_id: str, who: str, verb: str = "approve", reason: str | None = None) -> httpx.Response:
    return api.client.post(f"/v1/approvals/{approval_id}/{verb}", json={"reason": reason} if reason else None,
                           headers=api.as_human(who))


def test_request_waits_with_a_binding_then_approval_mints_once(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    body = pending(api, session)
    assert body["status"] == "pending_approval" and body["approval_id"].startswith("apr_")
    assert body["approvers"] == ["group:maintainers"] and body["min_approvals"] == 1
    message = body["binding_message"]
    assert "claude-code" in message and "deploy on jwt://payments-api" in message and '"env":"prod"' in message
    assert "deploy-cli" in message and "Binding " in message
    # Asking again does not open a second approval: same id.
    assert pending(api, session)["approval_id"] == body["approval_id"]

    # The approver sees it with full parameters, and may approve it.
    listed = api.client.get("/v1/approvals", params={"status": "pending"}, headers=api.as_human(BOB)).json()
    mine = next(a for a in listed if a["approval_id"] == body["approval_id"])
    assert mine["parameters"] == DEPLOY["parameters"] and mine["tool"] == "deploy-cli"
    assert mine["you_may_approve"] is True and mine["human"] == ALICE
    r = decide(api, body["approval_id"], BOB, reason="release 1.4.2 is signed off")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved" and r.json()["decided_by"] == BOB

    # Without approval_id the request still waits; with it, it mints.
    minted = ask(api, session, approval_id=body["approval_id"])
    assert minted.status_code == 201, minted.text
    cap = minted.json()
    assert cap["tier"] == "merge_deploy" and cap["expires_at"]
    seen = api.client.get(f"/v1/approvals/{body['approval_id']}", headers=agent(session)).json()
    assert seen["status"] == "used" and seen["capability_id"] == cap["capability_id"]

    # Reuse: single use.
    again = ask(api, session, approval_id=body["approval_id"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "approval-used"

    # The audit links request, approval and mint by ids.
    records = api.client.get("/v1/audit", params={"session_id": session["session_id"]},
                             headers=api.as_admin()).json()["records"]
    types = [r["type"] for r in records]
    assert types.index("capability.pending") < types.index("approval.decided") < types.index("capability.minted")
    decided = next(r for r in records if r["type"] == "approval.decided")
    assert decided["detail"]["decided_by"] == BOB and decided["request"]["actor"] == f"human:{BOB}"
    assert decided["detail"]["reason"] == "release 1.4.2 is signed off"
    mint = next(r for r in records if r["type"] == "capability.minted")
    assert mint["policy_decision"]["approval"]["approval_id"] == body["approval_id"]
    assert mint["policy_decision"]["approval"]["approved_by"] == BOB
    assert mint["jit_grant"]["capability_id"] == cap["capability_id"]


def test_changed_parameter_needs_a_new_approval(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    approval_id = pending(api, session)["approval_id"]
    assert decide(api, approval_id, BOB).status_code == 200
    for change in ({"parameters": {"env": "prod", "version": "1.4.3"}}, {"ttl_seconds": 301},
                   {"tool": "other-tool"}, {"access": "write"}, {"parameters": None}):
        r = ask(api, session, **change, approval_id=approval_id)
        assert r.status_code == 409, (change, r.text)
        assert r.json()["error"]["code"] == "approval-mismatch"
    # The refusals consumed nothing: the exact request still mints.
    assert ask(api, session, approval_id=approval_id).status_code == 201
    with Session(api.broker.engine) as db:
        assert len(db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all()) == 1


def test_expired_approval_is_refused(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    approval_id = pending(api, session)["approval_id"]
    assert decide(api, approval_id, BOB).status_code == 200
    with transaction(api.broker.engine) as db:
        row = db.get(Approval, approval_id)
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        db.add(row)
    r = ask(api, session, approval_id=approval_id)
    assert r.status_code == 409 and r.json()["error"]["code"] == "approval-expired"
    assert api.client.get(f"/v1/approvals/{approval_id}", headers=agent(session)).json()["status"] == "expired"
    # An expired pending approval cannot be decided either.
    other = pending(api, session, {**DEPLOY, "parameters": {"env": "staging"}})["approval_id"]
    with transaction(api.broker.engine) as db:
        row = db.get(Approval, other)
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        db.add(row)
    r = decide(api, other, BOB)
    assert r.status_code == 409 and r.json()["error"]["code"] == "approval-expired"


def test_self_approval_is_refused_unless_the_tier_allows_it(humans_api: Api, database_url: str, tmp_path: Path) -> None:
    api = humans_api
    session = api.new_session(human=ALICE)
    approval_id = pending(api, session)["approval_id"]
    r = decide(api, approval_id, ALICE)
    assert r.status_code == 403 and r.json()["error"]["code"] == "self-approval-forbidden"
    view = api.client.get(f"/v1/approvals/{approval_id}", headers=api.as_human(ALICE)).json()
    assert view["status"] == "pending" and view["you_may_approve"] is False and "own agent" in view["why_not"]
    # The delegator may always withdraw (deny) their own agent's request; deny is final.
    r = decide(api, approval_id, ALICE, "deny", reason="not today")
    assert r.status_code == 200 and r.json()["status"] == "denied"
    assert decide(api, approval_id, BOB).json()["error"]["code"] == "approval-not-pending"
    r = ask(api, session, approval_id=approval_id)
    assert r.status_code == 403 and r.json()["error"]["code"] == "approval-denied"

    # A policy with allow_self_approval lets the delegator approve.
    allowing = APPROVALS_POLICY.replace("approvers: [group:maintainers]}",
                                        "approvers: [group:maintainers], allow_self_approval: true}")
    (tmp_path / "self").mkdir()
    broker, secrets_ = open_broker(tmp_path / "self", database_url, allowing)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        other = Api(server.base_url, secrets_, broker, client)
        s2 = other.new_session(human=ALICE, task_id="self")
        aid = pending(other, s2)["approval_id"]
        assert decide(other, aid, ALICE).json()["status"] == "approved"
        assert ask(other, s2, approval_id=aid).status_code == 201


def test_approver_must_hold_the_access_and_be_named(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    approval_id = pending(api, session)["approval_id"]
    r = decide(api, approval_id, CAROL)  # a maintainer without deploy
    assert r.status_code == 403 and r.json()["error"]["code"] == "approver-lacks-permission"
    r = decide(api, approval_id, DAVE)  # holds no maintainer role: the approval is not even visible
    assert r.status_code == 404 and r.json()["error"]["code"] == "approval-not-found"
    r = decide(api, approval_id, MALLORY)
    assert r.status_code == 404
    for caller in (api.as_admin(), api.as_orchestrator(), agent(session)):
        r = api.client.post(f"/v1/approvals/{approval_id}/approve", headers=caller)
        assert r.status_code == 403 and r.json()["error"]["code"] == "approver-must-be-human"
    assert api.client.get(f"/v1/approvals/{approval_id}", headers=api.as_human(BOB)).json()["status"] == "pending"


def test_two_distinct_approvals_are_needed_where_the_tier_says_so(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    rotate = {"resource": "jwt://payments-api", "access": "rotate", "parameters": {"key": "ledger-signing"}}
    body = pending(api, session, rotate)
    assert body["min_approvals"] == 2 and body["approvers"] == ["group:security", ERIN]
    aid = body["approval_id"]
    first = decide(api, aid, DAVE)
    assert first.status_code == 200 and first.json()["status"] == "pending"
    assert [v["approver"] for v in first.json()["approvals"]] == [DAVE]
    # One approval where two are required: not usable.
    r = ask(api, session, rotate, approval_id=aid)
    assert r.status_code == 409 and r.json()["error"]["code"] == "approval-pending"
    # The same person twice is still one.
    again = decide(api, aid, DAVE)
    assert again.status_code == 409 and again.json()["error"]["code"] == "already-decided"
    second = decide(api, aid, ERIN)
    assert second.status_code == 200 and second.json()["status"] == "approved"
    assert ask(api, session, rotate, approval_id=aid).status_code == 201


def test_another_sessions_approval_cannot_be_used_or_read(humans_api: Api) -> None:
    api = humans_api
    mine, theirs = api.new_session(task_id="mine"), api.new_session(human=MALLORY, task_id="theirs")
    aid = pending(api, mine)["approval_id"]
    assert decide(api, aid, BOB).status_code == 200
    # Mallory's agent presents alice's approval for the identical request: not found, nothing minted.
    r = ask(api, theirs, approval_id=aid)
    assert r.status_code == 404 and r.json()["error"]["code"] == "approval-not-found"
    assert api.client.get(f"/v1/approvals/{aid}", headers=agent(theirs)).status_code == 404
    assert api.client.get(f"/v1/approvals/{aid}", headers=api.as_human(MALLORY)).status_code == 404
    assert api.client.get("/v1/approvals", headers=agent(theirs)).json() == []
    # Still good for its own session.
    assert ask(api, mine, approval_id=aid).status_code == 201


def test_escalation_waits_for_approval_too(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    first = pending(api, session)
    assert decide(api, first["approval_id"], BOB).status_code == 200
    assert ask(api, session, approval_id=first["approval_id"]).status_code == 201
    # A second deploy is an escalation and a new request: a new approval.
    second = pending(api, session, {**DEPLOY, "parameters": {"env": "prod", "version": "1.4.3"}})
    assert second["approval_id"] != first["approval_id"]


def _listening(server: LiveServer) -> bool:
    return server.app.state.approval_signals.waiting() > 0  # type: ignore[no-any-return]


def _poll_in_thread(client: httpx.Client, aid: str, headers: dict[str, str],
                    wait: int) -> tuple[threading.Thread, dict[str, Any]]:
    answer: dict[str, Any] = {}

    def run() -> None:
        answer["r"] = client.get(f"/v1/approvals/{aid}", params={"wait": wait}, headers=headers)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, answer


def test_long_poll_is_woken_by_the_decision(database_url: str, tmp_path: Path) -> None:
    # The database re-check is set far beyond the wait: only the in-process signal can answer in time.
    broker, secrets_ = open_broker(tmp_path, database_url, approval_poll_recheck_seconds=600)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=90) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session()
        aid = pending(api, session)["approval_id"]
        quick = client.get(f"/v1/approvals/{aid}", params={"wait": 1}, headers=agent(session))
        assert quick.status_code == 200 and quick.json()["status"] == "pending"
        too_long = client.get(f"/v1/approvals/{aid}", params={"wait": 301}, headers=agent(session))
        assert too_long.status_code == 422
        thread, answer = _poll_in_thread(client, aid, agent(session), 60)
        deadline = time.monotonic() + 20
        while not _listening(server) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _listening(server)
        assert decide(api, aid, BOB).status_code == 200
        thread.join(90)
        assert answer["r"].status_code == 200 and answer["r"].json()["status"] == "approved"
        assert not _listening(server)


def test_long_poll_sees_a_decision_made_on_another_replica(database_url: str, tmp_path: Path) -> None:
    broker, secrets_ = open_broker(tmp_path, database_url, approval_poll_recheck_seconds=0.2)
    from broker.runtime import Broker

    other = Broker.build(broker.settings)
    with LiveServer(broker) as a, LiveServer(other) as b, httpx.Client(base_url=a.base_url, timeout=90) as ca, \
            httpx.Client(base_url=b.base_url, timeout=90) as cb:
        api_a, api_b = Api(a.base_url, secrets_, broker, ca), Api(b.base_url, secrets_, other, cb)
        session = api_a.new_session()
        aid = pending(api_a, session)["approval_id"]
        thread, answer = _poll_in_thread(ca, aid, agent(session), 60)
        deadline = time.monotonic() + 20
        while not _listening(a) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert decide(api_b, aid, BOB).status_code == 200
        thread.join(90)
        assert answer["r"].json()["status"] == "approved"


def test_one_approval_racing_twice_mints_once(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    aid = pending(api, session)["approval_id"]
    assert decide(api, aid, BOB).status_code == 200
    barrier = threading.Barrier(4)
    statuses: list[int] = []

    def race() -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            barrier.wait()
            r = client.post("/v1/capabilities", headers=agent(session),
                            json={"purpose": "test", **DEPLOY, "approval_id": aid})
            statuses.append(r.status_code)

    threads = [threading.Thread(target=race) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(statuses) == [201, 409, 409, 409]
    with Session(api.broker.engine) as db:
        assert len(db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all()) == 1
