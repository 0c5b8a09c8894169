"""Deviation: an agent that keeps asking for what is outside its task is stopped.

The policy's `deviation: {refusals: N, window: 10m, action: suspend|end}` counts the session's
refusals whose reason is one of `COUNTED` (scope, tier) over a sliding window. The
Nth within the window trips it, in the transaction of that refusal:

This module is the tripwire, called from the request path; lifting a suspension is
`broker/sessions/deviation.py`.

- `suspend`: `sessions.suspended_at` is set. The policy's session layer then refuses every new
  capability (`session-suspended`) until the session's human or an admin resumes it
  (`POST /v1/sessions/{id}/resume`, `broker-cli sessions resume`). Capabilities already held
  stay until they expire or are revoked; a suspension is a hold, not a teardown.
- `end`: the session is ended through the ordinary end (receipts, webhook, CAEP), reason
  `deviation`, right after the refusal commits.

Either way the audit gets `session.suspended` (or `session.deviation-tripped` then
`session.ended`) naming the refusals that caused it, the approval outbox announces
`session.suspended` / `session.deviation-tripped` to the delegating human and the approvers,
and the counted refusals are cleared, so a resumed session starts a fresh window.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, update
from sqlmodel import Session, col, select

from broker.approvals import outbox
from broker.audit.service import append
from broker.leases.teardown import end, session_event
from broker.leases.vocabulary import CapabilityAsk
from broker.models import AnySession, SessionRefusal, SessionRow
from broker.policy import Decision
from broker.runtime import Broker
from broker.times import rfc3339

log = logging.getLogger("broker.sessions.deviation")

# The refusals that count: the agent asked outside its task's scope, above its tier ceiling, for a
# denied tier, or for a break-glass access without a justification. Budget, ttl and
# human-permission refusals are the broker's limits, not deviation. Escalation does not refuse (it
# asks for approval); a human's denial of an escalation approval is not counted yet.
COUNTED = frozenset({"outside-task-scope", "tier-denied", "agent-ceiling", "break-glass-justification-required"})
END_REASON = "deviation"


def _approvers(broker: Broker) -> list[str]:
    policy = broker.policies.current
    return sorted({a for tier in policy.tiers.values() for a in (tier.approvers or ())})


def _announce(db: Session, broker: Broker, session: AnySession, type_: str, refusals: list[dict[str, Any]],
              action: str, now: datetime) -> None:
    outbox.enqueue(db, broker, type_, {
        "session_id": session.id, "human": session.human, "agent": session.agent, "task_id": session.task_id,
        "action": action, "refusals": refusals, "notify": [f"user:{session.human}", *_approvers(broker)],
    }, now)


def note_refusal(db: Session, broker: Broker, session: AnySession, ask: CapabilityAsk, decision: Decision,
                 now: datetime) -> str | None:
    """In the refusal's transaction, under the session's row lock: count it; trip the wire on the
    Nth in the window. Returns the action taken ("suspend" | "end"), or None. On "end" the caller
    ends the session (`end_tripped`) after its transaction commits."""
    rules = broker.policies.current.deviation
    if rules is None or decision.reason not in COUNTED or session.suspended_at is not None:
        return None
    db.add(SessionRefusal(session_id=session.id, reason=decision.reason, resource=ask.resource[:512],
                          access=ask.access[:64], at=now))
    db.flush()
    since = now - timedelta(seconds=rules.window)
    db.exec(delete(SessionRefusal).where(col(SessionRefusal.session_id) == session.id,
                                         col(SessionRefusal.at) < since))
    counted = list(db.exec(select(SessionRefusal).where(SessionRefusal.session_id == session.id)
                           .order_by(col(SessionRefusal.at), col(SessionRefusal.id))).all())
    if len(counted) < rules.refusals:
        return None
    refusals = [{"reason": r.reason, "resource": r.resource, "access": r.access, "at": rfc3339(r.at)}
                for r in counted]
    db.exec(delete(SessionRefusal).where(col(SessionRefusal.session_id) == session.id))
    row = session if isinstance(session, SessionRow) else session.row()
    detail = {"refusals": refusals, "threshold": rules.refusals, "window_seconds": rules.window,
              "action": rules.action}
    if rules.action == "suspend":
        db.exec(update(SessionRow).where(col(SessionRow.id) == session.id)
                .values(suspended_at=now, suspend_reason=END_REASON))
        append(db, session_event(row, "session.suspended", "suspended", "broker:deviation", reason=END_REASON,
                                 detail=detail))
        _announce(db, broker, session, "session.suspended", refusals, "suspend", now)
    else:
        append(db, session_event(row, "session.deviation-tripped", "tripped", "broker:deviation",
                                 reason=END_REASON, detail=detail))
        _announce(db, broker, session, "session.deviation-tripped", refusals, "end", now)
    log.warning("deviation tripwire: session %s, %d refusals, %s", session.id, len(refusals), rules.action)
    return rules.action


def end_tripped(broker: Broker, session_id: str, action: str | None) -> None:
    """After the tripping refusal committed: end the session if the policy says `end`."""
    if action == "end":
        end(broker, session_id, reason=END_REASON, actor="broker:deviation")
