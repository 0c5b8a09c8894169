"""Checks across a whole policy document, the problems no single field can see: references
between sections, rules that can never apply.
"""

from __future__ import annotations

from broker.policy.models import PolicyDocument
from broker.policy.trust import trust_problems
from broker.principals import canonical_human

Path = tuple[str | int, ...]


Problem = tuple[Path, str]


def cross_check(doc: PolicyDocument) -> list[Problem]:
    """Problems no single field can see: references between sections, rules that can never apply."""
    # humans.X.groups may name a group with no `groups` entry: membership alone matters for
    # approvers such as "group:security", so that is not an error.
    return [*_tier_problems(doc), *_resource_problems(doc), *_human_problems(doc), *_tool_problems(doc),
            *trust_problems(doc.trust)]


def _tier_problems(doc: PolicyDocument) -> list[Problem]:
    problems: list[Problem] = []
    for name, tier in doc.tiers.items():
        if tier.control != "deny" and tier.max_ttl is None:
            problems.append((("tiers", name, "max_ttl"), f"tier {name!r} needs max_ttl unless its control is deny"))
        if tier.control == "approval" and not tier.approvers:
            # Nobody could ever approve: every request of this tier would hang until it expires.
            problems.append((("tiers", name, "approvers"), f"tier {name!r} requires approval but names no approvers"))
        if tier.min_approvals > 1 and tier.control != "approval":
            problems.append((("tiers", name, "min_approvals"),
                             f"tier {name!r} sets min_approvals but its control is {tier.control}, not approval"))
        users = [a for a in tier.approvers if not a.startswith("group:")]
        if tier.control == "approval" and users and not any(a.startswith("group:") for a in tier.approvers) \
                and len(users) < tier.min_approvals:
            problems.append((("tiers", name, "min_approvals"),
                             f"tier {name!r} needs {tier.min_approvals} approvals but names only {len(users)} approver(s)"))
    return problems


def _resource_problems(doc: PolicyDocument) -> list[Problem]:
    problems: list[Problem] = []
    seen_match: dict[str, int] = {}
    for i, rule in enumerate(doc.resources):
        if rule.match in seen_match:
            problems.append(
                (("resources", i, "match"), f"duplicate match {rule.match!r}: resources[{seen_match[rule.match]}] always wins")
            )
        seen_match.setdefault(rule.match, i)
        problems.extend((("resources", i, "access", access_name, "tier"), f"tier {access.tier!r} is not defined in tiers")
                        for access_name, access in rule.access.items() if access.tier not in doc.tiers)
        live = rule.human_permission
        if live is None:
            continue
        problems.extend((("resources", i, "human_permission", "require", access_name),
                         f"{access_name!r} is not an access of this rule")
                        for access_name in live.require if access_name not in rule.access)
        # An unmapped access could never be checked: say so at load, not at request.
        problems.extend((("resources", i, "human_permission", "require"),
                         f"access {access_name!r} has no entry: say which answers of {live.source} allow it")
                        for access_name in rule.access if access_name not in live.require)
        problems.extend((("resources", i, "human_permission", "require", access_name),
                         "an empty list would deny this access always; remove the access instead")
                        for access_name, answers in live.require.items() if not answers)
    return problems


def _human_problems(doc: PolicyDocument) -> list[Problem]:
    problems: list[Problem] = []
    seen_human: dict[str, str] = {}
    for email in doc.humans:
        # Two spellings with one canonical form (ASCII case) would be one person.
        key = canonical_human(email)
        if key in seen_human:
            problems.append((("humans", email), f"{email!r} repeats {seen_human[key]!r} (principals ignore ASCII case)"))
        seen_human.setdefault(key, email)
    return problems


def _tool_problems(doc: PolicyDocument) -> list[Problem]:
    return [(("tools", "rules", i, "tier"), f"tier {tool_rule.tier!r} is not defined in tiers")
            for i, tool_rule in enumerate(doc.tools.rules if doc.tools else [])
            if tool_rule.tier is not None and tool_rule.tier not in doc.tiers]
