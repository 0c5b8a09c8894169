"""Who may approve what, as the policy says it: the tier's approvers (groups from the policy or
the IdP, users by email), how many, whether the delegator may, and the approver's own grants."""

from __future__ import annotations

import pytest

from broker.errors import PolicyError
from broker.policy import approval_rule, human_permission, load_policy_text, named_approver
from tests.support.approvals import APPROVALS_POLICY

POLICY = load_policy_text(APPROVALS_POLICY)


@pytest.mark.parametrize(
    ("human", "groups", "approvers", "expected"),
    [
        ("bob@example.com", frozenset(), ("group:maintainers",), "group:maintainers"),  # policy membership
        ("BOB@Example.com", frozenset(), ("group:maintainers",), "group:maintainers"),  # emails ignore case
        ("zoe@example.com", frozenset({"maintainers"}), ("group:maintainers",), "group:maintainers"),  # IdP group
        ("zoe@example.com", frozenset({"security"}), ("group:maintainers",), None),
        ("erin@example.com", frozenset(), ("group:security", "erin@example.com"), "erin@example.com"),
        ("erin@example.com", frozenset(), ("user:Erin@example.com",), "user:Erin@example.com"),
        ("mallory@example.com", frozenset(), ("group:maintainers", "erin@example.com"), None),
        ("dave@example.com", frozenset(), (), None),
    ],
)
def test_named_approver(human: str, groups: frozenset[str], approvers: tuple[str, ...], expected: str | None) -> None:
    assert named_approver(POLICY, approvers, human, groups) == expected


def test_rule_of_an_approval_tier_and_of_an_escalated_auto_tier() -> None:
    deploy = approval_rule(POLICY, "merge_deploy")
    assert deploy.approvers == ("group:maintainers",) and deploy.min_approvals == 1
    assert deploy.allow_self_approval is False
    secret = approval_rule(POLICY, "secret")
    assert secret.min_approvals == 2 and secret.approvers == ("group:security", "erin@example.com")
    # An auto tier caught by escalation takes the escalation tiers' approvers and the strictest count.
    write = approval_rule(POLICY, "write")
    assert set(write.approvers) == {"group:maintainers", "group:security", "erin@example.com"}
    assert write.min_approvals == 2 and write.allow_self_approval is False


def test_self_approval_flag_is_read_from_the_tier() -> None:
    allowing = load_policy_text(APPROVALS_POLICY.replace("approvers: [group:maintainers]}",
                                                         "approvers: [group:maintainers], allow_self_approval: true}"))
    assert approval_rule(allowing, "merge_deploy").allow_self_approval is True


def test_approver_permission_is_the_human_layer() -> None:
    assert human_permission(POLICY, "bob@example.com", frozenset(), "jwt://payments-api", "deploy").verdict == "allow"
    lacking = human_permission(POLICY, "carol@example.com", frozenset(), "jwt://payments-api", "deploy")
    assert lacking.verdict == "deny" and lacking.reason == "human-lacks-permission"
    assert lacking.matched_rule == "humans.carol@example.com"


@pytest.mark.parametrize(
    ("tier_line", "message"),
    [
        ("  write: {control: auto, max_ttl: 30m, min_approvals: 2}", "its control is auto"),
        ("  write: {control: approval, max_ttl: 30m, approvers: [a@example.com], min_approvals: 2}",
         "names only 1 approver"),
        ("  write: {control: approval, max_ttl: 30m, approvers: [group:x], min_approvals: 0}", "greater than or equal"),
    ],
)
def test_min_approvals_is_checked(tier_line: str, message: str) -> None:
    text = APPROVALS_POLICY.replace("  write:        {control: auto,     max_ttl: 30m}", tier_line)
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text)
    assert any(message in p["message"] for p in caught.value.problems), caught.value.problems
    assert all(p["line"] == 4 for p in caught.value.problems)
