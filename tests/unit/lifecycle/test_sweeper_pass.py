"""One sweeper pass revokes a bounded number of expiry batches, then does the rest of its work;
the leases table is read for a provider's prune/collect hooks only when the provider reads it.

The database side (what is due, revoking it) is covered in tests/integration (test_api_flow,
test_receipts, ...); here the pass's shape alone, with the calls it makes replaced by fakes that
record them: a backlog larger than a pass's bound must not make the pass hold every receipt of
it, nor keep the key pruning and the other jobs from running.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from broker.leases.revocation import RevokeSummary
from broker.lifecycle import sweeper
from broker.providers.base import Grant, Minted, Provider, ProviderContext, Revoked, RevokeTarget
from broker.providers.native import NativeProvider

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
BATCH = 3


class Backlog:
    """`due_for_expiry` and `revoke_leases` over `size` expired leases, consumed as revoked."""

    def __init__(self, size: int) -> None:
        self.waiting = [f"cap_{i}" for i in range(size)]
        self.revoke_calls = 0
        self.calls: list[str] = []

    def due(self, _broker: Any, _now: datetime, batch: int) -> list[str]:
        return self.waiting[:batch]

    def revoke(self, _broker: Any, due: list[str], **_kw: Any) -> RevokeSummary:
        self.revoke_calls += 1
        self.waiting = self.waiting[len(due):]
        return RevokeSummary(revoked=list(due))


@pytest.fixture
def backlog(monkeypatch: pytest.MonkeyPatch) -> Backlog:
    state = Backlog(0)

    def record(name: str, value: Any) -> Any:
        def call(*_a: Any, **_kw: Any) -> Any:
            state.calls.append(name)
            return value
        return call

    monkeypatch.setattr(sweeper, "due_for_expiry", lambda *a: state.due(*a))
    monkeypatch.setattr(sweeper, "revoke_leases", lambda *a, **kw: state.revoke(*a, **kw))
    monkeypatch.setattr(sweeper.sessions, "past_deadline", record("past_deadline", []))
    monkeypatch.setattr(sweeper.liveness, "end_stalled", record("end_stalled", RevokeSummary()))
    monkeypatch.setattr(sweeper, "due_for_retry", record("due_for_retry", []))
    monkeypatch.setattr(sweeper, "reconcile_periodic", record("reconcile_periodic", RevokeSummary()))
    monkeypatch.setattr(sweeper, "prune_revocations", record("prune_revocations", 0))
    monkeypatch.setattr(sweeper.breakglass, "note_overdue", record("note_overdue", None))
    monkeypatch.setattr(sweeper, "prune_expired_keys", record("prune_expired_keys", 0))
    return state


BROKER = SimpleNamespace(settings=SimpleNamespace(sweep_batch_size=BATCH))
BOUND = sweeper.MAX_EXPIRY_BATCHES_PER_PASS * BATCH


@pytest.mark.parametrize(("waiting", "revoked", "left"), [
    (0, 0, 0),
    (BATCH - 1, BATCH - 1, 0),  # a short batch ends the loop
    (BOUND - 1, BOUND - 1, 0),
    (BOUND, BOUND, 0),
    (BOUND + 1, BOUND, 1),  # the rest waits for the next pass
    (10 * BOUND, BOUND, 9 * BOUND),
])
def test_a_pass_revokes_at_most_its_bound(backlog: Backlog, waiting: int, revoked: int, left: int) -> None:
    backlog.waiting = [f"cap_{i}" for i in range(waiting)]
    summary = sweeper.sweep_once(BROKER, now=NOW)  # type: ignore[arg-type]  # the fakes read only settings
    assert len(summary.revoked) == revoked
    assert summary.revoked == [f"cap_{i}" for i in range(revoked)]
    assert len(backlog.waiting) == left
    assert backlog.revoke_calls <= sweeper.MAX_EXPIRY_BATCHES_PER_PASS


def test_a_backlog_does_not_starve_the_rest_of_the_pass(backlog: Backlog) -> None:
    backlog.waiting = [f"cap_{i}" for i in range(100 * BOUND)]
    sweeper.sweep_once(BROKER, now=NOW)  # type: ignore[arg-type]
    assert backlog.calls == ["past_deadline", "end_stalled", "due_for_retry", "reconcile_periodic",
                             "prune_revocations", "note_overdue", "prune_expired_keys"]


def test_passes_drain_a_backlog_in_turn(backlog: Backlog) -> None:
    backlog.waiting = [f"cap_{i}" for i in range(3 * BOUND + 2)]
    revoked = [len(sweeper.sweep_once(BROKER, now=NOW).revoked) for _ in range(5)]  # type: ignore[arg-type]
    assert revoked == [BOUND, BOUND, BOUND, 2, 0]
    assert backlog.waiting == []


class Plain(Provider):
    """Leaves prune_revocations and collect_shared to the base (native's case)."""

    name: ClassVar[str] = "plain"

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> Plain:
        return cls()

    def mint(self, grant: Grant) -> Minted:
        raise NotImplementedError

    def revoke(self, target: RevokeTarget) -> Revoked | None:
        return None


class Sharing(Plain):
    """Reads what the sweeper reads for it (Vault's and AWS's case)."""

    name: ClassVar[str] = "sharing"

    def __init__(self) -> None:
        self.handles: list[list[dict[str, Any]]] = []
        self.resources: list[list[str]] = []

    def collect_shared(self, live_handles: Iterable[dict[str, Any]]) -> int:
        self.handles.append(list(live_handles))
        return 2

    def prune_revocations(self, now: datetime, resources: Iterable[str] = ()) -> int:
        self.resources.append(list(resources))
        return 1


NATIVE = NativeProvider.__new__(NativeProvider)  # no keys needed: only its class's hooks are looked at


@pytest.mark.parametrize(("provider", "hook", "listens"), [
    (Plain(), "collect_shared", False),
    (Plain(), "prune_revocations", False),
    (Sharing(), "collect_shared", True),
    (Sharing(), "prune_revocations", True),
    (NATIVE, "collect_shared", False),
    (NATIVE, "prune_revocations", False),
])
def test_listens_is_an_override_of_the_base(provider: Provider, hook: str, listens: bool) -> None:
    assert sweeper._listens(provider, hook) is listens


def test_a_hook_set_on_the_instance_listens() -> None:
    provider = Plain()
    provider.collect_shared = lambda live_handles: 0  # type: ignore[method-assign]
    assert sweeper._listens(provider, "collect_shared") is True


def test_leases_are_read_only_for_providers_that_read_them(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[str, str]] = []
    monkeypatch.setattr(sweeper, "live_handles", lambda _b, name: reads.append(("handles", name)) or [{"h": name}])
    monkeypatch.setattr(sweeper, "recently_revoked_resources",
                        lambda _b, name, *_: reads.append(("resources", name)) or [f"r://{name}"])
    monkeypatch.setattr(sweeper, "release_leftovers", lambda _b: SimpleNamespace(released=0))
    monkeypatch.setattr(sweeper, "_PRUNES", SimpleNamespace(due=lambda *_: True))
    sharing = Sharing()
    broker = SimpleNamespace(replica_id="r1", providers={"native": NATIVE, "plain": Plain(), "vault": sharing})
    assert sweeper.prune_revocations(broker, NOW) == 1 + 2  # type: ignore[arg-type]
    assert reads == [("resources", "vault"), ("handles", "vault")]
    assert sharing.handles == [[{"h": "vault"}]]
    assert sharing.resources == [["r://vault"]]
