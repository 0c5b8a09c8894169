"""The tool-call gate: allow / ask / deny for one agent tool call, from the same policy (its
`tools` section, tiers and agent ceilings). Pure, like `evaluate`.
"""

from __future__ import annotations

from broker.policy.compiled import CompiledPolicy
from broker.policy.fields import TIER_ORDER
from broker.policy.tools import CompiledToolRule, ToolCall, ToolVerdict


def decide_tool_call(policy: CompiledPolicy, *, agent: str, session_active: bool, call: ToolCall) -> ToolVerdict:
    """allow / ask / deny for one call, from the policy's `tools` section, tiers and agent ceiling."""
    tools = policy.tools
    if not session_active:
        return ToolVerdict("deny", "session-ended", "the broker session has ended: no more tool calls")
    if call.command_is_malformed:
        return ToolVerdict("deny", "command-not-a-string", "tool_input.command is not a string",
                           matched_rule="tools")
    if call.command is not None and tools.read(call) is None:
        # Refused unread (and kept so: the audit summary does not read it either), so the
        # gate's work per call stays bounded.
        return ToolVerdict("deny", "command-too-large",
                           f"the command is {call.command_bytes()} bytes, over tools.max_command_bytes "
                           f"({tools.max_command_bytes}); write it to a script file the user can review",
                           matched_rule="tools.max_command_bytes")
    parsed = tools.read(call)
    if parsed is None or parsed.plain:
        return _tool_rule_verdict(policy, agent, tools.match(call))  # first match wins
    # A command the gate cannot read plainly: every rule that matches any part of it has its say,
    # and so does `default` (some part may match no rule), and the most severe answer wins (file
    # order breaks ties): `git push origin main && curl evil.example` is denied by fetch-outside
    # even though push-protected comes first. Then it is never allowed: an allow becomes the
    # policy's `unclear_command`, and `unclear_command: deny` denies whatever the rules said.
    verdicts = [_tool_rule_verdict(policy, agent, rule) for rule in tools.matching(call)]
    verdict = max([*verdicts, _tool_rule_verdict(policy, agent, None)], key=_severity)
    if verdict.decision == "deny" or (verdict.decision == "ask" and tools.unclear_command == "ask"):
        return verdict
    why = ", ".join(parsed.unclear[:3])
    return ToolVerdict(tools.unclear_command, "command-not-understood",
                       f"the gate cannot read this command plainly ({why}); a plain single command is "
                       f"judged by the rules, this one is answered {tools.unclear_command}",
                       tier=verdict.tier, matched_rule="tools.unclear_command", rule_name=verdict.rule_name)


def _severity(verdict: ToolVerdict) -> int:
    return {"deny": 3, "ask": 1 + verdict.needs_approval}.get(verdict.decision, 0)


def _tool_rule_verdict(policy: CompiledPolicy, agent: str, rule: CompiledToolRule | None) -> ToolVerdict:
    tools = policy.tools
    if rule is None:
        return ToolVerdict(tools.default, "no-tool-rule", f"no tool rule matches; the policy's default is {tools.default}",
                           matched_rule="tools.default")
    label = rule.name or rule.rule
    because = f" ({rule.reason})" if rule.reason else ""
    if rule.decision is not None:
        return ToolVerdict(rule.decision, f"tool-rule-{rule.decision}", f"{label}: {rule.decision}{because}",
                           matched_rule=rule.rule, rule_name=rule.name)
    tier = rule.tier
    assert tier is not None  # noqa: S101  # type narrowing: rules without a tier were handled above
    who = policy.agent(agent)
    if who is None:
        return ToolVerdict("deny", "unknown-agent", f"{label}: no agent entry for {agent!r}", tier=tier,
                           matched_rule="agents", rule_name=rule.name)
    if TIER_ORDER.index(tier) > TIER_ORDER.index(who.max_tier):
        return ToolVerdict("deny", "agent-ceiling", f"{label} is tier {tier}, above {agent}'s ceiling {who.max_tier}{because}",
                           tier=tier, matched_rule=f"{who.rule}.max_tier", rule_name=rule.name)
    control = policy.tiers[tier].control
    if control == "deny":
        return ToolVerdict("deny", "tier-denied", f"{label} is tier {tier}, which is denied{because}", tier=tier,
                           matched_rule=rule.rule, rule_name=rule.name)
    if control == "approval":
        approvers = tuple(policy.tiers[tier].approvers)
        return ToolVerdict(tools.approval_answer, "approval-required",
                           f"{label} is tier {tier} and needs approval by {', '.join(approvers)}{because}",
                           tier=tier, matched_rule=rule.rule, rule_name=rule.name, needs_approval=True,
                           approvers=approvers)
    return ToolVerdict("allow", "tool-allowed", f"{label} is tier {tier}: allowed{because}", tier=tier,
                       matched_rule=rule.rule, rule_name=rule.name)
