"""Resource rules indexed by literal prefix: first match in file order, exactly as a linear scan."""

from __future__ import annotations

import random
from types import MappingProxyType

from broker.policy import load_policy_text
from broker.policy.compiled import ResourceMatcher, ResourceRule
from broker.policy.resources import compile_glob, is_glob

SCHEMES = ("jwt://", "vault://", "aws://", "github://")
PARTS = ("a", "b", "ab", "svc", "x", "*", "**", "/", "-")


def _linear(rules: list[ResourceRule], resource: str) -> ResourceRule | None:
    for rule in rules:
        if (compile_glob(rule.match).matches(resource) if is_glob(rule.match) else rule.match == resource):
            return rule
    return None


def _pattern(rng: random.Random) -> str:
    return rng.choice(SCHEMES) + "".join(rng.choice(PARTS) for _ in range(rng.randint(0, 6)))


def _resource(rng: random.Random) -> str:
    return rng.choice(SCHEMES) + "".join(rng.choice(("a", "b", "svc", "x", "/", "-")) for _ in range(rng.randint(0, 7)))


def test_index_agrees_with_a_linear_scan_on_random_policies() -> None:
    rng = random.Random(1010)
    tried = matched = 0
    for _ in range(300):
        rules = [ResourceRule(i, _pattern(rng), "native", MappingProxyType({})) for i in range(rng.randint(1, 40))]
        matcher = ResourceMatcher(rules)
        # Resources drawn at random, plus every rule's pattern read literally (exact hits, and
        # globs that cover their own text).
        resources = [_resource(rng) for _ in range(60)] + [r.match for r in rules] + [
            r.match.replace("*", "a") for r in rules]
        for resource in resources:
            expected = _linear(rules, resource)
            assert matcher.first(resource) is expected, (resource, [r.match for r in rules])
            tried += 1
            matched += expected is not None
    assert matched > tried // 10  # the random policies do match often enough to mean something


def test_first_match_in_file_order_with_overlapping_prefixes() -> None:
    rules = [ResourceRule(i, m, "native", MappingProxyType({})) for i, m in enumerate([
        "jwt://svc/a*", "jwt://svc/*", "jwt://svc/abc", "jwt://**", "jwt://svc/abc/*", "jwt://svc/abc"])]
    matcher = ResourceMatcher(rules)
    assert matcher.first("jwt://svc/abc") is rules[0]  # an earlier glob beats the exact rule
    assert matcher.first("jwt://svc/zzz") is rules[1]
    assert matcher.first("jwt://svc/abc/d") is rules[3]  # `**` written before the longer prefix
    assert matcher.first("jwt://other") is rules[3]
    assert matcher.first("vault://x") is None


def test_a_loaded_policy_with_a_thousand_rules_matches_as_the_scan_does() -> None:
    rng = random.Random(7)
    lines = ["version: 1", "tiers:", "  read: {control: auto, max_ttl: 1h}", "resources:"]
    for i in range(1000):
        kind = rng.randrange(3)
        match = (f"jwt://svc{i % 50}/r{i}" if kind == 0 else f"jwt://svc{i % 50}/r{i}/*" if kind == 1
                 else f"jwt://svc{i % 50}/r{i // 10}**")
        lines += [f'  - match: "{match}"', "    provider: native", "    access:", "      read: {tier: read}"]
    policy = load_policy_text("\n".join(lines) + "\n")
    rules = list(policy.resources)
    for _ in range(2000):
        n = rng.randrange(1000)
        resource = rng.choice([f"jwt://svc{n % 50}/r{n}", f"jwt://svc{n % 50}/r{n}/x", f"jwt://svc{n % 50}/q",
                               f"jwt://svc{n % 50}/r{n}/x/y", "jwt://none/x"])
        assert policy.match_resource(resource) is _linear(rules, resource), resource
