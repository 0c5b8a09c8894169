"""The decision: a pure function of (policy, session, request) that every layer must allow.

No I/O, no database, no clock: the caller supplies `now`, session counters, provider bounds
and, where a resource rule names a live permission source, what that source answered
(`RequestFacts.live`, fetched before by the caller). The same function answers real requests,
`policy explain` and the shadow policy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.policy.approvers import approvers_of
from broker.policy.compiled import AccessRule, CompiledPolicy, ResourceRule, tier_rank
from broker.policy.facts import (
    ALLOW,
    APPROVAL,
    DENY,
    SKIPPED,
    UNKNOWN,
    BoundsLookup,
    Decision,
    LayerVerdict,
    LivePermission,
    RequestFacts,
    SessionFacts,
    TtlBounds,
)
from broker.policy.resources import glob_matches, resource_problem
from broker.times import rfc3339

log = logging.getLogger("broker.policy")

_NO_TIME = datetime(1970, 1, 1, tzinfo=UTC)  # for layers that read no clock


def default_bounds(provider: str, resource: str, options: dict[str, Any]) -> TtlBounds:
    return TtlBounds()


def _allow(layer: str, rule: str | None, detail: str) -> LayerVerdict:
    return LayerVerdict(layer, ALLOW, None, rule, detail)


def _deny(layer: str, reason: str, rule: str | None, detail: str) -> LayerVerdict:
    return LayerVerdict(layer, DENY, reason, rule, detail)


def _skipped(layer: str, detail: str = "resource or access unknown") -> LayerVerdict:
    return LayerVerdict(layer, SKIPPED, None, None, detail)


@dataclass(frozen=True)
class _Target:
    """What the resource layer found: the rule and access the later layers judge."""

    rule: ResourceRule
    access: AccessRule
    options: dict[str, Any]


def _session_layer(session: SessionFacts, request: RequestFacts) -> LayerVerdict:
    if session.status != "active":
        return _deny("session", "session-ended", "session.status", f"session is {session.status}")
    if request.now >= session.expires_at:
        return _deny("session", "session-ended", "session.expires_at", f"session expired at {rfc3339(session.expires_at)}")
    if session.suspended:
        return _deny("session", "session-suspended", "deviation",
                     "the deviation tripwire suspended this session until a human resumes it")
    if session.idle_until is not None and request.now >= session.idle_until:
        return _deny("session", "session-stalled", "liveness.idle_timeout",
                     f"the session was silent past its idle timeout ({rfc3339(session.idle_until)})")
    return _allow("session", None, f"active until {rfc3339(session.expires_at)}")


def _resource_layer(policy: CompiledPolicy, request: RequestFacts) -> tuple[LayerVerdict, _Target | None]:
    problem = resource_problem(request.resource)
    if problem is not None:
        # Callers validate first; refusing here too keeps a literal "*" from matching a glob.
        return _deny("resource", "invalid-resource", None, f"resource {problem}"), None
    rule = policy.match_resource(request.resource)
    if rule is None:
        return _deny("resource", "unknown-resource", "resources", f"no rule matches {request.resource}"), None
    access = rule.access.get(request.access)
    if access is None:
        declared = ", ".join(rule.access)
        detail = f"{rule.match} declares {declared}, not {request.access!r}"
        return _deny("resource", "unknown-access", rule.rule, detail), None
    options = dict(access.options)
    if rule.provider == "native" and "audience" not in options:
        # A native token is for the service the jwt:// URI names unless the policy says otherwise;
        # a resource named by its URL (an MCP server) is its own audience (RFC 8707).
        web = request.resource.startswith(("https://", "http://"))
        options["audience"] = request.resource if web else request.resource.split("://", 1)[1]
    detail = f"{rule.match} via provider {rule.provider}, tier {access.tier}"
    return _allow("resource", access.rule, detail), _Target(rule, access, options)


def human_permission(policy: CompiledPolicy, human: str, groups: frozenset[str], resource: str,
                     access: str) -> LayerVerdict:
    """Whether `human` (with IdP `groups`) holds `access` on `resource`: the human layer, usable
    for any human, e.g. an approver who must hold what they approve."""
    key = policy.human_key(human)
    candidates = list(policy.grants_of(human))
    all_groups = policy.groups_of(human, groups)
    for group in all_groups:
        candidates.extend(policy.group_grants.get(group, ()))
    for grant in candidates:
        if grant.covers(resource, access):
            return _allow("human", grant.rule, f"{human} holds {access} on {grant.resource}")
    via = f" (groups: {', '.join(all_groups)})" if all_groups else ""
    detail = f"{human}{via} holds no grant for {access} on {resource}"
    return _deny("human", "human-lacks-permission", f"humans.{key}" if key else "humans", detail)


def _human_layer(policy: CompiledPolicy, session: SessionFacts, request: RequestFacts) -> LayerVerdict:
    return human_permission(policy, session.human, session.human_groups, request.resource, request.access)


def _human_live_layer(request: RequestFacts, target: _Target | None) -> tuple[LayerVerdict, LivePermission | None]:
    """The file's grants are one half of the human layer; a live source, where the rule names one,
    is the other. It can only take away: its allow never stands in for a missing grant."""
    if target is None:
        return _skipped("human_live"), None
    rule = target.rule.human_permission
    if rule is None:
        return _skipped("human_live", "no live permission source for this resource"), None
    live = request.live
    if live is None or live.source != rule.source:
        # Not consulted (or another source's answer): nothing says the human holds it. Fail closed.
        live = LivePermission(rule.source, UNKNOWN, {"error": "the live source was not consulted"})
    evidence = live.to_dict()
    allowed_by = ", ".join(sorted(rule.require.get(request.access, ())))
    said = live.evidence.get("summary") or live.verdict
    if live.verdict == ALLOW:
        return LayerVerdict("human_live", ALLOW, None, rule.rule, f"{rule.source}: {said}", evidence), live
    if live.verdict == DENY:
        detail = f"{rule.source}: {said}; {request.access} needs one of {allowed_by}"
        return LayerVerdict("human_live", DENY, "human-lacks-permission", rule.rule, detail, evidence), live
    if rule.on_unavailable == "allow":
        detail = f"{rule.source} could not answer ({said}); on_unavailable: allow, the grants alone decide"
        return LayerVerdict("human_live", ALLOW, None, f"{rule.rule}.on_unavailable", detail, evidence), live
    detail = f"{rule.source} could not answer ({said}); denied until it can (fail closed)"
    return LayerVerdict("human_live", DENY, "human-permission-unavailable", rule.rule, detail, evidence), live


def approver_permission(policy: CompiledPolicy, human: str, groups: frozenset[str], resource: str, access: str,
                        live: LivePermission | None) -> LayerVerdict:
    """Both halves of the human layer for any human (an approver, a granter): the file's grants,
    then the live source where the resource's rule names one (`live` is its answer for them;
    None where it was not asked, which fails closed like the request's own layer)."""
    held = human_permission(policy, human, groups, resource, access)
    if held.verdict != ALLOW:
        return held
    probe = RequestFacts(resource=resource, access=access, ttl_seconds=None, now=_NO_TIME, live=live)
    _, target = _resource_layer(policy, probe)
    verdict, _ = _human_live_layer(probe, target)
    return verdict if verdict.verdict == DENY else held


