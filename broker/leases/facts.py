"""What the policy's evaluator is told about a session and a backend, for a real request, a
dry run (`policy explain`) and a grant's check alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlmodel import Session, col, select

from broker.leases.vocabulary import LIVE
from broker.models import AnySession, Lease
from broker.policy import BoundsLookup, ScopeEntry, SessionFacts, TtlBounds
from broker.policy.compiled import CompiledPolicy
from broker.runtime import Broker
from broker.store.sql import sql_for


def session_facts(db: Session, session: AnySession, policies: Sequence[CompiledPolicy | None] | None = None) -> SessionFacts:
    """What the evaluator needs of the session. Given the policies that will judge it (current and
    shadow), the request path's case, the caller holds the session's row lock and the cost does
    not grow with the session's leases: the live count is `sessions.live_count` after folding in
    the session's rows of session_live_deltas (triggers on leases write them, 0009; few: what
    changed since the session's last request), and of the live tiers only the escalation tiers
    are looked up, one indexed EXISTS each (ix_leases_session_tier_status). Without policies
    (explain, grants: no lock, read only) every live lease is read, as before."""
    if policies is None:
        tiers = db.exec(select(Lease.tier).where(Lease.session_id == session.id, col(Lease.status).in_(LIVE))).all()
        active_count, active_tiers = len(tiers), frozenset(tiers)
    else:
        judged = [p for p in policies if p is not None]
        escalation = sorted(set().union(*(p.escalation_tiers for p in judged)))
        conn = db.connection()
        active_count, active_tiers = sql_for(conn).live_facts(conn, session.id, escalation)
    return SessionFacts(
        session_id=session.id,
        human=session.human,
        agent=session.agent,
        task_id=session.task_id,
        scope=tuple(ScopeEntry(s["resource"], tuple(s["access"])) for s in session.scope),
        status=session.status,
        expires_at=session.expires_at,
        issued_count=session.issued_count,
        active_count=active_count,
        active_tiers=active_tiers,
        suspended=session.suspended_at is not None,  # stall and deviation: broker/sessions/liveness.py, deviation.py
        idle_until=session.idle_until,
    )


def unchanging_facts(session: AnySession) -> SessionFacts:
    """The session as the one-call path decides on it: its facts that never change (who, the
    task, the scope, the end), as active with nothing issued or live. `Store.issue` checks the
    rest under the session's row lock, and writes nothing where they would change the answer."""
    return SessionFacts(
        session_id=session.id, human=session.human, agent=session.agent, task_id=session.task_id,
        scope=tuple(ScopeEntry(s["resource"], tuple(s["access"])) for s in session.scope),
        status="active", expires_at=session.expires_at,
    )


def bounds_lookup(broker: Broker) -> BoundsLookup:
    def lookup(provider: str, resource: str, options: dict[str, Any]) -> TtlBounds:
        return broker.provider(provider).ttl_bounds(resource, options)

    return lookup
