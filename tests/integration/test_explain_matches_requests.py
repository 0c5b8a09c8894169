"""`policy explain` tells the story a real request meets: on random asks against one session (a
grant that stands in for approvals and then runs out, escalation after a merge_deploy capability,
approval tiers, a four-eyes tier, a denied tier, unknown resources and accesses, ttl past the
tier's cap), explain's verdict for the session equals the outcome of the same request made right
after it, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from typing import Any

from tests.support.brokers import Api

ALICE, BOB = "alice@example.com", "bob@example.com"
RESOURCES = ["jwt://payments-api", "jwt://payments-api", "jwt://payments-api", "jwt://ledger-api"]
ACCESSES = ["read", "write", "deploy", "deploy", "rotate", "drop", "no-such-access"]
TTLS = [None, 60, 86_400]
# The HTTP answer each verdict means for a request (a deny's status depends on its reason).
STATUS = {"allow": 201, "approval_required": 202}
DENY_STATUS = {"budget-exceeded": 429}


def explain(api: Api, session: dict[str, Any], ask: dict[str, Any]) -> dict[str, Any]:
    r = api.client.post("/v1/policy/explain", headers=api.as_human(ALICE),
                        json={"session_id": session["session_id"], **ask})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_explain_equals_the_real_outcome_on_random_asks(humans_api: Api) -> None:
    api = humans_api
    rng = random.Random(20261207)  # fixed: a failure names its ask and can be replayed
    session = api.new_session(scope=[{"resource": "jwt://payments-api",
                                      "access": ["read", "write", "deploy", "rotate", "drop"]}])
    granted = api.client.post("/v1/grants", headers=api.as_human(BOB), json={
        "session_id": session["session_id"], "resource": "jwt://payments-api", "access": "deploy",
        "ttl_seconds": 600, "uses": 2})
    assert granted.status_code == 201, granted.text
    grant_id = granted.json()["grant_id"]

    seen: set[str] = set()
    for i in range(30):
        ask: dict[str, Any] = {"resource": rng.choice(RESOURCES), "access": rng.choice(ACCESSES)}
        ttl = rng.choice(TTLS)
        if ttl is not None:
            ask["ttl_seconds"] = ttl
        told = explain(api, session, ask)
        verdict = told["decision"]["result"]
        seen.add(verdict if verdict != "deny" else f"deny:{told['decision']['reason']}")
        real = api.request(session, ask)
        want = STATUS.get(verdict) or DENY_STATUS.get(told["decision"]["reason"], 403)
        assert real.status_code == want, (i, ask, told["decision"]["reason"], told.get("grant"), real.text)
        if verdict == "deny":
            assert real.json()["error"]["code"] == told["decision"]["reason"], (i, ask, real.text)
        if told.get("grant") is not None:
            # The grant explain named is the one the request used.
            assert told["grant"]["grant_id"] == grant_id and real.status_code == 201
            minted = api.client.get("/v1/audit", params={"session_id": session["session_id"], "newest": "true",
                                                         "limit": 1, "type": "capability.minted"},
                                    headers=api.as_admin()).json()["records"]
            assert minted[-1]["policy_decision"]["grant"]["grant_id"] == grant_id

    # The walk met every kind of story, the grant included, or it proved less than it says.
    assert {"allow", "approval_required"} <= seen and any(s.startswith("deny:") for s in seen), seen
    used = api.client.get("/v1/audit", params={"session_id": session["session_id"], "type": "capability.minted"},
                          headers=api.as_admin()).json()["records"]
    assert any((r["policy_decision"].get("grant") or {}).get("grant_id") == grant_id for r in used), seen


def test_explain_names_the_grant_that_stands_in_and_then_the_approval_once_it_is_used_up(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session()
    deploy = {"resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 300}
    assert explain(api, session, deploy)["decision"]["result"] == "approval_required"  # no grant yet
    g = api.client.post("/v1/grants", headers=api.as_human(BOB), json={
        "session_id": session["session_id"], "resource": "jwt://payments-api", "access": "deploy",
        "ttl_seconds": 120, "uses": 1}).json()
    told = explain(api, session, deploy)
    assert told["decision"]["result"] == "allow" and told["grant"]["grant_id"] == g["grant_id"]
    assert told["grant"]["granted_by"] == BOB and told["grant"]["uses_left"] == 1
    assert told["decision"]["ttl_seconds"] <= 120  # nothing minted under a grant outlives it
    again = explain(api, session, deploy)
    assert again["grant"]["uses_left"] == 1, "explain looks at a grant, never uses it"
    assert api.request(session, deploy).status_code == 201
    after = explain(api, session, deploy)
    assert after["decision"]["result"] == "approval_required" and after["grant"] is None
