"""RFC 8693 token exchange at /v1/oauth/token over real HTTP, on SQLite and PostgreSQL: the
same decision, lease and audit as POST /v1/capabilities, answered in the RFC's words."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jwt
from sqlmodel import Session, select

from broker.models import AuditRecord, Lease
from tests.support.brokers import Api

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TYPE = "urn:ietf:params:oauth:token-type:access_token"


def _exchange(api: Api, session: dict[str, Any], **params: Any) -> httpx.Response:
    form = {"grant_type": GRANT, "subject_token": session["session_token"], "subject_token_type": JWT_TYPE, **params}
    return api.client.post("/v1/oauth/token", data={k: v for k, v in form.items() if v is not None})


def _details(**detail: Any) -> str:
    return json.dumps([{"type": "jit-broker-capability", **detail}])


def _verify(api: Api, token: str, audience: str) -> dict[str, Any]:
    jwks = api.client.get("/.well-known/jwks.json").json()
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    return jwt.decode(token, key.key, algorithms=["EdDSA"], audience=audience, issuer=api.broker.settings.issuer)


def test_resource_and_scope_exchange_mints_through_the_capability_path(api: Api) -> None:
    session = api.new_session()
    r = _exchange(api, session, resource="jwt://payments-api", scope="read", ttl_seconds="300", purpose="read ledger")
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["issued_token_type"] == ACCESS_TYPE and body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 300 and body["scope"] == "read"
    assert "broker_credential" not in body  # a native token is one bearer string
    [detail] = body["authorization_details"]
    assert detail["type"] == "jit-broker-capability"
    assert (detail["resource"], detail["access"], detail["tier"], detail["provider"]) == \
        ("jwt://payments-api", "read", "read", "native")
    claims = _verify(api, body["access_token"], "payments-api")
    assert claims["jti"] == detail["capability_id"] and claims["sid"] == session["session_id"]
    assert claims["sub"] == "alice@example.com" and claims["act"] == {"sub": "claude-code"}
    # The same lease the JSON API shows, and the same audit record it writes.
    cap = api.client.get(f"/v1/capabilities/{detail['capability_id']}", headers=api.as_admin()).json()
    assert cap["status"] == "active" and cap["session_id"] == session["session_id"]
    with Session(api.broker.engine) as db:
        lease = db.get(Lease, detail["capability_id"])
        assert lease is not None and lease.purpose == "read ledger" and lease.ttl_seconds == 300
        minted = db.exec(select(AuditRecord).where(AuditRecord.type == "capability.minted")).all()
        assert [m.session_id for m in minted] == [session["session_id"]]
    introspected = api.client.post("/v1/introspect", data={"token": body["access_token"]}).json()
    assert introspected["active"] is True and introspected["jti"] == detail["capability_id"]


def test_authorization_details_exchange_and_access_token_subject_type(api: Api) -> None:
    session = api.new_session()
    r = _exchange(api, session, subject_token_type=ACCESS_TYPE,
                  authorization_details=_details(resource="jwt://svc/orders", access="read", ttl_seconds=120,
                                                 purpose="orders"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0 < body["expires_in"] <= 120
    [detail] = body["authorization_details"]
    assert (detail["resource"], detail["access"], detail["ttl_seconds"], detail["purpose"]) == \
        ("jwt://svc/orders", "read", 120, "orders")
    assert _verify(api, body["access_token"], "svc/orders")["jti"] == detail["capability_id"]


def test_policy_refusals_are_oauth_errors_with_the_broker_reason(api: Api) -> None:
    session = api.new_session()
    denied = _exchange(api, session, resource="jwt://payments-api", scope="drop")
    assert denied.status_code == 403
    assert denied.headers["cache-control"] == "no-store"
    assert denied.json()["error"] == "access_denied" and denied.json()["code"] == "agent-ceiling"
    same = api.request(session, {"resource": "jwt://payments-api", "access": "drop"})
    assert same.status_code == 403 and same.json()["error"]["code"] == denied.json()["code"]
    unknown = _exchange(api, session, resource="jwt://nowhere", scope="read")
    assert unknown.status_code == 400
    assert (unknown.json()["error"], unknown.json()["code"]) == ("invalid_target", "unknown-resource")
    # The per-layer decision rides along, as on the JSON API.
    assert {layer["layer"]: layer["verdict"] for layer in unknown.json()["decision"]["layers"]}["resource"] == "deny"
    with Session(api.broker.engine) as db:
        assert db.exec(select(Lease)).all() == []
        assert len(db.exec(select(AuditRecord).where(AuditRecord.type == "capability.denied")).all()) == 3


def test_malformed_requests_get_the_rfc_error(api: Api) -> None:
    session = api.new_session()
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"grant_type": "client_credentials"}, "unsupported_grant_type", "unsupported-grant-type"),
        ({"subject_token": "not.a.token"}, "invalid_grant", "invalid-token"),
        ({"subject_token": api.secrets.orchestrator_key}, "invalid_grant", "invalid-token"),
        ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "invalid_request",
         "unsupported-subject-token-type"),
        ({"resource": None}, "invalid_target", "one-resource-per-exchange"),
        ({"resource": "not a uri"}, "invalid_target", "invalid-resource"),
        ({"scope": "read write"}, "invalid_scope", "invalid-access"),
        ({"scope": None}, "invalid_scope", "invalid-access"),
        ({"audience": "payments"}, "invalid_request", "unsupported-parameter"),
        ({"ttl_seconds": "0"}, "invalid_request", "invalid-ttl"),
        ({"resource": None, "scope": None, "authorization_details": "[{"}, "invalid_authorization_details",
         "invalid-authorization-details"),
        ({"resource": None, "scope": None, "authorization_details": json.dumps([{"type": "payment_initiation"}])},
         "invalid_authorization_details", "unknown-authorization-details-type"),
        ({"authorization_details": _details(resource="jwt://payments-api", access="read")}, "invalid_request",
         "ambiguous-request"),
    ]
    for overrides, error, code in cases:
        r = _exchange(api, session, **{"resource": "jwt://payments-api", "scope": "read", **overrides})
        assert r.status_code == 400, (overrides, r.text)
        assert (r.json()["error"], r.json()["code"]) == (error, code), overrides
        assert r.json()["error_description"]
    two = api.client.post("/v1/oauth/token", content=(
        f"grant_type={GRANT}&subject_token={session['session_token']}&subject_token_type={JWT_TYPE}"
        "&resource=jwt%3A%2F%2Fpayments-api&resource=jwt%3A%2F%2Fsvc%2Fa&scope=read"),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert two.status_code == 400 and two.json()["error"] == "invalid_target"
    as_json = api.client.post("/v1/oauth/token", json={"grant_type": GRANT})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    with Session(api.broker.engine) as db:
        assert db.exec(select(Lease)).all() == []


def test_ended_session_token_is_an_invalid_grant(api: Api) -> None:
    session = api.new_session()
    ended = api.client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_orchestrator())
    assert ended.status_code == 200
    r = _exchange(api, session, resource="jwt://payments-api", scope="read")
    # RFC 6749 section 5.2 / RFC 8693: a subject token whose session is over is an invalid grant.
    assert r.status_code == 400, r.text
    assert (r.json()["error"], r.json()["code"]) == ("invalid_grant", "session-ended")
    with Session(api.broker.engine) as db:
        assert db.exec(select(Lease)).all() == []


def test_pending_approval_is_authorization_pending_then_redeemed(humans_api: Api) -> None:
    api = humans_api
    session = api.new_session(scope=[{"resource": "jwt://payments-api", "access": ["*"]}])
    pending = _exchange(api, session, resource="jwt://payments-api", scope="deploy", ttl_seconds="300")
    assert pending.status_code == 400, pending.text
    body = pending.json()
    assert (body["error"], body["code"]) == ("authorization_pending", "approval-required")
    assert body["approval_id"].startswith("apr_") and body["request_hash"]
    approved = api.client.post(f"/v1/approvals/{body['approval_id']}/approve", headers=api.as_human("bob@example.com"))
    assert approved.status_code == 200, approved.text
    r = _exchange(api, session, resource="jwt://payments-api", scope="deploy", ttl_seconds="300",
                  approval_id=body["approval_id"])
    assert r.status_code == 200, r.text
    assert r.json()["authorization_details"][0]["tier"] == "merge_deploy"
    # Single use, as on the JSON API.
    again = _exchange(api, session, resource="jwt://payments-api", scope="deploy", ttl_seconds="300",
                      approval_id=body["approval_id"])
    assert again.status_code >= 400 and again.json()["error"] in ("access_denied", "invalid_request")
