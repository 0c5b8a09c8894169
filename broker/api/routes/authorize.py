"""The authorization endpoint for MCP clients (authorization code + PKCE) and its consent API.

`GET /v1/oauth/authorize` is where an MCP client sends the person's browser; it answers with a
redirect: to the console's consent page, or back to the client with an RFC 6749 error once the
client and its redirect URI are known to be genuine (before that, errors are answered here, as
JSON, and never redirected). The consent itself is the console page, or, for a program acting
with the person's own bearer token (`broker-cli`, a test, an IdE plug-in), the two routes below.
See docs/mcp.md.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep, HumanCaller
from broker.api.routes.oauth import _ERR, NO_STORE, _oauth_error
from broker.oauth import authorize
from broker.oauth.clients import ClientDirectory
from broker.oauth.errors import OAuthError

router = APIRouter(tags=["oauth"])


class AuthorizationAsk(BaseModel):
    """What an MCP client asks the person for."""

    authorization_id: str
    status: str
    client_id: str
    client_name: str | None = None
    agent: str
    redirect_uri: str
    resource: str
    access: str
    scope: str
    tier: str | None = None
    session_ttl_seconds: int
    expires_at: str


class ConsentDecision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["approve", "deny"]


class ConsentAnswer(BaseModel):
    redirect_to: str = Field(description="where the person's browser goes next: the client's redirect URI with "
                                         "code, state and iss, or with error=access_denied")


class ConsentWaiting(BaseModel):
    """202: the access's tier needs an approval first; answer `approve` again once it is approved."""

    status: Literal["pending_approval"] = "pending_approval"
    approval_id: str
    approvers: list[str]
    expires_at: str


def directory(request: Request) -> ClientDirectory:
    clients: ClientDirectory = request.app.state.oauth_clients
    return clients


@router.get(
    "/v1/oauth/authorize",
    summary="Authorization code + PKCE (S256) for MCP clients: to the person's consent, or back with an error",
    status_code=303,
    responses={303: {"description": "to the consent page, or to the client's redirect URI with an RFC 6749 error "
                                    "and RFC 9207 iss"},
               **{s: {**_ERR, "description": "the client or its redirect URI is not genuine: shown, not redirected"}
                  for s in (400, 401)}},
)
async def authorization_endpoint(request: Request, broker: BrokerDep) -> Response:
    params: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        if "\x00" in value or len(value) > 4096 or len(params) > 64:
            return _oauth_error(OAuthError("invalid_request", f"parameter {key[:64]} is not acceptable",
                                           code="invalid-parameter"))
        params.setdefault(key, []).append(value)
    try:
        answer = await run_in_threadpool(authorize.start, broker, directory(request), params)
    except OAuthError as exc:
        return _oauth_error(exc)
    return RedirectResponse(answer.location, status_code=303, headers=NO_STORE)


@router.get(
    "/v1/oauth/authorizations/{authorization_id}",
    summary="What an authorization request asks for (the consent page's content), for the signed-in person",
    response_model=AuthorizationAsk,
    responses={s: {**_ERR, "description": "OAuth error"} for s in (401, 403, 404)},
)
async def authorization_ask(authorization_id: str, broker: BrokerDep, _: HumanCaller) -> AuthorizationAsk | JSONResponse:
    try:
        return AuthorizationAsk.model_validate(await run_in_threadpool(authorize.describe, broker, authorization_id))
    except OAuthError as exc:
        return _oauth_error(exc)


@router.post(
    "/v1/oauth/authorizations/{authorization_id}/decision",
    summary="The person's consent without a browser: approve or deny, with their own bearer token",
    response_model=ConsentAnswer,
    responses={202: {"model": ConsentWaiting, "description": "waits for an approval of the access's tier"},
               **{s: {**_ERR, "description": "OAuth error"} for s in (401, 403, 404, 409)}},
)
async def authorization_decision(authorization_id: str, body: ConsentDecision, broker: BrokerDep,
                                 person: HumanCaller) -> ConsentAnswer | JSONResponse:
    try:
        answer = await run_in_threadpool(authorize.decide, broker, person, authorization_id,
                                         body.decision == "approve")
    except OAuthError as exc:
        return _oauth_error(exc)
    if isinstance(answer, authorize.Waiting):
        waiting = ConsentWaiting(approval_id=answer.approval_id, approvers=answer.approvers,
                                 expires_at=answer.expires_at)
        return JSONResponse(waiting.model_dump(), status_code=202, headers=NO_STORE)
    return ConsentAnswer(redirect_to=answer.location)

