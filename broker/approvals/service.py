"""Approvals: a request of an approval tier waits, bound to its exact parameters, until the
humans the tier names decide it. The request side (open, redeem, mark used) is called from the
capability path inside its transaction; the human side reads, lists and decides.

Rules (each enforced here, in `approvers` and tested):

- approvers are those the tier names, checked against the policy in force at decision time as
  well as the list the request was shown, and must hold the access themselves (`approvers`);
- the delegating human may not approve their own agent's request unless the tier says
  `allow_self_approval: true` (they may always deny it: it is their authority being lent);
- a tier's `min_approvals` distinct people must approve; one person counts once;
- an approval expires (`BROKER_APPROVAL_TTL_SECONDS`), is used once, and binds the exact
  request: a hash over (session, resource, access, ttl, tool, parameters); deny is final.

Ids are no oracle: a caller who may not see an approval gets 404, as for one that is absent.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, or_, select

from broker.approvals import limits, outbox
from broker.approvals.approvers import approve_refusal, approver_live, deny_refusal, may_read
from broker.approvals.binding import LIVE, STATUSES, Binding, binding_message, effective_status
from broker.approvals.views import audit_event, contexts_for, decisions_for, notification, view
from broker.audit.service import append
from broker.breakglass import service as breakglass
from broker.db import transaction, utcnow
from broker.errors import Conflict, Denied, Forbidden, InvalidRequest, NotFound
from broker.identity.access import human_is
from broker.identity.callers import Caller
from broker.metrics import APPROVALS_OPENED, observe_approval_outcome
from broker.models import AnySession, Approval, ApprovalDecision, SessionRow
from broker.policy import approval_rule, named_approver
from broker.runtime import Broker

# --- the request side: called from the capability path, inside its transaction ---------------

def open_request(db: Session, broker: Broker, session: SessionRow, binding: Binding, *, tier: str, reason: str,
                 approvers: list[str], granted_ttl: int | None, purpose: str, now: datetime,
                 justification: str | None = None) -> tuple[Approval, bool]:
    """The approval this request waits on: the live one for the same binding, or a new one
    (audited by the caller, announced through the outbox). Returns (approval, created).

    Every approval is created here, so every path meets the same bounds (`limits`): agent text
    outside them is ApprovalTooLarge (422), one approval too many is ApprovalBudgetExceeded (429);
    either raises before anything is added to the transaction."""
    limits.check_request({"purpose": purpose, "tool": binding.tool, "resource": binding.resource,
                          "access": binding.access}, binding.parameters)
    request_hash = binding.request_hash()
    existing = db.exec(
        select(Approval).where(Approval.session_id == session.id, Approval.request_hash == request_hash,
                               col(Approval.status).in_(LIVE), col(Approval.expires_at) > now)
        .order_by(col(Approval.created_at).desc())
    ).first()
    if existing is not None:
        return existing, False  # asking twice does not page the approvers twice
    policy = broker.policies.current
    limits.check_budget(db, policy, session.id, approvers, now)
    rule = approval_rule(policy, tier)
    glass = breakglass.rule_for(policy, binding.resource, binding.access) if reason == breakglass.REASON else None
    approval = Approval(
        id="apr_" + secrets.token_hex(16),
        session_id=session.id,
        human=session.human,
        request_hash=request_hash,
        resource=binding.resource,
        access=binding.access,
        tier=tier,
        ttl_seconds=granted_ttl or 0,
        purpose=purpose,
        tool=binding.tool,
        parameters=binding.parameters,
        reason=reason,
        approvers=list(approvers),
        min_approvals=glass.min_approvals if glass is not None else rule.min_approvals,
        justification=justification if glass is not None else None,
        binding_message=binding_message(session, binding, tier, granted_ttl, purpose),
        created_at=now,
        expires_at=min(now + timedelta(seconds=broker.settings.approval_ttl_seconds), session.expires_at),
    )
    db.add(approval)
    APPROVALS_OPENED.labels(tier=approval.tier or "none").inc()
    outbox.enqueue(db, broker, "approval.requested", notification(broker, approval, session, [], now), now)
    if glass is not None:
        breakglass.requested(db, broker, session, approval, now)  # loud: audit, outbox, SET
    return approval, True


def redeem(db: Session, approval_id: str, session: AnySession, binding: Binding, now: datetime) -> Approval:
    """The approval a re-submitted request names, locked, checked to be usable for exactly it.
    The caller marks it used (`mark_used`) only if the request is then allowed."""
    approval = db.exec(select(Approval).where(Approval.id == approval_id).with_for_update()).first()
    if approval is None or approval.session_id != session.id:
        raise NotFound("no such approval for this session", code="approval-not-found")
    if approval.request_hash != binding.request_hash():
        raise Conflict("the approval was given for a different request (resource, access, ttl, tool or parameters "
                       "changed); ask again without approval_id to get a new one", code="approval-mismatch")
    status = effective_status(approval, session, now)
    if status == "used":
        raise Conflict("this approval was already used; each approval mints one capability", code="approval-used")
    if status == "denied":
        raise Denied("this request was denied by an approver; a denial is final", code="approval-denied",
                     decided_by=approval.decided_by, decision_reason=approval.decision_reason)
    if status == "expired":
        raise Conflict("the approval expired; ask again without approval_id", code="approval-expired")
    if status == "pending":
        raise Conflict("the approval is still pending; wait on GET /v1/approvals/{id}?wait=30", code="approval-pending")
    return approval


def mark_used(db: Session, approval: Approval, capability_id: str | None, now: datetime) -> None:
    approval.status, approval.used_at, approval.capability_id = "used", now, capability_id
    db.add(approval)
    observe_approval_outcome(approval, "used", now)


# --- the human side: read, list, decide ---------------------------------------------------------

def get(broker: Broker, caller: Caller, approval_id: str) -> dict[str, Any]:
    now = utcnow()
    policy = broker.policies.current
    with transaction(broker.engine) as db:
        approval = db.get(Approval, approval_id)
        session = db.get(SessionRow, approval.session_id) if approval else None
        if approval is None or session is None or not may_read(policy, caller, approval, session):
            raise NotFound("no such approval", code="approval-not-found")
        return view(approval, session, decisions_for(db, [approval.id])[approval.id], now, policy=policy, caller=caller,
                    context=contexts_for(db, policy, [approval], now)[approval.id])


def list_for(broker: Broker, caller: Caller, status: str | None, limit: int) -> list[dict[str, Any]]:
    if status is not None and status not in STATUSES:
        raise InvalidRequest(f"status must be one of {', '.join(STATUSES)}", code="invalid-status")
    now = utcnow()
    policy = broker.policies.current
    with transaction(broker.engine) as db:
        stmt = select(Approval, SessionRow).join(SessionRow, col(SessionRow.id) == col(Approval.session_id))
        if caller.kind == "agent":
            stmt = stmt.where(Approval.session_id == caller.session_id)
        elif caller.kind == "orchestrator":
            stmt = stmt.where(SessionRow.created_by == caller.name)
        elif caller.kind == "human":
            # Their own sessions, and what a tier names them for (checked exactly below).
            tiers = [t for t in policy.tiers if named_approver(policy, approval_rule(policy, t).approvers,
                                                               caller.name, caller.groups)]
            stmt = stmt.where(or_(human_is(caller.name), col(Approval.tier).in_(tiers)))
        if status == "pending" or status == "approved":
            stmt = stmt.where(Approval.status == status, col(Approval.expires_at) > now,
                              SessionRow.status == "active")
        elif status == "expired":
            stmt = stmt.where(or_(Approval.status == "expired",
                                  col(Approval.status).in_(LIVE) & (col(Approval.expires_at) <= now),
                                  col(Approval.status).in_(LIVE) & (SessionRow.status != "active")))
        elif status is not None:
            stmt = stmt.where(Approval.status == status)
        rows = [(a, s) for a, s in db.exec(stmt.order_by(col(Approval.created_at).desc()).limit(limit)).all()
                if may_read(policy, caller, a, s)]
        decisions = decisions_for(db, [a.id for a, _ in rows])
        contexts = contexts_for(db, policy, [a for a, _ in rows], now)
        return [view(a, s, decisions[a.id], now, policy=policy, caller=caller, context=contexts[a.id]) for a, s in rows]


def decide(broker: Broker, caller: Caller, approval_id: str, decision: str, reason: str | None,
           *, shown_hash: str | None = None) -> dict[str, Any]:
    """Approve or deny. One transaction: the vote, the status, the audit record, the outbox.
    `shown_hash`: the request hash the person's screen showed; another one decides nothing."""
    assert decision in ("approve", "deny")  # noqa: S101  # the route's schema admits only these two
    if caller.kind != "human":
        raise Forbidden("only humans decide approvals (the local admin is not a person the policy names)",
                        code="approver-must-be-human")
    policy = broker.policies.current
    live = None
    if decision == "approve":
        with transaction(broker.engine) as db:
            target = db.get(Approval, approval_id)
        if target is not None:
            live = approver_live(broker, policy, caller.name, target.resource, target.access)
    now = utcnow()
    with transaction(broker.engine) as db:
        approval = db.exec(select(Approval).where(Approval.id == approval_id).with_for_update()).first()
        session = db.get(SessionRow, approval.session_id) if approval else None
        if approval is None or session is None or not may_read(policy, caller, approval, session):
            raise NotFound("no such approval", code="approval-not-found")
        status = effective_status(approval, session, now)
        if status != "pending":
            code = "approval-expired" if status == "expired" else "approval-not-pending"
            raise Conflict(f"the approval is {status}; only a pending approval can be decided", code=code,
                           status_now=status)
        if shown_hash is not None and shown_hash != approval.request_hash:
            raise Conflict("the request you were shown is not this approval's request (its request_hash differs); "
                           "reload it and read it again", code="approval-binding-mismatch",
                           request_hash=approval.request_hash)
        votes = decisions_for(db, [approval.id])[approval.id]
        if any(v.approver == caller.name for v in votes):
            raise Conflict("you already decided this approval; another approver must add theirs",
                           code="already-decided")
        refusal = (approve_refusal(policy, caller, approval, session, live, ask_live=True) if decision == "approve"
                   else deny_refusal(policy, caller, approval, session))
        if refusal is not None:
            raise refusal
        vote = ApprovalDecision(approval_id=approval.id, approver=caller.name, decision=decision,
                                reason=reason, decided_at=now)
        db.add(vote)
        votes.append(vote)
        approvals = sum(1 for v in votes if v.decision == "approve")
        required = max(approval.min_approvals, approval_rule(policy, approval.tier).min_approvals)
        if breakglass.is_break_glass(approval):  # one member of the break-glass group suffices
            required = breakglass.required_votes(
                policy, approval, [(v.approver, caller.groups if v.approver == caller.name else frozenset())
                                   for v in votes if v.decision == "approve"], required)
        if decision == "deny":
            approval.status, outcome = "denied", "denied"
        elif approvals >= required:
            approval.status, outcome = "approved", "approved"
            # The agent gets a full window to use it from now (never past its session).
            approval.expires_at = min(now + timedelta(seconds=broker.settings.approval_ttl_seconds),
                                      session.expires_at)
        else:
            outcome = "approval_recorded"
        if approval.status != "pending":
            approval.decided_by, approval.decided_at, approval.decision_reason = caller.name, now, reason
            observe_approval_outcome(approval, "decided", now)
        db.add(approval)
        append(db, audit_event(approval, session, "approval.decided", outcome, caller.principal, {
            "approval_id": approval.id, "decided_by": caller.name, "decision": decision, "reason": reason,
            "approvals": approvals, "required": required, "request_hash": approval.request_hash,
        }))
        if approval.status != "pending":
            outbox.enqueue(db, broker, "approval.decided", notification(broker, approval, session, votes, now), now)
        if approval.status == "approved" and breakglass.is_break_glass(approval):
            breakglass.approved(db, broker, session, approval, [v.approver for v in votes if v.decision == "approve"],
                                now)
        return view(approval, session, votes, now, policy=policy, caller=caller,
                    context=contexts_for(db, policy, [approval], now)[approval.id])
