"""Authorization code + PKCE for MCP clients: the request, the person's consent, the code, the refresh.

The story, top to bottom (docs/mcp.md draws it):

1. `GET /v1/oauth/authorize` (`start`): the client is identified (pre-registered or CIMD) and
   its redirect URI checked; until both hold, errors are shown, never redirected (RFC 6749
   section 4.1.2.1). Then `response_type=code`, PKCE with S256 only, exactly one `resource`
   that the policy knows (RFC 8707), and a `scope` that one of its accesses covers; a pending
   authorization row is written and the browser is sent to the consent page.
2. The person signs in (the console's sign-in) and sees the client, the MCP server, the access
   and its scopes; they approve or deny (`decide`). Approving opens a session (human = that
   person, agent = the client's agent name, scope = that one resource and access), and the
   client is redirected with a single-use code, `state` and RFC 9207 `iss`.
3. `POST /v1/oauth/token` with `grant_type=authorization_code` (`redeem_code`): the code is
   spent before anything is minted; the verifier must hash to the challenge; the capability
   is asked for through the one decision path (`request_capability`), as the agent of that
   session. A code presented twice ends its session: whatever it minted is revoked.
4. `grant_type=refresh_token` (`refresh`): rotated on every use; a rotated token presented
   again ends the session (RFC 9700 section 4.14.2). Each refresh is a new decision.

Ending the session (`POST /v1/sessions/{id}/end`, the webhook, the deadline) revokes every
token it minted and makes its refresh tokens useless.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from sqlmodel import col, delete, select

from broker.approvals.binding import effective_status
from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import BrokerError
from broker.identity.callers import Caller
from broker.leases.outcomes import PendingApproval
from broker.leases.revocation import revoke_leases
from broker.leases.service import request_capability
from broker.leases.vocabulary import CapabilityAsk
from broker.models import Approval, Lease, OAuthAuthorization, OAuthRefreshToken, SessionRow
from broker.oauth.clients import ClientDirectory, OAuthClient
from broker.oauth.errors import OAuthError, from_broker_error
from broker.oauth.form import one
from broker.oauth.revoke import find_capability
from broker.policy import CompiledPolicy, canonical_resource
from broker.policy.compiled import tier_rank
from broker.runtime import Broker
from broker.sessions import service as sessions
from broker.times import rfc3339

AUTHORIZATION_CODE = "authorization_code"
REFRESH_TOKEN = "refresh_token"
CONSENT_PATH = "/console/oauth/authorize"
REFRESH_TOKEN_PREFIX = "jbr_"
KEEP_ANSWERED = timedelta(hours=1)
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")
_AUTHZ_ID = re.compile(r"^az_[0-9a-f]{32}$")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$")  # RFC 6749 section 3.3
# Scopes a client may add that ask for nothing of the MCP server.
_IGNORED_SCOPES = frozenset({"offline_access"})


class ShownError(OAuthError):
    """An error shown to the person, never sent to a redirect URI that is not yet trusted."""


@dataclass(frozen=True)
class Redirect:
    """Where the browser goes next."""

    location: str
    code_issued: bool = False


def _with_query(uri: str, params: dict[str, str | None]) -> str:
    parts = urlsplit(uri)
    extra = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def issuer(broker: Broker) -> str:
    return broker.settings.issuer.rstrip("/")


def access_scopes(options: Any, name: str) -> frozenset[str]:
    scope = options.get("scope") if hasattr(options, "get") else None
    return frozenset(str(scope).split()) if scope else frozenset({name})


def choose_access(policy: CompiledPolicy, resource: str, scope: str | None) -> tuple[str, str]:
    """(access name, the scope it grants): the narrowest access of the resource's rule whose
    scopes (its `scope`, or its name) cover every scope asked for; an access name may be asked
    for by name. Ties go to the lower tier."""
    rule = policy.match_resource(resource)
    if rule is None:
        raise OAuthError("invalid_target", "the policy knows no MCP server or resource by that name",
                         code="unknown-resource")
    asked = frozenset((scope or "").split()) - _IGNORED_SCOPES
    if not asked:
        raise OAuthError("invalid_scope", "scope is required: the scopes of the MCP server to use",
                         code="missing-scope")
    if len(asked) > 32 or not all(_SCOPE_TOKEN.match(s) for s in asked):
        raise OAuthError("invalid_scope", "scope is not a list of scope tokens", code="invalid-scope")
    fits = []
    for name, access in rule.access.items():
        granted = access_scopes(access.options, name)
        if asked <= granted | {name}:
            fits.append((len(granted), tier_rank(access.tier), name, granted))
    if not fits:
        raise OAuthError("invalid_scope", "no access of this MCP server covers that scope", code="unknown-scope")
    _, _, name, granted = min(fits)
    return name, " ".join(sorted(granted))


def resource_of(value: str) -> str:
    try:
        return canonical_resource(value)
    except BrokerError as exc:
        raise OAuthError("invalid_target", exc.message, code="invalid-resource") from None


def _resource(params: dict[str, list[str]]) -> str:
    resources = [r for r in params.get("resource", []) if r]
    if len(resources) != 1:
        raise OAuthError("invalid_target", "exactly one resource (RFC 8707), the MCP server's URL, is required",
                         code="one-resource-per-request")
    return resource_of(resources[0])


def start(broker: Broker, clients: ClientDirectory, params: dict[str, list[str]]) -> Redirect:
    """Check an authorization request; the consent page's address, or a redirect with the error."""
    for name, values in params.items():
        if len(values) > 1 and name != "resource":
            raise ShownError("invalid_request", f"parameter {name} is repeated", code="repeated-parameter")
    try:
        client = clients.resolve(one(params, "client_id"))
    except OAuthError as exc:
        raise ShownError(exc.error, exc.description, code=exc.code) from None
    redirect_uri = one(params, "redirect_uri")
    if redirect_uri is None:
        if len(client.redirect_uris) != 1:
            raise ShownError("invalid_request", "redirect_uri is required", code="missing-redirect-uri")
        redirect_uri = client.redirect_uris[0]
    if not client.redirect_allowed(redirect_uri):
        raise ShownError("invalid_request", "redirect_uri is not one of the client's redirect URIs",
                         code="invalid-redirect-uri")
    state = one(params, "state")
    if state is not None and len(state) > 1024:
        raise ShownError("invalid_request", "state is too long", code="invalid-parameter")

    def back(error: str, description: str) -> Redirect:
        # From here on the redirect URI is trusted: errors go back to the client (RFC 6749 4.1.2.1).
        return Redirect(_with_query(redirect_uri, {"error": error, "error_description": description,
                                                   "state": state, "iss": issuer(broker)}))

    if one(params, "response_type") != "code":
        return back("unsupported_response_type", "the only response_type is code")
    challenge, method = one(params, "code_challenge"), one(params, "code_challenge_method")
    if challenge is None:
        return back("invalid_request", "PKCE is required: code_challenge with code_challenge_method=S256")
    if method != "S256":
        return back("invalid_request", "code_challenge_method must be S256 (plain is not accepted)")
    if not _CHALLENGE.match(challenge):
        return back("invalid_request", "code_challenge must be the base64url SHA-256 of the verifier")
    try:
        resource = _resource(params)
        access, granted = choose_access(broker.policies.current, resource, one(params, "scope"))
    except OAuthError as exc:
        return back(exc.error, exc.description)
    now = utcnow().replace(microsecond=0)
    row = OAuthAuthorization(
        id="az_" + secrets.token_hex(16), client_id=client.client_id, client_name=client.name, agent=client.agent,
        redirect_uri=redirect_uri, state=state, code_challenge=challenge, resource=resource, access=access,
        scope=granted, status="pending", created_at=now,
        expires_at=now + timedelta(seconds=broker.settings.oauth_authorization_ttl_seconds))
    with transaction(broker.engine) as db:
        # Rows past their time are deleted as new ones come (a spent code is kept a while longer, so
        # its replay is still recognised as one and ends its session).
        db.exec(delete(OAuthAuthorization).where(col(OAuthAuthorization.expires_at) < now - KEEP_ANSWERED))
        db.add(row)
    return Redirect(f"{broker.settings.public_base_url()}{CONSENT_PATH}/{row.id}")


