"""What the policy's evaluator is told about a session and a backend, for a real request, a
dry run (`policy explain`) and a grant's check alike."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import TextClause, text
from sqlmodel import Session, col, select

from broker.leases.vocabulary import LIVE
from broker.models import AnySession, Lease
from broker.policy import BoundsLookup, ScopeEntry, SessionFacts, TtlBounds
from broker.policy.compiled import CompiledPolicy
from broker.runtime import Broker


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
        params: dict[str, Any] = {"s": session.id}
        params.update({f"t{i}": tier for i, tier in enumerate(escalation)})
        conn = db.connection()
        if conn.dialect.name == "postgresql":
            # One round trip: fold the deltas, read the count, one EXISTS per escalation tier.
            row = conn.execute(_facts_statement(len(escalation)), params).one()
        else:  # SQLite: writers are serialised, so three statements see one state
            conn.execute(_SQLITE_FOLD, params)
            conn.execute(_SQLITE_CLEAR, params)
            row = conn.execute(_sqlite_facts_statement(len(escalation)), params).one()
        active_count = int(row[0])
        active_tiers = frozenset(tier for tier, held in zip(escalation, row[1:], strict=True) if held)
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


_LIVE_STATUSES = ", ".join(f"'{status}'" for status in LIVE)
# The session's deltas are deleted and added to its count in the statement that reads it. A
# delta of a transaction still running is not visible, and neither is its lease's new status: it
# is folded by a later request.
_FOLD = ("WITH d AS (DELETE FROM session_live_deltas WHERE session_id = :s RETURNING delta), "
         "u AS (UPDATE sessions SET live_count = live_count + (SELECT coalesce(sum(delta), 0) FROM d) "
         "WHERE id = :s RETURNING live_count) ")
_SQLITE_FOLD = text("UPDATE sessions SET live_count = live_count + "
                    "(SELECT coalesce(sum(delta), 0) FROM session_live_deltas WHERE session_id = :s) WHERE id = :s")
_SQLITE_CLEAR = text("DELETE FROM session_live_deltas WHERE session_id = :s")
_LIVE_TIER = ("EXISTS (SELECT 1 FROM leases WHERE session_id = :s AND tier = :t{i} AND status IN "  # noqa: S608  # composed from module constants only; values are bound parameters
              f"({_LIVE_STATUSES}))")


@functools.lru_cache(maxsize=64)
def _facts_statement(tiers: int) -> TextClause:
    """Built once per shape (the policies change it only on reload), not on every request."""
    columns = ["(SELECT live_count FROM u)"] + [_LIVE_TIER.format(i=i) for i in range(tiers)]
    return text(_FOLD + "SELECT " + ", ".join(columns))


@functools.lru_cache(maxsize=64)
def _sqlite_facts_statement(tiers: int) -> TextClause:
    columns = ["(SELECT live_count FROM sessions WHERE id = :s)"] + [_LIVE_TIER.format(i=i) for i in range(tiers)]
    return text("SELECT " + ", ".join(columns))


def bounds_lookup(broker: Broker) -> BoundsLookup:
    def lookup(provider: str, resource: str, options: dict[str, Any]) -> TtlBounds:
        return broker.provider(provider).ttl_bounds(resource, options)

    return lookup
