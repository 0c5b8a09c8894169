"""Reading capabilities back (never their credentials) and answering introspection."""

from __future__ import annotations

from typing import Any

from sqlmodel import col, select

from broker.db import transaction, utcnow
from broker.errors import Forbidden, NotFound, Unauthenticated
from broker.identity.callers import Caller
from broker.ids import is_capability_id, is_session_id
from broker.leases.revocation import RevokeSummary, revoke_leases
from broker.models import Lease, SessionRow
from broker.runtime import Broker
from broker.sessions.service import managed_by, may_manage

STATUSES = ("minting", "active", "revoke_pending", "revoked", "expired", "failed")


def view(lease: Lease) -> dict[str, Any]:
    return {
        "capability_id": lease.id,
        "session_id": lease.session_id,
        "status": lease.status,
        "resource": lease.resource,
        "access": lease.access,
        "tier": lease.tier,
        "provider": lease.provider,
        "created_at": lease.created_at,
        "expires_at": lease.expires_at,
        "ended_at": lease.ended_at,
        "status_reason": lease.status_reason,
        "credential_fingerprint": lease.fingerprint,
        "revoke_attempts": lease.revoke_attempts,
    }


def _visible(broker: Broker, caller: Caller, capability_id: str) -> Lease:
    if not is_capability_id(capability_id):
        raise NotFound("no such capability", code="capability-not-found")
    with transaction(broker.engine) as db:
        lease = db.get(Lease, capability_id)
        session = db.get(SessionRow, lease.session_id) if lease else None
        if lease is None or session is None or not may_manage(caller, session):
            raise NotFound("no such capability", code="capability-not-found")
        return lease


def get(broker: Broker, caller: Caller, capability_id: str) -> Lease:
    return _visible(broker, caller, capability_id)


def revoke(broker: Broker, caller: Caller, capability_id: str) -> tuple[Lease, RevokeSummary]:
    _visible(broker, caller, capability_id)
    summary = revoke_leases(broker, [capability_id], reason="revoked-by-" + caller.kind, actor=caller.principal)
    return _visible(broker, caller, capability_id), summary


def list_for(broker: Broker, caller: Caller, session_id: str | None, status: str | None, limit: int) -> list[Lease]:
    if status is not None and status not in STATUSES:
        from broker.errors import InvalidRequest

        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid-status")
    if caller.kind == "agent":
        if session_id not in (None, caller.session_id):
            raise Forbidden("an agent sees its own session only")
        session_id = caller.session_id
    with transaction(broker.engine) as db:
        stmt = select(Lease)
        if session_id:
            session = db.get(SessionRow, session_id) if is_session_id(session_id) else None
            if session is None or not may_manage(caller, session):
                raise NotFound("no such session", code="session-not-found")
            stmt = stmt.where(Lease.session_id == session_id)
        elif (scope := managed_by(caller, "an agent sees its own session only")) is not None:
            stmt = stmt.join(SessionRow, col(SessionRow.id) == col(Lease.session_id)).where(scope)
        if status:
            stmt = stmt.where(Lease.status == status)
        return list(db.exec(stmt.order_by(col(Lease.created_at).desc()).limit(limit)).all())


def introspect(broker: Broker, token: str) -> dict[str, Any]:
    """RFC 7662: anything but a live, unrevoked, unexpired native token is just inactive."""
    try:
        claims = broker.keyring.verify(token, audience=None, issuer=broker.settings.issuer, token_use="capability")
    except Unauthenticated:
        return {"active": False}
    with transaction(broker.engine) as db:
        lease = db.get(Lease, str(claims.get("jti")))
        if lease is None or lease.status != "active" or lease.expires_at <= utcnow():
            return {"active": False}
    answer = {
        "active": True,
        "token_type": "DPoP" if claims.get("cnf") else "Bearer",
        "scope": claims.get("scope"),
        "sub": claims.get("sub"),
        "act": claims.get("act"),
        "aud": claims.get("aud"),
        "iss": claims.get("iss"),
        "exp": claims.get("exp"),
        "iat": claims.get("iat"),
        "jti": claims.get("jti"),
        "sid": claims.get("sid"),
    }
    if claims.get("cnf"):
        answer["cnf"] = claims["cnf"]  # RFC 9449 section 6.2: the key the token is bound to
    return answer
