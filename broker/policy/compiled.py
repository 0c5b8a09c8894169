"""A validated policy compiled once into the lookup structures the evaluator reads."""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from broker.policy.fields import DEFAULT_ESCALATION_TIERS, TIER_ORDER
from broker.policy.models import BreakGlass, Budgets, Grant, PolicyDocument, Tier
from broker.policy.resources import Glob, compile_glob, is_glob
from broker.policy.tools import CompiledTools
from broker.policy.trust import CompiledTrust
from broker.principals import canonical_human, principal_problem


@dataclass(frozen=True)
class AccessRule:
    """One access declared on a resource rule."""

    name: str
    tier: str
    options: Mapping[str, Any]  # the provider fields that were set, `options` merged in
    rule: str  # "resources[i].access.<name>"
    break_glass: BreakGlass | None = None  # opt-in break-glass (broker/breakglass/)


@dataclass(frozen=True)
class LivePermissionRule:
    """A resource rule's `human_permission`: the live source and what of its answers allows each access."""

    source: str
    require: Mapping[str, frozenset[str]]  # access name -> backend answers that allow it
    on_unavailable: str  # "deny" | "allow"
    options: Mapping[str, Any]
    rule: str  # "resources[i].human_permission"


@dataclass(frozen=True)
class ResourceRule:
    index: int
    match: str
    provider: str
    access: Mapping[str, AccessRule]
    human_permission: LivePermissionRule | None = None

    @property
    def rule(self) -> str:
        return f"resources[{self.index}]"


@dataclass(frozen=True)
class GrantRule:
    """A grant a human or group holds: (resource glob, access names or "*")."""

    rule: str  # "humans.<email>.grants[i]" or "groups.<name>.grants[i]"
    resource: str
    access: frozenset[str]
    pattern: Glob

    def covers(self, resource: str, access: str) -> bool:
        return ("*" in self.access or access in self.access) and self.pattern.matches(resource)


@dataclass(frozen=True)
class AgentRule:
    name: str  # the key as written, "*" for the fallback
    max_tier: str
    providers: frozenset[str] | None  # None: any provider

    @property
    def rule(self) -> str:
        return f"agents.{self.name}"


class ResourceMatcher:
    """First match in file order, without trying every rule.

    Exact matches are a dict hit. A glob can only cover resources that start with its literal
    prefix (the text before its first `*`, scheme included), so globs are indexed by that
    prefix: a lookup lists the distinct prefix lengths, takes the resource's prefix of each
    length, and merges the few candidate lists (each in file order) by rule index. Candidates
    are tried in file order and only those written before an exact hit can beat it. With a
    thousand rules under a handful of prefixes, a decision tries the rules sharing the
    resource's prefix, not all of them.
    """

    def __init__(self, rules: Sequence[ResourceRule]) -> None:
        self._exact: dict[str, ResourceRule] = {}
        by_prefix: dict[str, list[tuple[int, Glob, ResourceRule]]] = {}
        for rule in rules:
            if is_glob(rule.match):
                prefix = rule.match.split("*", 1)[0]
                by_prefix.setdefault(prefix, []).append((rule.index, compile_glob(rule.match), rule))
            else:
                self._exact.setdefault(rule.match, rule)
        self._by_prefix = by_prefix
        self._lengths = sorted({len(p) for p in by_prefix})

    def _candidates(self, resource: str) -> Iterable[tuple[int, Glob, ResourceRule]]:
        lists = []
        for length in self._lengths:
            if length > len(resource):
                break
            found = self._by_prefix.get(resource[:length])
            if found:
                lists.append(found)
        if len(lists) == 1:
            return lists[0]
        return heapq.merge(*lists, key=lambda c: c[0])

    def first(self, resource: str) -> ResourceRule | None:
        exact = self._exact.get(resource)
        for index, pattern, rule in self._candidates(resource):
            if exact is not None and index > exact.index:
                break
            if pattern.matches(resource):
                return rule
        return exact


def tier_rank(tier: str) -> int:
    return TIER_ORDER.index(tier)


def _key(human: str) -> str:
    """The canonical form to look a human up by; "" (no principal, so nobody) for a name without one."""
    return canonical_human(human) if principal_problem(human) is None else ""


def _grants(prefix: str, grants: list[Grant]) -> tuple[GrantRule, ...]:
    return tuple(
        GrantRule(f"{prefix}.grants[{i}]", g.resource, frozenset(g.access), compile_glob(g.resource))
        for i, g in enumerate(grants)
    )


