"""OAuth endpoints (RFC 8693 token exchange, RFC 7009 revocation, RFC 8414 / 9728 metadata).

Form-encoded as the RFCs say; errors in RFC 6749's shape (`error`, `error_description`) with
the broker's kebab-case `code` alongside. The decision, the mint and the revocation are the
JSON API's own service functions. See docs/oauth.md.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep, get_caller
from broker.errors import BrokerError, Unauthenticated
from broker.identity.callers import Caller
from broker.oauth import exchange, form, idjag, metadata, tokens
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
    summary="Tokens: RFC 8693 exchange of a session token, authorization_code + PKCE, refresh_token (rotated), "
            "jwt-bearer with an ID-JAG",
    response_model=TokenResponse,
    response_model_exclude_none=True,
    responses={200: {"description": "issued"},
               **{s: {**_ERR, "description": "OAuth error"} for s in (400, 403, 409, 429, 500, 502, 503)},
               401: {**_ERR, "description": "invalid_client: the client's authentication failed (RFC 6749 section 5.2)",
                     "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}},
    openapi_extra={"requestBody": {"required": True, "content": {"application/x-www-form-urlencoded": {"schema": {
        "type": "object",
        "required": ["grant_type"],
        "properties": {
            "grant_type": {"type": "string", "enum": [exchange.GRANT_TYPE, tokens.AUTHORIZATION_CODE,
                                                      tokens.REFRESH_TOKEN, idjag.GRANT_TYPE]},
            "assertion": _STR,
            "subject_token": _STR,
            "subject_token_type": {"type": "string", "enum": list(exchange.SUBJECT_TOKEN_TYPES)},
            "code": _STR,
            "code_verifier": _STR,
            "redirect_uri": _STR,
            "refresh_token": _STR,
            "client_id": _STR,
            "client_secret": _STR,
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
        grant_type = form.one(params, "grant_type", required=True)
        if grant_type in (tokens.AUTHORIZATION_CODE, tokens.REFRESH_TOKEN, idjag.GRANT_TYPE):
            answer = await run_in_threadpool(_authorization_grant, request, broker, params, grant_type)
        else:
            answer = await run_in_threadpool(exchange.exchange, request, broker, params, idempotency_key)
    except OAuthError as exc:
        if exc.status == 401:
            exc.headers.setdefault("WWW-Authenticate", 'Basic realm="jit-broker"')  # RFC 6749 section 5.2
        return _oauth_error(exc)
    response.headers.update(NO_STORE)
    return TokenResponse.model_validate(answer)


def _client_revocation(raw: bytes) -> bool:
    """A revocation by an OAuth client (it sends client_id, RFC 7009 section 2.1), not by a bearer."""
    try:
        params = form.parse(raw, "application/x-www-form-urlencoded")
    except OAuthError:
        return False
    return form.one(params, "client_id") is not None


def _basic(request: Request) -> tuple[str, str] | None:
    """RFC 6749 section 2.3.1: client_secret_basic, both parts form-urlencoded."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise OAuthError("invalid_client", "client authentication is Basic or in the form", code="invalid-client",
                         status=401)
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        raise OAuthError("invalid_client", "the Basic credentials cannot be read", code="invalid-client",
                         status=401) from None
    if not sep:
        raise OAuthError("invalid_client", "the Basic credentials cannot be read", code="invalid-client", status=401)
    return unquote_plus(user), unquote_plus(password)


def _authorization_grant(request: Request, broker: BrokerDep, params: dict[str, list[str]],
                         grant_type: str) -> dict[str, Any]:
    client = tokens.authenticate_client(request.app.state.oauth_clients, params, _basic(request))
    if grant_type == tokens.AUTHORIZATION_CODE:
        return tokens.redeem_code(broker, client, params)
    if grant_type == idjag.GRANT_TYPE:
        return idjag.exchange(broker, request.app.state.idjag, client, params)
    return tokens.refresh(broker, client, params)


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
        caller: Caller | None = None
        try:
            caller = None if authorization is None else await get_caller(request, authorization)
        except Unauthenticated as exc:
            raise OAuthError("invalid_client", exc.message, code=exc.code, status=401, headers={
                "WWW-Authenticate": metadata.www_authenticate(
                    broker, error=None if exc.code == "missing-credentials" else "invalid_token")}) from None
        params = form.parse(await request.body(), request.headers.get("content-type", ""))
        token_value = form.one(params, "token", required=True)
        if len(token_value) > 8192:
            raise OAuthError("invalid_request", "token is too long", code="invalid-parameter")
        if len(form.one(params, "client_id") or "") > 2048:
            raise OAuthError("invalid_request", "client_id is too long", code="invalid-parameter")
        hint = form.one(params, "token_type_hint")
        if hint is not None and hint not in TOKEN_TYPE_HINTS:
            # RFC 7009 section 2.2.1; the hint is only a hint, but an unknown one is reported.
            raise OAuthError("unsupported_token_type", "token_type_hint must be access_token or refresh_token",
                             code="unsupported-token-type")
        if caller is None and _client_revocation(await request.body()):
            # An OAuth client revoking a token issued to it (RFC 7009 section 2.1): it names itself
            # (public) or proves its secret (confidential). A refresh token is only ever its client's
            # to revoke; for an access token, a client_id the broker does not know (authlib sends one
            # with `none`) falls back to the holder's right below.
            try:
                client = tokens.authenticate_client(request.app.state.oauth_clients, params, None)
            except OAuthError:
                if token_value.startswith(tokens.REFRESH_TOKEN_PREFIX):
                    raise
                client = None
            if client is not None:
                await run_in_threadpool(tokens.revoke_for_client, broker, client, token_value)
                response.headers.update(NO_STORE)
                return Revoked()
        # With a Bearer caller: as DELETE on the capability. Without: holding the token is the right.
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

