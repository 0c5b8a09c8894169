"""Who may approve: a tier's approval rule (approvers, how many, self-approval) and whether a
human is named among a rule's approvers. Pure, like the evaluator that shares it.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.policy.compiled import CompiledPolicy
from broker.principals import same_principal


def approvers_of(policy: CompiledPolicy, tier: str | None) -> tuple[str, ...]:
    if tier is None:
        return ()
    own = tuple(policy.tiers[tier].approvers)
    if own:
        return own
    # An auto tier caught by escalation has no approvers of its own: the escalation tiers' do.
    pooled: list[str] = []
    for name, t in policy.tiers.items():
        if name in policy.escalation_tiers:
            pooled.extend(a for a in t.approvers if a not in pooled)
    return tuple(pooled)


@dataclass(frozen=True)
class ApprovalRule:
    """Who may approve a request of one tier, how many of them, and whether the delegator may."""

    approvers: tuple[str, ...]
    min_approvals: int
    allow_self_approval: bool


def approval_rule(policy: CompiledPolicy, tier: str) -> ApprovalRule:
    """The tier's own rule; an auto tier caught by escalation takes the escalation tiers' rule,
    as strict as the strictest of them."""
    own = policy.tiers.get(tier)
    if own is not None and own.approvers:
        return ApprovalRule(tuple(own.approvers), own.min_approvals, own.allow_self_approval)
    pooled = [t for name, t in policy.tiers.items() if name in policy.escalation_tiers and t.approvers]
    return ApprovalRule(
        approvers=approvers_of(policy, tier),
        min_approvals=max((t.min_approvals for t in pooled), default=1),
        allow_self_approval=bool(pooled) and all(t.allow_self_approval for t in pooled),
    )


def named_approver(policy: CompiledPolicy, approvers: tuple[str, ...] | list[str], human: str,
                   groups: frozenset[str] = frozenset()) -> str | None:
    """The approvers entry naming `human` ("group:x", "user:email" or an email), or None."""
    member_of = set(policy.groups_of(human, groups))
    for entry in approvers:
        if entry.startswith("group:"):
            if entry.removeprefix("group:") in member_of:
                return entry
        elif same_principal(entry.removeprefix("user:"), human):
            return entry
    return None

