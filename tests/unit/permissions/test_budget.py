"""Per-caller budgets of live-permission calls: a clock we move, a source that counts its calls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import ClassVar

import pytest

from broker.permissions.base import PermissionQuery, SourceAnswer, SourceHealth
from broker.permissions.budget import LiveCheckBudget, LiveCheckBudgetExceeded
from broker.permissions.cache import AnswerCache
from broker.permissions.registry import LivePermissions
from broker.policy import load_policy_text
from tests.support.brokers import STANDARD_TIERS

POLICY = load_policy_text(STANDARD_TIERS + """\
resources:
  - match: "github://acme/*"
    provider: github
    access:
      read: {tier: read, permissions: {contents: read}}
    human_permission: {source: counting, require: {read: [read]}}
humans:
  alice@example.com: {grants: [{resource: "github://acme/*", access: [read]}]}
agents:
  claude-code: {max_tier: review}
""")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingSource:
    name: ClassVar[str] = "counting"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.gate = gate

    def check(self, query: PermissionQuery) -> SourceAnswer:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(10)
        return SourceAnswer("allow", {"summary": f"{query.human} reads {query.resource}"})

    def health(self) -> SourceHealth:
        return SourceHealth(True)

    def close(self) -> None:
        pass


def _until(predicate: Callable[[], bool], what: str) -> None:
    """Poll for a state (the bound only stops a hung test; nothing is timed)."""
    deadline = time.monotonic() + 30
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_a_bucket_refuses_past_its_size_and_refills_with_time() -> None:
    clock = Clock()
    budget = LiveCheckBudget(3, 60.0, clock=clock)
    for _ in range(3):
        budget.take("session:a")
    with pytest.raises(LiveCheckBudgetExceeded) as refused:
        budget.take("session:a")
    assert refused.value.status == 429 and refused.value.code == "live-check-budget-exceeded"
    assert refused.value.headers == {"Retry-After": "20"}  # one call comes back every 60/3 s
    clock.now += 20
    budget.take("session:a")  # one came back
    with pytest.raises(LiveCheckBudgetExceeded):
        budget.take("session:a")


@pytest.mark.parametrize("spender", ["session:a", "human:mallory@example.com", "admin:admin", "session:", "x" * 500])
def test_one_callers_spending_leaves_every_other_bucket_full(spender: str) -> None:
    budget = LiveCheckBudget(5, 60.0, clock=Clock())
    for _ in range(5):
        budget.take(spender)
    for _ in range(50):
        with pytest.raises(LiveCheckBudgetExceeded):
            budget.take(spender)
    for other in ("session:b", "human:alice@example.com", "admin:admin2"):
        assert budget.remaining(other) == 5
        budget.take(other)


def test_zero_means_no_budget() -> None:
    budget = LiveCheckBudget(0, 60.0)
    assert not budget.enabled
    for _ in range(1000):
        budget.take("session:a")


def test_only_backend_calls_are_charged_cache_hits_are_free() -> None:
    source = CountingSource()
    live = LivePermissions({"counting": source}, cache_seconds=60, budget=LiveCheckBudget(2, 60.0, clock=Clock()))
    for _ in range(10):  # one backend call, nine hits
        answer = live.consult(POLICY, "alice@example.com", "github://acme/a", "read", caller="session:a")
        assert answer is not None and answer.verdict == "allow"
    assert source.calls == 1 and live.budget.remaining("session:a") == 1
    live.consult(POLICY, "alice@example.com", "github://acme/b", "read", caller="session:a")
    with pytest.raises(LiveCheckBudgetExceeded):
        live.consult(POLICY, "alice@example.com", "github://acme/c", "read", caller="session:a")
    assert source.calls == 2  # the refused question never reached the backend
    # What is cached is still answered to the spent caller, and others ask freely.
    assert live.consult(POLICY, "alice@example.com", "github://acme/a", "read", caller="session:a") is not None
    assert live.consult(POLICY, "alice@example.com", "github://acme/c", "read", caller="session:b") is not None
    assert source.calls == 3
    # The broker's own re-check has no caller: never refused.
    for repo in "defgh":
        live.consult(POLICY, "alice@example.com", f"github://acme/{repo}", "read", fresh=True)
    assert source.calls == 8


def test_a_caller_joining_anothers_call_in_flight_pays_nothing_and_a_refused_one_opens_no_flight() -> None:
    gate = threading.Event()
    source = CountingSource(gate)
    budget = LiveCheckBudget(1, 3600.0, clock=Clock())
    live = LivePermissions({"counting": source}, cache_seconds=60, budget=budget)
    budget.take("session:poor")  # spent before it starts
    leader = threading.Thread(target=live.consult, args=(POLICY, "alice@example.com", "github://acme/a", "read"),
                              kwargs={"caller": "session:leader"})
    leader.start()
    joined: list[object] = []
    joiner = threading.Thread(target=lambda: joined.append(
        live.consult(POLICY, "alice@example.com", "github://acme/a", "read", caller="session:poor")))
    _until(lambda: source.calls == 1, "the leader's call in flight")
    joiner.start()
    _until(lambda: sum(f.waiters for f in live.cache._flights.values()) == 1, "the spent caller waiting on it")
    # A spent caller asking something nobody is fetching is refused, and leaves no flight behind.
    with pytest.raises(LiveCheckBudgetExceeded):
        live.consult(POLICY, "alice@example.com", "github://acme/z", "read", caller="session:poor")
    assert len(live.cache._flights) == 1
    gate.set()
    leader.join(10)
    joiner.join(10)
    assert source.calls == 1 and len(joined) == 1  # the spent caller shared the leader's answer
    assert budget.remaining("session:leader") == 0


def test_cache_admit_is_not_called_on_hits() -> None:
    cache = AnswerCache(60, clock=Clock())
    charged: list[str] = []
    answer = SourceAnswer("deny", {"summary": "no"})
    for _ in range(5):
        cache.get_or_fetch("k", lambda: answer, admit=lambda: charged.append("k"))
    assert charged == ["k"]
