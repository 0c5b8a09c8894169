"""Approvals: a request of an approval tier waits, bound to its exact parameters, until the
humans the tier names decide it.

Rules (each enforced here and tested):

- approvers are those the tier names (`group:<name>`, `user:<email>` or an email), checked
  against the policy in force at decision time as well as the list the request was shown;
- the approver must hold the access themselves (the evaluator's human layer, for them);
- the delegating human may not approve their own agent's request unless the tier says
  `allow_self_approval: true` (they may always deny it: it is their authority being lent);
- a tier's `min_approvals` distinct people must approve; one person counts once;
- an approval expires (`BROKER_APPROVAL_TTL_SECONDS`), is used once, and binds the exact
  request: a hash over (session, resource, access, ttl, tool, parameters); deny is final.

Ids are no oracle: a caller who may not see an approval gets 404, as for one that is absent.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, or_, select

from broker.approvals import limits, outbox, summary
from broker.audit.events import AgentRef, AuditEvent, GrantRef, RequestRef
from broker.audit.service import append
from broker.breakglass import service as breakglass
from broker.db import transaction, utcnow
from broker.errors import BrokerError, Conflict, Denied, Forbidden, InvalidRequest, NotFound
from broker.identity.access import human_is
from broker.identity.callers import Caller
from broker.identity.principals import same_principal
from broker.metrics import APPROVALS_OPENED, observe_approval_outcome
from broker.models import AnySession, Approval, ApprovalDecision, AuditRecord, Lease, SessionRow
from broker.permissions.service import needs_live_answer
from broker.policy import (
    CompiledPolicy,
    LivePermission,
    approval_rule,
    approver_permission,
    human_permission,
    named_approver,
)
from broker.runtime import Broker
from broker.times import rfc3339

STATUSES = ("pending", "approved", "denied", "expired", "used")
LIVE = ("pending", "approved")
MAX_PARAMETERS_IN_MESSAGE = 240


@dataclass(frozen=True)
class Binding:
    """What an approval is bound to. Any field changed is another request."""

    session_id: str
    resource: str
    access: str
    ttl_seconds: int | None  # as requested (None: the tier's maximum)
    tool: str | None
    parameters: dict[str, Any] | None

    def request_hash(self) -> str:
        return summary.request_hash({"session_id": self.session_id, "resource": self.resource, "access": self.access,
                                     "ttl_seconds": self.ttl_seconds, "tool": self.tool,
                                     "parameters": self.parameters})


def binding_message(session: SessionRow, binding: Binding, tier: str, granted_ttl: int | None, purpose: str) -> str:
    ttl = f"{granted_ttl}s" if granted_ttl else "the tier's maximum"
    text = (f"{session.agent} (task {session.task_id}, delegated by {session.human}) asks {binding.access} on "
            f"{binding.resource} [{tier}] for {ttl}")
    if binding.tool:
        text += f" via {binding.tool}"
    if binding.parameters:
        params = json.dumps(binding.parameters, sort_keys=True, separators=(",", ":"))
        if len(params) > MAX_PARAMETERS_IN_MESSAGE:
            params = params[:MAX_PARAMETERS_IN_MESSAGE] + "..."
        text += f" with {params}"
    return f"{text}; purpose: {purpose[:200]}. Binding {summary.binding_code(binding.request_hash())}."


def effective_status(approval: Approval, session: AnySession | None, now: datetime) -> str:
    """Expiry is read, not swept: a live approval past its time (or its session's) is expired."""
    if approval.status in LIVE and (approval.expires_at <= now or session is None or session.status != "active"
                                    or session.expires_at <= now):
        return "expired"
    return approval.status


def _is_delegator(caller: Caller, session: SessionRow) -> bool:
    return caller.kind == "human" and same_principal(caller.name, session.human)


def _named(policy: CompiledPolicy, approval: Approval, caller: Caller) -> str | None:
    """The entry naming the caller, in both the list the request was shown and today's policy."""
    if caller.kind != "human":
        return None
    shown = named_approver(policy, approval.approvers, caller.name, caller.groups)
    if shown is None:
        return None
    glass = breakglass.rule_for(policy, approval.resource, approval.access) if breakglass.is_break_glass(approval) else None
    today = tuple(glass.approvers) if glass is not None else approval_rule(policy, approval.tier).approvers
    return named_approver(policy, today, caller.name, caller.groups)


def may_read(policy: CompiledPolicy, caller: Caller, approval: Approval, session: SessionRow) -> bool:
    if caller.kind == "admin":
        return True
    if caller.kind == "agent":
        return caller.session_id == approval.session_id
    if caller.kind == "orchestrator":
        return session.created_by == caller.name
    if caller.kind == "human":
        return _is_delegator(caller, session) or _named(policy, approval, caller) is not None
    return False


def session_for_approver(broker: Broker, caller: Caller, session_id: str) -> SessionRow | None:
    """The session, read-only, for a person named as an approver of one of its approvals (pending
    or decided): whoever is asked to decide may see what the agent did in that session before."""
    if caller.kind != "human":
        return None
    policy = broker.policies.current
    with transaction(broker.engine) as db:
        session = db.get(SessionRow, session_id)
        if session is None:
            return None
        asked = db.exec(select(Approval).where(Approval.session_id == session_id)
                        .order_by(col(Approval.created_at).desc()).limit(200)).all()
        return session if any(_named(policy, a, caller) is not None for a in asked) else None


def approver_live(broker: Broker, policy: CompiledPolicy, human: str, resource: str, access: str) -> LivePermission | None:
    """The live source's answer for an approver, where the resource's rule names one. Asked
    before any row is locked, like the request's own (a slow backend must not hold locks)."""
    if not needs_live_answer(policy, resource, access):
        return None
    return broker.permissions.consult(policy, human, resource, access)


def approve_refusal(policy: CompiledPolicy, caller: Caller, approval: Approval, session: SessionRow,
                    live: LivePermission | None = None, *, ask_live: bool = True) -> BrokerError | None:
    """Why this caller may not approve (None: they may). The rules of the module docstring.
    `ask_live=False` judges the file's grants alone (list views: no backend call per row)."""
    if caller.kind != "human":
        return Forbidden("only a human named by the tier's approvers decides an approval", code="approver-must-be-human")
    rule = approval_rule(policy, approval.tier)
    entry = _named(policy, approval, caller)
    if entry is None:
        return Forbidden(f"{caller.name} is not among the approvers ({', '.join(approval.approvers)})",
                         code="not-an-approver")
    # Break-glass: never the delegator, whatever the tier says (broker/breakglass/).
    if _is_delegator(caller, session) and (not rule.allow_self_approval or breakglass.is_break_glass(approval)):
        why = ("break-glass is never approved by the delegator" if breakglass.is_break_glass(approval)
               else f"tier {approval.tier} does not set allow_self_approval")
        return Forbidden(f"the delegating human may not approve their own agent's request ({why}); "
                         "ask another approver", code="self-approval-forbidden")
    held = (approver_permission(policy, caller.name, caller.groups, approval.resource, approval.access, live)
            if ask_live else human_permission(policy, caller.name, caller.groups, approval.resource, approval.access))
    if held.verdict != "allow":
        return Forbidden(f"an approver must hold the access themselves: {held.detail}",
                         code="approver-lacks-permission", matched_rule=held.matched_rule)
    return None


def deny_refusal(policy: CompiledPolicy, caller: Caller, approval: Approval, session: SessionRow) -> BrokerError | None:
    """Why this caller may not deny (None: they may). The delegating human always may (it is their
    authority being lent); a named approver may even without holding the access themselves."""
    if caller.kind == "human" and _is_delegator(caller, session):
        return None
    refusal = approve_refusal(policy, caller, approval, session, ask_live=False)  # holding it is not needed to deny
    if refusal is not None and refusal.code in ("self-approval-forbidden", "approver-lacks-permission"):
        return None
    return refusal


@dataclass(frozen=True)
class Context:
    """What an approver needs beside the approval itself: the session's live capabilities (the
    escalation chain) and the decision that asked for approval (reason, rule, policy version)."""

    held: list[Lease]
    decision: dict[str, Any] | None


def _contexts(db: Session, policy: CompiledPolicy, approvals: list[Approval], now: datetime) -> dict[str, Context]:
    session_ids = sorted({a.session_id for a in approvals})
    held: dict[str, list[Lease]] = {s: [] for s in session_ids}
    decisions: dict[str, dict[str, Any]] = {}
    if session_ids:
        for lease in db.exec(select(Lease).where(col(Lease.session_id).in_(session_ids), Lease.status == "active",
                                                 col(Lease.expires_at) > now).order_by(col(Lease.created_at))).all():
            held[lease.session_id].append(lease)
        # The pending record of each request holds the decision that asked for approval.
        for row in db.exec(select(AuditRecord).where(col(AuditRecord.session_id).in_(session_ids),
                                                     AuditRecord.type == "capability.pending")).all():
            record = json.loads(row.record)
            approval_id = (record.get("jit_grant") or {}).get("approval_id")
            if approval_id and record.get("policy_decision"):
                decision = dict(record["policy_decision"])
                rule = decision.get("matched_rule")
                if rule and decision.get("policy_version") == policy.version:
                    decision["matched_line"] = policy.line_of(rule)
                decisions[approval_id] = decision
    return {a.id: Context(held[a.session_id], decisions.get(a.id)) for a in approvals}


def _decisions(db: Session, approval_ids: list[str]) -> dict[str, list[ApprovalDecision]]:
    out: dict[str, list[ApprovalDecision]] = {i: [] for i in approval_ids}
    if approval_ids:
        rows = db.exec(select(ApprovalDecision).where(col(ApprovalDecision.approval_id).in_(approval_ids))
                       .order_by(col(ApprovalDecision.decided_at))).all()
        for row in rows:
            out[row.approval_id].append(row)
    return out


def view(approval: Approval, session: SessionRow | None, decisions: list[ApprovalDecision], now: datetime,
         *, policy: CompiledPolicy | None = None, caller: Caller | None = None,
         context: Context | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "approval_id": approval.id,
        "status": effective_status(approval, session, now),
        "session_id": approval.session_id,
        "human": session.human if session else approval.human,
        "agent": session.agent if session else None,
        "task_id": session.task_id if session else None,
        "repository": session.repository if session else None,
        "labels": dict(session.labels) if session else {},
        "resource": approval.resource,
        "access": approval.access,
        "tier": approval.tier,
        "ttl_seconds": approval.ttl_seconds,
        "purpose": approval.purpose,
        "tool": approval.tool,
        "parameters": approval.parameters,
        "reason": approval.reason,
        "approvers": list(approval.approvers),
        "min_approvals": approval.min_approvals,
        "approvals": [{"approver": d.approver, "decision": d.decision, "reason": d.reason,
                       "decided_at": d.decided_at} for d in decisions],
        "binding_message": approval.binding_message,
        "justification": approval.justification,
        "request_hash": approval.request_hash,
        "created_at": approval.created_at,
        "expires_at": approval.expires_at,
        "decided_by": approval.decided_by,
        "decided_at": approval.decided_at,
        "decision_reason": approval.decision_reason,
        "capability_id": approval.capability_id,
        "used_at": approval.used_at,
    }
    body["display"] = summary.display(body)
    if context is not None:
        body["held"] = [{"capability_id": lease.id, "resource": lease.resource, "access": lease.access,
                         "tier": lease.tier, "expires_at": lease.expires_at} for lease in context.held]
        body["policy_decision"] = context.decision
    if policy is not None and caller is not None and caller.kind == "human" and session is not None:
        refusal = approve_refusal(policy, caller, approval, session, ask_live=False)
        voted = any(d.approver == caller.name for d in decisions)
        body["you_may_approve"] = refusal is None and not voted and body["status"] == "pending"
        body["why_not"] = ("you already decided" if voted else refusal.message if refusal else None)
        deny = deny_refusal(policy, caller, approval, session)
        body["you_may_deny"] = deny is None and not voted and body["status"] == "pending"
        body["why_not_deny"] = ("you already decided" if voted else deny.message if deny else None)
    return body


def _event(approval: Approval, session: SessionRow, type_: str, outcome: str, actor: str,
           detail: dict[str, Any]) -> AuditEvent:
    return AuditEvent(
        type=type_, outcome=outcome, actor=actor, human_principal=session.human, agent=AgentRef.of(session),
        request=RequestRef(operation=type_.split(".", 1)[1], tool=approval.tool, resource=approval.resource,
                           access=approval.access, tier=approval.tier, parameters=approval.parameters,
                           purpose=approval.purpose),
        jit_grant=GrantRef(status=approval.status, approval_id=approval.id, ttl_seconds=approval.ttl_seconds),
        detail=detail,
    )


def console_url(broker: Broker, approval_id: str) -> str:
    """The approval's card in the console: what a notification links to."""
    return f"{broker.settings.public_base_url()}/console/approvals/{approval_id}"


def notification(broker: Broker, approval: Approval, session: SessionRow, decisions: list[ApprovalDecision],
                 now: datetime) -> dict[str, Any]:
    return {"approval": json.loads(json.dumps(view(approval, session, decisions, now), default=_iso_default)),
            "url": console_url(broker, approval.id)}


def _iso_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339(value)
    raise TypeError(type(value).__name__)


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
        return view(approval, session, _decisions(db, [approval.id])[approval.id], now, policy=policy, caller=caller,
                    context=_contexts(db, policy, [approval], now)[approval.id])


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
        decisions = _decisions(db, [a.id for a, _ in rows])
        contexts = _contexts(db, policy, [a for a, _ in rows], now)
        return [view(a, s, decisions[a.id], now, policy=policy, caller=caller, context=contexts[a.id]) for a, s in rows]


def decide(broker: Broker, caller: Caller, approval_id: str, decision: str, reason: str | None,
           *, shown_hash: str | None = None) -> dict[str, Any]:
    """Approve or deny. One transaction: the vote, the status, the audit record, the outbox.
    `shown_hash`: the request hash the person's screen showed; another one decides nothing."""
    assert decision in ("approve", "deny")
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
        votes = _decisions(db, [approval.id])[approval.id]
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
        append(db, _event(approval, session, "approval.decided", outcome, caller.principal, {
            "approval_id": approval.id, "decided_by": caller.name, "decision": decision, "reason": reason,
            "approvals": approvals, "required": required, "request_hash": approval.request_hash,
        }))
        if approval.status != "pending":
            outbox.enqueue(db, broker, "approval.decided", notification(broker, approval, session, votes, now), now)
        if approval.status == "approved" and breakglass.is_break_glass(approval):
            breakglass.approved(db, broker, session, approval, [v.approver for v in votes if v.decision == "approve"],
                                now)
        return view(approval, session, votes, now, policy=policy, caller=caller,
                    context=_contexts(db, policy, [approval], now)[approval.id])