class CompiledPolicy:
    """Everything the evaluator needs, indexed; built once per policy file and never mutated."""

    def __init__(self, document: PolicyDocument, *, raw: bytes, lines: Mapping[str, int], source: str = "<policy>") -> None:
        self.document = document
        self.source = source
        # The content hash names the policy in every decision and audit record.
        self.version = "sha256:" + hashlib.sha256(raw).hexdigest()
        self._lines = dict(lines)

        self.tiers: Mapping[str, Tier] = MappingProxyType(
            {name: document.tiers[name] for name in TIER_ORDER if name in document.tiers}
        )

        rules = []
        for i, r in enumerate(document.resources):
            access = {
                name: AccessRule(name, a.tier, MappingProxyType(a.provider_options()), f"resources[{i}].access.{name}",
                                 a.break_glass)
                for name, a in r.access.items()
            }
            live = None
            if r.human_permission is not None:
                hp = r.human_permission
                live = LivePermissionRule(
                    hp.source, MappingProxyType({a: frozenset(v) for a, v in hp.require.items()}), hp.on_unavailable,
                    MappingProxyType(dict(hp.options or {})), f"resources[{i}].human_permission",
                )
            rules.append(ResourceRule(i, r.match, r.provider, MappingProxyType(access), live))
        self.resources: tuple[ResourceRule, ...] = tuple(rules)
        self._matcher = ResourceMatcher(self.resources)

        # Humans are keyed by their canonical form (broker.principals), the one way
        # principals are compared; the models refused any name without one.
        self._human_keys: dict[str, str] = {canonical_human(email): email for email in document.humans}
        self.human_identities: Mapping[str, Mapping[str, str]] = MappingProxyType(
            {canonical_human(email): MappingProxyType(h.identity()) for email, h in document.humans.items()}
        )
        self.human_grants: Mapping[str, tuple[GrantRule, ...]] = MappingProxyType(
            {canonical_human(email): _grants(f"humans.{email}", h.grants) for email, h in document.humans.items()}
        )
        self.group_grants: Mapping[str, tuple[GrantRule, ...]] = MappingProxyType(
            {name: _grants(f"groups.{name}", g.grants) for name, g in document.groups.items()}
        )
        members: dict[str, set[str]] = {name: {canonical_human(m) for m in g.members}
                                        for name, g in document.groups.items()}
        for email, human in document.humans.items():
            for group in human.groups:
                members.setdefault(group, set()).add(canonical_human(email))
        self.group_members: Mapping[str, frozenset[str]] = MappingProxyType(
            {name: frozenset(m) for name, m in members.items()}
        )

        self.agents: Mapping[str, AgentRule] = MappingProxyType(
            {
                name: AgentRule(name, a.max_tier, frozenset(a.providers) if a.providers is not None else None)
                for name, a in document.agents.items()
            }
        )
        budgets = document.budgets
        self.max_issued_per_session: int | None = budgets.max_issued_per_session if budgets else None
        self.max_active_per_session: int | None = budgets.max_active_per_session if budgets else None
        budgets = budgets or Budgets()
        self.max_pending_approvals_per_session: int = budgets.max_pending_approvals_per_session
        self.max_pending_approvals_per_approver: int = budgets.max_pending_approvals_per_approver
        self.rate_limits = document.rate_limits
        self.escalation_tiers: frozenset[str] = frozenset(
            document.escalation.tiers if document.escalation else DEFAULT_ESCALATION_TIERS
        )
        # Stall and deviation (broker/sessions/liveness.py, deviation.py); absent: neither applies.
        self.liveness = document.liveness
        self.deviation = document.deviation
        # The tool-call gate's rules (PreToolUse hooks); an absent section asks about everything.
        self.tools = CompiledTools(document.tools)
        # Machine callers' trust rules (workload identity); empty: no workload token is accepted.
        self.trust = CompiledTrust(document.trust)

    def __repr__(self) -> str:
        return f"CompiledPolicy(source={self.source!r}, version={self.version!r})"

    def match_resource(self, resource: str) -> ResourceRule | None:
        """The first resource rule, in file order, whose match covers `resource`."""
        return self._matcher.first(resource)

    def human_key(self, human: str) -> str | None:
        """The `humans` key as written for this human, or None when the policy does not name them."""
        return self._human_keys.get(_key(human))

    def identity_of(self, human: str) -> Mapping[str, str]:
        """Who the human is at live sources (github_login, openbao_entity, ...), as the policy maps them."""
        return self.human_identities.get(_key(human), MappingProxyType({}))

    def grants_of(self, human: str) -> tuple[GrantRule, ...]:
        """The grants the `humans` section gives this human by name (groups aside)."""
        return self.human_grants.get(_key(human), ())

    def live_sources(self) -> frozenset[str]:
        """Every live permission source some rule names: the broker builds exactly these."""
        return frozenset(r.human_permission.source for r in self.resources if r.human_permission is not None)

    def groups_of(self, human: str, extra: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """Every group the human belongs to: policy membership plus `extra` (IdP claims).

        Ordered as the `groups` section is written, then the rest by name, so the first matching
        grant is the same on every evaluation.
        """
        email = _key(human)
        belongs = {name for name, members in self.group_members.items() if email in members} | set(extra)
        ordered = [name for name in self.document.groups if name in belongs]
        return tuple(ordered + sorted(belongs - set(ordered)))

    def agent(self, name: str) -> AgentRule | None:
        """The agent's own entry, else the "*" fallback, else None."""
        return self.agents.get(name) or self.agents.get("*")

    def line_of(self, rule_path: str) -> int | None:
        """The line a rule path ("resources[0].access.read") starts on; None if not in the file."""
        return self._lines.get(rule_path)