def _task_scope_layer(session: SessionFacts, request: RequestFacts) -> LayerVerdict:
    for i, entry in enumerate(session.scope):
        if ("*" in entry.access or request.access in entry.access) and glob_matches(entry.resource, request.resource):
            return _allow("task_scope", f"session.scope[{i}]", f"declared scope {entry.resource} covers it")
    return _deny("task_scope", "outside-task-scope", "session.scope", "the task's declared scope does not cover it")


def _agent_layer(policy: CompiledPolicy, session: SessionFacts, target: _Target | None) -> LayerVerdict:
    agent = policy.agent(session.agent)
    if agent is None:
        return _deny("agent", "unknown-agent", "agents", f"no agent entry for {session.agent!r} and no '*'")
    if target is None:
        return _skipped("agent")
    tier, provider = target.access.tier, target.rule.provider
    if tier_rank(tier) > tier_rank(agent.max_tier):
        detail = f"tier {tier} is above {agent.name}'s ceiling {agent.max_tier}"
        return _deny("agent", "agent-ceiling", f"{agent.rule}.max_tier", detail)
    if agent.providers is not None and provider not in agent.providers:
        detail = f"provider {provider} is not among {agent.name}'s providers"
        return _deny("agent", "agent-ceiling", f"{agent.rule}.providers", detail)
    return _allow("agent", agent.rule, f"{session.agent} may use tier {tier} via {provider}")


