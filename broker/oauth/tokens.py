"""The token endpoint's side of the authorization-code flow (steps 3 and 4 of `authorize`'s
story): client authentication, redeeming a code (PKCE checked, spent first, a replay ends its
session), rotating refresh tokens (a replayed one ends the session), the answer's shape, and
RFC 7009 revocation of a client's own tokens. Every token is one decision of the capability path.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from typing import Any

from sqlmodel import col, delete, select

from broker.db import transaction, utcnow
from broker.errors import BrokerError
from broker.identity.callers import Caller
from broker.leases.outcomes import PendingApproval
from broker.leases.revocation import revoke_leases
from broker.leases.service import request_capability
from broker.leases.vocabulary import CapabilityAsk
from broker.models import Lease, OAuthAuthorization, OAuthRefreshToken, SessionRow
from broker.oauth.clients import ClientDirectory, OAuthClient
from broker.oauth.errors import OAuthError, from_broker_error
from broker.oauth.form import one
from broker.oauth.revoke import find_capability
from broker.oauth.vocabulary import IGNORED_SCOPES, client_label, digest, one_resource
from broker.runtime import Broker
from broker.sessions import service as sessions

AUTHORIZATION_CODE = "authorization_code"
REFRESH_TOKEN = "refresh_token"  # noqa: S105  # an OAuth grant type's name, not a secret
REFRESH_TOKEN_PREFIX = "jbr_"  # noqa: S105  # a token's public prefix, not a secret
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")


def capability_ask(resource: str, access: str, client_id: str, approval_id: str | None = None) -> CapabilityAsk:
    return CapabilityAsk(resource=resource, access=access, purpose=f"MCP client {client_id}"[:1000],
                         approval_id=approval_id)


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def end_session(broker: Broker, session_id: str | None, reason: str) -> None:
    if session_id is not None:
        sessions.end(broker, session_id, reason=reason, actor="oauth-authorize")


def _mint(broker: Broker, session: SessionRow | None, resource: str, access: str, client_id: str,
          approval_id: str | None = None) -> dict[str, Any]:
    if session is None or session.status != "active":
        raise OAuthError("invalid_grant", "the session behind this grant has ended", code="session-ended")
    caller = Caller(kind="agent", name=session.agent, session_id=session.id)
    try:
        outcome = request_capability(broker, caller, capability_ask(resource, access, client_id, approval_id), None)
    except BrokerError as exc:
        raise from_broker_error(exc) from None
    if isinstance(outcome, PendingApproval):
        raise OAuthError("authorization_pending", "this access waits for a person's approval",
                         code="approval-required", approval_id=outcome.approval_id)
    body = outcome.model_dump(mode="json")
    credential = body["credential"]
    if credential.get("type") != "jwt":
        raise OAuthError("invalid_target", "an MCP server's resource must use the native provider",
                         code="not-an-mcp-resource")
    return {"access_token": credential["token"], "token_type": "Bearer", "capability_id": body["capability_id"],
            "expires_at": body["expires_at"]}


def mint_for_session(broker: Broker, session_id: str, resource: str, access: str, client_id: str) -> dict[str, Any]:
    """The one token of a session nothing else will ask through (an ID-JAG's): refused, the session ends."""
    with transaction(broker.engine) as db:
        session = db.get(SessionRow, session_id)
    try:
        return _mint(broker, session, resource, access, client_id)
    except OAuthError:
        end_session(broker, session_id, "token-refused")
        raise


def _new_refresh(db: Any, broker: Broker, session: SessionRow, client_id: str, resource: str, access: str,
                 scope: str, family: str | None = None) -> str:
    token = REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow().replace(microsecond=0)
    db.exec(delete(OAuthRefreshToken).where(col(OAuthRefreshToken.expires_at) < now))  # their sessions are over
    db.add(OAuthRefreshToken(token_hash=digest(token), family=family or "rtf_" + secrets.token_hex(16),
                             session_id=session.id, client_id=client_id, resource=resource, access=access,
                             scope=scope, status="active", created_at=now, expires_at=session.expires_at))
    return token


def authenticate_client(clients: ClientDirectory, params: dict[str, list[str]],
                        basic: tuple[str, str] | None) -> OAuthClient:
    """RFC 6749 section 2.3: a confidential client proves its secret (basic or post); a public one names itself."""
    secret = one(params, "client_secret")
    named = one(params, "client_id")
    if basic is not None:
        if secret is not None or (named is not None and named != basic[0]):
            raise OAuthError("invalid_request", "one client authentication method at a time", code="ambiguous-client")
        named, secret = basic
    client = clients.resolve(named)
    if client.confidential:
        if secret is None or not client.secret_matches(secret):
            raise OAuthError("invalid_client", "client authentication failed", code="invalid-client", status=401)
    elif secret is not None:
        raise OAuthError("invalid_client", "a public client has no secret", code="invalid-client", status=401)
    return client


def answer(minted: dict[str, Any], scope: str, refresh_token: str | None) -> dict[str, Any]:
    from broker.oauth.exchange import _expires_in  # one clock rule for every grant

    answer = {"access_token": minted["access_token"], "token_type": minted["token_type"],
              "expires_in": _expires_in(minted["expires_at"]), "scope": scope}
    if refresh_token is not None:
        answer["refresh_token"] = refresh_token
    return answer


def redeem_code(broker: Broker, client: OAuthClient, params: dict[str, list[str]]) -> dict[str, Any]:
    code = one(params, "code", required=True)
    verifier = one(params, "code_verifier")
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.exec(select(OAuthAuthorization).where(OAuthAuthorization.code_hash == digest(code))
                      .with_for_update()).first()
        if row is None:
            raise OAuthError("invalid_grant", "the code is not valid", code="invalid-code")
        if row.status == "redeemed":
            # RFC 6749 section 4.1.2: a code used twice; what it minted is revoked.
            replayed = row.session_id
        else:
            replayed = None
            if row.status != "approved" or row.expires_at <= now:
                raise OAuthError("invalid_grant", "the code has expired", code="code-expired")
            if row.client_id != client.client_id:
                raise OAuthError("invalid_grant", "the code was issued to another client", code="client-mismatch")
            # Spent before anything else is checked: a wrong verifier does not leave a code to guess at.
            row.status = "redeemed"
            db.add(row)
    if replayed is not None:
        end_session(broker, replayed, "authorization-code-replayed")
        raise OAuthError("invalid_grant", "the code was already used; its tokens are revoked", code="code-reused")
    if one(params, "redirect_uri") != row.redirect_uri:
        raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request's",
                         code="redirect-uri-mismatch")
    if verifier is None:
        raise OAuthError("invalid_grant", "code_verifier is required (PKCE)", code="missing-code-verifier")
    if not _VERIFIER.match(verifier) or not secrets.compare_digest(_s256(verifier), row.code_challenge):
        raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge", code="pkce-mismatch")
    if params.get("resource") and one_resource(params) != row.resource:
        raise OAuthError("invalid_target", "resource differs from the authorization request's",
                         code="resource-mismatch")
    with transaction(broker.engine) as db:
        session = db.get(SessionRow, row.session_id)
    try:
        minted = _mint(broker, session, row.resource, row.access, client.client_id, row.approval_id)
    except OAuthError:
        # Refused (the person lost the permission since consenting, a budget...): the code is spent
        # and nothing else can use its session, so it ends rather than idles to its deadline.
        end_session(broker, row.session_id if session is not None and session.status == "active" else None, "token-refused")
        raise
    assert session is not None  # noqa: S101  # type narrowing: the refusal above raised when it was None
    with transaction(broker.engine) as db:
        refresh_token = _new_refresh(db, broker, session, client.client_id, row.resource, row.access, row.scope)
    return answer(minted, row.scope, refresh_token)


