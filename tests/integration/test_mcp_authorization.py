"""The broker as the authorization server of MCP servers, end to end with the official MCP Python
SDK on both sides: its OAuth client provider drives authorization code + PKCE against a served
broker (the person's consent through the non-interactive consent API, with their own bearer
token), then calls a tool on an SDK MCP server that checks the broker's tokens. On SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import httpx2
import jwt
import pytest
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken
from sqlmodel import select

from broker.db import transaction
from broker.models import Lease, OutboxMessage
from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.mcp_servers import McpServer
from tests.support.ports import free_port

CLIENT_ID = "mcp-test-client"
ALICE = "alice@example.com"


def mcp_policy(first: str, second: str) -> str:
    return STANDARD_TIERS + f"""\
resources:
  - match: "{first}"
    provider: native
    access:
      tools: {{tier: read, scope: "tools:read"}}
      admin: {{tier: merge_deploy, scope: "tools:read tools:admin"}}
  - match: "{second}"
    provider: native
    access:
      tools: {{tier: read, scope: "tools:read"}}
  - match: "jwt://payments-api"
    provider: native
    access:
      read: {{tier: read}}
humans:
  {ALICE}:
    grants:
      - {{resource: "{first}", access: [tools, admin]}}
      - {{resource: "{second}", access: [tools]}}
      - {{resource: "jwt://payments-api", access: [read]}}
  bob@example.com:
    groups: [maintainers]
groups:
  maintainers:
    grants:
      - {{resource: "{first}", access: [tools, admin]}}
agents:
  mcp-client: {{max_tier: merge_deploy}}
  claude-code: {{max_tier: merge_deploy}}
