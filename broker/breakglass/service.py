"""Break-glass: request, approval, single use, and the post-review every use opens.

An access whose policy entry has `break_glass: {...}` (docs/approvals.md#break-glass) is reached
only this way, whatever its tier's control says:

1. The agent's request carries a written `justification`; without one it is refused
   (`break-glass-justification-required`, the policy's tier layer). With one it waits for an
   approval whose reason is `break-glass-required` (`broker.approvals`), announced loudly:
   audit `breakglass.requested`, the approval outbox, a Security Event Token.
2. `min_approvals` (at least two) distinct approvers named by `break_glass.approvers` must
   approve, or one who is a member of `break_glass.group`; the delegating human never may,
   whatever the tier's `allow_self_approval` says. Audit `breakglass.approved`.
3. The approval is single use (any approval is) and the capability lives at most
   `break_glass.max_ttl` (at most 15 minutes; the policy's time layer).
4. The mint under it opens a review (`breakglass_reviews`), audit `breakglass.used`, the outbox
   and a SET again. A reviewer (`break_glass.reviewers`, else its approvers) closes it with a
   verdict (`GET /v1/reviews`, `POST /v1/reviews/{id}/close`): audit `breakglass.reviewed`. An
   open review past `review_within` is overdue: `broker_breakglass_reviews_overdue` in /metrics,
   and one `breakglass.review-overdue` audit record (the sweeper).

This module imports nothing from `approvals.service` or `leases/`: they call it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from broker import security_events
from broker.approvals import outbox
from broker.audit.events import AgentRef, AuditEvent, GrantRef, RequestRef
from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import Conflict, Forbidden, NotFound
from broker.identity.callers import Caller
from broker.models import Approval, ApprovalDecision, BreakGlassReview, SessionRow
from broker.policy.approvers import named_approver
from broker.policy.compiled import CompiledPolicy
from broker.policy.models import BreakGlass
from broker.runtime import Broker
from broker.times import rfc3339

REASON = "break-glass-required"  # the approval's reason, set by the policy's tier layer
VERDICTS = ("appropriate", "inappropriate")


def rule_for(policy: CompiledPolicy, resource: str, access: str) -> BreakGlass | None:
    """The break-glass rule of (resource, access) in today's policy, or None."""
    rule = policy.match_resource(resource)
    found = rule.access.get(access) if rule is not None else None
    return found.break_glass if found is not None else None


def is_break_glass(approval: Approval) -> bool:
    return approval.reason == REASON


def _event(session: SessionRow, approval: Approval, type_: str, outcome: str, actor: str,
           detail: dict[str, Any]) -> AuditEvent:
    return AuditEvent(
        type=type_, outcome=outcome, actor=actor, human_principal=session.human, agent=AgentRef.of(session),
        request=RequestRef(operation=type_, tool=approval.tool, resource=approval.resource, access=approval.access,
                           tier=approval.tier, parameters=approval.parameters, purpose=approval.purpose),
        jit_grant=GrantRef(status=approval.status, approval_id=approval.id, ttl_seconds=approval.ttl_seconds),
        detail={"justification": approval.justification, **detail},
    )


def _announce(db: Session, broker: Broker, session: SessionRow, approval: Approval, stage: str,
              detail: dict[str, Any], now: datetime) -> None:
    body = {"session_id": session.id, "human": session.human, "agent": session.agent, "task_id": session.task_id,
            "approval_id": approval.id, "resource": approval.resource, "access": approval.access,
            "justification": approval.justification, "approvers": list(approval.approvers), **detail}
    outbox.enqueue(db, broker, f"breakglass.{stage}", body, now)
    security_events.breakglass(db, broker, session, stage=stage,
                               detail={"approval_id": approval.id, "resource": approval.resource,
                                       "access": approval.access, **detail}, now=now)


# --- called by broker.approvals.service -------------------------------------------------------------


def requested(db: Session, broker: Broker, session: SessionRow, approval: Approval, now: datetime) -> None:
    """A break-glass approval was opened: audit and notify, in its transaction."""
    append(db, _event(session, approval, "breakglass.requested", "pending_approval", f"agent:{session.agent}",
                      {"min_approvals": approval.min_approvals}))
    _announce(db, broker, session, approval, "requested", {}, now)


def required_votes(policy: CompiledPolicy, approval: Approval, approving: Sequence[tuple[str, frozenset[str]]],
                   required: int) -> int:
    """Votes needed: `required`, or 1 once an approver from the break-glass group approved."""
    rule = rule_for(policy, approval.resource, approval.access)
    if rule is None or rule.group is None:
        return required
    group = "group:" + rule.group
    for who, groups in approving:
        if named_approver(policy, [group], who, groups) is not None:
            return 1
    return required


def approved(db: Session, broker: Broker, session: SessionRow, approval: Approval, approvers: list[str],
             now: datetime) -> None:
    append(db, _event(session, approval, "breakglass.approved", "approved", "broker:breakglass",
                      {"approved_by": approvers}))
    _announce(db, broker, session, approval, "approved", {"approved_by": approvers}, now)


# --- called by the capability path, in the mint's transaction ---------------------------------------