def _load(db: Any, authz_id: str, *, lock: bool = False) -> OAuthAuthorization:
    if not _AUTHZ_ID.match(authz_id or ""):
        raise OAuthError("invalid_request", "no such authorization request", code="authorization-not-found",
                         status=404)
    stmt = select(OAuthAuthorization).where(OAuthAuthorization.id == authz_id)
    row = db.exec(stmt.with_for_update() if lock else stmt).first()
    if row is None:
        raise OAuthError("invalid_request", "no such authorization request", code="authorization-not-found",
                         status=404)
    return row


def describe(broker: Broker, authz_id: str) -> dict[str, Any]:
    """What the person is asked to approve, in plain fields (the consent page shows them)."""
    with transaction(broker.engine) as db:
        row = _load(db, authz_id)
    rule = broker.policies.current.match_resource(row.resource)
    tier = rule.access[row.access].tier if rule is not None and row.access in rule.access else None
    return {"authorization_id": row.id, "status": row.status if row.expires_at > utcnow() else "expired",
            "client_id": row.client_id, "client_name": row.client_name, "agent": row.agent,
            "redirect_uri": row.redirect_uri, "resource": row.resource, "access": row.access, "scope": row.scope,
            "tier": tier, "session_ttl_seconds": broker.settings.mcp_session_ttl_seconds,
            "expires_at": rfc3339(row.expires_at)}


