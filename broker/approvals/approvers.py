"""Who may read, approve and deny an approval. The rules (each enforced here and tested):

- approvers are those the tier names (`group:<name>`, `user:<email>` or an email), checked
  against the policy in force at decision time as well as the list the request was shown;
- the approver must hold the access themselves (the evaluator's human layer, for them);
- the delegating human may not approve their own agent's request unless the tier says
  `allow_self_approval: true` (they may always deny it: it is their authority being lent);
- a caller who may not see an approval gets 404, as for one that is absent (ids are no oracle).
"""

from __future__ import annotations

from sqlmodel import col, select

from broker.breakglass import service as breakglass
from broker.db import transaction
from broker.errors import BrokerError, Forbidden
from broker.identity.callers import Caller
from broker.models import Approval, SessionRow
from broker.permissions.service import needs_live_answer
from broker.policy import (
    CompiledPolicy,
    LivePermission,
    approval_rule,
    approver_permission,
    human_permission,
    named_approver,
)
from broker.principals import same_principal
from broker.runtime import Broker


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
