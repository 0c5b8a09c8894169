"""Deviation: lifting a suspension the tripwire (`broker/leases/deviation.py`) put on a session."""

from __future__ import annotations

from sqlmodel import select

from broker.audit.service import append
from broker.db import transaction
from broker.errors import Conflict, NotFound
from broker.identity.access import may_manage
from broker.identity.callers import Caller
from broker.ids import is_session_id
from broker.models import SessionRow
from broker.runtime import Broker
from broker.sessions.service import session_event
from broker.times import rfc3339


def resume(broker: Broker, caller: Caller, session_id: str, *, reason: str | None) -> SessionRow:
    """Its human or an admin lifts the suspension; audited (`session.resumed`)."""
    if caller.kind not in ("human", "admin") or not is_session_id(session_id):
        # Agents (even the session's own) and orchestrators may not lift what holds the agent.
        raise NotFound("no such session", code="session-not-found")
    with transaction(broker.engine) as db:
        session = db.exec(select(SessionRow).where(SessionRow.id == session_id).with_for_update()).first()
        if session is None or not may_manage(caller, session):
            raise NotFound("no such session", code="session-not-found")
        if session.status != "active":
            raise Conflict("the session has ended; there is nothing to resume", code="session-ended")
        if session.suspended_at is None:
            raise Conflict("the session is not suspended", code="session-not-suspended")
        held_since = session.suspended_at
        session.suspended_at, session.suspend_reason = None, None
        db.add(session)
        append(db, session_event(session, "session.resumed", "resumed", caller.principal, reason=reason,
                                 detail={"suspended_at": rfc3339(held_since), "reason": reason}))
        db.flush()
        db.refresh(session)
        return session
