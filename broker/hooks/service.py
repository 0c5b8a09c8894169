"""The tool-call gate: a Claude Code PreToolUse call -> the policy's verdict, an approval when the
tier needs one, and an audit record for every decision.

The classification is `broker.policy.tool_gate.decide_tool_call` (pure). Here: the session (locked,
so an approval is opened or used once), approvals bound to the exact call, and the audit. A
call whose tier needs approval opens an approval like a capability request does (same table,
`resource` = `tool://<tool name>`, `access` = the tier, `parameters` = the tool input, so the
approvers see exactly what they approve); the same call made again once it is approved is
allowed, and uses the approval up.

A call whose approval cannot be opened (its input outside the approval bounds, 16 KiB / depth 8,
or a pending-approval budget spent) is denied with that reason, audited, and nothing is stored
for approvers: answered as `deny` with 200, because an http hook that fails lets the call through.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from broker.approvals import service as approvals
from broker.approvals.binding import Binding
from broker.approvals.limits import ApprovalBudgetExceeded, ApprovalTooLarge
from broker.audit.events import AgentRef, AuditEvent, DecisionRef, GrantRef, RequestRef
from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import BrokerError, Forbidden, Unauthenticated
from broker.identity.callers import Caller
from broker.leases.service import lock_session
from broker.models import AnySession, Approval
from broker.policy.tool_gate import decide_tool_call
from broker.policy.tools import ToolCall, ToolVerdict, describe
from broker.runtime import Broker

HOOK_EVENT = "PreToolUse"


@dataclass(frozen=True)
class HookInput:
    """The fields of Claude Code's PreToolUse input the gate reads (others are accepted and ignored)."""

    tool_name: str
    tool_input: dict[str, Any]
    agent_session_id: str | None = None  # Claude Code's own session id, not the broker's
    tool_use_id: str | None = None
    cwd: str | None = None
    permission_mode: str | None = None


def hook_output(decision: str, reason: str) -> dict[str, Any]:
    """The JSON Claude Code reads from a PreToolUse hook."""
    return {"hookSpecificOutput": {"hookEventName": HOOK_EVENT, "permissionDecision": decision,
                                   "permissionDecisionReason": reason}}


def _binding(session_id: str, call: ToolCall, tier: str | None) -> Binding:
    # Bound to the tool and its exact input: a changed command needs a new approval.
    return Binding(session_id=session_id, resource=f"tool://{call.tool_name}", access=tier or "tool",
                   ttl_seconds=None, tool=call.tool_name,
                   parameters={"tool_name": call.tool_name, "tool_input": dict(call.tool_input)})


def _approval_for(db: Session, session: AnySession, request_hash: str, now: datetime) -> Approval | None:
    return db.exec(
        select(Approval)
        .where(Approval.session_id == session.id, Approval.request_hash == request_hash,
               col(Approval.status).in_(("pending", "approved")), Approval.expires_at > now)
        .order_by(col(Approval.created_at).desc())
        .with_for_update()
    ).first()


def pre_tool_use(broker: Broker, caller: Caller, hook: HookInput) -> dict[str, Any]:
    if caller.kind != "agent" or caller.session_id is None:
        raise Forbidden("only an agent's session token may ask the tool-call gate")
    policy = broker.policies.current
    call = ToolCall(hook.tool_name, hook.tool_input)
    now = utcnow()
    with transaction(broker.engine) as db:
        session = lock_session(db, caller.session_id)
        if session is None:
            raise Unauthenticated("the session behind this token does not exist")
        active = session.status == "active" and session.expires_at > now
        verdict = decide_tool_call(policy, agent=session.agent, session_active=active, call=call)
        decision, message, approval_id, outcome = verdict.decision, verdict.message, None, verdict.decision
        refusal_code: str | None = None
        if verdict.needs_approval:
            binding = _binding(session.id, call, verdict.tier)
            approval = _approval_for(db, session, binding.request_hash(), now)
            if approval is not None and approval.status == "approved":
                # Single use: the next identical call asks again. No capability is minted for a
                # tool call, so the approval names none.
                approvals.mark_used(db, approval, None, now)
                decision, outcome = "allow", "allow"
                message = f"{verdict.message}; approved by {approval.decided_by} ({approval.id})"
            else:
                refused: BrokerError | None = None
                if approval is None:
                    try:
                        approval, _ = approvals.open_request(
                            db, broker, session.row(), binding, tier=verdict.tier or "", reason=verdict.reason,
                            approvers=list(verdict.approvers), granted_ttl=None, purpose=describe(call), now=now)
                    except (ApprovalTooLarge, ApprovalBudgetExceeded) as exc:
                        refused = exc
                if approval is None:
                    # No approval was opened. Answered as a deny (200), never as an error status:
                    # Claude Code lets a call through when an http hook fails.
                    assert refused is not None  # noqa: S101  # type narrowing only: no approval means it was refused
                    decision, outcome = "deny", "denied"
                    refusal_code = refused.code  # approval-too-large or approval-budget-exceeded
                    message = f"{verdict.message}, but no approval was opened ({refusal_code}): {refused.message}"
                else:
                    approval_id, outcome = approval.id, "pending_approval"
                    message = (f"{verdict.message}: approval {approval.id} is pending "
                               f"(`broker-cli approve {approval.id}`); make the same call again once it is approved")
        append(db, _audit(session, hook, call, verdict, decision, outcome, approval_id, policy.version,
                          refusal_code))
    return hook_output(decision, message)


def _audit(session: AnySession, hook: HookInput, call: ToolCall, verdict: ToolVerdict, decision: str, outcome: str,
           approval_id: str | None, policy_version: str, refusal_code: str | None = None) -> AuditEvent:
    # The tool input itself may hold secrets (a header in a curl, a file's content): the audit
    # keeps what was run (program, path, host) and the input's SHA-256, never the input.
    kind = {"allow": "allowed", "deny": "denied", "ask": "asked"}[decision]
    return AuditEvent(
        type=f"tool.{kind}",
        outcome=outcome,
        actor=f"agent:{session.agent}",
        human_principal=session.human,
        agent=AgentRef.of(session),
        request=RequestRef(operation="pre-tool-use", tool=call.tool_name, resource=f"tool://{call.tool_name}",
                           tier=verdict.tier,
                           parameters={"summary": describe(call), "tool_input_sha256": call.input_sha256()}),
        # A call that needed approval but could not open one is denied for that reason.
        policy_decision=DecisionRef(decision, refusal_code or verdict.reason, verdict.matched_rule, policy_version,
                                    rule_name=verdict.rule_name),
        jit_grant=GrantRef(status="pending_approval", approval_id=approval_id) if approval_id else None,
        detail={"hook_event": HOOK_EVENT, "agent_session_id": hook.agent_session_id, "tool_use_id": hook.tool_use_id,
                "permission_mode": hook.permission_mode},
    )
