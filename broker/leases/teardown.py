"""Ending a session: close it, announce it (audit, CAEP), revoke everything it holds.

Here, below `sessions/`, because the request path ends sessions too (the deviation tripwire's
`end`); `broker.sessions.service` re-exports both names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlmodel import col, select

from broker import security_events
from broker.audit.events import AgentRef, AuditEvent, RequestRef
from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import NotFound
from broker.identity.access import may_manage
from broker.identity.callers import Caller
from broker.ids import is_session_id
from broker.leases.revocation import RevokeSummary, revoke_leases
from broker.leases.vocabulary import LIVE
from broker.models import Lease, SessionRow
from broker.runtime import Broker


def session_event(session: SessionRow, type_: str, outcome: str, actor: str, *, reason: str | None = None,
                  detail: dict[str, Any] | None = None) -> AuditEvent:
    return AuditEvent(
        type=type_,
        outcome=outcome,
        actor=actor,
        human_principal=session.human,
        agent=AgentRef.of(session),
        request=RequestRef(operation=type_, resource=session.repository, reason=reason),
        detail=dict(detail or {}),
    )


def end(
    broker: Broker, session_id: str, *, reason: str, actor: str, caller: Caller | None = None,
    only_if: Callable[[SessionRow], bool] | None = None,
) -> tuple[SessionRow, RevokeSummary]:
    """Idempotent: ending an ended session revokes whatever is still live and changes nothing else.
    `only_if`: checked under the row lock; false: nothing is done (the idle-timeout end)."""
    if not is_session_id(session_id):
        raise NotFound("no such session", code="session-not-found")
    now = utcnow()
    with transaction(broker.engine) as db:
        session = db.exec(select(SessionRow).where(SessionRow.id == session_id).with_for_update()).first()
        if session is None or (caller is not None and not may_manage(caller, session)):
            raise NotFound("no such session", code="session-not-found")
        if only_if is not None and not only_if(session):
            return session, RevokeSummary()
        if session.status == "active":
            session.status, session.ended_at, session.end_reason = "ended", now, reason[:128]
            db.add(session)
            append(db, session_event(session, "session.ended", "ended", actor, reason=reason))
            security_events.session_revoked(db, broker, session, reason=reason, actor=actor, now=now)
        live = list(db.exec(select(Lease.id).where(Lease.session_id == session_id, col(Lease.status).in_(LIVE))).all())
    summary = revoke_leases(broker, live, reason=f"session-ended:{reason}", actor=actor)
    return session, summary