@dataclass(frozen=True)
class Waiting:
    """The access needs a person's approval first (its tier's control): ask again once approved."""

    approval_id: str
    approvers: list[str]
    expires_at: str


def _tier(broker: Broker, resource: str, access: str) -> str | None:
    rule = broker.policies.current.match_resource(resource)
    return rule.access[access].tier if rule is not None and access in rule.access else None


def _code_for(broker: Broker, authz_id: str, now: datetime, *, session_id: str | None = None,
              approval_id: str | None = None) -> Redirect:
    code = "jbc_" + secrets.token_urlsafe(32)
    with transaction(broker.engine) as db:
        row = _load(db, authz_id, lock=True)
        if session_id is not None:
            row.session_id = session_id
        row.status, row.code_hash, row.approval_id = "approved", _digest(code), approval_id
        row.expires_at = now + timedelta(seconds=broker.settings.oauth_code_ttl_seconds)
        db.add(row)
    return Redirect(_with_query(row.redirect_uri, {"code": code, "state": row.state, "iss": issuer(broker)}),
                    code_issued=True)


def _denied(broker: Broker, row: OAuthAuthorization, description: str) -> Redirect:
    return Redirect(_with_query(row.redirect_uri, {"error": "access_denied", "error_description": description,
                                                   "state": row.state, "iss": issuer(broker)}))