def refresh(broker: Broker, client: OAuthClient, params: dict[str, list[str]]) -> dict[str, Any]:
    token = one(params, "refresh_token", required=True)
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.exec(select(OAuthRefreshToken).where(OAuthRefreshToken.token_hash == digest(token))
                      .with_for_update()).first()
        if row is None or row.client_id != client.client_id:
            raise OAuthError("invalid_grant", "the refresh token is not valid", code="invalid-refresh-token")
        reused = row.status == "rotated"
        if not reused:
            if row.status != "active" or row.expires_at <= now:
                raise OAuthError("invalid_grant", "the refresh token is not valid", code="invalid-refresh-token")
            row.status = "rotated"
            db.add(row)
        session = db.get(SessionRow, row.session_id)
    if reused:
        # A rotated token came back: someone holds a copy. End the session (RFC 9700 4.14.2).
        end_session(broker, row.session_id, "refresh-token-replayed")
        raise OAuthError("invalid_grant", "the refresh token was already used; the grant is revoked",
                         code="refresh-token-reused")
    if params.get("resource") and one_resource(params) != row.resource:
        raise OAuthError("invalid_target", "a refresh token is good for its own resource only",
                         code="resource-mismatch")
    asked = one(params, "scope")
    if asked is not None and not frozenset(asked.split()) - IGNORED_SCOPES <= frozenset(row.scope.split()):
        raise OAuthError("invalid_scope", "a refresh cannot widen the scope; authorize again", code="scope-widening")
    minted = _mint(broker, session, row.resource, row.access, client.client_id)
    assert session is not None  # noqa: S101  # type narrowing: checked above
    with transaction(broker.engine) as db:
        new_token = _new_refresh(db, broker, session, client.client_id, row.resource, row.access, row.scope,
                                 family=row.family)
    return answer(minted, row.scope, new_token)


def revoke_for_client(broker: Broker, client: OAuthClient, token: str) -> None:
    """RFC 7009 for a client's own tokens. A refresh token ends its grant, and so its session and
    every access token minted under it (section 2.1); an access token is revoked alone. A token
    the broker does not know changes nothing (section 2.2); one issued to another client is refused."""
    if token.startswith(REFRESH_TOKEN_PREFIX):
        with transaction(broker.engine) as db:
            row = db.get(OAuthRefreshToken, digest(token))
            if row is None:
                return
            if row.client_id != client.client_id:
                raise _not_yours()
            for sibling in db.exec(select(OAuthRefreshToken).where(OAuthRefreshToken.family == row.family)).all():
                sibling.status = "revoked"
                db.add(sibling)
            session_id = row.session_id
        end_session(broker, session_id, "refresh-token-revoked")
        return
    capability_id = find_capability(broker, token)
    if capability_id is None:
        return
    with transaction(broker.engine) as db:
        lease = db.get(Lease, capability_id)
        session = db.get(SessionRow, lease.session_id) if lease is not None else None
    if session is None or (session.labels or {}).get("oauth_client") != client_label(client.client_id):
        raise _not_yours()
    revoke_leases(broker, [capability_id], reason="revoked-by-client", actor=f"oauth-client:{client.client_id}"[:200])


def _not_yours() -> OAuthError:
    return OAuthError("unauthorized_client", "this token was not issued to this client", code="not-your-token",
                      status=403)
