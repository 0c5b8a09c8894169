"""Every bad input of the authorization code flow is refused with the RFC's error and nothing is
minted: PKCE missing, `plain` or a wrong verifier; a redirect URI not in the client's metadata;
CIMD documents that lie about their URL, sit at private addresses or are too large; a code used
twice; a resource the policy does not know. Over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from sqlmodel import select

from broker.db import transaction
from broker.models import Lease, SessionRow
from tests.integration.test_mcp_authorization import ALICE, CLIENT_ID, mcp_policy
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.ports import free_port

MCP = "https://mcp.example.com/mcp"
OTHER = "https://tickets.example.com/mcp"


class Documents(ThreadingHTTPServer):
    """Client ID Metadata Documents on loopback: path -> body."""

    def __init__(self) -> None:
        self.bodies: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.redirects: dict[str, str] = {}
        self.delays: dict[str, float] = {}
        docs = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                docs.hits[self.path] = docs.hits.get(self.path, 0) + 1
                if self.path in docs.redirects:
                    self.send_response(302)
                    self.send_header("Location", docs.redirects[self.path])
                    self.end_headers()
                    return
                body = docs.bodies.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                if self.path in docs.delays:
                    import time

                    time.sleep(docs.delays[self.path])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)
        self.base = f"http://127.0.0.1:{self.server_address[1]}"

    def serve(self, path: str, body: dict[str, Any] | bytes) -> str:
        self.bodies[path] = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.base + path


@dataclass
class World:
    api: Api
    redirect_uri: str
    docs: Documents


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    docs = Documents()
    thread = threading.Thread(target=docs.serve_forever, daemon=True)
    thread.start()
    port = free_port()
    redirect_uri = "http://127.0.0.1:9/callback"
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, mcp_policy(MCP, OTHER), issuer=f"http://127.0.0.1:{port}",
                          oauth_clients=json.dumps({CLIENT_ID: {"redirect_uris": [redirect_uri]},
                                                    "other-client": {"redirect_uris": [redirect_uri]}}),
                          cimd_allow_loopback=True)
    try:
        with LiveServer(broker, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield World(Api(server.base_url, secrets_, broker, client), redirect_uri, docs)
    finally:
        docs.shutdown()


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    return verifier, base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def _authorize(world: World, **overrides: str | None) -> httpx.Response:
    _, challenge = _pkce()
    params: dict[str, str | None] = {"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": world.redirect_uri,
                                     "code_challenge": challenge, "code_challenge_method": "S256", "resource": MCP,
                                     "scope": "tools:read", "state": "st-1"}
    params.update(overrides)
    return world.api.client.get("/v1/oauth/authorize", params={k: v for k, v in params.items() if v is not None})


def _redirected_error(r: httpx.Response, world: World) -> dict[str, list[str]]:
    assert r.status_code == 303, r.text
    location = r.headers["location"]
    assert location.startswith(world.redirect_uri + "?"), location
    query = parse_qs(urlsplit(location).query)
    # RFC 9207: iss on every authorization response, errors included; state comes back.
    assert query["iss"] == [world.api.broker.settings.issuer] and query["state"] == ["st-1"]
    return query


def _nothing_minted(world: World) -> None:
    with transaction(world.api.broker.engine) as db:
        assert db.exec(select(Lease)).all() == []


def _code(world: World, *, verifier: str | None = None, challenge: str | None = None,
          client_id: str = CLIENT_ID, redirect_uri: str | None = None) -> tuple[str, str]:
    """A real code: authorize, consent as Alice; (code, verifier)."""
    if verifier is None:
        verifier, challenge = _pkce()
    r = _authorize(world, code_challenge=challenge, client_id=client_id, redirect_uri=redirect_uri or world.redirect_uri)
    assert r.status_code == 303, r.text
    authz_id = r.headers["location"].rsplit("/", 1)[1]
    answer = world.api.client.post(f"/v1/oauth/authorizations/{authz_id}/decision", json={"decision": "approve"},
                                   headers=world.api.as_human(ALICE))
    assert answer.status_code == 200, answer.text
    return parse_qs(urlsplit(answer.json()["redirect_to"]).query)["code"][0], verifier


def _redeem(world: World, code: str, verifier: str | None, **extra: str) -> httpx.Response:
    form = {"grant_type": "authorization_code", "code": code, "client_id": CLIENT_ID,
            "redirect_uri": world.redirect_uri, **extra}
    if verifier is not None:
        form["code_verifier"] = verifier
    return world.api.client.post("/v1/oauth/token", data=form)


@pytest.mark.parametrize(("overrides", "error"), [
    ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),
    ({"code_challenge_method": None}, "invalid_request"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge_method": "s256"}, "invalid_request"),
    ({"code_challenge": "short"}, "invalid_request"),
    ({"code_challenge": "a" * 42 + "="}, "invalid_request"),
    ({"code_challenge": "\u202e" + "a" * 42}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"response_type": None}, "unsupported_response_type"),
    ({"resource": None}, "invalid_target"),
    ({"resource": "https://unknown.example.com/mcp"}, "invalid_target"),
    ({"resource": "https://mcp.example.com/mcp/../admin"}, "invalid_target"),
    ({"resource": "https://mcp.example.com/mcp%2F..%2Fadmin"}, "invalid_target"),
    ({"resource": "https://mcp.example.com/mcp#frag"}, "invalid_target"),
    ({"resource": "https://MCP.example.com/mcp\n"}, "invalid_target"),
    ({"resource": "javascript:alert(1)"}, "invalid_target"),
    ({"scope": None}, "invalid_scope"),
    ({"scope": "tools:write"}, "invalid_scope"),
    ({"scope": "tools:read \"; rm -rf /"}, "invalid_scope"),
    ({"scope": "tools:read\u200b"}, "invalid_scope"),
])
def test_bad_authorization_requests_go_back_to_the_client_with_the_rfc_error(
        world: World, overrides: dict[str, str | None], error: str) -> None:
    query = _redirected_error(_authorize(world, **overrides), world)
    assert query["error"] == [error] and "code" not in query
    _nothing_minted(world)


@pytest.mark.parametrize("redirect_uri", [
    "http://127.0.0.1:9/other", "https://evil.example.com/callback", "http://127.0.0.1:9/callback/../x",
    "http://127.0.0.1:9/callback?x=1", "http://127.0.0.1:9/callback#f", "http://localhost.evil.com/callback",
    "http://127.0.0.1:9@evil.com/callback", "javascript:alert(1)", "", "http://127.0.0.1:9/CALLBACK",
])
def test_a_redirect_uri_outside_the_clients_metadata_is_shown_never_followed(world: World, redirect_uri: str) -> None:
    r = _authorize(world, redirect_uri=redirect_uri or None) if redirect_uri else _authorize(world, redirect_uri="")
    if not redirect_uri:
        # Absent: the client's only registered URI is used (RFC 6749 section 3.1.2.3).
        assert r.status_code == 303 and "/console/oauth/authorize/" in r.headers["location"]
        return
    assert r.status_code == 400 and "location" not in r.headers
    assert r.json()["error"] == "invalid_request" and r.json()["code"] == "invalid-redirect-uri"


@pytest.mark.parametrize("client_id", ["unknown-client", "", "mcp-test-client\x00", "https://10.0.0.7/client.json",
                                       "https://192.168.1.20/client.json", "https://169.254.169.254/latest/meta-data",
                                       "https://[::ffff:10.0.0.1]/client.json", "https://[fd00::1]/client.json",
                                       "https://0.0.0.0/client.json", "ftp://example.com/client.json",
                                       "https://user:pw@example.com/client.json", "https://example.com/",
                                       "https://example.com/a/../client.json"])
def test_unknown_or_unreachable_clients_are_refused_before_any_redirect(world: World, client_id: str) -> None:
    r = _authorize(world, client_id=client_id)
    assert r.status_code == 400 and "location" not in r.headers, r.text
    # A NUL is refused at the broker's boundary, in its own error shape; the rest in RFC 6749's.
    error = r.json()["error"]
    assert error in ("invalid_client", "invalid_request") or error["code"] == "nul-byte"
    if "10.0.0" in client_id or "169.254" in client_id or "192.168" in client_id or "fd00" in client_id:
        assert r.json()["code"] == "client-metadata-private-address"


def test_cimd_client_is_fetched_checked_and_used(world: World) -> None:
    url = world.docs.base + "/good/client.json"
    world.docs.serve("/good/client.json", {"client_id": url, "client_name": "Good client",
                                           "redirect_uris": [world.redirect_uri], "token_endpoint_auth_method": "none"})
    code, verifier = _code(world, client_id=url)
    r = world.api.client.post("/v1/oauth/token", data={"grant_type": "authorization_code", "code": code,
                                                       "client_id": url, "redirect_uri": world.redirect_uri,
                                                       "code_verifier": verifier, "resource": MCP})
    assert r.status_code == 200, r.text
    assert r.json()["token_type"] == "Bearer" and r.json()["scope"] == "tools:read"


@pytest.mark.parametrize(("name", "document", "code"), [
    ("mismatch", lambda url: {"client_id": url + "x", "redirect_uris": ["http://127.0.0.1:9/callback"]},
     "client-id-mismatch"),
    ("other", lambda url: {"client_id": "https://elsewhere.example.com/client.json",
                           "redirect_uris": ["http://127.0.0.1:9/callback"]}, "client-id-mismatch"),
    ("large", lambda url: {"client_id": url, "redirect_uris": ["http://127.0.0.1:9/callback"], "pad": "x" * 6000},
     "client-metadata-too-large"),
    ("secret", lambda url: {"client_id": url, "redirect_uris": ["http://127.0.0.1:9/callback"], "client_secret": "s"},
     "invalid-client-metadata"),
    ("bidi", lambda url: {"client_id": url, "redirect_uris": ["http://127.0.0.1:9/callback"],
                          "client_name": "Trusted\u202eevil"}, "invalid-client-metadata"),
    ("noredirects", lambda url: {"client_id": url}, "invalid-client-metadata"),
    ("notjson", lambda url: b"<html>", "invalid-client-metadata"),
    ("array", lambda url: b"[1, 2]", "invalid-client-metadata"),
])
def test_a_bad_client_metadata_document_is_refused(world: World, name: str, document: Any, code: str) -> None:
    url = world.docs.serve(f"/{name}/client.json", b"")
    body = document(url)
    world.docs.serve(f"/{name}/client.json", body)
    r = _authorize(world, client_id=url)
    assert r.status_code == 400 and "location" not in r.headers, r.text
    assert r.json()["error"] == "invalid_client" and r.json()["code"] == code
    _nothing_minted(world)


def test_a_cimd_redirect_uri_not_in_its_document_is_refused(world: World) -> None:
    url = world.docs.serve("/narrow/client.json", b"")
    world.docs.serve("/narrow/client.json", {"client_id": url, "redirect_uris": ["http://127.0.0.1:9/only"]})
    r = _authorize(world, client_id=url)
    assert r.status_code == 400 and r.json()["code"] == "invalid-redirect-uri"


@pytest.mark.parametrize(("verifier", "code"), [
    (None, "missing-code-verifier"), ("", "missing-code-verifier"), ("x" * 43, "pkce-mismatch"),
    ("short", "pkce-mismatch"), ("\u00e9" * 50, "pkce-mismatch"), ("a" * 129, "pkce-mismatch"),
])
def test_a_missing_or_wrong_verifier_spends_the_code_and_mints_nothing(world: World, verifier: str | None,
                                                                        code: str) -> None:
    issued, right = _code(world)
    r = _redeem(world, issued, verifier)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant" and r.json()["code"] == code
    _nothing_minted(world)
    # The code is spent: the right verifier now finds it used, and its session ends.
    again = _redeem(world, issued, right)
    assert again.status_code == 400 and again.json()["code"] == "code-reused"
    _nothing_minted(world)


def test_a_code_used_twice_is_refused_and_revokes_what_it_minted(world: World) -> None:
    issued, verifier = _code(world)
    first = _redeem(world, issued, verifier)
    assert first.status_code == 200, first.text
    token = first.json()["access_token"]
    second = _redeem(world, issued, verifier)
    assert second.status_code == 400 and second.json() == {
        "error": "invalid_grant", "error_description": "the code was already used; its tokens are revoked",
        "code": "code-reused"}
    assert world.api.client.post("/v1/introspect", data={"token": token}).json() == {"active": False}
    with transaction(world.api.broker.engine) as db:
        assert [s.status for s in db.exec(select(SessionRow)).all()] == ["ended"]


@pytest.mark.parametrize(("extra", "error"), [
    ({"redirect_uri": "http://127.0.0.1:9/other"}, "invalid_grant"),
    ({"resource": OTHER}, "invalid_target"),
    ({"client_id": "unknown-client"}, "invalid_client"),
    ({"client_secret": "guess"}, "invalid_client"),
])
def test_a_code_redeemed_with_other_parameters_mints_nothing(world: World, extra: dict[str, str], error: str) -> None:
    issued, verifier = _code(world)
    r = _redeem(world, issued, verifier, **extra)
    assert r.json()["error"] == error, r.text
    assert r.status_code == (401 if error == "invalid_client" else 400)
    _nothing_minted(world)


@pytest.mark.parametrize("code", ["", "jbc_" + "A" * 43, "x" * 5000, "'; drop table leases; --", "\u202ejbc_"])
def test_unknown_codes_are_invalid_grant(world: World, code: str) -> None:
    r = _redeem(world, code, "v" * 43)
    assert r.status_code == 400 and r.json()["error"] in ("invalid_grant", "invalid_request")
    _nothing_minted(world)


def test_a_denied_consent_goes_back_as_access_denied(world: World) -> None:
    r = _authorize(world)
    authz_id = r.headers["location"].rsplit("/", 1)[1]
    answer = world.api.client.post(f"/v1/oauth/authorizations/{authz_id}/decision", json={"decision": "deny"},
                                   headers=world.api.as_human(ALICE))
    query = parse_qs(urlsplit(answer.json()["redirect_to"]).query)
    assert query["error"] == ["access_denied"] and query["state"] == ["st-1"] and "code" not in query
    # Answered once: a second answer is a conflict, and agents and strangers cannot answer at all.
    again = world.api.client.post(f"/v1/oauth/authorizations/{authz_id}/decision", json={"decision": "approve"},
                                  headers=world.api.as_human(ALICE))
    assert again.status_code == 409
    assert world.api.client.post(f"/v1/oauth/authorizations/{authz_id}/decision",
                                 json={"decision": "approve"}).status_code == 401


def test_a_refresh_token_used_twice_ends_the_grant(world: World) -> None:
    issued, verifier = _code(world)
    body = _redeem(world, issued, verifier).json()
    form = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": CLIENT_ID}
    assert world.api.client.post("/v1/oauth/token", data=form).status_code == 200
    replay = world.api.client.post("/v1/oauth/token", data=form)
    assert replay.status_code == 400 and replay.json()["code"] == "refresh-token-reused"
    with transaction(world.api.broker.engine) as db:
        assert {lease.status for lease in db.exec(select(Lease)).all()} == {"revoked"}


def test_authorize_parameters_repeated_are_refused(world: World) -> None:
    query = urlencode([("client_id", CLIENT_ID), ("client_id", CLIENT_ID), ("response_type", "code")])
    r = world.api.client.get("/v1/oauth/authorize?" + query)
    assert r.status_code == 400 and r.json()["code"] == "repeated-parameter"


def test_a_client_revokes_its_refresh_token_and_the_grant_ends(world: World) -> None:
    issued, verifier = _code(world)
    body = _redeem(world, issued, verifier).json()
    revoke = "/v1/oauth/revoke"
    # A client the broker does not know is refused (RFC 7009 section 2.1: the client authenticates);
    # another client may not revoke this one's tokens. Neither changes anything.
    unknown = world.api.client.post(revoke, data={"token": body["refresh_token"], "client_id": "nobody"})
    assert unknown.status_code == 401 and unknown.json()["error"] == "invalid_client"
    for token in (body["refresh_token"], body["access_token"]):
        other = world.api.client.post(revoke, data={"token": token, "client_id": "other-client"})
        assert other.status_code == 403 and other.json()["code"] == "not-your-token"
    assert world.api.client.post("/v1/introspect", data={"token": body["access_token"]}).json()["active"] is True
    r = world.api.client.post(revoke, data={"token": body["refresh_token"], "client_id": CLIENT_ID,
                                            "token_type_hint": "refresh_token"})
    assert r.status_code == 200 and r.json() == {}
    # The access token minted under the same grant is revoked with it (section 2.1), the refresh token is dead.
    assert world.api.client.post("/v1/introspect", data={"token": body["access_token"]}).json() == {"active": False}
    again = world.api.client.post("/v1/oauth/token", data={"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                                           "refresh_token": body["refresh_token"]})
    assert again.status_code == 400 and again.json()["code"] == "invalid-refresh-token"
    # An unknown refresh-shaped token is not an error.
    assert world.api.client.post(revoke, data={"token": "jbr_" + "x" * 43, "client_id": CLIENT_ID}).status_code == 200


def test_a_client_revokes_one_access_token_and_keeps_its_grant(world: World) -> None:
    issued, verifier = _code(world)
    body = _redeem(world, issued, verifier).json()
    r = world.api.client.post("/v1/oauth/revoke", data={"token": body["access_token"], "client_id": CLIENT_ID})
    assert r.status_code == 200
    assert world.api.client.post("/v1/introspect", data={"token": body["access_token"]}).json() == {"active": False}
    refreshed = world.api.client.post("/v1/oauth/token", data={"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                                               "refresh_token": body["refresh_token"]})
    assert refreshed.status_code == 200, refreshed.text


def test_authorization_requests_past_their_time_are_deleted_as_new_ones_come(world: World) -> None:
    from datetime import timedelta

    from broker.db import utcnow
    from broker.models import OAuthAuthorization

    old = _authorize(world).headers["location"].rsplit("/", 1)[1]
    with transaction(world.api.broker.engine) as db:
        row = db.get(OAuthAuthorization, old)
        assert row is not None
        row.expires_at = utcnow() - timedelta(hours=2)
        db.add(row)
    new = _authorize(world).headers["location"].rsplit("/", 1)[1]
    with transaction(world.api.broker.engine) as db:
        assert [r.id for r in db.exec(select(OAuthAuthorization)).all()] == [new]
    # The old consent page is gone: 404, never an answer for a request nobody can finish.
    r = world.api.client.get(f"/v1/oauth/authorizations/{old}", headers=world.api.as_human(ALICE))
    assert r.status_code == 404 and r.json()["code"] == "authorization-not-found"


HOSTILE = ["", "jbr_", "jbr_" + "\u202e" * 10, "jbr_\x00abc", "' OR 1=1 --", "$(rm -rf /)", "jbr_" + "A" * 9000,
           "{\"a\": 1}", "jbr_%ED%A0%80 (raw)", "jbr_%00", "\u0000", "jbr_../../etc/passwd", "az_" + "0" * 32]


@pytest.mark.parametrize("token", HOSTILE)
def test_hostile_refresh_tokens_are_refused_without_a_trace(world: World, token: str) -> None:
    if token.endswith(" (raw)"):  # a lone surrogate's UTF-8 bytes: no client library would send them
        r = world.api.client.post("/v1/oauth/token", headers={"Content-Type": "application/x-www-form-urlencoded"},
                                  content=f"grant_type=refresh_token&client_id={CLIENT_ID}&refresh_token="
                                          + token.removesuffix(" (raw)"))
    else:
        r = world.api.client.post("/v1/oauth/token", data={"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                                           "refresh_token": token})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error in ("invalid_grant", "invalid_request") or error["code"] in ("nul-byte", "invalid-unicode")
    _nothing_minted(world)


@pytest.mark.parametrize("authz_id", ["az_" + "0" * 32, "..%2F..%2Fv1%2Fsessions", "az_" + "\u202e" * 32, "az_%00",
                                      "AZ_" + "A" * 32, "az_" + "0" * 33, "' OR 1=1 --", "az_" + "g" * 32])
def test_hostile_authorization_ids_are_not_found(world: World, authz_id: str) -> None:
    headers = world.api.as_human(ALICE)
    read = world.api.client.get(f"/v1/oauth/authorizations/{authz_id}", headers=headers)
    decide = world.api.client.post(f"/v1/oauth/authorizations/{authz_id}/decision", json={"decision": "approve"},
                                   headers=headers)
    for r in (read, decide):
        assert r.status_code in (400, 404), r.text
    _nothing_minted(world)


@pytest.mark.parametrize("decision", ["yes", "APPROVE", "approve\u200b", "", None, 1, ["approve"], {"a": 1}])
def test_a_decision_that_is_not_approve_or_deny_is_refused(world: World, decision: object) -> None:
    authz_id = _authorize(world).headers["location"].rsplit("/", 1)[1]
    r = world.api.client.post(f"/v1/oauth/authorizations/{authz_id}/decision", json={"decision": decision},
                              headers=world.api.as_human(ALICE))
    assert r.status_code == 422 and r.json()["error"]["code"] == "validation-failed"
    assert world.api.client.get(f"/v1/oauth/authorizations/{authz_id}",
                                headers=world.api.as_human(ALICE)).json()["status"] == "pending"


def test_denying_while_an_approval_waits_ends_the_session_and_mints_nothing(world: World) -> None:
    authz_id = _authorize(world, scope="tools:admin").headers["location"].rsplit("/", 1)[1]
    decision = f"/v1/oauth/authorizations/{authz_id}/decision"
    waiting = world.api.client.post(decision, json={"decision": "approve"}, headers=world.api.as_human(ALICE))
    assert waiting.status_code == 202 and waiting.json()["status"] == "pending_approval"
    assert waiting.json()["approvers"] == ["group:maintainers"]
    # Only the person who consented continues; another person is refused and changes nothing.
    other = world.api.client.post(decision, json={"decision": "approve"}, headers=world.api.as_human("bob@example.com"))
    assert other.status_code == 409
    denied = world.api.client.post(decision, json={"decision": "deny"}, headers=world.api.as_human(ALICE))
    assert denied.status_code == 200
    query = parse_qs(urlsplit(denied.json()["redirect_to"]).query)
    assert query["error"] == ["access_denied"] and "code" not in query
    _nothing_minted(world)
    with transaction(world.api.broker.engine) as db:
        assert [s.status for s in db.exec(select(SessionRow)).all()] == ["ended"]
    approval = world.api.client.get(f"/v1/approvals/{waiting.json()['approval_id']}", headers=world.api.as_admin())
    assert approval.json()["status"] != "pending"
