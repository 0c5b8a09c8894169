"""What the policy's evaluator is told about a session and a backend, for a real request, a
dry run (`policy explain`) and a grant's check alike."""

from __future__ import annotations

from typing import Any

from sqlmodel import Session, col, select

from broker.leases.vocabulary import LIVE
from broker.models import Lease, SessionRow
from broker.policy import BoundsLookup, ScopeEntry, SessionFacts, TtlBounds
from broker.runtime import Broker


def session_facts(db: Session, session: SessionRow) -> SessionFacts:
    tiers = db.exec(
        select(Lease.tier).where(Lease.session_id == session.id, col(Lease.status).in_(LIVE))
    ).all()
    return SessionFacts(
        session_id=session.id,
        human=session.human,
        agent=session.agent,
        task_id=session.task_id,
        scope=tuple(ScopeEntry(s["resource"], tuple(s["access"])) for s in session.scope),
        status=session.status,
        expires_at=session.expires_at,
        issued_count=session.issued_count,
        active_count=len(tiers),
        active_tiers=frozenset(tiers),
    )


def bounds_lookup(broker: Broker) -> BoundsLookup:
    def lookup(provider: str, resource: str, options: dict[str, Any]) -> TtlBounds:
        return broker.provider(provider).ttl_bounds(resource, options)

    return lookup
