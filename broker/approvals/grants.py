"""Grants: a human pre-approves (resource, access) for one session, good for `uses` capabilities
until the grant's end; a matching request that would wait for approval consumes a use instead.

A grant is an approval given in advance, so the approver rules hold for the granter: named by
the tier's approvers, holding the access themselves, not the delegator unless the tier allows
self-approval, and never a way around `min_approvals` > 1 or a denied tier. Everything else
about the request (task scope, agent ceiling, budgets, time) is still decided when it comes;
nothing minted under a grant outlives the grant.

The request is judged as the capability path would judge it; that path's session facts and
provider bounds are handed in by the caller (the leases package sits above this one).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from broker.approvals.approvers import approver_live
from broker.audit.events import AgentRef, AuditEvent, GrantRef, RequestRef
from broker.audit.service import append
from broker.breakglass import service as breakglass
from broker.db import transaction, utcnow
from broker.errors import Denied, Forbidden, NotFound
from broker.identity.callers import Caller
from broker.models import JitGrant, SessionRow
from broker.permissions import service as live_permissions
from broker.policy import (
    BoundsLookup,
    RequestFacts,
    SessionFacts,
    approval_rule,
    approver_permission,
    evaluate,
    named_approver,
)
from broker.policy.resources import canonical_resource
from broker.principals import same_principal
from broker.runtime import Broker

# (transaction, the session's locked row) -> what the evaluator is told about the session
SessionFactsOf = Callable[[Session, SessionRow], SessionFacts]


@dataclass(frozen=True)
class GrantAsk:
    session_id: str
    resource: str
    access: str
    ttl_seconds: int
    uses: int = 1
    reason: str | None = None


def view(grant: JitGrant) -> dict[str, Any]:
    return {
        "grant_id": grant.id, "session_id": grant.session_id, "resource": grant.resource, "access": grant.access,
        "tier": grant.tier, "granted_by": grant.granted_by, "uses": grant.uses, "uses_left": grant.uses_left,
        "status": grant.status, "reason": grant.reason, "created_at": grant.created_at, "expires_at": grant.expires_at,
    }


def create(broker: Broker, caller: Caller, ask: GrantAsk, *, session_facts: SessionFactsOf,
           bounds: BoundsLookup) -> dict[str, Any]:
    """`session_facts` and `bounds`: the capability path's own (`broker.leases.facts`)."""
    if caller.kind != "human":
        raise Forbidden("grants are given by humans the tier names as approvers", code="granter-must-be-human")

    ask = replace(ask, resource=canonical_resource(ask.resource))
    policy = broker.policies.current
    # Live sources (the session's human, and the granter) are asked before any lock is taken.
    session_live = live_permissions.for_session(broker.engine, broker.permissions, policy, ask.session_id,
                                                ask.resource, ask.access)
    granter_live = approver_live(broker, policy, caller.name, ask.resource, ask.access)
    now = utcnow()
    with transaction(broker.engine) as db:
        session = db.exec(select(SessionRow).where(SessionRow.id == ask.session_id).with_for_update()).first()
        rule_tier, decision = None, None
        if session is not None:
            facts = session_facts(db, session)
            decision = evaluate(policy, facts, RequestFacts(ask.resource, ask.access, None, now, approved=True,
                                                            live=session_live), bounds)
            rule_tier = decision.tier
        delegator = session is not None and same_principal(caller.name, session.human)
        rule = approval_rule(policy, rule_tier) if rule_tier else None
        entry = named_approver(policy, rule.approvers, caller.name, caller.groups) if rule else None
        if session is None or (not delegator and entry is None):
            # Neither their session nor a tier that names them: the id is not confirmed to exist.
            raise NotFound("no such session", code="session-not-found")
        if rule is None or rule_tier is None or decision is None:
            raise RuntimeError("a grant reached past the approver check without its session's decision and rule")
        if decision.result == "deny":
            raise Denied(f"this capability would be denied anyway ({decision.reason}); a grant cannot change that",
                         code=decision.reason, decision=decision.to_dict())
        if breakglass.rule_for(policy, ask.resource, ask.access) is not None:
            raise Forbidden("a break-glass access is never pre-approved: each use needs its own justification and "
                            "approvers", code="break-glass-not-grantable")
        if entry is None:
            raise Forbidden(f"{caller.name} is not among the approvers of tier {rule_tier} "
                            f"({', '.join(rule.approvers) or 'none'})", code="not-an-approver")
        if delegator and not rule.allow_self_approval:
            raise Forbidden("the delegating human may not pre-approve their own agent's capability "
                            f"(tier {rule_tier} does not set allow_self_approval)", code="self-approval-forbidden")
        held = approver_permission(policy, caller.name, caller.groups, ask.resource, ask.access, granter_live)
        if held.verdict != "allow":
            raise Forbidden(f"a grant is bounded by the granter's own permissions: {held.detail}",
                            code="approver-lacks-permission")
        if rule.min_approvals > 1:
            raise Forbidden(f"tier {rule_tier} needs {rule.min_approvals} distinct approvals; one person's grant "
                            "cannot stand in for them: approve the pending request instead", code="needs-more-approvers")
        expires_at = min(now + timedelta(seconds=ask.ttl_seconds), session.expires_at)
        grant = JitGrant(id="grt_" + secrets.token_hex(16), session_id=session.id, resource=ask.resource,
                         access=ask.access, tier=rule_tier, granted_by=caller.name, uses=ask.uses, uses_left=ask.uses,
                         reason=ask.reason, created_at=now, expires_at=expires_at)
        db.add(grant)
        append(db, AuditEvent(
            type="grant.created", outcome="granted", actor=caller.principal, human_principal=session.human,
            agent=AgentRef.of(session),
            request=RequestRef(operation="grant", resource=ask.resource, access=ask.access, tier=rule_tier),
            jit_grant=GrantRef(status="granted", grant_id=grant.id, uses=ask.uses,
                               ttl_seconds=int((expires_at - now).total_seconds())),
            detail={"granted_by": caller.name, "approver_entry": entry, "reason": ask.reason},
        ))
        return view(grant)


def find_usable(db: Session, session_id: str, resource: str, access: str, now: datetime,
                *, lock: bool = True) -> JitGrant | None:
    """An active grant with uses left for exactly this (session, resource, access), locked
    (`lock=False`: only looked at, as `policy explain` does)."""
    stmt = select(JitGrant).where(JitGrant.session_id == session_id, JitGrant.resource == resource,
                                  JitGrant.access == access, JitGrant.status == "active", JitGrant.uses_left > 0,
                                  col(JitGrant.expires_at) > now).order_by(col(JitGrant.expires_at))
    return db.exec(stmt.with_for_update() if lock else stmt).first()


def consume(db: Session, grant: JitGrant) -> None:
    grant.uses_left -= 1
    if grant.uses_left <= 0:
        grant.status = "used_up"
    db.add(grant)