def _tier_layer(policy: CompiledPolicy, request: RequestFacts, target: _Target | None) -> LayerVerdict:
    if target is None:
        return _skipped("tier")
    name = target.access.tier
    tier = policy.tiers[name]
    rule = f"tiers.{name}"
    if target.access.break_glass is not None:  # opt-in, whatever the tier's control says
        glass = f"{target.access.rule}.break_glass"
        if request.approved:
            return _allow("tier", glass, "break-glass approved")
        if not request.justified:
            return _deny("tier", "break-glass-justification-required", glass,
                         "break-glass only: the request must carry a written justification")
        return LayerVerdict("tier", APPROVAL, "break-glass-required", glass,
                            f"break-glass: {target.access.break_glass.min_approvals} distinct approvers")
    if tier.control == "deny":
        return _deny("tier", "tier-denied", rule, f"tier {name} is denied")
    if tier.control == "approval" and not request.approved:
        return LayerVerdict("tier", APPROVAL, "approval-required", rule, f"tier {name} needs approval")
    return _allow("tier", rule, "approved" if tier.control == "approval" else f"tier {name} is auto")


def _budget_layer(policy: CompiledPolicy, session: SessionFacts) -> LayerVerdict:
    issued, active = policy.max_issued_per_session, policy.max_active_per_session
    if issued is not None and session.issued_count >= issued:
        detail = f"{session.issued_count} issued, limit {issued}"
        return _deny("budget", "budget-exceeded", "budgets.max_issued_per_session", detail)
    if active is not None and session.active_count >= active:
        detail = f"{session.active_count} active, limit {active}"
        return _deny("budget", "budget-exceeded", "budgets.max_active_per_session", detail)
    return _allow("budget", None, "within budget" if issued is not None or active is not None else "no budgets")


def _escalation_layer(
    policy: CompiledPolicy, session: SessionFacts, request: RequestFacts, target: _Target | None
) -> LayerVerdict:
    if target is None:
        return _skipped("escalation")
    tier = target.access.tier
    held = session.active_tiers & policy.escalation_tiers
    if tier in policy.escalation_tiers and held and not request.approved:
        # A chain (merge, then deploy, then a secret) is what a reviewer must see, even when
        # each link alone is auto.
        detail = f"session already holds {', '.join(sorted(held))}; another {tier} needs approval"
        return LayerVerdict("escalation", APPROVAL, "escalation-requires-approval", "escalation", detail)
    if tier in policy.escalation_tiers and held:
        return _allow("escalation", None, "escalation approved")
    return _allow("escalation", None, "no escalation chain")