def used(db: Session, broker: Broker, session: SessionRow, approval: Approval, capability_id: str,
         now: datetime) -> BreakGlassReview:
    """The capability is being minted under a break-glass approval: open its post-review."""
    rule = rule_for(broker.policies.current, approval.resource, approval.access)
    within = rule.review_within if rule is not None else 86400
    reviewers = list((rule.reviewers or rule.approvers) if rule is not None else approval.approvers)
    approvers = [d for d in (approval.decided_by,) if d]
    votes = db.exec(select(ApprovalDecision.approver).where(ApprovalDecision.approval_id == approval.id,
                                                            ApprovalDecision.decision == "approve")).all()
    approvers = sorted(set(votes) | set(approvers))
    review = BreakGlassReview(
        id="rev_" + secrets.token_hex(16), session_id=session.id, approval_id=approval.id,
        capability_id=capability_id, human=session.human, agent=session.agent, resource=approval.resource,
        access=approval.access, justification=approval.justification or "", approved_by=approvers,
        reviewers=reviewers, used_at=now, due_at=now + timedelta(seconds=within),
    )
    db.add(review)
    append(db, _event(session, approval, "breakglass.used", "used", f"agent:{session.agent}",
                      {"capability_id": capability_id, "review_id": review.id, "approved_by": approvers,
                       "review_due_at": rfc3339(review.due_at)}))
    _announce(db, broker, session, approval, "used",
              {"capability_id": capability_id, "review_id": review.id, "approved_by": approvers}, now)
    return review


# --- reviews ----------------------------------------------------------------------------------------


def _may_review(policy: CompiledPolicy, caller: Caller, review: BreakGlassReview) -> bool:
    if caller.kind == "admin":
        return True
    return caller.kind == "human" and named_approver(policy, review.reviewers, caller.name, caller.groups) is not None


def view(review: BreakGlassReview, now: datetime) -> dict[str, Any]:
    return {
        "review_id": review.id, "status": review.status, "overdue": review.status == "open" and review.due_at <= now,
        "session_id": review.session_id, "approval_id": review.approval_id, "capability_id": review.capability_id,
        "human": review.human, "agent": review.agent, "resource": review.resource, "access": review.access,
        "justification": review.justification, "approved_by": list(review.approved_by),
        "reviewers": list(review.reviewers), "used_at": review.used_at, "due_at": review.due_at,
        "verdict": review.verdict, "note": review.note, "closed_by": review.closed_by, "closed_at": review.closed_at,
    }


def list_reviews(broker: Broker, caller: Caller, status: str | None, limit: int) -> list[dict[str, Any]]:
    if caller.kind not in ("human", "admin"):
        raise Forbidden("post-reviews are for the reviewers the policy names")
    policy, now = broker.policies.current, utcnow()
    with transaction(broker.engine) as db:
        stmt = select(BreakGlassReview)
        if status:
            stmt = stmt.where(BreakGlassReview.status == status)
        rows = db.exec(stmt.order_by(col(BreakGlassReview.due_at)).limit(max(limit * 4, limit))).all()
    return [view(r, now) for r in rows if _may_review(policy, caller, r)][:limit]


def close(broker: Broker, caller: Caller, review_id: str, *, verdict: str, note: str | None) -> dict[str, Any]:
    """A named reviewer (or an admin) closes a review with a verdict; once."""
    if caller.kind not in ("human", "admin"):
        raise NotFound("no such review", code="review-not-found")
    policy, now = broker.policies.current, utcnow()
    with transaction(broker.engine) as db:
        review = db.exec(select(BreakGlassReview).where(BreakGlassReview.id == review_id).with_for_update()).first()
        if review is None or not _may_review(policy, caller, review):
            raise NotFound("no such review", code="review-not-found")
        if review.status != "open":
            raise Conflict("the review is already closed", code="review-closed")
        review.status, review.verdict, review.note = "closed", verdict, note
        review.closed_by, review.closed_at = caller.name, now
        db.add(review)
        session = db.get(SessionRow, review.session_id)
        approval = db.get(Approval, review.approval_id)
        if session is not None and approval is not None:
            append(db, _event(session, approval, "breakglass.reviewed", verdict, caller.principal,
                              {"review_id": review.id, "capability_id": review.capability_id, "verdict": verdict,
                               "note": note, "overdue": review.due_at <= now}))
        db.flush()
        return view(review, now)


def note_overdue(broker: Broker, now: datetime, limit: int) -> int:
    """The sweeper: one `breakglass.review-overdue` audit record per review that fell due."""
    noted = 0
    with transaction(broker.engine) as db:
        stmt = (select(BreakGlassReview)
                .where(BreakGlassReview.status == "open", col(BreakGlassReview.due_at) <= now,
                       col(BreakGlassReview.overdue_noted_at).is_(None))
                .limit(limit).with_for_update(skip_locked=True))
        for review in db.exec(stmt).all():
            review.overdue_noted_at = now
            db.add(review)
            session = db.get(SessionRow, review.session_id)
            approval = db.get(Approval, review.approval_id)
            if session is not None and approval is not None:
                append(db, _event(session, approval, "breakglass.review-overdue", "overdue", "broker:sweeper",
                                  {"review_id": review.id, "due_at": rfc3339(review.due_at)}))
            noted += 1
    return noted
