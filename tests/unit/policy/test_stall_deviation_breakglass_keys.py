"""The policy keys of issue 26 (`liveness`, `deviation`, an access's `break_glass`): what they
accept, what they refuse (line-precise, never silently changed), and what they decide."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.errors import InvalidRequest, PolicyError
from broker.policy import RequestFacts, ScopeEntry, SessionFacts, evaluate, load_policy_text
from broker.sessions.idle import idle_timeout_for

HEAD = """\
version: 1
tiers:
  read:        {control: auto, max_ttl: 1h}
  destructive: {control: deny}
resources:
  - match: "jwt://svc/*"
    provider: native
    access:
      read: {tier: read}
      drop:
        tier: destructive
"""
TAIL = """\
humans:
  alice@example.com: {grants: [{resource: "jwt://svc/*", access: [read, drop]}]}
agents:
  ops-bot: {max_tier: destructive}
"""


def policy(break_glass: str = "", extra: str = "") -> str:
    glass = f"        break_glass: {break_glass}\n" if break_glass else ""
    return HEAD + glass + TAIL + extra


GOOD_GLASS = "{approvers: [group:sre, bob@example.com], group: oncall, max_ttl: 10m, reviewers: [group:security]}"

REFUSED = [
    ("break-glass ttl above 15m", policy("{approvers: [group:sre], max_ttl: 16m}"), "max_ttl"),
    ("break-glass with one approver", policy("{approvers: [group:sre], min_approvals: 1}"), "min_approvals"),
    ("break-glass without approvers", policy("{approvers: []}"), "approvers"),
    ("break-glass unknown key", policy("{approvers: [group:sre], approve_self: true}"), "approve_self"),
    ("break-glass review window too long", policy("{approvers: [group:sre], review_within: 31d}"), "review_within"),
    ("idle timeout above its maximum", policy(extra="liveness: {idle_timeout: 2h, max_idle_timeout: 1h}\n"),
     "liveness"),
    ("idle timeout zero", policy(extra="liveness: {idle_timeout: 0}\n"), "idle_timeout"),
    ("idle timeout not a duration", policy(extra="liveness: {idle_timeout: soon}\n"), "idle_timeout"),
    ("deviation without refusals", policy(extra="deviation: {window: 10m}\n"), "refusals"),
    ("deviation zero refusals", policy(extra="deviation: {refusals: 0, window: 10m}\n"), "refusals"),
    ("deviation unknown action", policy(extra="deviation: {refusals: 3, window: 10m, action: kill}\n"), "action"),
    ("deviation window too long", policy(extra="deviation: {refusals: 3, window: 8d}\n"), "window"),
]


@pytest.mark.parametrize(("name", "text", "key"), REFUSED, ids=[r[0] for r in REFUSED])
def test_bad_keys_are_refused_with_the_line(name: str, text: str, key: str) -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text)
    problems = caught.value.problems
    assert problems and any(key in str(p.get("path", "")) + str(p.get("message", "")) for p in problems), problems
    assert all(isinstance(p.get("line"), int) for p in problems), problems


def test_good_keys_compile_with_their_defaults() -> None:
    compiled = load_policy_text(policy(GOOD_GLASS, "liveness: {idle_timeout: 15m}\n"
                                                   "deviation: {refusals: 5, window: 10m}\n"))
    glass = compiled.match_resource("jwt://svc/x").access["drop"].break_glass  # type: ignore[union-attr]
    assert glass is not None and glass.min_approvals == 2 and glass.max_ttl == 600 and glass.review_within == 86400
    assert compiled.liveness is not None and compiled.liveness.idle_timeout == 900
    assert compiled.deviation is not None and compiled.deviation.action == "suspend" and compiled.deviation.window == 600
    # Break-glass keys never reach the provider.
    assert "break_glass" not in compiled.match_resource("jwt://svc/x").access["drop"].options  # type: ignore[union-attr]


@pytest.mark.parametrize(("liveness", "asked", "expected"), [
    ("", None, None), ("", 60, 60),
    ("liveness: {idle_timeout: 15m}\n", None, 900), ("liveness: {idle_timeout: 15m}\n", 600, 600),
    ("liveness: {idle_timeout: 15m, max_idle_timeout: 1h}\n", 3600, 3600),
])
def test_the_idle_timeout_at_provision(liveness: str, asked: int | None, expected: int | None) -> None:
    assert idle_timeout_for(load_policy_text(policy(extra=liveness)), asked) == expected


@pytest.mark.parametrize("asked", [901, 3600, 86400])
def test_an_idle_timeout_above_the_policys_is_refused(asked: int) -> None:
    with pytest.raises(InvalidRequest) as caught:
        idle_timeout_for(load_policy_text(policy(extra="liveness: {idle_timeout: 15m}\n")), asked)
    assert caught.value.code == "idle-timeout-out-of-bounds"


NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def facts(**kw: object) -> SessionFacts:
    base: dict[str, object] = {"session_id": "ses_x", "human": "alice@example.com", "agent": "ops-bot",
                               "task_id": "t", "scope": (ScopeEntry("jwt://svc/*", ("*",)),), "status": "active",
                               "expires_at": NOW + timedelta(hours=1)}
    return SessionFacts(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize(("justified", "approved", "result", "reason"), [
    (False, False, "deny", "break-glass-justification-required"),
    (True, False, "approval_required", "break-glass-required"),
    (True, True, "allow", "allowed"),
])
def test_break_glass_decisions(justified: bool, approved: bool, result: str, reason: str) -> None:
    compiled = load_policy_text(policy(GOOD_GLASS))
    decision = evaluate(compiled, facts(), RequestFacts("jwt://svc/db", "drop", None, NOW, approved=approved,
                                                        justified=justified))
    assert (decision.result, decision.reason) == (result, reason)
    if result == "approval_required":
        assert decision.approvers == ("group:sre", "bob@example.com")
    if result == "allow":
        assert decision.ttl_seconds == 600  # break-glass max_ttl, though the tier has none


def test_without_break_glass_the_destructive_tier_stays_denied_justified_or_not() -> None:
    compiled = load_policy_text(policy())
    for justified in (False, True):
        decision = evaluate(compiled, facts(), RequestFacts("jwt://svc/db", "drop", None, NOW, justified=justified))
        assert (decision.result, decision.reason) == ("deny", "tier-denied")


@pytest.mark.parametrize(("kw", "reason"), [
    ({"suspended": True}, "session-suspended"),
    ({"idle_until": NOW}, "session-stalled"),
    ({"idle_until": NOW - timedelta(seconds=1)}, "session-stalled"),
    ({"idle_until": NOW + timedelta(seconds=1)}, "allowed"),
    ({"suspended": True, "status": "ended"}, "session-ended"),
])
def test_the_session_layer_refuses_suspended_and_stalled_sessions(kw: dict[str, object], reason: str) -> None:
    compiled = load_policy_text(policy())
    decision = evaluate(compiled, facts(**kw), RequestFacts("jwt://svc/db", "read", None, NOW))
    assert decision.reason == reason
