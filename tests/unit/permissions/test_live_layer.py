"""The live layer: the policy syntax, the pure evaluator's use of a live answer, the mapping and the cache."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.errors import PolicyError
from broker.permissions.base import ALLOW, DENY, UNKNOWN, PermissionQuery, SourceAnswer, SourceHealth, judge
from broker.permissions.cache import AnswerCache
from broker.permissions.registry import LivePermissions
from broker.policy import LivePermission, RequestFacts, ScopeEntry, SessionFacts, evaluate, load_policy_text

POLICY = """\
version: 1
tiers:
  read:  {control: auto, max_ttl: 1h}
  write: {control: auto, max_ttl: 30m}
resources:
  - match: "github://acme/*"
    provider: github
    access:
      read:  {tier: read,  permissions: {contents: read}}
      write: {tier: write, permissions: {contents: write}}
    human_permission:
      source: github
      require:
        read:  [read, triage, write, maintain, admin]
        write: [write, maintain, admin]
      options: {login_claim: github_login}
  - match: "github://open/*"
    provider: github
    access:
      read: {tier: read, permissions: {contents: read}}
    human_permission: {source: github, require: {read: [read, write, admin]}, on_unavailable: allow}
  - match: "jwt://payments-api"
    provider: native
    access:
      read: {tier: read}
humans:
  alice@example.com:
    github_login: alice-gh
    openbao_entity: alice
    identities: {gitlab_user: alice-gl}
    grants:
      - {resource: "github://acme/*", access: [read, write]}
      - {resource: "github://open/*", access: [read]}
      - {resource: "jwt://payments-api", access: [read]}
  bob@example.com:
    grants: [{resource: "github://acme/*", access: [read]}]
agents:
  claude-code: {max_tier: write}
