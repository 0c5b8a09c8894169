"""Trust rules: anchored patterns, first match wins, the shapes a policy may not take."""

from __future__ import annotations

from typing import Any

import pytest

from broker.errors import PolicyError
from broker.policy import load_policy_text
from broker.policy.trust import CompiledTrust, TrustRule, compile_pattern
from tests.support.brokers import TEST_POLICY

GHA = "https://token.actions.githubusercontent.com"
K8S = "https://kubernetes.default.svc"


def rule(**kw: Any) -> TrustRule:
    base: dict[str, Any] = {"name": "r", "role": "orchestrator", "orchestrator": "ci", "issuer": GHA,
                            "audience": "jit-broker"}
    return TrustRule.model_validate({**base, **kw})


# (pattern, value, matches): every row is one anchoring or metacharacter trick.
PATTERN_CASES = [
    ("repo:acme/app", "repo:acme/app", True),
    ("repo:acme/app", "repo:acme/app-evil", False),  # the prefix trick
    ("repo:acme/app", "repo:acme/app:environment:prod", False),
    ("repo:acme/app", "xrepo:acme/app", False),  # the suffix trick
    ("repo:acme/app", "repo:acme/app\n", False),  # a trailing newline ($ would have matched it)
    ("repo:acme/app", "repo:acme/apps", False),
    ("repo:acme/app", "REPO:ACME/APP", False),  # case is not folded
    ("repo:acme/app:*", "repo:acme/app:ref", True),
    ("repo:acme/app:*", "repo:acme/app:environment:prod", False),  # * stops at ':'
    ("repo:acme/app:**", "repo:acme/app:environment:prod", True),
    ("repo:acme/app:**", "repo:acme/app-evil:environment:prod", False),
    ("repo:acme/*:environment:prod", "repo:acme/app:environment:prod", True),
    ("repo:acme/*:environment:prod", "repo:acme/app/x:environment:prod", False),  # * stops at '/'
    ("repo:acme/*:environment:prod", "repo:acme/:environment:prod", True),  # * may be empty
    ("repo:acme/app.x", "repo:acme/appXx", False),  # '.' is literal in a glob
    ("repo:acme/app+", "repo:acme/appp", False),  # '+' too
    ("repo:acme/(app)", "repo:acme/app", False),
    ("repo:acme/[ab]pp", "repo:acme/app", False),  # no character classes in a glob
    ("repo:acme/app?", "repo:acme/appx", False),
    ("refs/heads/**", "refs/heads/feature/x", True),
    ("refs/heads/*", "refs/heads/feature/x", False),
    ("refs/heads/main", "refs/heads/main\u200b", False),  # a zero-width tail
    ("refs/heads/main", "refs/heads/ma\u0456n", False),  # a Cyrillic i
    ("re:repo:acme/(app|api)", "repo:acme/api", True),
    ("re:repo:acme/(app|api)", "repo:acme/app-evil", False),  # fullmatch, not match
    ("re:repo:acme/app", "repo:acme/app:x", False),
    ("re:repo:acme/app", "evil:repo:acme/app", False),  # not search
    ("re:^repo:acme/app$", "repo:acme/app\n", False),  # fullmatch ignores $'s newline leniency
    ("re:.*", "anything:at/all", True),
    ("system:serviceaccount:agents:*", "system:serviceaccount:agents:runner", True),
    ("system:serviceaccount:agents:*", "system:serviceaccount:agents-evil:runner", False),
    ("system:serviceaccount:agents:*", "system:serviceaccount:agents:runner:x", False),
    ("spiffe://example.org/ns/agents/sa/*", "spiffe://example.org/ns/agents/sa/runner", True),
    ("spiffe://example.org/ns/agents/sa/*", "spiffe://example.org/ns/agents/sa/runner/../../admin", False),
    ("spiffe://example.org/ns/agents/**", "spiffe://example.org.evil.com/ns/agents/x", False),
    ("x", "", False),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), PATTERN_CASES)
def test_patterns_match_the_whole_value_only(pattern: str, value: str, expected: bool) -> None:
    assert (compile_pattern(pattern).fullmatch(value) is not None) is expected


def gha_claims(sub: str, **extra: Any) -> dict[str, Any]:
    return {"iss": GHA, "aud": "jit-broker", "sub": sub, "repository": sub.split(":")[1], **extra}


def test_first_rule_in_file_order_wins_and_role_filters() -> None:
    trust = CompiledTrust([
        rule(name="agent-first", role="agent", orchestrator=None, subject_pattern="repo:acme/**"),
        rule(name="prod", subject="repo:acme/app:environment:prod", orchestrator="deployer"),
        rule(name="any-env", subject_pattern="repo:acme/app:environment:*", orchestrator="tester"),
    ])
    found = trust.first("orchestrator", GHA, gha_claims("repo:acme/app:environment:prod"))
    assert found is not None and found.rule.name == "prod" and found.rule.rule == "trust[1]"
    found = trust.first("orchestrator", GHA, gha_claims("repo:acme/app:environment:staging"))
    assert found is not None and found.rule.orchestrator == "tester"
    found = trust.first("agent", GHA, gha_claims("repo:acme/app:environment:prod"))
    assert found is not None and found.rule.name == "agent-first"
    assert trust.first("orchestrator", GHA, gha_claims("repo:acme/app-evil:environment:prod")) is None


