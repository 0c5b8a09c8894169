"""What a capability request leaves behind: its audit events and, when refused, the error."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from broker.audit.service import AuditEvent
from broker.errors import BrokerError, BudgetExceeded, Denied
from broker.models import SessionRow
from broker.policy import Decision
from broker.providers.base import Grant

if TYPE_CHECKING:
    from broker.leases.service import CapabilityAsk


def decision_record(decision: Decision, shadow: Decision | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "result": decision.result,
        "reason": decision.reason,
        "matched_rule": decision.matched_rule,
        "policy_version": decision.policy_version,
    }
    if decision.result != "allow":
        record["layer"] = _deciding_layer(decision)  # which of the intersection's layers said no (or "ask")
    if decision.live is not None:
        # The live layer: which source, what it answered, and whether from the cache.
        record["human_permission"] = decision.live.to_dict()
    if shadow is not None:
        record["shadow"] = {
            "result": shadow.result,
            "reason": shadow.reason,
            "matched_rule": shadow.matched_rule,
            "policy_version": shadow.policy_version,
        }
    return record


def capability_event(
    session: SessionRow, ask: CapabilityAsk | None, type_: str, outcome: str, *, tier: str | None = None,
    decision: dict[str, Any] | None = None, grant: dict[str, Any] | None = None, detail: dict[str, Any] | None = None,
    resource: str | None = None, operation: str = "request",
) -> AuditEvent:
    return AuditEvent(
        type=type_,
        outcome=outcome,
        human_principal=session.human,
        agent={"id": session.agent, "session_id": session.id, "task_id": session.task_id},
        request={
            "tool": ask.tool if ask else None,
            "operation": operation,
            "resource": ask.resource if ask else resource,
            "access": ask.access if ask else None,
            "tier": tier,
            "parameters": ask.parameters if ask else None,
            "purpose": ask.purpose if ask else None,
        },
        policy_decision=decision,
        jit_grant=grant,
        detail=detail,
    )


def refusal(decision: Decision) -> BrokerError:
    body = decision.to_dict()
    if decision.reason == "budget-exceeded":
        return BudgetExceeded(f"denied: {decision.reason}", code=decision.reason, decision=body)
    layer = _failing_layer(decision)
    if layer == "human_live" and decision.live is not None:
        # Name the live source and what it said: the file's grants allowed, the backend did not.
        said = decision.live.evidence.get("summary") or decision.live.verdict
        return Denied(f"denied by the live permission source {decision.live.source}: {decision.reason} ({said})",
                      code=decision.reason, decision=body)
    return Denied(f"denied by the {layer} layer: {decision.reason}", code=decision.reason, decision=body)


def _deciding_layer(decision: Decision) -> str:
    for layer in decision.layers:
        if layer.verdict == "deny":
            return layer.layer
    for layer in decision.layers:
        if layer.verdict == "approval_required":
            return layer.layer
    return "policy"


def _failing_layer(decision: Decision) -> str:
    for layer in decision.layers:
        if layer.verdict == "deny":
            return layer.layer
    return "policy"


def mint_failed_event(session: SessionRow, ask: CapabilityAsk, grant: Grant, provider: str, record: dict[str, Any],
                      failure: BrokerError) -> AuditEvent:
    return capability_event(
        session, ask, "capability.mint_failed", "failed", tier=grant.tier, decision=record,
        grant={"status": "failed", "capability_id": grant.capability_id, "provider": provider,
               "ttl_seconds": grant.ttl_seconds},
        detail={"error": failure.code, "message": failure.message},
    )
