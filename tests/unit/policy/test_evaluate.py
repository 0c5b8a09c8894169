"""The evaluator, layer by layer: one table of (session, request) -> exact decision."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.policy import RequestFacts, ScopeEntry, SessionFacts, evaluate, evaluate_with_shadow, load_policy_text
from broker.providers.base import TtlBounds

POLICY = """\
version: 1
tiers:
  read:         {control: auto, max_ttl: 1h}
  write:        {control: auto, max_ttl: 30m}
  review:       {control: auto, max_ttl: 30m}
  merge_deploy: {control: auto, max_ttl: 10m}
  secret:       {control: approval, max_ttl: 10m, approvers: [group:security]}
  destructive:  {control: deny}
resources:
  - match: "github://acme/widgets"
    provider: github
    access:
      read:  {tier: read, permissions: {contents: read}}
      merge: {tier: merge_deploy, permissions: {contents: write}}
  - match: "github://acme/*"
    provider: github
    access:
      read:   {tier: read}
      write:  {tier: write, permissions: {contents: write}, repositories: [gadgets]}
      review: {tier: review}
      delete: {tier: destructive}
  - match: "vault://secret/**"
    provider: vault
    access:
      read: {tier: secret, policies: [ledger-read]}
  - match: "aws://123456789012/role/*"
    provider: aws
    access:
      read:   {tier: read, max_duration: 1h}
      deploy: {tier: merge_deploy}
  - match: "jwt://payments-api"
    provider: native
    access:
      read:  {tier: read, scope: "ledger:read"}
      write: {tier: write, scope: "ledger:write", audience: "https://payments.example.com"}
  - match: "github://acme/legacy"
    provider: github
    access:
      read: {tier: write}
humans:
  alice@example.com:
    grants:
      - {resource: "github://acme/*", access: [read, write, review, delete]}
      - {resource: "jwt://payments-api", access: ["*"]}
      - {resource: "vault://secret/**", access: [read]}
      - {resource: "aws://123456789012/role/*", access: [read, deploy]}
  bob@example.com: {groups: [maintainers]}
  frank@example.com:
    grants:
      - {resource: "vault://secret/*", access: [read]}
groups:
  maintainers:
    members: [carol@example.com]
    grants:
      - {resource: "github://acme/widgets", access: [merge]}
      - {resource: "github://acme/*", access: [read, write, review]}
agents:
  claude-code:     {max_tier: secret}
  reviewer-bot:    {max_tier: read, providers: [github]}
  break-glass-bot: {max_tier: destructive}
  "*":             {max_tier: write}