# Claims that look like a match but are not: wrong type, nesting, absence, lists.
CLAIM_CASES: list[tuple[dict[str, Any], bool]] = [
    ({"repository": "acme/app", "kubernetes.io": {"namespace": "agents"}}, True),
    ({"repository": "acme/app-evil", "kubernetes.io": {"namespace": "agents"}}, False),
    ({"repository": ["acme/app"], "kubernetes.io": {"namespace": "agents"}}, False),
    ({"repository": {"name": "acme/app"}, "kubernetes.io": {"namespace": "agents"}}, False),
    ({"repository": "acme/app", "kubernetes.io": {"namespace": ["agents"]}}, False),
    ({"repository": "acme/app", "kubernetes.io": "agents"}, False),
    ({"repository": "acme/app"}, False),
    ({"kubernetes.io": {"namespace": "agents"}}, False),
    ({"repository": "acme/app", "kubernetes.io": {"namespace": "agents-x"}}, False),
    ({"repository": None, "kubernetes.io": {"namespace": "agents"}}, False),
    ({"repository": 1, "kubernetes.io": {"namespace": "agents"}}, False),
    ({"repository": True, "kubernetes.io": {"namespace": "agents"}}, False),
    # A claim named with the dots, or a path of two objects: either alone is read...
    ({"repository": "acme/app", "kubernetes.io.namespace": "agents"}, True),
    ({"repository": "acme/app", "kubernetes": {"io": {"namespace": "agents"}}}, True),
    # ...but where the path reaches two claims, it reaches none: the token cannot pick.
    ({"repository": "acme/app", "kubernetes.io.namespace": "agents", "kubernetes.io": {"namespace": "x"}}, False),
    ({"repository": "acme/app", "kubernetes.io.namespace": "agents", "kubernetes.io": {"namespace": "agents"}},
     False),
]


@pytest.mark.parametrize(("extra", "expected"), CLAIM_CASES)
def test_claim_patterns_need_string_claims_that_match(extra: dict[str, Any], expected: bool) -> None:
    trust = CompiledTrust([rule(subject="s", claim_pattern={"repository": "acme/app",
                                                            "kubernetes.io.namespace": "agents"})])
    claims = {"iss": GHA, "aud": ["jit-broker"], "sub": "s", **extra}
    assert (trust.first("orchestrator", GHA, claims) is not None) is expected


@pytest.mark.parametrize(("aud", "expected"), [
    ("jit-broker", True), (["other", "jit-broker"], True), ("jit-broker-evil", False), (["jit"], False),
    ([], False), (None, False), ({"jit-broker": 1}, False), ([["jit-broker"]], False),
])
def test_the_rule_audience_must_be_among_the_token_audiences(aud: Any, expected: bool) -> None:
    trust = CompiledTrust([rule(subject="s")])
    assert (trust.first("orchestrator", GHA, {"iss": GHA, "aud": aud, "sub": "s"}) is not None) is expected


def test_an_issuer_must_match_exactly() -> None:
    trust = CompiledTrust([rule(subject="s")])
    for issuer in (GHA + "/", GHA.upper(), "https://token.actions.githubusercontent.com.evil", K8S):
        assert trust.first("orchestrator", issuer, {"aud": "jit-broker", "sub": "s"}) is None


BAD_RULES: list[tuple[dict[str, Any], str]] = [
    ({}, "exactly one of subject or subject_pattern"),
    ({"subject": "a", "subject_pattern": "a*"}, "exactly one of subject or subject_pattern"),
    ({"subject": "a", "orchestrator": None}, "names the orchestrator"),
    ({"subject": "a", "role": "agent"}, "for role orchestrator only"),
    ({"subject": "a", "claim_pattern": {"sub": "x"}}, "claim_pattern cannot name"),
    ({"subject": "a", "claim_pattern": {"aud": "x"}}, "claim_pattern cannot name"),
    ({"subject_pattern": "re:repo:(unclosed"}, "invalid regular expression"),
    ({"subject": "a", "issuer": "ftp://x"}, "String should match pattern"),
    ({"subject": "a", "issuer": "spiffe://Example.org"}, "String should match pattern"),
    ({"subject": "a", "audience": ""}, "at least 1 character"),
    ({"subject": "a", "role": "admin"}, "Input should be"),
    ({"subject": "a", "unknown": 1}, "Extra inputs are not permitted"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_RULES)
def test_malformed_rules_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rule(**fields)


def test_policy_file_trust_section_compiles_and_reports_lines() -> None:
    policy = load_policy_text(TEST_POLICY + f"""\
trust:
  - name: gha-prod
    role: orchestrator
    orchestrator: gha
    issuer: {GHA}
    audience: jit-broker
    subject: "repo:acme/app:environment:prod"
    claim_pattern: {{job_workflow_ref: "acme/app/.github/workflows/agent.yml@refs/heads/main"}}
""")
    assert [r.name for r in policy.trust.rules] == ["gha-prod"]
    with pytest.raises(PolicyError) as raised:
        load_policy_text(TEST_POLICY + f"""\
trust:
  - {{name: a, role: orchestrator, orchestrator: o, issuer: {GHA}, audience: x, subject: s}}
  - {{name: a, role: orchestrator, orchestrator: o, issuer: {GHA}, audience: x, subject: t}}
  - {{name: b, role: agent, issuer: "spiffe://example.org", audience: x, subject: "spiffe://other.org/x"}}
""")
    messages = [p["message"] for p in raised.value.problems]
    assert any("is used by trust[0]" in m for m in messages), messages
    assert any("starts with spiffe://example.org/" in m for m in messages), messages
    assert all(p["line"] > 1 for p in raised.value.problems)