"""

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
SESSION = SessionFacts(
    session_id="ses_1", human="alice@example.com", agent="claude-code", task_id="t",
    scope=(ScopeEntry("github://**", ("*",)), ScopeEntry("jwt://payments-api", ("*",))),
    status="active", expires_at=NOW + timedelta(hours=2),
)


@pytest.fixture(scope="module")
def policy() -> Any:
    return load_policy_text(POLICY)


def _request(resource: str, access: str, live: LivePermission | None) -> RequestFacts:
    return RequestFacts(resource=resource, access=access, ttl_seconds=None, now=NOW, live=live)


def _layer(decision: Any, name: str) -> Any:
    return next(layer for layer in decision.layers if layer.layer == name)


# --- the policy syntax -----------------------------------------------------------------------


def test_the_rule_compiles_into_a_mapping_and_humans_into_identities(policy):
    rule = policy.match_resource("github://acme/widgets").human_permission
    assert rule.source == "github" and rule.rule == "resources[0].human_permission"
    assert rule.require["write"] == frozenset({"write", "maintain", "admin"})
    assert rule.on_unavailable == "deny" and dict(rule.options) == {"login_claim": "github_login"}
    assert policy.match_resource("github://open/x").human_permission.on_unavailable == "allow"
    assert policy.match_resource("jwt://payments-api").human_permission is None
    assert dict(policy.identity_of("ALICE@example.com")) == {
        "github_login": "alice-gh", "openbao_entity": "alice", "gitlab_user": "alice-gl"}
    assert dict(policy.identity_of("nobody@example.com")) == {}
    assert policy.live_sources() == frozenset({"github"})


@pytest.mark.parametrize(("edit", "path", "message"), [
    ("write: [write, maintain, admin]", "resources[0].human_permission.require",
     "access 'write' has no entry"),
    ("write: [write, maintain, admin]\n        delete: [admin]", "resources[0].human_permission.require.delete",
     "'delete' is not an access of this rule"),
    ("write: []", "resources[0].human_permission.require.write", "an empty list would deny"),
])
def test_a_mapping_that_does_not_fit_the_rule_is_refused_with_its_line(edit, path, message):
    text = POLICY.replace("write: [write, maintain, admin]", edit, 1)
    if edit.startswith("write: [write, maintain, admin]") and "delete" not in edit:
        text = POLICY.replace("        write: [write, maintain, admin]\n", "", 1)
    with pytest.raises(PolicyError) as caught:
        load_policy_text(text)
    found = [p for p in caught.value.problems if p["path"] == path]
    assert found and message in found[0]["message"], caught.value.problems
    assert found[0]["line"] > 0


def test_on_unavailable_is_deny_or_allow_and_identities_do_not_repeat_fields():
    with pytest.raises(PolicyError) as caught:
        load_policy_text(POLICY.replace("on_unavailable: allow", "on_unavailable: maybe"))
    assert any("on_unavailable" in p["path"] for p in caught.value.problems)
    with pytest.raises(PolicyError) as caught:
        load_policy_text(POLICY.replace("identities: {gitlab_user: alice-gl}", "identities: {github_login: x}"))
    assert any("must not repeat" in p["message"] for p in caught.value.problems)


# --- the evaluator: grants AND the live answer --------------------------------------------------


@pytest.mark.parametrize(("access", "live", "result", "reason", "live_verdict"), [
    # the live source allows, the grant allows
    ("write", LivePermission("github", ALLOW, {"summary": "alice-gh has role write"}), "allow", "allowed", "allow"),
    # the live source says no: denied even though the file grants it
    ("write", LivePermission("github", DENY, {"summary": "alice-gh has role read"}), "deny",
     "human-lacks-permission", "deny"),
    # the source could not answer: fail closed
    ("write", LivePermission("github", UNKNOWN, {"summary": "timed out"}), "deny",
     "human-permission-unavailable", "deny"),
    # nobody asked the source: the same as unknown, never an allow
    ("write", None, "deny", "human-permission-unavailable", "deny"),
    # an answer from another source does not count
    ("write", LivePermission("openbao", ALLOW, {}), "deny", "human-permission-unavailable", "deny"),
])
def test_the_live_answer_is_an_input_and_can_only_take_away(policy, access, live, result, reason, live_verdict):
    decision = evaluate(policy, SESSION, _request("github://acme/widgets", access, live))
    assert (decision.result, decision.reason) == (result, reason)
    layer = _layer(decision, "human_live")
    assert layer.verdict == live_verdict
    assert layer.evidence is not None and layer.evidence["source"] == "github"
    if result == "deny":
        assert decision.matched_rule == "resources[0].human_permission"
        assert decision.ttl_seconds is None


def test_a_live_allow_never_stands_in_for_a_missing_grant(policy):
    bob = replace(SESSION, human="bob@example.com")
    live = LivePermission("github", ALLOW, {"summary": "bob-gh has role admin"})
    decision = evaluate(policy, bob, _request("github://acme/widgets", "write", live))
    assert (decision.result, decision.reason) == ("deny", "human-lacks-permission")
    assert decision.matched_rule == "humans.bob@example.com"
    assert _layer(decision, "human_live").verdict == "allow"  # shown, and still not enough


def test_on_unavailable_allow_lets_the_grants_decide_while_the_source_cannot_answer(policy):
    live = LivePermission("github", UNKNOWN, {"summary": "503"})
    decision = evaluate(policy, SESSION, _request("github://open/docs", "read", live))
    assert decision.result == "allow"
    layer = _layer(decision, "human_live")
    assert layer.verdict == "allow" and layer.matched_rule == "resources[1].human_permission.on_unavailable"
    denied = evaluate(policy, SESSION, _request("github://open/docs", "read",
                                                 LivePermission("github", DENY, {"summary": "none"})))
    assert denied.reason == "human-lacks-permission"  # a definite no is still a no


def test_rules_without_a_source_skip_the_live_layer(policy):
    decision = evaluate(policy, SESSION, _request("jwt://payments-api", "read", None))
    assert decision.result == "allow"
    assert _layer(decision, "human_live").verdict == "skipped"
    assert decision.live is None and decision.to_dict()["human_permission"] is None


def test_the_decision_carries_the_live_answer_for_the_audit(policy):
    live = LivePermission("github", ALLOW, {"summary": "ok", "role_name": "write"}, cached=True)
    body = evaluate(policy, SESSION, _request("github://acme/widgets", "write", live)).to_dict()
    assert body["human_permission"] == {"source": "github", "verdict": "allow", "cached": True,
                                        "evidence": {"summary": "ok", "role_name": "write"}}


# --- the mapping -----------------------------------------------------------------------------


def _query(*require: str) -> PermissionQuery:
    return PermissionQuery(human="a@example.com", resource="github://acme/w", access="write", require=frozenset(require))


@pytest.mark.parametrize(("held", "require", "verdict", "matched"), [
    ({"write"}, ("write", "maintain", "admin"), ALLOW, ["write"]),
    ({"maintain", "write"}, ("maintain", "admin"), ALLOW, ["maintain"]),  # role_name maintain, permission write
    ({"read", "triage"}, ("write", "maintain", "admin"), DENY, []),
    (set(), ("read",), DENY, []),
    ({"Ledger-Writer"}, ("ledger-writer",), ALLOW, ["ledger-writer"]),  # names compare without case
    ({"security-reviewer", "write"}, ("security-reviewer",), ALLOW, ["security-reviewer"]),  # a custom role
])
def test_judge_maps_backend_answers_to_access(held, require, verdict, matched):
    answer = judge(held, _query(*require), "summary", login="x")
    assert answer.verdict == verdict
    assert answer.evidence["matched"] == matched
    assert answer.evidence["login"] == "x" and answer.evidence["summary"] == "summary"


# --- the cache -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_kept_for_the_ttl_and_asked_again_after():
    clock, calls = Clock(), []
    cache = AnswerCache(60, clock=clock)

    def fetch() -> SourceAnswer:
        calls.append(1)
        return SourceAnswer(ALLOW, {})

    assert cache.get_or_fetch("k", fetch) == (SourceAnswer(ALLOW, {}), False)
    clock.now += 59.9
    assert cache.get_or_fetch("k", fetch)[1] is True
    clock.now += 0.2
    assert cache.get_or_fetch("k", fetch)[1] is False
    assert len(calls) == 2


def test_unknown_is_never_kept_and_fresh_skips_what_is_kept():
    cache, calls = AnswerCache(60, clock=Clock()), []

    def unknown() -> SourceAnswer:
        calls.append("u")
        return SourceAnswer(UNKNOWN, {})

    cache.get_or_fetch("k", unknown)
    cache.get_or_fetch("k", unknown)
    assert calls == ["u", "u"]
    cache.get_or_fetch("d", lambda: SourceAnswer(DENY, {}))
    answer, cached = cache.get_or_fetch("d", lambda: SourceAnswer(ALLOW, {}), fresh=True)
    assert (answer.verdict, cached) == (ALLOW, False)
    assert cache.get_or_fetch("d", lambda: SourceAnswer(DENY, {}))[0].verdict == ALLOW  # the fresh answer is kept


def test_zero_seconds_keeps_nothing():
    cache, calls = AnswerCache(0), []
    for _ in range(3):
        cache.get_or_fetch("k", lambda: calls.append(1) or SourceAnswer(ALLOW, {}))  # type: ignore[func-returns-value]
    assert len(calls) == 3


def test_concurrent_misses_for_one_key_make_one_call():
    cache = AnswerCache(0)  # nothing kept: only single-flight can spare the calls
    release, calls = threading.Event(), []
    started = threading.Barrier(21)

    def slow() -> SourceAnswer:
        calls.append(1)
        release.wait(10)
        return SourceAnswer(ALLOW, {"n": len(calls)})

    results: list[tuple[SourceAnswer, bool]] = []

    def ask() -> None:
        started.wait()
        results.append(cache.get_or_fetch("k", slow))

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for t in threads:
        t.start()
    started.wait()
    # The leader blocks in slow() until released; wait until the 19 others have joined its call.
    deadline = time.monotonic() + 10
    while cache.waiting("k") < 19 and time.monotonic() < deadline:
        time.sleep(0.001)
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1
    assert len(results) == 20 and all(a.verdict == ALLOW for a, _ in results)
    assert sorted(c for _, c in results) == [False] + [True] * 19


def test_the_cache_is_bounded():
    cache = AnswerCache(60, clock=Clock(), max_entries=3)
    for i in range(5):
        cache.get_or_fetch(i, lambda: SourceAnswer(ALLOW, {}))
    assert len(cache._entries) == 3 and 0 not in cache._entries


# --- consulting: failures fail closed ---------------------------------------------------------


class Boom:
    name = "github"

    def check(self, query: PermissionQuery) -> SourceAnswer:
        raise RuntimeError("bug in a source")

    def health(self) -> SourceHealth:
        return SourceHealth(False)

    def close(self) -> None:
        pass


def test_a_source_that_raises_is_unknown_and_a_missing_source_is_unknown(policy):
    live = LivePermissions({"github": Boom()}, 60).consult(policy, "alice@example.com", "github://acme/w", "read")
    assert live is not None and live.verdict == UNKNOWN and "RuntimeError" in live.evidence["summary"]
    missing = LivePermissions({}, 60).consult(policy, "alice@example.com", "github://acme/w", "read")
    assert missing is not None and missing.verdict == UNKNOWN
    assert LivePermissions({}, 60).consult(policy, "alice@example.com", "jwt://payments-api", "read") is None


def test_the_query_carries_the_mapping_the_identity_and_the_options(policy):
    seen: list[PermissionQuery] = []

    class Recorder(Boom):
        def check(self, query: PermissionQuery) -> SourceAnswer:
            seen.append(query)
            return SourceAnswer(ALLOW, {"summary": "ok"})

    lives = LivePermissions({"github": Recorder()}, 60)
    first = lives.consult(policy, "alice@example.com", "github://acme/w", "write", claims={"github_login": "a"})
    second = lives.consult(policy, "alice@example.com", "github://acme/w", "write", claims={"github_login": "a"})
    assert first is not None and second is not None and (first.cached, second.cached) == (False, True)
    assert len(seen) == 1
    q = seen[0]
    assert q.require == frozenset({"write", "maintain", "admin"})
    assert q.identity["github_login"] == "alice-gh" and q.claims == {"github_login": "a"}
    assert q.options == {"login_claim": "github_login"}


def test_evidence_is_bounded_before_it_reaches_a_decision(policy):
    class Chatty(Boom):
        def check(self, query: PermissionQuery) -> SourceAnswer:
            return SourceAnswer(DENY, {"summary": "x" * 10_000, "policies": [f"p{i}" for i in range(500)],
                                       "nested": {"deep": {"deeper": {"deepest": object()}}}})

    live = LivePermissions({"github": Chatty()}, 60).consult(policy, "alice@example.com", "github://acme/w", "read")
    assert live is not None and live.verdict == DENY
    assert len(live.evidence["summary"]) == 500 and len(live.evidence["policies"]) == 50
    assert isinstance(live.evidence["nested"]["deep"]["deeper"], str)
