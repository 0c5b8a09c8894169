"""The spine over real HTTP, on SQLite and PostgreSQL: sessions, native capabilities,
introspection, revocation, denials, approvals pending, budgets, expiry and the audit."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import jwt
import pytest
from sqlmodel import Session, select

from broker.lifecycle.sweeper import sweep_once
from broker.models import AuditRecord, Lease, SessionRow
from tests.support.brokers import Api


def _verify_with_jwks(api: Api, token: str, audience: str) -> dict:
    jwks = api.client.get("/.well-known/jwks.json").json()
    header = jwt.get_unverified_header(token)
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == header["kid"])
    return jwt.decode(token, key.key, algorithms=["EdDSA"], audience=audience, issuer=api.broker.settings.issuer,
                      options={"require": ["iss", "aud", "exp", "iat", "jti", "sub"]})


def _audit_types(api: Api, session_id: str) -> list[str]:
    r = api.client.get("/v1/audit", params={"session_id": session_id, "limit": 1000}, headers=api.as_admin())
    assert r.status_code == 200
    return [rec["type"] for rec in r.json()["records"]]


def test_session_token_is_bound_to_broker_session_and_deadline(api: Api) -> None:
    session = api.new_session(ttl=600)
    token = session["session_token"]
    jwks = api.client.get("/.well-known/jwks.json").json()
    key = jwt.PyJWK(jwks["keys"][0])
    claims = jwt.decode(token, key.key, algorithms=["EdDSA"], audience="jit-broker", issuer=api.broker.settings.issuer)
    assert claims["sid"] == session["session_id"]
    assert claims["sub"] == "claude-code"
    assert claims["token_use"] == "session"
    expires = datetime.fromisoformat(session["expires_at"].replace("Z", "+00:00"))
    assert claims["exp"] <= expires.timestamp()
    assert claims["exp"] - claims["iat"] == 600


def test_native_capability_flow(api: Api) -> None:
    session = api.new_session()
    r = api.request(session, {"resource": "jwt://payments-api", "access": "read", "ttl_seconds": 300, "tool": "curl"})
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    cap = r.json()
    assert (cap["status"], cap["tier"], cap["provider"]) == ("active", "read", "native")
    credential = cap["credential"]
    assert credential["type"] == "jwt" and credential["token_type"] == "Bearer" and credential["audience"] == "payments-api"

    claims = _verify_with_jwks(api, credential["token"], "payments-api")
    assert claims["sub"] == "alice@example.com"
    assert claims["act"] == {"sub": "claude-code"}
    assert claims["sid"] == session["session_id"]
    assert claims["jti"] == cap["capability_id"]
    assert claims["scope"] == "ledger:read"
    assert claims["exp"] - claims["iat"] == 300

    assert api.client.post("/v1/introspect", data={"token": credential["token"]}).json()["active"] is True

    agent = {"Authorization": f"Bearer {session['session_token']}"}
    shown = api.client.get(f"/v1/capabilities/{cap['capability_id']}", headers=agent).json()
    assert shown["status"] == "active" and "credential" not in shown  # shown once, at mint
    assert shown["credential_fingerprint"].startswith("sha256:")

    revoked = api.client.delete(f"/v1/capabilities/{cap['capability_id']}", headers=agent)
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    # The receipt: introspection says inactive, but an offline verifier accepts the JWT until exp.
    receipt = revoked.json()["receipt"]
    assert receipt["outcome"] == "expires_naturally" and receipt["revoked_at"] is None
    assert receipt["expires_at"] == datetime.fromtimestamp(claims["exp"], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "introspection answers active=false" in receipt["detail"]
    assert api.client.post("/v1/introspect", data={"token": credential["token"]}).json() == {"active": False}
    assert _verify_with_jwks(api, credential["token"], "payments-api")["jti"] == cap["capability_id"]  # still verifies
    # Revoking twice is harmless and changes nothing; the receipt says it had ended.
    again = api.client.delete(f"/v1/capabilities/{cap['capability_id']}", headers=agent).json()
    assert again["status"] == "revoked" and again["receipt"]["outcome"] == "already_ended"
    assert again["receipt"]["ended_at"] == again["ended_at"] and again["receipt"]["expires_at"] is None

    types = _audit_types(api, session["session_id"])
    assert types == ["session.created", "capability.minted", "capability.revoked"]
    records = api.client.get("/v1/audit", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    assert records["records"][-1]["detail"]["receipt"] == receipt  # the audit holds the same receipt
    assert api.client.get("/v1/audit/verify", headers=api.as_admin()).json()["ok"] is True


def test_denial_names_layer_rule_and_policy_version(api: Api) -> None:
    session = api.new_session(scope=[{"resource": "jwt://payments-api", "access": ["read"]}])
    r = api.request(session, {"resource": "jwt://payments-api", "access": "write"})
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["code"] == "outside-task-scope"
    assert error["decision"]["matched_rule"] == "session.scope"
    assert error["decision"]["policy_version"] == api.broker.policies.current.version
    layers = {layer["layer"]: layer["verdict"] for layer in error["decision"]["layers"]}
    assert layers["human"] == "allow" and layers["task_scope"] == "deny"

    records = api.client.get("/v1/audit", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    denied = [rec for rec in records["records"] if rec["type"] == "capability.denied"]
    assert len(denied) == 1
    assert denied[0]["policy_decision"]["reason"] == "outside-task-scope"
    assert denied[0]["human_principal"] == "alice@example.com"
    assert denied[0]["agent"] == {"id": "claude-code", "session_id": session["session_id"], "task_id": "task-1"}


def test_tier_controls(api: Api) -> None:
    session = api.new_session()
    capped = api.request(session, {"resource": "jwt://payments-api", "access": "drop"})
    assert capped.status_code == 403 and capped.json()["error"]["code"] == "agent-ceiling"
    ops = api.new_session(agent="ops-bot")
    drop = api.request(ops, {"resource": "jwt://payments-api", "access": "drop"})
    assert drop.status_code == 403 and drop.json()["error"]["code"] == "tier-denied"
    assert drop.json()["error"]["decision"]["matched_rule"] == "tiers.destructive"

    deploy = api.request(session, {"resource": "jwt://payments-api", "access": "deploy", "parameters": {"env": "prod"}})
    assert deploy.status_code == 202, deploy.text
    body = deploy.json()
    assert body["status"] == "pending_approval" and body["approval_id"].startswith("apr_")
    assert body["approvers"] == ["group:maintainers"]
    # Pending is not granted: nothing live was created.
    with Session(api.broker.engine) as db:
        assert db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all() == []


def test_unknown_resource_and_human_without_permission(api: Api) -> None:
    session = api.new_session()
    r = api.request(session, {"resource": "jwt://unknown-api", "access": "read"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "unknown-resource"
    bob = api.new_session(human="bob@example.com")
    r = api.request(bob, {"resource": "jwt://payments-api", "access": "read"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "human-lacks-permission"


def test_budget_is_enforced_with_429(api: Api) -> None:
    session = api.new_session()
    for _ in range(30):  # max_active_per_session: 30
        assert api.request(session, {"resource": "jwt://svc/a", "access": "read", "ttl_seconds": 60}).status_code == 201
    r = api.request(session, {"resource": "jwt://svc/a", "access": "read"})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "budget-exceeded"
    assert r.json()["error"]["decision"]["matched_rule"] == "budgets.max_active_per_session"


def test_ttl_is_clamped_to_tier_and_session(api: Api) -> None:
    session = api.new_session(ttl=120)
    r = api.request(session, {"resource": "jwt://payments-api", "access": "write", "ttl_seconds": 3600})
    assert r.status_code == 201
    claims = _verify_with_jwks(api, r.json()["credential"]["token"], "payments-api")
    assert claims["exp"] - claims["iat"] <= 120  # session remaining beats tier (30 m) and request (1 h)


def test_session_end_revokes_everything_and_refuses_more(api: Api) -> None:
    session = api.new_session()
    tokens = [api.request(session, {"resource": "jwt://svc/x", "access": "read"}).json()["credential"]["token"]
              for _ in range(3)]
    r = api.client.post(f"/v1/sessions/{session['session_id']}/end", json={"reason": "completed"},
                        headers=api.as_orchestrator())
    body = r.json()
    receipts = body.pop("receipts")
    assert r.status_code == 200 and body == {"session_id": session["session_id"], "status": "ended",
                                             "revoked": 3, "revoke_pending": 0}
    assert len(receipts) == 3 and {rc["outcome"] for rc in receipts} == {"expires_naturally"}
    assert {rc["status"] for rc in receipts} == {"revoked"} and all(rc["expires_at"] for rc in receipts)
    for token in tokens:
        assert api.client.post("/v1/introspect", data={"token": token}).json() == {"active": False}
    after = api.request(session, {"resource": "jwt://svc/x", "access": "read"})
    assert after.status_code == 403 and after.json()["error"]["code"] == "session-ended"
    # Idempotent: a second end changes nothing and writes no second session.ended.
    again = api.client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_orchestrator())
    assert again.status_code == 200 and again.json()["revoked"] == 0 and again.json()["receipts"] == []
    assert _audit_types(api, session["session_id"]).count("session.ended") == 1
    shown = api.client.get(f"/v1/sessions/{session['session_id']}", headers=api.as_orchestrator()).json()
    assert shown["status"] == "ended" and shown["capabilities"] == [] and shown["end_reason"] == "completed"


def test_expiry_sweeper_expires_leases_and_introspection_follows(api: Api) -> None:
    session = api.new_session()
    cap = api.request(session, {"resource": "jwt://svc/x", "access": "read", "ttl_seconds": 1}).json()
    keep = api.request(session, {"resource": "jwt://svc/y", "access": "read", "ttl_seconds": 600}).json()
    time.sleep(1.2)
    summary = sweep_once(api.broker)
    assert summary.revoked == [cap["capability_id"]]
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    assert api.client.get(f"/v1/capabilities/{cap['capability_id']}", headers=agent).json()["status"] == "expired"
    assert api.client.get(f"/v1/capabilities/{keep['capability_id']}", headers=agent).json()["status"] == "active"
    assert api.client.post("/v1/introspect", data={"token": cap["credential"]["token"]}).json() == {"active": False}
    assert "capability.expired" in _audit_types(api, session["session_id"])


def test_session_deadline_ends_the_session(api: Api) -> None:
    session = api.new_session(ttl=60)
    api.request(session, {"resource": "jwt://svc/x", "access": "read"})
    with Session(api.broker.engine) as db:  # move the deadline into the past
        row = db.get(SessionRow, session["session_id"])
        row.expires_at = datetime.now(UTC)
        db.add(row)
        db.commit()
    sweep_once(api.broker)
    shown = api.client.get(f"/v1/sessions/{session['session_id']}", headers=api.as_orchestrator()).json()
    assert shown["status"] == "ended" and shown["end_reason"] == "deadline" and shown["capabilities"] == []


def test_listing_is_scoped_to_the_caller(api: Api) -> None:
    mine, other = api.new_session(), api.new_session(task_id="task-2")
    cap = api.request(other, {"resource": "jwt://svc/x", "access": "read"}).json()
    api.request(mine, {"resource": "jwt://svc/x", "access": "read"})
    agent = {"Authorization": f"Bearer {mine['session_token']}"}
    listed = api.client.get("/v1/capabilities", headers=agent).json()
    assert {c["session_id"] for c in listed} == {mine["session_id"]}
    # Another session's capability looks absent, not forbidden: ids are no oracle.
    r = api.client.get(f"/v1/capabilities/{cap['capability_id']}", headers=agent)
    assert r.status_code == 404 and r.json()["error"]["code"] == "capability-not-found"
    r = api.client.get("/v1/capabilities", params={"session_id": other["session_id"]}, headers=agent)
    assert r.status_code == 403
    active = api.client.get("/v1/capabilities", params={"status": "active"}, headers=api.as_admin()).json()
    assert len(active) == 2


def test_no_secret_reaches_the_audit_or_the_lease_table(api: Api) -> None:
    session = api.new_session()
    cap = api.request(session, {"resource": "jwt://payments-api", "access": "read"}).json()
    token = cap["credential"]["token"]
    with Session(api.broker.engine) as db:
        records = " ".join(r.record for r in db.exec(select(AuditRecord)).all())
        lease = db.get(Lease, cap["capability_id"])
    assert token not in records and token.split(".")[2] not in records
    assert lease.fingerprint in records  # the fingerprint is what the audit shows
    assert token not in json.dumps(lease.model_dump(), default=str)
    assert session["session_token"] not in records


def test_operations_endpoints(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz").json()
    assert ready["ready"] is True and ready["checks"]["providers"]["native"]["ok"] is True
    assert ready["checks"]["policy"]["version"] == api.broker.policies.current.version
    session = api.new_session()
    api.request(session, {"resource": "jwt://svc/x", "access": "read"})
    metrics = api.client.get("/metrics").text
    assert 'broker_leases{provider="native",status="active"} 1.0' in metrics
    assert 'broker_decisions_total{reason="allowed",result="allow",tier="read"}' in metrics
    assert 'broker_mint_seconds_count{provider="native"}' in metrics


@pytest.mark.parametrize("as_json", [False, True])
def test_introspection_accepts_form_and_json(api: Api, as_json: bool) -> None:
    session = api.new_session()
    token = api.request(session, {"resource": "jwt://svc/x", "access": "read"}).json()["credential"]["token"]
    r = (api.client.post("/v1/introspect", json={"token": token}) if as_json
         else api.client.post("/v1/introspect", data={"token": token}))
    body = r.json()
    assert body["active"] is True and body["aud"] == "svc/x" and body["sid"] == session["session_id"]
    # A session token is not a capability: introspection says inactive.
    assert api.client.post("/v1/introspect", data={"token": session["session_token"]}).json() == {"active": False}


def test_policy_explain_shows_every_layer_for_live_and_hypothetical_sessions(api: Api) -> None:
    session = api.new_session(scope=[{"resource": "jwt://payments-api", "access": ["read"]}])
    live = api.client.post("/v1/policy/explain", headers=api.as_admin(), json={
        "session_id": session["session_id"], "resource": "jwt://payments-api", "access": "write"}).json()
    decision = live["decision"]
    assert (decision["result"], decision["reason"], decision["matched_rule"]) == ("deny", "outside-task-scope", "session.scope")
    verdicts = {layer["layer"]: layer["verdict"] for layer in decision["layers"]}
    assert verdicts == {"session": "allow", "resource": "allow", "human": "allow", "human_live": "skipped", "task_scope": "deny",
                        "agent": "allow", "tier": "allow", "budget": "allow", "escalation": "allow", "time": "allow"}
    assert live["shadow"] is None
    hypothetical = api.client.post("/v1/policy/explain", headers=api.as_admin(), json={
        "human": "alice@example.com", "agent": "claude-code", "resource": "jwt://payments-api", "access": "deploy",
        "scope": [{"resource": "jwt://payments-api", "access": ["*"]}]}).json()["decision"]
    assert (hypothetical["result"], hypothetical["reason"]) == ("approval_required", "approval-required")
    assert hypothetical["approvers"] == ["group:maintainers"]
    # A dry run changes nothing: no lease, no audit record for it.
    assert api.client.get("/v1/capabilities", params={"session_id": session["session_id"]},
                          headers=api.as_admin()).json() == []
    assert _audit_types(api, session["session_id"]) == ["session.created"]
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    assert api.client.post("/v1/policy/explain", headers=agent, json={
        "session_id": session["session_id"], "resource": "jwt://payments-api", "access": "read"}).status_code == 403
