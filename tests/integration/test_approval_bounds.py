"""Approval bounds, on SQLite and PostgreSQL: every path that stores agent text for people goes
through the same limits (16 KiB / depth 8 of parameters, text lengths), and pending approvals
count against a per-session and a per-approver budget (429 approval-budget-exceeded). A refusal
stores nothing: no approval, no notification. The tool-call gate answers such a refusal as a
deny (its hooks let a call through on an error status), audited with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from broker.approvals import service as approvals
from broker.approvals.binding import Binding
from broker.approvals.limits import ApprovalTooLarge
from broker.db import transaction, utcnow
from broker.models import Approval, OutboxMessage, SessionRow
from broker.policy import load_policy_text
from tests.support.approvals import APPROVALS_POLICY
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker

GATE = """\
groups:
  maintainers:
    grants: [{resource: "tool://**", access: [merge_deploy]}]
tools:
  default: allow
  rules:
    - {name: deploys, tool: "(?s).*deploy.*", tier: merge_deploy}
"""
PER_SESSION, PER_APPROVER = 3, 5
POLICY = APPROVALS_POLICY.replace(
    "max_active_per_session: 30}",
    f"max_active_per_session: 30, max_pending_approvals_per_session: {PER_SESSION}, "
    f"max_pending_approvals_per_approver: {PER_APPROVER}}}") + GATE
assert f"max_pending_approvals_per_session: {PER_SESSION}" in POLICY


@pytest.fixture
def bounded(database_url: str, tmp_path: Path) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, POLICY, approval_webhook_urls="http://127.0.0.1:9/hook",
                          approval_webhook_secret="s3cret")
    with LiveServer(broker, outbox=False) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": "x"}
    for _ in range(depth - 1):
        value = {"d": value}
    return value


# tool_input values whose approval would store more than the bounds allow. The approval's
# parameters are {"tool_name", "tool_input"}: one level more than tool_input itself.
OVER_BOUNDS = {
    "too-deep": _nested(8),                                   # 9 levels once wrapped
    "much-too-deep": _nested(30),
    "over-16-kib": {f"k{i}": "x" * 4000 for i in range(5)},   # 20 KB, each string within bounds
    "string-too-long": {"command": "deploy " + "y" * 5000},
    "array-too-long": {"args": ["a"] * 300},
    "too-many-keys": {f"k{i}": i for i in range(200)},
    "integer-out-of-range": {"n": 2**60},
    "hidden-bulk": {"command": "deploy" + "\u200b" * 4000, "more": "\u202e" * 4000, "x": "\ufeff" * 4000,
                    "y": "\u2066" * 4000, "z": "\u200d" * 4000},
}
WITHIN_BOUNDS = {"command": "deploy prod", "nested": _nested(6), "blob": "x" * 4000}


def _hook(api: Api, session: dict[str, Any], tool_input: dict[str, Any], tool: str = "deploy") -> httpx.Response:
    return api.client.post("/v1/hooks/pre-tool-use", json={"hook_event_name": "PreToolUse", "tool_name": tool,
                                                           "tool_input": tool_input},
                           headers={"Authorization": f"Bearer {session['session_token']}"})


def _stored(api: Api) -> tuple[list[Approval], int]:
    with transaction(api.broker.engine) as db:
        return list(db.exec(select(Approval)).all()), len(db.exec(select(OutboxMessage)).all())


def _audit(api: Api, session: dict[str, Any]) -> list[dict[str, Any]]:
    r = api.client.get("/v1/audit", params={"session_id": session["session_id"], "limit": 1000},
                       headers=api.as_admin())
    return r.json()["records"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", sorted(OVER_BOUNDS))
def test_gate_approvals_over_the_bounds_are_refused_and_nothing_is_stored(bounded: Api, case: str) -> None:
    api = bounded
    session = api.new_session()
    r = _hook(api, session, OVER_BOUNDS[case])
    assert r.status_code == 200, r.text
    out = r.json()["hookSpecificOutput"]
    assert out["permissionDecision"] == "deny" and "approval-too-large" in out["permissionDecisionReason"]
    assert _stored(api) == ([], 0)
    record = [rec for rec in _audit(api, session) if rec["type"].startswith("tool.")][-1]
    assert record["type"] == "tool.denied" and record["policy_decision"]["reason"] == "approval-too-large"
    assert record["jit_grant"] is None and "tool_input_sha256" in record["request"]["parameters"]


def test_gate_approvals_within_the_bounds_are_opened(bounded: Api) -> None:
    api = bounded
    session = api.new_session()
    r = _hook(api, session, WITHIN_BOUNDS)
    assert r.json()["hookSpecificOutput"]["permissionDecision"] == "ask", r.text
    stored, messages = _stored(api)
    assert len(stored) == 1 and messages == 1
    assert stored[0].parameters == {"tool_name": "deploy", "tool_input": WITHIN_BOUNDS}


DIRECT = {"too-deep": _nested(9), "over-16-kib": OVER_BOUNDS["over-16-kib"],
          "integer-out-of-range": OVER_BOUNDS["integer-out-of-range"]}


@pytest.mark.parametrize("case", sorted(DIRECT))
def test_the_one_place_every_approval_is_created_refuses_the_same(bounded: Api, case: str) -> None:
    # Whatever path calls it (a future one included): open_request checks before adding anything.
    api = bounded
    session = api.new_session()
    now = utcnow()
    binding = Binding(session["session_id"], "jwt://payments-api", "deploy", 300, "deploy-cli",
                                DIRECT[case])
    with pytest.raises(ApprovalTooLarge) as refused, transaction(api.broker.engine) as db:
        row = db.get(SessionRow, session["session_id"])
        assert row is not None
        approvals.open_request(db, api.broker, row, binding, tier="merge_deploy", reason="approval-required",
                               approvers=["group:maintainers"], granted_ttl=300, purpose="p", now=now)
    assert refused.value.code == "approval-too-large" and refused.value.status == 422
    assert refused.value.details["bound"] == case.replace("over-16-kib", "json-too-large").replace(
        "too-deep", "json-too-deep").replace("integer-out-of-range", "json-number-out-of-range")
    with pytest.raises(ApprovalTooLarge), transaction(api.broker.engine) as db:
        row = db.get(SessionRow, session["session_id"])
        assert row is not None
        approvals.open_request(db, api.broker, row, Binding(session["session_id"], "jwt://payments-api",
                                                                      "deploy", 300, "t" * 300, None),
                               tier="merge_deploy", reason="approval-required", approvers=["group:maintainers"],
                               granted_ttl=300, purpose="p", now=now)
    assert _stored(api) == ([], 0)


def _deploy(api: Api, session: dict[str, Any], n: int) -> httpx.Response:
    return api.request(session, {"resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 300,
                                 "tool": "deploy-cli", "parameters": {"version": f"1.0.{n}"}})


def test_the_session_budget_refuses_the_next_pending_approval_until_one_is_decided(bounded: Api) -> None:
    api = bounded
    session = api.new_session()
    opened = [_deploy(api, session, n) for n in range(PER_SESSION)]
    assert [r.status_code for r in opened] == [202] * PER_SESSION
    over = _deploy(api, session, 99)
    assert over.status_code == 429, over.text
    err = over.json()["error"]
    assert err["code"] == "approval-budget-exceeded" and err["scope"] == "session" and err["limit"] == PER_SESSION
    assert (len(_stored(api)[0]), _stored(api)[1]) == (PER_SESSION, PER_SESSION)
    # Asking again for one already pending is no new approval: still 202, same id.
    again = _deploy(api, session, 0)
    assert again.status_code == 202 and again.json()["approval_id"] == opened[0].json()["approval_id"]
    # The gate is held to the same budget, answered as a deny.
    gate = _hook(api, session, {"command": "deploy prod"})
    out = gate.json()["hookSpecificOutput"]
    assert out["permissionDecision"] == "deny" and "approval-budget-exceeded" in out["permissionDecisionReason"]
    assert len(_stored(api)[0]) == PER_SESSION
    # A decision frees the budget.
    denied = api.client.post(f"/v1/approvals/{opened[1].json()['approval_id']}/deny",
                             headers=api.as_human("bob@example.com"), json={"reason": "one at a time"})
    assert denied.status_code == 200
    assert _deploy(api, session, 99).status_code == 202
    assert _deploy(api, session, 100).status_code == 429


def test_the_approver_budget_counts_across_sessions(bounded: Api) -> None:
    api = bounded
    sessions = [api.new_session(task_id=f"t{i}") for i in range(3)]
    # 3 + 2 = PER_APPROVER pending approvals name group:maintainers.
    first = [_deploy(api, sessions[0], n) for n in range(3)] + [_deploy(api, sessions[1], n) for n in range(2)]
    assert [r.status_code for r in first] == [202] * PER_APPROVER
    over = _deploy(api, sessions[2], 0)
    assert over.status_code == 429, over.text
    err = over.json()["error"]
    assert err["code"] == "approval-budget-exceeded" and err["scope"] == "approver"
    assert err["approvers"] == ["group:maintainers"] and err["limit"] == PER_APPROVER
    stored, messages = _stored(api)
    assert len(stored) == PER_APPROVER and messages == PER_APPROVER
    assert not any(a.session_id == sessions[2]["session_id"] for a in stored)
    # Approving one frees a place (an approved approval no longer waits on anyone).
    approved = api.client.post(f"/v1/approvals/{first[0].json()['approval_id']}/approve",
                               headers=api.as_human("bob@example.com"))
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    assert _deploy(api, sessions[2], 0).status_code == 202
    assert _deploy(api, sessions[2], 1).status_code == 429
    # An approval whose session ended, or that expired, does not count either.
    ended = api.client.post(f"/v1/sessions/{sessions[1]['session_id']}/end", headers=api.as_orchestrator())
    assert ended.status_code == 200, ended.text
    assert _deploy(api, sessions[2], 1).status_code == 202
    with transaction(api.broker.engine) as db:
        row = db.get(Approval, first[1].json()["approval_id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(seconds=1)
        db.add(row)
    assert _deploy(api, sessions[2], 2).status_code == 202  # pending now: s0 one, s2 three
    assert _deploy(api, sessions[0], 9).status_code == 202  # the fifth
    refused = _deploy(api, sessions[0], 10)
    assert refused.status_code == 429 and refused.json()["error"]["scope"] == "approver"


def test_the_budget_keys_default_when_the_policy_is_silent() -> None:
    compiled = load_policy_text(APPROVALS_POLICY.replace(
        "budgets: {max_issued_per_session: 50, max_active_per_session: 30}\n", ""))
    assert (compiled.max_pending_approvals_per_session, compiled.max_pending_approvals_per_approver) == (10, 50)


def test_concurrent_sessions_cannot_overshoot_the_approver_budget(bounded: Api) -> None:
    # One place left; six sessions ask at once, each on its own connection: exactly one gets it.
    from concurrent.futures import ThreadPoolExecutor

    api = bounded
    filler = [api.new_session(task_id=f"f{i}") for i in range(2)]
    assert [_deploy(api, filler[i // 2], i).status_code for i in range(PER_APPROVER - 1)] == [202] * (PER_APPROVER - 1)
    racers = [api.new_session(task_id=f"r{i}") for i in range(6)]

    def ask(session: dict[str, Any]) -> int:
        with httpx.Client(base_url=api.base_url, timeout=60) as client:
            return client.post("/v1/capabilities", headers={"Authorization": f"Bearer {session['session_token']}"},
                               json={"resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 300,
                                     "purpose": "race", "parameters": {"n": 1}}).status_code

    with ThreadPoolExecutor(len(racers)) as pool:
        statuses = sorted(pool.map(ask, racers))
    assert statuses == [202] + [429] * (len(racers) - 1)
    assert len(_stored(api)[0]) == PER_APPROVER
