"""How an approval is shown: the view every surface returns (API, console, notifications), the
context an approver reads beside it (what the session holds, the decision that asked), the
votes so far, and the audit event of a step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from broker.approvals import summary
from broker.approvals.approvers import approve_refusal, deny_refusal
from broker.approvals.binding import effective_status
from broker.audit.events import AgentRef, AuditEvent, GrantRef, RequestRef
from broker.identity.callers import Caller
from broker.models import Approval, ApprovalDecision, AuditRecord, Lease, SessionRow
from broker.policy import CompiledPolicy
from broker.runtime import Broker
from broker.times import rfc3339


@dataclass(frozen=True)
class Context:
    """What an approver needs beside the approval itself: the session's live capabilities (the
    escalation chain) and the decision that asked for approval (reason, rule, policy version)."""

    held: list[Lease]
    decision: dict[str, Any] | None


def contexts_for(db: Session, policy: CompiledPolicy, approvals: list[Approval], now: datetime) -> dict[str, Context]:
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


def decisions_for(db: Session, approval_ids: list[str]) -> dict[str, list[ApprovalDecision]]:
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


def audit_event(approval: Approval, session: SessionRow, type_: str, outcome: str, actor: str,
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