budgets: {max_issued_per_session: 10, max_active_per_session: 3}
"""

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
ALL_SCOPE = (
    ScopeEntry("github://acme/*", ("*",)),
    ScopeEntry("jwt://payments-api", ("read", "write")),
    ScopeEntry("vault://secret/**", ("read",)),
    ScopeEntry("aws://123456789012/role/*", ("*",)),
)
SESSION = SessionFacts(
    session_id="ses_1",
    human="alice@example.com",
    agent="claude-code",
    task_id="task-1",
    scope=ALL_SCOPE,
    status="active",
    expires_at=NOW + timedelta(hours=2),
)


def aws_bounds(provider: str, resource: str, options: dict) -> TtlBounds:
    # STS's floor of 900 s; a lower ceiling than the tier so clamping to it is visible.
    return TtlBounds(900, 2400) if provider == "aws" else TtlBounds(1, 86400)


@pytest.fixture(scope="module")
def policies() -> dict[str, Any]:
    return {
        "main": load_policy_text(POLICY),
        "no-fallback": load_policy_text(POLICY.replace('  "*":             {max_tier: write}\n', "")),
    }


def case(
    id: str,
    resource: str,
    access: str,
    result: str,
    reason: str,
    rule: str | None,
    *,
    ttl: int | None = None,
    session: dict | None = None,
    request: dict | None = None,
    policy: str = "main",
    layer: tuple[str, str] | None = None,
):
    return pytest.param(resource, access, session or {}, request or {}, policy, result, reason, rule, ttl, layer, id=id)


ALLOW, DENY, APPROVAL = "allow", "deny", "approval_required"
T = timedelta

CASES = [
    # session
    case("session-status-ended", "github://acme/gadgets", "read", DENY, "session-ended", "session.status",
         session={"status": "ended"}),
    case("session-expired", "github://acme/gadgets", "read", DENY, "session-ended", "session.expires_at",
         session={"expires_at": NOW - T(seconds=1)}),
    case("session-expires-exactly-now", "github://acme/gadgets", "read", DENY, "session-ended", "session.expires_at",
         session={"expires_at": NOW}),
    case("session-ended-beats-unknown-resource", "gitlab://acme/x", "read", DENY, "session-ended", "session.status",
         session={"status": "revoked"}),
    # resource
    case("allow-exact-rule", "github://acme/widgets", "read", ALLOW, "allowed", "resources[0].access.read", ttl=3600),
    case("allow-glob-rule", "github://acme/gadgets", "write", ALLOW, "allowed", "resources[1].access.write", ttl=1800),
    case("unknown-resource", "gitlab://acme/widgets", "read", DENY, "unknown-resource", "resources"),
    case("unknown-access-on-exact", "github://acme/widgets", "write", DENY, "unknown-access", "resources[0]"),
    case("unknown-access-on-glob", "github://acme/gadgets", "merge", DENY, "unknown-access", "resources[1]"),
    case("earlier-glob-beats-later-exact", "github://acme/legacy", "read", ALLOW, "allowed", "resources[1].access.read",
         ttl=3600),
    case("star-does-not-cross-slash", "aws://123456789012/role/team/ro", "read", DENY, "unknown-resource", "resources"),
    case("github-resource-is-owner-and-repo", "github://acme/widgets/sub", "read", DENY, "invalid-resource", None),
    case("non-canonical-resource-refused", "github://Acme/Widgets", "read", DENY, "invalid-resource", None),
    case("percent-encoded-escape-refused", "vault://secret/%2e%2e/sys/x", "read", DENY, "invalid-resource", None),
    case("doublestar-crosses-slash", "vault://secret/team/app/key", "read", ALLOW, "allowed",
         "resources[2].access.read", ttl=600, request={"approved": True}),
    case("malformed-resource-refused", "github://acme/*", "read", DENY, "invalid-resource", None),
    # human
    case("human-lacks-access", "github://acme/widgets", "merge", DENY, "human-lacks-permission",
         "humans.alice@example.com"),
    case("human-unknown", "github://acme/gadgets", "read", DENY, "human-lacks-permission", "humans",
         session={"human": "mallory@example.com"}),
    case("human-email-case-insensitive", "github://acme/gadgets", "read", ALLOW, "allowed", "resources[1].access.read",
         ttl=3600, session={"human": "Alice@Example.COM"}, layer=("human", "humans.alice@example.com.grants[0]")),
    case("human-grant-star-access", "jwt://payments-api", "write", ALLOW, "allowed", "resources[4].access.write",
         ttl=1800, layer=("human", "humans.alice@example.com.grants[1]")),
    case("group-via-human-groups", "github://acme/widgets", "merge", ALLOW, "allowed", "resources[0].access.merge",
         ttl=600, session={"human": "bob@example.com"}, layer=("human", "groups.maintainers.grants[0]")),
    case("group-via-members", "github://acme/widgets", "merge", ALLOW, "allowed", "resources[0].access.merge",
         ttl=600, session={"human": "carol@example.com"}, layer=("human", "groups.maintainers.grants[0]")),
    case("group-via-idp-claim", "github://acme/gadgets", "review", ALLOW, "allowed", "resources[1].access.review",
         ttl=1800, session={"human": "dave@example.com", "human_groups": frozenset({"maintainers"})},
         layer=("human", "groups.maintainers.grants[1]")),
    case("idp-group-without-grants", "github://acme/gadgets", "read", DENY, "human-lacks-permission", "humans",
         session={"human": "erin@example.com", "human_groups": frozenset({"contractors"})}),
    case("grant-star-does-not-cross-slash", "vault://secret/team/key", "read", DENY, "human-lacks-permission",
         "humans.frank@example.com", session={"human": "frank@example.com"}),
    case("grant-star-within-segment", "vault://secret/key", "read", APPROVAL, "approval-required", "tiers.secret",
         ttl=600, session={"human": "frank@example.com"}, layer=("human", "humans.frank@example.com.grants[0]")),
    # task scope
    case("outside-task-scope-resource", "aws://123456789012/role/ro", "read", DENY, "outside-task-scope",
         "session.scope", session={"scope": ALL_SCOPE[:3]}),
    case("outside-task-scope-access", "github://acme/gadgets", "write", DENY, "outside-task-scope", "session.scope",
         session={"scope": (ScopeEntry("github://acme/gadgets", ("read",)),)}),
    case("scope-star-does-not-cross-slash", "vault://secret/a/b", "read", DENY, "outside-task-scope", "session.scope",
         session={"scope": (ScopeEntry("vault://secret/*", ("read",)),)}, request={"approved": True}),
    case("scope-entry-index", "jwt://payments-api", "read", ALLOW, "allowed", "resources[4].access.read", ttl=3600,
         layer=("task_scope", "session.scope[1]")),
    case("empty-scope", "github://acme/gadgets", "read", DENY, "outside-task-scope", "session.scope",
         session={"scope": ()}),
    # agent
    case("unknown-agent", "github://acme/gadgets", "read", DENY, "unknown-agent", "agents",
         session={"agent": "codex"}, policy="no-fallback"),
    case("agent-fallback-allows", "github://acme/gadgets", "write", ALLOW, "allowed", "resources[1].access.write",
         ttl=1800, session={"agent": "codex"}, layer=("agent", "agents.*")),
    case("agent-fallback-ceiling", "github://acme/gadgets", "review", DENY, "agent-ceiling", "agents.*.max_tier",
         session={"agent": "codex"}),
    case("agent-tier-ceiling", "github://acme/gadgets", "write", DENY, "agent-ceiling",
         "agents.reviewer-bot.max_tier", session={"agent": "reviewer-bot"}),
    case("agent-provider-ceiling", "jwt://payments-api", "read", DENY, "agent-ceiling",
         "agents.reviewer-bot.providers", session={"agent": "reviewer-bot"}),
    case("agent-within-ceiling", "github://acme/gadgets", "read", ALLOW, "allowed", "resources[1].access.read",
         ttl=3600, session={"agent": "reviewer-bot"}),
    # tier
    case("tier-denied", "github://acme/gadgets", "delete", DENY, "tier-denied", "tiers.destructive",
         session={"agent": "break-glass-bot"}),
    case("tier-denied-even-approved", "github://acme/gadgets", "delete", DENY, "tier-denied", "tiers.destructive",
         session={"agent": "break-glass-bot"}, request={"approved": True}),
    case("tier-approval-required", "vault://secret/ledger", "read", APPROVAL, "approval-required", "tiers.secret",
         ttl=600),
    case("tier-approval-satisfied", "vault://secret/ledger", "read", ALLOW, "allowed", "resources[2].access.read",
         ttl=600, request={"approved": True}),
    case("deny-beats-approval", "vault://secret/ledger", "read", DENY, "budget-exceeded",
         "budgets.max_issued_per_session", session={"issued_count": 10}),
    case("earlier-deny-beats-approval", "vault://secret/ledger", "read", DENY, "outside-task-scope", "session.scope",
         session={"scope": ALL_SCOPE[:2]}),
    # budget
    case("budget-issued-exceeded", "github://acme/gadgets", "read", DENY, "budget-exceeded",
         "budgets.max_issued_per_session", session={"issued_count": 10}),
    case("budget-issued-last-one", "github://acme/gadgets", "read", ALLOW, "allowed", "resources[1].access.read",
         ttl=3600, session={"issued_count": 9}),
    case("budget-active-exceeded", "github://acme/gadgets", "read", DENY, "budget-exceeded",
         "budgets.max_active_per_session", session={"active_count": 3}),
    case("budget-both-exceeded-issued-first", "github://acme/gadgets", "read", DENY, "budget-exceeded",
         "budgets.max_issued_per_session", session={"issued_count": 11, "active_count": 5}),
    # escalation
    case("escalation-auto-tier-chained", "github://acme/widgets", "merge", APPROVAL, "escalation-requires-approval",
         "escalation", ttl=600, session={"human": "bob@example.com", "active_tiers": frozenset({"secret"})}),
    case("escalation-approved", "github://acme/widgets", "merge", ALLOW, "allowed", "resources[0].access.merge",
         ttl=600, session={"human": "bob@example.com", "active_tiers": frozenset({"merge_deploy"})},
         request={"approved": True}),
    case("escalation-not-for-low-tier", "github://acme/gadgets", "read", ALLOW, "allowed", "resources[1].access.read",
         ttl=3600, session={"active_tiers": frozenset({"secret", "merge_deploy"})}),
    case("escalation-needs-held-high-tier", "github://acme/widgets", "merge", ALLOW, "allowed",
         "resources[0].access.merge", ttl=600, session={"human": "bob@example.com", "active_tiers": frozenset({"write"})}),
    case("tier-approval-reported-before-escalation", "vault://secret/ledger", "read", APPROVAL, "approval-required",
         "tiers.secret", ttl=600, session={"active_tiers": frozenset({"merge_deploy"})}),
    # time
    case("ttl-requested-kept", "github://acme/gadgets", "read", ALLOW, "allowed", "resources[1].access.read", ttl=600,
         request={"ttl_seconds": 600}),
    case("ttl-clamped-to-tier", "github://acme/gadgets", "read", ALLOW, "allowed", "resources[1].access.read",
         ttl=3600, request={"ttl_seconds": 99999}),
    case("ttl-clamped-to-session", "github://acme/gadgets", "read", ALLOW, "allowed", "resources[1].access.read",
         ttl=1000, session={"expires_at": NOW + T(seconds=1000)}),
    case("ttl-session-remaining-floored", "github://acme/gadgets", "read", ALLOW, "allowed",
         "resources[1].access.read", ttl=1000, session={"expires_at": NOW + T(seconds=1000, milliseconds=900)}),
    case("ttl-clamped-to-provider-max", "aws://123456789012/role/ro", "read", ALLOW, "allowed",
         "resources[3].access.read", ttl=2400),
    case("ttl-at-provider-minimum", "aws://123456789012/role/ro", "read", ALLOW, "allowed", "resources[3].access.read",
         ttl=900, request={"ttl_seconds": 900}),
    case("ttl-exceeds-session", "aws://123456789012/role/ro", "read", DENY, "ttl-exceeds-session",
         "session.expires_at", session={"expires_at": NOW + T(seconds=600)}),
    case("ttl-exceeds-tier", "aws://123456789012/role/deploy", "deploy", DENY, "ttl-exceeds-tier",
         "tiers.merge_deploy.max_ttl"),
    case("ttl-below-provider-minimum", "aws://123456789012/role/ro", "read", DENY, "ttl-below-provider-minimum",
         "providers.aws.min_ttl", request={"ttl_seconds": 300}),
]


@pytest.mark.parametrize(
    ("resource", "access", "session", "request_", "policy", "result", "reason", "rule", "ttl", "layer"), CASES)
def test_decision(policies, resource, access, session, request_, policy, result, reason, rule, ttl, layer):
    facts = replace(SESSION, **session)
    req = RequestFacts(**{"resource": resource, "access": access, "ttl_seconds": None, "now": NOW, **request_})
    decision = evaluate(policies[policy], facts, req, aws_bounds)
    assert (decision.result, decision.reason, decision.matched_rule) == (result, reason, rule)
    assert decision.ttl_seconds == ttl
    assert [v.layer for v in decision.layers] == [
        "session", "resource", "human", "human_live", "task_scope", "agent", "tier", "budget", "escalation", "time",
    ]
    if layer is not None:
        verdict = next(v for v in decision.layers if v.layer == layer[0])
        assert (verdict.verdict, verdict.matched_rule) == ("allow", layer[1])


def _request(resource: str, access: str, **kw) -> RequestFacts:
    return RequestFacts(resource=resource, access=access, ttl_seconds=kw.pop("ttl_seconds", None), now=NOW, **kw)


def test_table_is_large_enough():
    assert len(CASES) >= 45


def test_allow_carries_provider_tier_options_and_line(policies):
    policy = policies["main"]
    decision = evaluate(policy, SESSION, _request("github://acme/gadgets", "write"))
    assert decision.provider == "github" and decision.tier == "write"
    assert decision.options == {"permissions": {"contents": "write"}, "repositories": ["gadgets"]}
    assert decision.matched_line == POLICY.splitlines().index("      write:  {tier: write, permissions: "
                                                              "{contents: write}, repositories: [gadgets]}") + 1
    assert decision.policy_version == policy.version
    assert decision.approvers == ()


def test_native_audience_defaults_to_the_resource_path(policies):
    read = evaluate(policies["main"], SESSION, _request("jwt://payments-api", "read"))
    write = evaluate(policies["main"], SESSION, _request("jwt://payments-api", "write"))
    assert read.options == {"scope": "ledger:read", "audience": "payments-api"}
    assert write.options == {"scope": "ledger:write", "audience": "https://payments.example.com"}


def test_approval_names_the_tier_approvers(policies):
    decision = evaluate(policies["main"], SESSION, _request("vault://secret/ledger", "read"))
    assert decision.result == "approval_required"
    assert decision.approvers == ("group:security",)
    assert decision.options == {"policies": ["ledger-read"]}


def test_escalation_of_an_auto_tier_borrows_escalation_approvers(policies):
    session = replace(SESSION, human="bob@example.com", active_tiers=frozenset({"secret"}))
    decision = evaluate(policies["main"], session, _request("github://acme/widgets", "merge"))
    assert decision.reason == "escalation-requires-approval"
    assert decision.approvers == ("group:security",)


def test_session_rules_have_no_line_and_skipped_layers_are_marked(policies):
    session = replace(SESSION, status="ended")
    decision = evaluate(policies["main"], session, _request("gitlab://x/y", "read"))
    assert decision.matched_line is None
    verdicts = {v.layer: v.verdict for v in decision.layers}
    assert verdicts == {
        "session": "deny", "resource": "deny", "human": "deny", "human_live": "skipped", "task_scope": "deny",
        "agent": "skipped",
        "tier": "skipped", "budget": "allow", "escalation": "skipped", "time": "skipped",
    }
    assert decision.tier is None and decision.provider is None and decision.ttl_seconds is None


def test_to_dict_is_json_ready(policies):
    import json

    decision = evaluate(policies["main"], SESSION, _request("vault://secret/ledger", "read"))
    body = json.loads(json.dumps(decision.to_dict()))
    assert body["result"] == "approval_required"
    assert body["approvers"] == ["group:security"]
    assert body["layers"][6] == {
        "layer": "tier", "verdict": "approval_required", "reason": "approval-required",
        "matched_rule": "tiers.secret", "detail": "tier secret needs approval", "evidence": None,
    }
    assert body["human_permission"] is None


def test_no_budgets_means_unlimited():
    policy = load_policy_text(POLICY.replace("budgets: {max_issued_per_session: 10, max_active_per_session: 3}\n", ""))
    session = replace(SESSION, issued_count=10_000, active_count=10_000)
    assert evaluate(policy, session, _request("github://acme/gadgets", "read")).result == "allow"


def test_shadow_is_evaluated_beside_but_never_enforced(policies):
    stricter = load_policy_text(POLICY.replace("claude-code:     {max_tier: secret}", "claude-code:     {max_tier: read}"))
    request = _request("github://acme/gadgets", "write")
    alone = evaluate(policies["main"], SESSION, request)
    enforced, shadow = evaluate_with_shadow(policies["main"], stricter, SESSION, request)
    assert enforced == alone
    assert (enforced.result, enforced.reason) == ("allow", "allowed")
    assert shadow is not None
    assert (shadow.result, shadow.reason, shadow.matched_rule) == ("deny", "agent-ceiling", "agents.claude-code.max_tier")
    assert shadow.policy_version != enforced.policy_version


def test_shadow_absent(policies):
    enforced, shadow = evaluate_with_shadow(policies["main"], None, SESSION, _request("github://acme/gadgets", "read"))
    assert enforced.result == "allow" and shadow is None


def test_a_failing_shadow_never_breaks_enforcement(policies):
    calls = []

    def bounds(provider: str, resource: str, options: dict) -> TtlBounds:
        calls.append(provider)
        if len(calls) > 1:  # the shadow's evaluation comes second
            raise RuntimeError("bounds lookup failed")
        return TtlBounds(1, 86400)

    shadow_policy = load_policy_text(POLICY + "# shadow\n")
    request = _request("github://acme/gadgets", "read")
    enforced, shadow = evaluate_with_shadow(policies["main"], shadow_policy, SESSION, request, bounds)
    assert (enforced.result, enforced.ttl_seconds) == ("allow", 3600)
    assert shadow is None


def test_the_policy_package_imports_no_api_providers_or_database():
    import subprocess
    import sys

    code = (
        "import sys, broker.policy\n"
        "bad = [m for m in sys.modules\n"
        "       if m.startswith(('broker.api', 'broker.providers', 'broker.db', 'sqlalchemy', 'sqlmodel'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_bounds_are_one_second_to_one_day(policies):
    long_session = replace(SESSION, expires_at=NOW + timedelta(days=3))
    policy = load_policy_text(POLICY.replace("read:         {control: auto, max_ttl: 1h}", "read: {control: auto, max_ttl: 2d}"))
    assert evaluate(policy, long_session, _request("github://acme/gadgets", "read")).ttl_seconds == 86400
    assert evaluate(policy, long_session, _request("github://acme/gadgets", "read", ttl_seconds=1)).ttl_seconds == 1