def _time_layer(
    policy: CompiledPolicy, session: SessionFacts, request: RequestFacts, target: _Target | None, bounds: BoundsLookup
) -> tuple[LayerVerdict, int | None]:
    if target is None:
        return _skipped("time"), None
    name = target.access.tier
    max_ttl = policy.tiers[name].max_ttl
    if target.access.break_glass is not None:  # never longer than break-glass allows
        max_ttl = min(max_ttl or target.access.break_glass.max_ttl, target.access.break_glass.max_ttl)
    if max_ttl is None:
        return _skipped("time", f"tier {name} has no max_ttl"), None
    limits = bounds(target.rule.provider, request.resource, dict(target.options))
    remaining = math.floor((session.expires_at - request.now).total_seconds())
    if remaining < limits.min_seconds:
        detail = f"{max(remaining, 0)}s left in the session, provider minimum {limits.min_seconds}s"
        return _deny("time", "ttl-exceeds-session", "session.expires_at", detail), None
    if max_ttl < limits.min_seconds:
        detail = f"tier {name} allows {max_ttl}s, provider minimum {limits.min_seconds}s"
        return _deny("time", "ttl-exceeds-tier", f"tiers.{name}.max_ttl", detail), None
    if request.ttl_seconds is not None and request.ttl_seconds < limits.min_seconds:
        # Never stretched silently: the caller asked for less than the backend can issue.
        detail = f"requested {request.ttl_seconds}s, provider minimum {limits.min_seconds}s"
        rule = f"providers.{target.rule.provider}.min_ttl"
        return _deny("time", "ttl-below-provider-minimum", rule, detail), None
    want = request.ttl_seconds if request.ttl_seconds is not None else max_ttl
    granted = min(want, max_ttl, remaining, limits.max_seconds)
    detail = f"granted {granted}s = min(wanted {want}, tier {max_ttl}, session {remaining}, provider {limits.max_seconds})"
    return _allow("time", f"tiers.{name}.max_ttl", detail), granted


def evaluate(
    policy: CompiledPolicy, session: SessionFacts, request: RequestFacts, bounds: BoundsLookup | None = None
) -> Decision:
    """Judge one request on every layer; the first deny in layer order names the reason."""
    resource_verdict, target = _resource_layer(policy, request)
    time_verdict, granted = _time_layer(policy, session, request, target, bounds or default_bounds)
    live_verdict, live = _human_live_layer(request, target)
    layers = (
        _session_layer(session, request),
        resource_verdict,
        _human_layer(policy, session, request),
        live_verdict,
        _task_scope_layer(session, request),
        _agent_layer(policy, session, target),
        _tier_layer(policy, request, target),
        _budget_layer(policy, session),
        _escalation_layer(policy, session, request, target),
        time_verdict,
    )
    deciding = next((v for v in layers if v.verdict == DENY), None) or next(
        (v for v in layers if v.verdict == APPROVAL), None
    )
    tier = target.access.tier if target else None
    if deciding is None:
        result, reason, rule = ALLOW, "allowed", resource_verdict.matched_rule
    else:
        result, reason, rule = deciding.verdict, deciding.reason or deciding.verdict, deciding.matched_rule
    return Decision(
        result=result,
        reason=reason,
        matched_rule=rule,
        matched_line=policy.line_of(rule) if rule else None,
        policy_version=policy.version,
        tier=tier,
        provider=target.rule.provider if target else None,
        options=target.options if target else {},
        ttl_seconds=granted if result != DENY else None,
        approvers=(tuple(target.access.break_glass.approvers) if target and target.access.break_glass
                   else approvers_of(policy, tier)) if result == APPROVAL else (),
        layers=layers,
        live=live,
    )


def evaluate_with_shadow(
    policy: CompiledPolicy,
    shadow: CompiledPolicy | None,
    session: SessionFacts,
    request: RequestFacts,
    bounds: BoundsLookup | None = None,
) -> tuple[Decision, Decision | None]:
    """The enforced decision, and what the shadow policy would have said (only ever logged)."""
    enforced = evaluate(policy, session, request, bounds)
    if shadow is None:
        return enforced, None
    try:
        observed = evaluate(shadow, session, request, bounds)
    except Exception:  # a shadow policy must never change what is enforced, but it is seen to fail
        log.exception("the shadow policy %s could not evaluate %s %s; the enforced decision stands",
                      shadow.version, request.access, request.resource)
        observed = None
    return enforced, observed

