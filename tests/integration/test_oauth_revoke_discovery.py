"""RFC 7009 revocation, RFC 8414 / 9728 discovery and the 401/403 challenges, over real HTTP."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlmodel import Session, select

from broker.models import AuditRecord, Lease
from tests.support.brokers import Api

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


def _mint(api: Api, session: dict[str, Any]) -> tuple[str, str]:
    r = api.request(session, {"resource": "jwt://payments-api", "access": "read"})
    assert r.status_code == 201, r.text
    return r.json()["capability_id"], r.json()["credential"]["token"]


def _status(api: Api, capability_id: str) -> str:
    return str(api.client.get(f"/v1/capabilities/{capability_id}", headers=api.as_admin()).json()["status"])


def test_revoking_a_native_token_is_delete_on_its_capability(api: Api) -> None:
    session = api.new_session()
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    cap, token = _mint(api, session)
    r = api.client.post("/v1/oauth/revoke", data={"token": token, "token_type_hint": "access_token"}, headers=agent)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert _status(api, cap) == "revoked"
    assert api.client.post("/v1/introspect", data={"token": token}).json() == {"active": False}
    with Session(api.broker.engine) as db:
        lease = db.get(Lease, cap)
        assert lease is not None and lease.status_reason == "revoked-by-agent"
        assert db.exec(select(AuditRecord).where(AuditRecord.type == "capability.revoked")).first() is not None
    # Again: still 200, nothing more happens.
    assert api.client.post("/v1/oauth/revoke", data={"token": token}, headers=agent).status_code == 200


def test_revoking_by_fingerprint_when_the_token_is_not_signed_by_the_broker(api: Api) -> None:
    """Provider tokens are found by their stored SHA-256 fingerprint; here a native one whose jti path is
    bypassed by clearing the fingerprint of another lease proves the lookup is by the stored value."""
    session = api.new_session()
    cap, token = _mint(api, session)
    with Session(api.broker.engine) as db:
        lease = db.get(Lease, cap)
        assert lease is not None
        assert lease.fingerprint == "sha256:" + hashlib.sha256(token.encode()).hexdigest()
        # A provider token: opaque to the broker's keyring, known only by fingerprint.
        opaque = "hvs.CAESIF" + "x" * 40
        lease.fingerprint = "sha256:" + hashlib.sha256(opaque.encode()).hexdigest()
        db.add(lease)
        db.commit()
    r = api.client.post("/v1/oauth/revoke", data={"token": opaque}, headers=api.as_human("alice@example.com"))
    assert r.status_code == 200, r.text
    assert _status(api, cap) == "revoked"


def test_unknown_token_is_200_and_others_may_not_revoke(api: Api) -> None:
    session, other = api.new_session(), api.new_session(human="alice@example.com", task_id="other")
    cap, token = _mint(api, session)
    other_agent = {"Authorization": f"Bearer {other['session_token']}"}
    assert api.client.post("/v1/oauth/revoke", data={"token": "never-issued"}, headers=other_agent).status_code == 200
    refused = api.client.post("/v1/oauth/revoke", data={"token": token}, headers=other_agent)
    assert refused.status_code == 403
    assert (refused.json()["error"], refused.json()["code"]) == ("unauthorized_client", "not-your-token")
    # Credentials that are sent must be good: a bad Bearer is 401, never read as "no credentials".
    bad_caller = api.client.post("/v1/oauth/revoke", data={"token": token}, headers={"Authorization": "Bearer a.b.c"})
    assert bad_caller.status_code == 401 and bad_caller.json()["error"] == "invalid_client"
    assert "resource_metadata=" in bad_caller.headers["www-authenticate"]
    # Without credentials (a public client, `none`): an unknown token is still just 200.
    assert api.client.post("/v1/oauth/revoke", data={"token": "never-issued"}).status_code == 200
    bad_hint = api.client.post("/v1/oauth/revoke", data={"token": token, "token_type_hint": "id_token"},
                               headers=api.as_admin())
    assert bad_hint.status_code == 400 and bad_hint.json()["error"] == "unsupported_token_type"
    missing = api.client.post("/v1/oauth/revoke", data={}, headers=api.as_admin())
    assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
    assert _status(api, cap) == "active"
    assert api.client.post("/v1/oauth/revoke", data={"token": token}, headers=api.as_admin()).status_code == 200
    assert _status(api, cap) == "revoked"


def test_authorization_server_metadata_has_the_rfc_8414_members(api: Api) -> None:
    r = api.client.get("/.well-known/oauth-authorization-server")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    issuer = api.broker.settings.issuer.rstrip("/")
    # RFC 8414 section 2: issuer (https or, here, the configured URL; no query or fragment) and
    # response_types_supported are REQUIRED; token_endpoint is required where a grant uses it.
    assert doc["issuer"] == issuer and "?" not in doc["issuer"] and "#" not in doc["issuer"]
    assert isinstance(doc["response_types_supported"], list)
    assert doc["grant_types_supported"] == [GRANT, "authorization_code", "refresh_token"]
    # The MCP authorization profile: authorization code with PKCE S256 only, RFC 9207 iss, CIMD clients.
    assert doc["response_types_supported"] == ["code"] and doc["code_challenge_methods_supported"] == ["S256"]
    assert doc["authorization_endpoint"] == api.broker.settings.public_base_url() + "/v1/oauth/authorize"
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert doc["client_id_metadata_document_supported"] is True
    # Exactly what the endpoints accept (an absent member would mean client_secret_basic).
    assert doc["token_endpoint_auth_methods_supported"] == ["none", "client_secret_basic", "client_secret_post"]
    assert doc["revocation_endpoint_auth_methods_supported"] == ["none", "client_secret_post"]
    assert doc["introspection_endpoint_auth_methods_supported"] == ["none"]
    assert doc["authorization_details_types_supported"] == ["jit-broker-capability"]
    for member, path in (("token_endpoint", "/v1/oauth/token"), ("revocation_endpoint", "/v1/oauth/revoke"),
                         ("introspection_endpoint", "/v1/introspect"), ("jwks_uri", "/.well-known/jwks.json")):
        assert doc[member].endswith(path), member
        assert doc[member].startswith(api.broker.settings.public_base_url())
    # Each advertised endpoint answers at the advertised path.
    assert api.client.get(doc["jwks_uri"].removeprefix(api.broker.settings.public_base_url())).json()["keys"]
    # The issuer signs what it says it signs: a session token's iss is the metadata's issuer.
    session = api.new_session()
    import jwt
    assert jwt.decode(session["session_token"], options={"verify_signature": False})["iss"].rstrip("/") == issuer


def test_protected_resource_metadata_has_the_rfc_9728_members(api: Api) -> None:
    r = api.client.get("/.well-known/oauth-protected-resource")
    assert r.status_code == 200
    doc = r.json()
    assert doc["resource"] == api.broker.settings.public_base_url()  # REQUIRED
    assert doc["authorization_servers"] == [api.client.get("/.well-known/oauth-authorization-server").json()["issuer"]]
    assert doc["bearer_methods_supported"] == ["header"]
    assert doc["jwks_uri"].endswith("/.well-known/jwks.json")


def test_401_and_403_carry_bearer_challenges(api: Api) -> None:
    metadata_url = api.broker.settings.public_base_url() + "/.well-known/oauth-protected-resource"
    missing = api.client.get("/v1/capabilities")
    assert missing.status_code == 401
    challenge = missing.headers["www-authenticate"]
    assert challenge.startswith("Bearer ") and f'resource_metadata="{metadata_url}"' in challenge
    assert "error=" not in challenge  # RFC 6750 3.1: no error code when no credentials were sent
    bad = api.client.get("/v1/capabilities", headers={"Authorization": "Bearer a.b.c"})
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert f'resource_metadata="{metadata_url}"' in bad.headers["www-authenticate"]
    # An agent's token lacks the privilege to provision sessions: 403 insufficient_scope.
    session = api.new_session()
    forbidden = api.client.post("/v1/sessions", headers={"Authorization": f"Bearer {session['session_token']}"},
                                json={"human": "alice@example.com", "agent": "claude-code", "task_id": "x",
                                      "ttl_seconds": 60, "scope": [{"resource": "jwt://**", "access": ["*"]}]})
    assert forbidden.status_code == 403
    assert forbidden.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="insufficient_scope"' in forbidden.headers["www-authenticate"]
    assert f'resource_metadata="{metadata_url}"' in forbidden.headers["www-authenticate"]
    # A policy denial is not about the token's privilege: no challenge.
    denied = api.request(session, {"resource": "jwt://payments-api", "access": "drop"})
    assert denied.status_code == 403 and "www-authenticate" not in denied.headers


def test_oversized_oauth_bodies_are_refused_before_parsing(api: Api) -> None:
    big = {"token": "x" * (20 * 1024)}
    r = api.client.post("/v1/oauth/revoke", data=big, headers=api.as_admin())
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload-too-large"
    r = api.client.post("/v1/oauth/token", data={"grant_type": "x", "subject_token": "y" * (70 * 1024)})
    assert r.status_code == 413
