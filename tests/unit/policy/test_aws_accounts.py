"""aws rules for another account than the broker's own are refused when the policy loads (the aws
provider's grammar and its `policy_check`, applied by the policy generically)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import PolicyError
from broker.policy import PolicyStore, load_policy_text
from broker.providers.aws.grammar import own_account_check

POLICY = """\
version: 1
tiers:
  read: {control: auto, max_ttl: 1h}
resources:
  - match: "jwt://x"
    provider: native
    access: {read: {tier: read}}
  - match: "aws://ACCOUNT/role/ro"
    provider: aws
    access: {read: {tier: read}}
"""
OWN, OTHER = "123456789012", "210987654321"


def policy_for(account: str) -> str:
    return POLICY.replace("ACCOUNT", account)


def test_own_account_loads() -> None:
    policy = load_policy_text(policy_for(OWN), checks={"aws": own_account_check(OWN)})
    assert policy.match_resource(f"aws://{OWN}/role/ro") is not None


def test_other_account_is_refused_at_its_line() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy_text(policy_for(OTHER), checks={"aws": own_account_check(OWN)})
    [problem] = caught.value.problems
    assert problem["line"] == 8 and problem["path"] == "resources[1].match"
    assert OTHER in problem["message"] and "own account" in problem["message"]
    assert caught.value.code == "policy-invalid"


@pytest.mark.parametrize("match", ["aws://*/role/ro", "aws://**", "aws://12345678901*/role/ro"])
def test_an_aws_rule_must_name_one_account_literally(match: str) -> None:
    text = POLICY.replace('"aws://ACCOUNT/role/ro"', f'"{match}"')
    with pytest.raises(PolicyError, match="must name one account"):
        load_policy_text(text)  # whatever the broker's account: a glob could reach any other


def test_without_a_known_account_only_the_form_is_checked() -> None:
    assert load_policy_text(policy_for(OTHER)) is not None


def test_reload_refuses_a_cross_account_rule_and_keeps_the_last_good(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_for(OWN))
    store = PolicyStore(path, checks={"aws": own_account_check(OWN)})
    good = store.current.version
    path.write_text(policy_for(OTHER))
    assert store.reload() is False
    assert store.current.version == good


def test_adopting_the_account_checks_the_policy_in_force(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_for(OTHER))
    store = PolicyStore(path)  # account not known yet
    with pytest.raises(PolicyError) as caught:
        store.adopt_checks({"aws": own_account_check(OWN)})
    assert caught.value.problems[0]["line"] == 8
    PolicyStore(path).adopt_checks({"aws": own_account_check(OTHER)})  # its own account: fine
