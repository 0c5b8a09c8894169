"""OAuth endpoints (RFC 8693 token exchange, RFC 7009 revocation, RFC 8414 / 9728 metadata).

Form-encoded as the RFCs say; errors in RFC 6749's shape (`error`, `error_description`) with
the broker's kebab-case `code` alongside. The decision, the mint and the revocation are the
JSON API's own service functions. See docs/oauth.md.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep, get_caller
from broker.errors import BrokerError, Unauthenticated
from broker.oauth import exchange, form, metadata
from broker.oauth.errors import OAuthError, from_broker_error
from broker.oauth.models import AuthorizationServerMetadata, ProtectedResourceMetadata, Revoked, TokenResponse
from broker.oauth.revoke import TOKEN_TYPE_HINTS, revoke_token

router = APIRouter(tags=["oauth"])
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_STR = {"type": "string", "maxLength": 16384}
OAUTH_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        # An RFC 6749 error name; a request refused at the boundary before the OAuth layer (NUL byte,
        # body too large) carries the broker's usual {"code", "message"} object instead.
        "error": {"anyOf": [{"type": "string"}, {"type": "object", "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}}}]},
        "error_description": {"type": "string"},
        "code": {"type": "string", "description": "the broker's kebab-case reason"},
        "approval_id": {"type": "string"},
    },
}
_ERR = {"content": {"application/json": {"schema": OAUTH_ERROR_SCHEMA}}}


def _oauth_error(exc: OAuthError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status, headers={**NO_STORE, **exc.headers})


@router.post(
    "/v1/oauth/token",
    summary="RFC 8693 token exchange: a session token for one capability",
    response_model=TokenResponse,
    response_model_exclude_none=True,
    responses={200: {"description": "issued"},
               **{s: {**_ERR, "description": "OAuth error"} for s in (400, 403, 409, 429, 500, 502, 503)}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
        "type": "object",
        "required": ["grant_type", "subject_token", "subject_token_type"],
        "properties": {
            "grant_type": {"type": "string", "enum": [exchange.GRANT_TYPE]},
            "subject_token": _STR,
            "subject_token_type": {"type": "string", "enum": list(exchange.SUBJECT_TOKEN_TYPES)},
            "resource": _STR,
            "scope": _STR,
            "authorization_details": _STR,
            "requested_token_type": _STR,
            "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 86400},
            "purpose": {"type": "string", "minLength": 1, "maxLength": 1000},
            "approval_id": {"type": "string", "pattern": "^apr_[0-9a-f]{32}$"},
        },
    }}}}},
)
async def token(
    request: Request, response: Response, broker: BrokerDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
    dpop_proof: Annotated[str | None, Header(alias="DPoP", max_length=8192,
                                             description="RFC 9449 proof: binds a native token to its key")] = None,
) -> TokenResponse | JSONResponse:
    # The DPoP header is read from the request itself (several are an error, which a parameter would hide).
    del dpop_proof
    try:
        params = form.parse(await request.body(), request.headers.get("content-type", ""),
                            repeatable=frozenset({"resource"}))
        answer = await run_in_threadpool(exchange.exchange, request, broker, params, idempotency_key)
    except OAuthError as exc:
        return _oauth_error(exc)
    response.headers.update(NO_STORE)
    return TokenResponse.model_validate(answer)


@router.post(
    "/v1/oauth/revoke",
    summary="RFC 7009 revocation of a token the broker issued",
    response_model=Revoked,
    responses={200: {"description": "revoked, or not a token the broker knows (RFC 7009 section 2.2)"},
               **{s: {**_ERR, "description": "OAuth error"} for s in (400, 401, 403, 409, 429, 500, 502, 503)}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
        "type": "object",
        "required": ["token"],
        "properties": {"token": {"type": "string", "minLength": 1, "maxLength": 8192},
                       "token_type_hint": {"type": "string", "maxLength": 64},
                       "client_id": {"type": "string", "maxLength": 2048,
                                     "description": "a public client may name itself (RFC 7009 section 2.1); unused"}},
    }}}}},
)
async def revoke(
    request: Request, response: Response, broker: BrokerDep,
    authorization: Annotated[str | None, Header(description="optional Bearer: the session's agent, its human, "
                                                "its orchestrator or an admin (as DELETE on the capability); "
                                                "without it, holding the token is the right to revoke it "
                                                "(client authentication `none`)")] = None,
) -> Revoked | JSONResponse:
    try:
        try:
            caller = None if authorization is None else await get_caller(request, authorization)
        except Unauthenticated as exc:
            raise OAuthError("invalid_client", exc.message, code=exc.code, status=401, headers={
                "WWW-Authenticate": metadata.www_authenticate(
                    broker, error=None if exc.code == "missing-credentials" else "invalid_token")}) from None
        params = form.parse(await request.body(), request.headers.get("content-type", ""))
        token_value = form.one(params, "token", required=True)
        assert token_value is not None
        if len(token_value) > 8192:
            raise OAuthError("invalid_request", "token is too long", code="invalid-parameter")
        if len(form.one(params, "client_id") or "") > 2048:
            raise OAuthError("invalid_request", "client_id is too long", code="invalid-parameter")
        hint = form.one(params, "token_type_hint")
        if hint is not None and hint not in TOKEN_TYPE_HINTS:
            # RFC 7009 section 2.2.1; the hint is only a hint, but an unknown one is reported.
            raise OAuthError("unsupported_token_type", "token_type_hint must be access_token or refresh_token",
                             code="unsupported-token-type")
        await run_in_threadpool(revoke_token, broker, caller, token_value)
    except OAuthError as exc:
        return _oauth_error(exc)
    except BrokerError as exc:
        return _oauth_error(from_broker_error(exc))
    response.headers.update(NO_STORE)
    return Revoked()


@router.get(metadata.AS_METADATA_PATH, summary="RFC 8414 authorization server metadata",
            response_model=AuthorizationServerMetadata)
def authorization_server_metadata(broker: BrokerDep, response: Response) -> AuthorizationServerMetadata:
    response.headers["Cache-Control"] = "public, max-age=300"
    return AuthorizationServerMetadata.model_validate(metadata.authorization_server(broker))


@router.get(metadata.RESOURCE_METADATA_PATH, summary="RFC 9728 protected resource metadata",
            response_model=ProtectedResourceMetadata)
def protected_resource_metadata(broker: BrokerDep, response: Response) -> ProtectedResourceMetadata:
    response.headers["Cache-Control"] = "public, max-age=300"
    return ProtectedResourceMetadata.model_validate(metadata.protected_resource(broker))

