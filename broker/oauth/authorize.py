"""Authorization code + PKCE for MCP clients: the request, the person's consent, the code, the refresh.

The story, top to bottom (docs/mcp.md draws it); steps 1 and 2 are here, 3 and 4 in `tokens`:

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
from broker.models import Approval, OAuthAuthorization, SessionRow
from broker.oauth.clients import ClientDirectory
from broker.oauth.errors import OAuthError
from broker.oauth.form import one
from broker.oauth.tokens import capability_ask, end_session
from broker.oauth.vocabulary import choose_access, client_label, digest, issuer, one_resource
from broker.runtime import Broker
from broker.sessions import service as sessions
from broker.times import rfc3339

CONSENT_PATH = "/console/oauth/authorize"
KEEP_ANSWERED = timedelta(hours=1)
_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")
_AUTHZ_ID = re.compile(r"^az_[0-9a-f]{32}$")


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
        resource = one_resource(params)
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
    row: OAuthAuthorization | None = db.exec(stmt.with_for_update() if lock else stmt).first()
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
        row.status, row.code_hash, row.approval_id = "approved", digest(code), approval_id
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
                assert approval is not None  # noqa: S101  # type narrowing: a status other than missing has its approval
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
            end_session(broker, row.session_id, "authorization-denied")  # nothing will ever be minted in it
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
        outcome = request_capability(broker, caller, capability_ask(row.resource, row.access, row.client_id), None)
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