def decide(broker: Broker, person: Caller, authz_id: str, approve: bool) -> Redirect | Waiting:
    """The person's answer; approving opens the session the client's tokens are keyed to. Where
    the access's tier needs an approval, the request waits for it exactly as `POST
    /v1/capabilities` does (the same approval, the same approvers); the person asks again, and
    once approved the code is issued, bound to that approval."""
    if person.kind != "human":
        raise OAuthError("access_denied", "only a person signed in as a human may consent", code="forbidden",
                         status=403)
    now = utcnow().replace(microsecond=0)
    closed: Redirect | None = None  # a waiting request that ends here without a code
    with transaction(broker.engine) as db:
        row = _load(db, authz_id, lock=True)
        if row.status == "waiting" and row.human == person.name and row.expires_at > now:
            approval = db.get(Approval, row.approval_id) if row.approval_id else None
            session = db.get(SessionRow, row.session_id) if row.session_id else None
            status = effective_status(approval, session, now) if approval is not None else "expired"
            if not approve or status in ("denied", "expired", "used", "cancelled"):
                row.status = "denied"
                db.add(row)
                closed = _denied(broker, row, "the person denied the request" if not approve
                                 else f"the approval was {status}")
            elif status != "approved":
                assert approval is not None
                return Waiting(approval.id, list(approval.approvers or []), rfc3339(approval.expires_at))
            approved = True
        elif row.status != "pending" or row.expires_at <= now:
            raise OAuthError("invalid_request", "this authorization request was already answered or has expired",
                             code="authorization-closed", status=409)
        else:
            approved = False
            row.human = person.name
            row.status = "approving" if approve else "denied"
            db.add(row)
            if not approve:
                return _denied(broker, row, "the person denied the request")
    if approved:
        if closed is not None:
            _end(broker, row.session_id, "authorization-denied")  # nothing will ever be minted in it
            return closed
        return _code_for(broker, authz_id, now, approval_id=row.approval_id)
    # The session: one task = this client's access to this MCP server for this person.
    session, _ = sessions.create(broker, Caller(kind="orchestrator", name="oauth-authorize"), sessions.SessionAsk(
        human=person.name, agent=row.agent, task_id=f"oauth:{row.id}",
        scope=[{"resource": row.resource, "access": [row.access]}],
        ttl_seconds=min(broker.settings.mcp_session_ttl_seconds, broker.settings.session_max_ttl_seconds),
        labels={"oauth_client": client_label(row.client_id)}))
    with transaction(broker.engine) as db:
        # The consent itself, in the session's chain: who let which client at which MCP server, and how far.
        append(db, sessions.session_event(session, "oauth.consented", "consented", person.principal, detail={
            "client_id": row.client_id, "client": row.client_name, "via": "cimd" if row.client_id.startswith(
                ("https://", "http://")) else "registered", "redirect_uri": row.redirect_uri,
            "resource": row.resource, "access": row.access, "scope": row.scope}))
    tier = _tier(broker, row.resource, row.access)
    policy_tier = broker.policies.current.tiers.get(tier) if tier is not None else None
    if policy_tier is None or policy_tier.control != "approval":
        return _code_for(broker, authz_id, now, session_id=session.id)
    # Asked now, through the one decision path: a refusal by any other layer is said at once, and
    # an approval opens for the tier's approvers. Nothing is minted while it waits.
    caller = Caller(kind="agent", name=session.agent, session_id=session.id)
    try:
        outcome = request_capability(broker, caller, _ask(row.resource, row.access, row.client_id), None)
    except BrokerError as exc:
        sessions.end(broker, session.id, reason="authorization-refused", actor="oauth-authorize")
        with transaction(broker.engine) as db:
            row = _load(db, authz_id, lock=True)
            row.status = "denied"
            db.add(row)
        return _denied(broker, row, f"refused by policy: {exc.code}")
    if not isinstance(outcome, PendingApproval):
        # A standing grant covered it and a credential was minted here, which nobody receives: it is
        # revoked at once, and the code mints through the same path when it is redeemed.
        revoke_leases(broker, [outcome.capability_id], reason="not-handed-out", actor="oauth-authorize")
        return _code_for(broker, authz_id, now, session_id=session.id)
    with transaction(broker.engine) as db:
        row = _load(db, authz_id, lock=True)
        row.session_id, row.approval_id, row.status = session.id, outcome.approval_id, "waiting"
        db.add(row)
    expires = outcome.expires_at
    return Waiting(outcome.approval_id, outcome.approvers, rfc3339(expires) if isinstance(expires, datetime)
                   else str(expires))


def _ask(resource: str, access: str, client_id: str, approval_id: str | None = None) -> CapabilityAsk:
    return CapabilityAsk(resource=resource, access=access, purpose=f"MCP client {client_id}"[:1000],
                         approval_id=approval_id)


def client_label(client_id: str) -> str:
    """The session label naming the client its tokens were issued to (labels are short; ids may not be)."""
    return client_id if len(client_id) <= 200 else "sha256:" + _digest(client_id)


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


def _end(broker: Broker, session_id: str | None, reason: str) -> None:
    if session_id is not None:
        sessions.end(broker, session_id, reason=reason, actor="oauth-authorize")


