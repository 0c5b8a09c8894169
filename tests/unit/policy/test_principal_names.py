"""A policy naming a human or group outside the canonical form is refused at load, on the right
line, and a reload with one keeps the last good policy: the policy never names a look-alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.errors import PolicyError
from broker.policy import PolicyStore
from broker.policy.approvers import named_approver
from broker.policy.evaluate import human_permission
from broker.policy.loader import load_policy_text
from tests.unit.identity.test_principals import LOOKALIKES_OF_KATE

POLICY = """\
version: 1
tiers:
  read: {control: auto, max_ttl: 1h}
  merge_deploy: {control: approval, max_ttl: 10m, approvers: [group:maintainers, "user:{approver}"]}
resources:
  - {match: "jwt://svc", provider: native, access: {read: {tier: read}, deploy: {tier: merge_deploy}}}
humans:
  "{human}":
    groups: [maintainers]
    grants: [{resource: "jwt://svc", access: [read, deploy]}]
groups:
  maintainers:
    members: ["{member}"]
"""
LINES = {"approver": 4, "human": 8, "member": 13}
KATE = "kate@example.com"
# Names that YAML can carry in a double-quoted scalar (escapes written out), and that the Email
# pattern alone (no "@"-less, no whitespace) would let through or not: either way, refused.
CORPUS = [name for name in LOOKALIKES_OF_KATE if name and "@" in name]


def policy(**names: str) -> str:
    values = {"approver": KATE, "human": KATE, "member": KATE, **names}
    # Written as YAML escapes, so control and invisible characters survive the file as themselves.
    escaped = {k: v.encode("unicode_escape").decode("ascii").replace('"', '\\"') for k, v in values.items()}
    return POLICY.replace("{approver}", escaped["approver"]).replace("{human}", escaped["human"]) \
        .replace("{member}", escaped["member"])


def test_the_good_policy_loads_and_kate_in_any_ascii_case_is_kate() -> None:
    compiled = load_policy_text(policy(human="Kate@Example.COM", member="KATE@example.com"))
    for spelling in ("kate@example.com", "KATE@EXAMPLE.COM"):
        assert compiled.human_key(spelling) == "Kate@Example.COM"
        assert human_permission(compiled, spelling, frozenset(), "jwt://svc", "deploy").verdict == "allow"
        assert named_approver(compiled, compiled.tiers["merge_deploy"].approvers, spelling) is not None


@pytest.mark.parametrize("where", sorted(LINES))
@pytest.mark.parametrize("name", CORPUS)
def test_a_lookalike_name_is_refused_on_its_line(name: str, where: str) -> None:
    with pytest.raises(PolicyError) as refused:
        load_policy_text(policy(**{where: name}))
    problems = refused.value.problems
    assert [p["line"] for p in problems] == [LINES[where]], problems
    section = {"approver": "tiers", "human": "humans", "member": "groups"}[where]
    assert problems[0]["path"].startswith(section), problems


@pytest.mark.parametrize("name", CORPUS)
def test_lookalikes_of_a_named_human_are_nobody_to_the_evaluator(name: str) -> None:
    compiled = load_policy_text(policy())
    assert compiled.human_key(name) is None
    assert compiled.groups_of(name) == ()
    assert human_permission(compiled, name, frozenset(), "jwt://svc", "deploy").verdict == "deny"
    assert named_approver(compiled, compiled.tiers["merge_deploy"].approvers, name) is None


@pytest.mark.parametrize("group", ["main tainers", "maintainers\u200b", "\u202emaintainers", "maintainers\u00a0"])
def test_a_group_name_with_invisible_characters_is_refused(group: str) -> None:
    text = policy().replace("groups: [maintainers]", f'groups: ["{group.encode("unicode_escape").decode()}"]')
    with pytest.raises(PolicyError) as refused:
        load_policy_text(text)
    assert [p["line"] for p in refused.value.problems] == [9]


def test_a_reload_naming_a_lookalike_keeps_the_last_good_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy())
    store = PolicyStore(path)
    before = store.current
    path.write_text(policy(approver="\u212aate@example.com"))
    assert store.reload() is False
    assert store.current is before
    assert list(store.current.tiers["merge_deploy"].approvers) == ["group:maintainers", "user:kate@example.com"]
