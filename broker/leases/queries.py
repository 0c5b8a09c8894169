"""Reading capabilities back (never their credentials) and answering introspection."""

from __future__ import annotations

from sqlmodel import col, select

from broker.db import transaction, utcnow
from broker.errors import Forbidden, InvalidRequest, NotFound, Unauthenticated
from broker.identity.access import managed_by, may_manage
from broker.identity.callers import Caller
from broker.ids import is_capability_id, is_session_id
from broker.leases import receipts
from broker.leases.outcomes import Introspection
from broker.leases.receipts import RevocationReceipt
from broker.leases.revocation import revoke_leases
from broker.leases.vocabulary import LeaseStatus
from broker.models import Lease, SessionRow
from broker.runtime import Broker


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


def revoke(broker: Broker, caller: Caller, capability_id: str) -> tuple[Lease, RevocationReceipt]:
    """Revoke now; the lease as it is afterwards, and the receipt of what happened to its credential."""
    _visible(broker, caller, capability_id)
    summary = revoke_leases(broker, [capability_id], reason="revoked-by-" + caller.kind, actor=caller.principal)
    lease = _visible(broker, caller, capability_id)
    return lease, summary.receipts.get(capability_id) or receipts.untouched(lease)


def list_for(broker: Broker, caller: Caller, session_id: str | None, status: str | None, limit: int) -> list[Lease]:
    if status is not None and status not in set(LeaseStatus):
        raise InvalidRequest(f"status must be one of {', '.join(LeaseStatus)}", code="invalid-status")
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


def introspect(broker: Broker, token: str) -> Introspection:
    """RFC 7662: anything but a live, unrevoked, unexpired native token is just inactive."""
    try:
        claims = broker.keyring.verify(token, audience=None, issuer=broker.settings.issuer, token_use="capability")  # noqa: S106  # the token's kind, not a secret
    except Unauthenticated:
        return Introspection(active=False)
    with transaction(broker.engine) as db:
        lease = db.get(Lease, str(claims.get("jti")))
        if lease is None or lease.status != LeaseStatus.ACTIVE or lease.expires_at <= utcnow():
            return Introspection(active=False)
    cnf = claims.get("cnf")  # RFC 9449 section 6.2: the key the token is bound to
    return Introspection(active=True, token_type="DPoP" if cnf else "Bearer", cnf=cnf or None,
                         **{k: claims.get(k) for k in _CLAIMS})


_CLAIMS = ("scope", "sub", "act", "aud", "iss", "exp", "iat", "jti", "sid")