"""


@dataclass
class World:
    api: Api
    first: McpServer
    second: McpServer
    redirect_uri: str


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    port = free_port()
    issuer = f"http://127.0.0.1:{port}"
    redirect_uri = f"http://127.0.0.1:{free_port()}/callback"
    with McpServer("files", issuer, ["tools:read"], admin_scopes="tools:read tools:admin") as first, \
            McpServer("tickets", issuer, ["tools:read"]) as second:
        secrets_ = BrokerSecrets()
        clients = {CLIENT_ID: {"redirect_uris": [redirect_uri], "client_name": "SDK test client"}}
        broker = build_broker(tmp_path, database_url, secrets_, mcp_policy(first.url, second.url), issuer=issuer,
                              oauth_clients=json.dumps(clients), security_event_receivers=json.dumps(
                                  [{"name": "siem", "url": f"http://127.0.0.1:{free_port()}/set", "audience": "siem"}]))
        with LiveServer(broker, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield World(Api(server.base_url, secrets_, broker, client), first, second, redirect_uri)


class Storage:
    def __init__(self, client_info: OAuthClientInformationFull) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = client_info

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info


class Person:
    """The person's side of the flow without a browser: follow the authorization redirect to the
    consent page, read what is asked, approve it with their own bearer token, hand the redirect back.
    Where the access waits for an approval, `approver` (another person) approves it in between."""

    def __init__(self, world: World, human: str = ALICE, approver: str | None = None) -> None:
        self.world, self.human, self.approver = world, human, approver
        self.asked: list[dict[str, Any]] = []
        self.waited: list[str] = []
        self.redirect: str | None = None

    async def redirect_handler(self, url: str) -> None:
        api = self.world.api
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.get(url)
            assert r.status_code == 303, r.text
            consent = r.headers["location"]
            assert consent.startswith(api.base_url + "/console/oauth/authorize/az_")
            authz_id = consent.rsplit("/", 1)[1]
            headers = api.as_human(self.human)
            ask = await http.get(f"{api.base_url}/v1/oauth/authorizations/{authz_id}", headers=headers)
            assert ask.status_code == 200, ask.text
            self.asked.append(ask.json())
            decision = f"{api.base_url}/v1/oauth/authorizations/{authz_id}/decision"
            answer = await http.post(decision, json={"decision": "approve"}, headers=headers)
            if answer.status_code == 202:
                approval_id = answer.json()["approval_id"]
                self.waited.append(approval_id)
                # Still waiting until a person decides: asking again changes nothing.
                again = await http.post(decision, json={"decision": "approve"}, headers=headers)
                assert again.status_code == 202 and again.json()["approval_id"] == approval_id
                assert self.approver is not None, "nobody to approve"
                approved = await http.post(f"{api.base_url}/v1/approvals/{approval_id}/approve", json={},
                                           headers=api.as_human(self.approver))
                assert approved.status_code == 200, approved.text
                answer = await http.post(decision, json={"decision": "approve"}, headers=headers)
            assert answer.status_code == 200, answer.text
            self.redirect = answer.json()["redirect_to"]

    async def callback_handler(self) -> AuthorizationCodeResult:
        assert self.redirect is not None
        assert self.redirect.startswith(self.world.redirect_uri + "?")
        query = parse_qs(urlsplit(self.redirect).query)
        return AuthorizationCodeResult(code=query["code"][0], state=query["state"][0], iss=query["iss"][0])


async def _call_tools(world: World, server: McpServer, person: Person, storage: Storage, *tools: str) -> list[str]:
    metadata = OAuthClientMetadata(redirect_uris=[world.redirect_uri], grant_types=["authorization_code", "refresh_token"],
                                   response_types=["code"], token_endpoint_auth_method="none", client_name="SDK test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        provider = OAuthClientProvider(server.url, metadata, storage, redirect_handler=person.redirect_handler,
                                       callback_handler=person.callback_handler)
    texts = []
    async with httpx2.AsyncClient(auth=provider, timeout=30) as http, \
            Client(streamable_http_client(server.url, http_client=http)) as client:
        for tool in tools:
            result = await client.call_tool(tool, {})
            texts.append(" ".join(getattr(c, "text", "") for c in result.content))
    return texts


async def _call_tool(world: World, server: McpServer, person: Person, storage: Storage) -> str:
    [text] = await _call_tools(world, server, person, storage, "whoami")
    return text


def _registered() -> OAuthClientInformationFull:
    return OAuthClientInformationFull(client_id=CLIENT_ID, redirect_uris=None, token_endpoint_auth_method="none")


def _raw_tool_call(server: McpServer, token: str) -> httpx.Response:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}}
    return httpx.post(server.url, json=body, timeout=30, headers={
        "Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream"})


def test_sdk_client_completes_the_flow_and_calls_the_tool_with_a_token_for_that_server_only(world: World) -> None:
    storage = Storage(_registered())
    storage.client_info.redirect_uris = [world.redirect_uri]  # type: ignore[union-attr]
    person = Person(world)
    text = asyncio.run(_call_tool(world, world.first, person, storage))
    assert text == "files: ok" and world.first.calls == ["files"]
    # The person saw what was asked: this client, this MCP server, the narrowest access covering the scope.
    [asked] = person.asked
    assert (asked["client_id"], asked["resource"], asked["access"], asked["scope"], asked["tier"]) == \
        (CLIENT_ID, world.first.url, "tools", "tools:read", "read")
    assert storage.tokens is not None and storage.tokens.refresh_token
    token = storage.tokens.access_token
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == world.first.url  # exactly that MCP server, one string, nothing else
    assert claims["sub"] == ALICE and claims["act"] == {"sub": "mcp-client"} and claims["scope"] == "tools:read"
    # The same token at the second MCP server: refused by its audience check.
    refused = _raw_tool_call(world.second, token)
    assert refused.status_code == 401 and world.second.calls == []
    assert _raw_tool_call(world.first, token).status_code == 200
    # The token is a lease of a session, in the audit like any capability.
    with transaction(world.api.broker.engine) as db:
        lease = db.get(Lease, claims["jti"])
        assert lease is not None and lease.session_id == claims["sid"] and lease.status == "active"
    audit = world.api.client.get("/v1/audit", params={"session_id": claims["sid"]}, headers=world.api.as_admin())
    records = audit.json()["records"]
    assert {"session.created", "oauth.consented", "capability.minted"} <= {r["type"] for r in records}
    [consent] = [r for r in records if r["type"] == "oauth.consented"]
    assert consent["actor"] == f"human:{ALICE}" and consent["human_principal"] == ALICE
    assert (consent["detail"]["client_id"], consent["detail"]["resource"], consent["detail"]["access"]) == \
        (CLIENT_ID, world.first.url, "tools")


def test_ending_the_session_revokes_every_mcp_token_and_its_refresh_token(world: World) -> None:
    storage = Storage(_registered())
    storage.client_info.redirect_uris = [world.redirect_uri]  # type: ignore[union-attr]
    asyncio.run(_call_tool(world, world.first, Person(world), storage))
    assert storage.tokens is not None
    token, refresh_token = storage.tokens.access_token, storage.tokens.refresh_token
    sid = jwt.decode(token, options={"verify_signature": False})["sid"]
    # A refresh: rotated, a new decision, a second lease of the same session.
    r = world.api.client.post("/v1/oauth/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token,
                                                       "client_id": CLIENT_ID})
    assert r.status_code == 200, r.text
    refreshed = r.json()
    assert refreshed["refresh_token"] != refresh_token and refreshed["scope"] == "tools:read"
    assert jwt.decode(refreshed["access_token"], options={"verify_signature": False})["sid"] == sid
    ended = world.api.client.post(f"/v1/sessions/{sid}/end", json={"reason": "done"}, headers=world.api.as_admin())
    assert ended.status_code == 200, ended.text
    for access_token in (token, refreshed["access_token"]):
        assert world.api.client.post("/v1/introspect", data={"token": access_token}).json() == {"active": False}
        assert _raw_tool_call(world.first, access_token).status_code == 401
    again = world.api.client.post("/v1/oauth/token", data={"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                                           "refresh_token": refreshed["refresh_token"]})
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    with transaction(world.api.broker.engine) as db:
        sets = db.exec(select(OutboxMessage).where(OutboxMessage.kind == "set")).all()
        kinds = [m.type for m in sets]
    assert kinds.count("session-revoked") == 1 and kinds.count("credential-change") == 2


def test_scope_step_up_through_an_approval_tier_waits_for_a_person_then_works_once(world: World) -> None:
    storage = Storage(_registered())
    storage.client_info.redirect_uris = [world.redirect_uri]  # type: ignore[union-attr]
    person = Person(world, approver="bob@example.com")
    texts = asyncio.run(_call_tools(world, world.first, person, storage, "whoami", "admin"))
    assert texts == ["files: ok", "files: admin ok"] and world.first.calls == ["files", "files:admin"]
    # Two consents: the auto tier at once, then the scope challenge's wider scope (the SDK asks for the
    # union), which the broker maps to the narrowest access covering it, of an approval tier.
    assert [(a["access"], a["scope"], a["tier"]) for a in person.asked] == [
        ("tools", "tools:read", "read"), ("admin", "tools:admin tools:read", "merge_deploy")]
    [approval_id] = person.waited
    assert storage.tokens is not None
    claims = jwt.decode(storage.tokens.access_token, options={"verify_signature": False})
    assert set(claims["scope"].split()) == {"tools:admin", "tools:read"} and claims["aud"] == world.first.url
    # Once: the approval is spent by that token; a refresh of the wider grant waits for a new one.
    approval = world.api.client.get(f"/v1/approvals/{approval_id}", headers=world.api.as_admin()).json()
    assert approval["status"] == "used"
    r = world.api.client.post("/v1/oauth/token", data={"grant_type": "refresh_token", "client_id": CLIENT_ID,
                                                       "refresh_token": storage.tokens.refresh_token})
    assert r.status_code == 400 and r.json()["error"] == "authorization_pending", r.text
    assert r.json()["approval_id"] != approval_id


def test_an_agent_exchanges_its_session_token_for_an_mcp_token_and_loses_it_at_session_end(world: World) -> None:
    api = world.api
    session = api.new_session(agent="claude-code", scope=[{"resource": world.first.url, "access": ["tools"]}])
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": session["session_token"],
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "resource": world.first.url,
            "scope": "tools"}
    r = api.client.post("/v1/oauth/token", data=form)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["aud"] == world.first.url and claims["act"] == {"sub": "claude-code"}
    assert claims["sid"] == session["session_id"]

    async def call() -> str:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=30) as http, \
                Client(streamable_http_client(world.first.url, http_client=http)) as client:
            result = await client.call_tool("whoami", {})
            return " ".join(getattr(c, "text", "") for c in result.content)

    assert asyncio.run(call()) == "files: ok"
    # The same decision path: outside the task's scope (another MCP server) is refused, nothing minted.
    other = api.client.post("/v1/oauth/token", data={**form, "resource": world.second.url})
    assert other.status_code == 403 and other.json()["code"] == "outside-task-scope"
    ended = api.client.post(f"/v1/sessions/{session['session_id']}/end", json={"reason": "done"},
                            headers=api.as_orchestrator())
    assert ended.status_code == 200
    assert _raw_tool_call(world.first, token).status_code == 401
    with pytest.raises(ExceptionGroup):  # the SDK client cannot even initialise with the revoked token
        asyncio.run(call())