def _mint(broker: Broker, session: SessionRow | None, resource: str, access: str, client_id: str,
          approval_id: str | None = None) -> dict[str, Any]:
    if session is None or session.status != "active":
        raise OAuthError("invalid_grant", "the session behind this grant has ended", code="session-ended")
    caller = Caller(kind="agent", name=session.agent, session_id=session.id)
    try:
        outcome = request_capability(broker, caller, _ask(resource, access, client_id, approval_id), None)
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
        _end(broker, session_id, "token-refused")
        raise


def _new_refresh(db: Any, broker: Broker, session: SessionRow, client_id: str, resource: str, access: str,
                 scope: str, family: str | None = None) -> str:
    token = REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utcnow().replace(microsecond=0)
    db.exec(delete(OAuthRefreshToken).where(col(OAuthRefreshToken.expires_at) < now))  # their sessions are over
    db.add(OAuthRefreshToken(token_hash=_digest(token), family=family or "rtf_" + secrets.token_hex(16),
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
    assert code is not None
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.exec(select(OAuthAuthorization).where(OAuthAuthorization.code_hash == _digest(code))
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
        _end(broker, replayed, "authorization-code-replayed")
        raise OAuthError("invalid_grant", "the code was already used; its tokens are revoked", code="code-reused")
    if one(params, "redirect_uri") != row.redirect_uri:
        raise OAuthError("invalid_grant", "redirect_uri differs from the authorization request's",
                         code="redirect-uri-mismatch")
    if verifier is None:
        raise OAuthError("invalid_grant", "code_verifier is required (PKCE)", code="missing-code-verifier")
    if not _VERIFIER.match(verifier) or not secrets.compare_digest(_s256(verifier), row.code_challenge):
        raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge", code="pkce-mismatch")
    if params.get("resource") and _resource(params) != row.resource:
        raise OAuthError("invalid_target", "resource differs from the authorization request's",
                         code="resource-mismatch")
    with transaction(broker.engine) as db:
        session = db.get(SessionRow, row.session_id)
    try:
        minted = _mint(broker, session, row.resource, row.access, client.client_id, row.approval_id)
    except OAuthError:
        # Refused (the person lost the permission since consenting, a budget...): the code is spent
        # and nothing else can use its session, so it ends rather than idles to its deadline.
        _end(broker, row.session_id if session is not None and session.status == "active" else None, "token-refused")
        raise
    assert session is not None
    with transaction(broker.engine) as db:
        refresh_token = _new_refresh(db, broker, session, client.client_id, row.resource, row.access, row.scope)
    return answer(minted, row.scope, refresh_token)


def refresh(broker: Broker, client: OAuthClient, params: dict[str, list[str]]) -> dict[str, Any]:
    token = one(params, "refresh_token", required=True)
    assert token is not None
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.exec(select(OAuthRefreshToken).where(OAuthRefreshToken.token_hash == _digest(token))
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
        _end(broker, row.session_id, "refresh-token-replayed")
        raise OAuthError("invalid_grant", "the refresh token was already used; the grant is revoked",
                         code="refresh-token-reused")
    if params.get("resource") and _resource(params) != row.resource:
        raise OAuthError("invalid_target", "a refresh token is good for its own resource only",
                         code="resource-mismatch")
    asked = one(params, "scope")
    if asked is not None and not frozenset(asked.split()) - _IGNORED_SCOPES <= frozenset(row.scope.split()):
        raise OAuthError("invalid_scope", "a refresh cannot widen the scope; authorize again", code="scope-widening")
    minted = _mint(broker, session, row.resource, row.access, client.client_id)
    assert session is not None
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
            row = db.get(OAuthRefreshToken, _digest(token))
            if row is None:
                return
            if row.client_id != client.client_id:
                raise _not_yours()
            for sibling in db.exec(select(OAuthRefreshToken).where(OAuthRefreshToken.family == row.family)).all():
                sibling.status = "revoked"
                db.add(sibling)
            session_id = row.session_id
        _end(broker, session_id, "refresh-token-revoked")
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
