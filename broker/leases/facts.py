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
    shadow), the cost is bounded by the policies, not by the session's leases: the live count is
    counted only up to the largest `max_active_per_session` (the budget compares against it;
    past it the count says "at the limit"), and of the live tiers only the escalation tiers are
    looked up, one indexed EXISTS each (ix_leases_session_tier_status), all in one statement.
    Without policies (explain, grants) every live lease is read, as before."""
    if policies is None:
        tiers = db.exec(select(Lease.tier).where(Lease.session_id == session.id, col(Lease.status).in_(LIVE))).all()
        active_count, active_tiers = len(tiers), frozenset(tiers)
    else:
        judged = [p for p in policies if p is not None]
        caps = [p.max_active_per_session for p in judged if p.max_active_per_session is not None]
        escalation = sorted(set().union(*(p.escalation_tiers for p in judged)))
        # One round trip: the bounded count and one EXISTS per escalation tier.
        params: dict[str, Any] = {"s": session.id, "cap": max(caps) if caps else 0}
        params.update({f"t{i}": tier for i, tier in enumerate(escalation)})
        row = db.connection().execute(_facts_statement(bool(caps), len(escalation)), params).one()
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
    )


_LIVE_STATUSES = ", ".join(f"'{status}'" for status in LIVE)
_LIVE_UP_TO = (f"(SELECT count(*) FROM (SELECT 1 FROM leases WHERE session_id = :s AND status IN ({_LIVE_STATUSES}) "
               "LIMIT :cap) AS live)")
_LIVE_TIER = ("EXISTS (SELECT 1 FROM leases WHERE session_id = :s AND tier = :t{i} AND status IN "
              f"({_LIVE_STATUSES}))")


@functools.lru_cache(maxsize=64)
def _facts_statement(capped: bool, tiers: int) -> TextClause:
    """Built once per shape (the policies change it only on reload), not on every request."""
    columns = [_LIVE_UP_TO if capped else "0"] + [_LIVE_TIER.format(i=i) for i in range(tiers)]
    return text("SELECT " + ", ".join(columns))


def bounds_lookup(broker: Broker) -> BoundsLookup:
    def lookup(provider: str, resource: str, options: dict[str, Any]) -> TtlBounds:
        return broker.provider(provider).ttl_bounds(resource, options)

    return lookup
