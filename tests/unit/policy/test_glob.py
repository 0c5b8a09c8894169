"""The glob matcher: the same answers as the regex it replaced, with a bound on its work."""

from __future__ import annotations

import random
import re

import pytest

from broker.policy import load_policy_text
from broker.policy.resources import Glob, glob_matches


def old_regex_match(pattern: str, resource: str) -> bool:
    """The semantics before: `*` -> `[^/]*`, `**` -> `.*`, the rest literal, whole string."""
    parts = [".*" if token == "**" else "[^/]*" if token == "*" else re.escape(token)
             for token in re.split(r"(\*\*|\*)", pattern)]
    return re.fullmatch("".join(parts), resource, re.DOTALL) is not None


TABLE = [
    ("github://acme/*", "github://acme/widgets", True),
    ("github://acme/*", "github://acme/widgets/sub", False),
    ("github://acme/*", "github://acme/", True),
    ("github://acme/*", "github://acmex/w", False),
    ("github://**", "github://acme/widgets", True),
    ("vault://secret/**", "vault://secret/team/app/key", True),
    ("vault://secret/**", "vault://secretx/a", False),
    ("vault://secret/*", "vault://secret/team/key", False),
    ("jwt://svc/ledger*", "jwt://svc/ledger-archive", True),
    ("jwt://svc/ledger*", "jwt://svc/ledger", True),
    ("jwt://svc/ledger*", "jwt://svc/ledge", False),
    ("jwt://*/x", "jwt://a/x", True),
    ("jwt://*/x", "jwt://a/b/x", False),
    ("jwt://**/x", "jwt://a/b/x", True),
    ("jwt://**/x", "jwt://x", False),
    ("jwt://a/**/b", "jwt://a/b", False),
    ("jwt://a/**/b", "jwt://a//b", True),
    ("jwt://a***b", "jwt://a/x/b", True),  # "***" is "**" then "*"
    ("jwt://a*b*c", "jwt://aXbYc", True),
    ("jwt://a*b*c", "jwt://aXbY/c", False),
    ("jwt://a*a", "jwt://a", False),
    ("jwt://a*a", "jwt://aa", True),
    ("jwt://payments-api", "jwt://payments-api", True),
    ("jwt://payments-api", "jwt://payments-apix", False),
    ("aws://123456789012/role/*", "aws://123456789012/role/ro", True),
    ("*", "", True),
    ("**", "a/b", True),
    ("", "", True),
]


@pytest.mark.parametrize(("pattern", "resource", "expected"), TABLE)
def test_table(pattern: str, resource: str, expected: bool) -> None:
    assert glob_matches(pattern, resource) is expected
    assert old_regex_match(pattern, resource) is expected  # the table is the old semantics


def test_equivalent_to_the_old_regex_on_generated_cases() -> None:
    """Seeded, so the same few thousand cases every run: short enough for the regex to answer."""
    rng = random.Random(7)
    for _ in range(4000):
        pattern = "".join(rng.choice("ab/**") for _ in range(rng.randint(0, 8)))
        resource = "".join(rng.choice("ab/") for _ in range(rng.randint(0, 10)))
        expected = old_regex_match(pattern, resource)
        assert Glob(pattern).matches(resource) is expected, (pattern, resource)
        assert Glob(pattern).match_counting(resource)[0] is expected, (pattern, resource)


def test_one_star_fast_path_answers_as_the_automaton_does() -> None:
    """Patterns with a single `*` or `**` (nearly all real ones) skip the automaton; seeded cases
    around the edges (prefix and suffix overlapping, `/` right at either end) agree with it."""
    rng = random.Random(11)
    for _ in range(4000):
        star = rng.choice(["*", "**"])
        prefix = "".join(rng.choice("ab/") for _ in range(rng.randint(0, 4)))
        suffix = "".join(rng.choice("ab/") for _ in range(rng.randint(0, 3)))
        glob = Glob(prefix + star + suffix)
        resource = "".join(rng.choice("ab/") for _ in range(rng.randint(0, 9)))
        expected = old_regex_match(glob.pattern, resource)
        assert glob.matches(resource) is expected, (glob.pattern, resource)
        assert glob.match_counting(resource)[0] is expected, (glob.pattern, resource)


@pytest.mark.parametrize(("pattern", "resource"), [
    # The case (3.7 s under the backtracking regex) is refused by its literal suffix alone:
    ("jwt://*a*a*a*a*a*a*a*a*b", "jwt://" + "a" * 40),
    # these pass the prefix and suffix checks, so the automaton does all the work:
    ("jwt://*a*a*a*a*a*a*a*a*b", "jwt://" + "a" * 40 + "/b"),
    ("jwt://**a**a**a**a**a**a**a**a**b", "jwt://" + "a/" * 7 + "c" * 300 + "b"),
    ("jwt://*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", "jwt://" + "a" * 480 + "/b"),
    ("jwt://**/**/**/**/**/**/**/**/x", "jwt://" + "a/" * 240 + "yx"),
    ("jwt://" + "*x" * 150 + "b", "jwt://" + "x" * 200 + "/b"),
])
def test_pathological_patterns_have_bounded_work(pattern: str, resource: str) -> None:
    matched, steps = Glob(pattern).match_counting(resource)
    assert matched is False
    assert steps <= (len(pattern) + 1) * (len(resource) + 1)
    assert old_regex_match(pattern[:12], resource[:12]) in (True, False)  # the reference still answers small


def test_work_grows_linearly_with_the_resource() -> None:
    """Doubling the resource at most doubles the steps: no exponential blow-up hides in the bound."""
    glob = Glob("jwt://*a*a*a*a*a*a*a*a*b")
    small = glob.match_counting("jwt://" + "a" * 100 + "/b")[1]
    large = glob.match_counting("jwt://" + "a" * 200 + "/b")[1]
    assert small > 0 and large <= 2 * small + 2 * len(glob.pattern)


def test_first_rule_in_file_order_still_wins() -> None:
    policy = load_policy_text("""\
version: 1
tiers: {read: {control: auto, max_ttl: 1h}, write: {control: auto, max_ttl: 1h}}
resources:
  - {match: "jwt://svc/*", provider: native, access: {read: {tier: read}}}
  - {match: "jwt://svc/ledger", provider: native, access: {write: {tier: write}}}
  - {match: "jwt://**", provider: native, access: {read: {tier: read}}}
""")
    assert policy.match_resource("jwt://svc/ledger").index == 0  # an earlier glob beats a later exact rule
    assert policy.match_resource("jwt://other/x").index == 2
    assert policy.match_resource("jwt://svc/a/b").index == 2
