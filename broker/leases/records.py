"""What a capability request leaves behind: its audit events and, when refused, the error."""

from __future__ import annotations

from typing import Any

from broker.audit.events import AgentRef, AuditEvent, DecisionRef, GrantRef, RequestRef
from broker.errors import BrokerError, BudgetExceeded, Denied
from broker.leases.vocabulary import CapabilityAsk
from broker.models import AnySession
from broker.policy import Decision
from broker.providers.base import Grant


def agent_principal(session: AnySession) -> str:
    """The actor of what an agent asks: the same `kind:name` as Caller.principal."""
    return f"agent:{session.agent}"


def capability_event(
    session: AnySession, ask: CapabilityAsk, type_: str, outcome: str, *, tier: str | None,
    decision: DecisionRef | None, grant: GrantRef | None = None, detail: dict[str, Any] | None = None,
) -> AuditEvent:
    return AuditEvent(
        type=type_,
        outcome=outcome,
        actor=agent_principal(session),
        human_principal=session.human,
        agent=AgentRef.of(session),
        request=RequestRef(operation="request", tool=ask.tool, resource=ask.resource, access=ask.access, tier=tier,
                           parameters=ask.parameters, purpose=ask.purpose),
        policy_decision=decision,
        jit_grant=grant,
        detail=detail or {},
    )


def refusal(decision: Decision) -> BrokerError:
    body = decision.to_dict()
    if decision.reason == "budget-exceeded":
        return BudgetExceeded(f"denied: {decision.reason}", code=decision.reason, decision=body)
    layer = decision.deciding_layer()
    if layer == "human_live" and decision.live is not None:
        # Name the live source and what it said: the file's grants allowed, the backend did not.
        said = decision.live.evidence.get("summary") or decision.live.verdict
        return Denied(f"denied by the live permission source {decision.live.source}: {decision.reason} ({said})",
                      code=decision.reason, decision=body)
    return Denied(f"denied by the {layer} layer: {decision.reason}", code=decision.reason, decision=body)


def mint_failed_event(session: AnySession, ask: CapabilityAsk, grant: Grant, provider: str, decision: DecisionRef,
                      failure: BrokerError) -> AuditEvent:
    return capability_event(
        session, ask, "capability.mint_failed", "failed", tier=grant.tier, decision=decision,
        grant=GrantRef(status="failed", capability_id=grant.capability_id, provider=provider,
                       ttl_seconds=grant.ttl_seconds),
        detail={"error": failure.code, "message": failure.message},
    )
