"""What "expires naturally" means for a lease without a handle, and the blip retry around backend calls.

Looking leases up by capability id is exercised against real backends in
tests/integration/test_lifecycle_faults.py and, through the contract alone, in
tests/integration/test_provider_contract.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from broker.errors import ProviderRejected, ProviderUnavailable
from broker.leases import backend
from broker.leases.backend import _natural_expiry, backend_call
from broker.models import Lease
from broker.providers.base import Grant, Minted, Provider, ProviderContext, RevokeTarget, TtlBounds

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def lease(**kw: Any) -> Lease:
    base: dict[str, Any] = dict(id="cap_1", session_id="ses_1", resource="aws://123456789012/role/r", access="read",
                                tier="read", provider="x", status="revoke_pending", ttl_seconds=600, purpose="p",
                                created_at=T0, expires_at=T0 + timedelta(seconds=600))
    return Lease(**{**base, **kw})


class Unsearchable(Provider):
    name: ClassVar[str] = "unsearchable"

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> Unsearchable:
        return cls()

    def mint(self, grant: Grant) -> Minted:
        raise NotImplementedError

    def revoke(self, target: RevokeTarget) -> None:
        raise NotImplementedError

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        return TtlBounds(1, 3600)


@pytest.mark.parametrize(
    ("row", "searchable", "expected"),
    [
        # searchable and not found: the lease's own end (the backend TTL equals it)
        (lease(), True, T0 + timedelta(seconds=600)),
        (lease(backend_expires_at=T0 + timedelta(seconds=900)), True, T0 + timedelta(seconds=900)),
        # unsearchable: the backend's own upper bound from the mint's start, plus the call timeout
        (lease(), False, T0 + timedelta(seconds=3600 + 10)),
        (lease(expires_at=T0 + timedelta(hours=2)), False, T0 + timedelta(hours=2)),
    ],
)
def test_natural_expiry(row: Lease, searchable: bool, expected: datetime) -> None:
    broker = SimpleNamespace(settings=SimpleNamespace(provider_timeout_seconds=10.0))
    assert _natural_expiry(broker, Unsearchable(), row, searchable) == expected  # type: ignore[arg-type]  # settings only


def test_backend_call_retries_blips_but_not_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend, "BLIP_WAIT_INITIAL_SECONDS", 0.001)
    monkeypatch.setattr(backend, "BLIP_JITTER_SECONDS", 0.001)
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise ProviderUnavailable("down")
        return "ok"

    assert backend_call(flaky, "t") == "ok" and len(attempts) == 3

    attempts.clear()

    def down() -> None:
        attempts.append(1)
        raise ProviderUnavailable("down")

    with pytest.raises(ProviderUnavailable):
        backend_call(down, "t")
    assert len(attempts) == backend.BLIP_ATTEMPTS  # then the persisted backoff takes over

    attempts.clear()

    def refused() -> None:
        attempts.append(1)
        raise ProviderRejected("no")

    with pytest.raises(ProviderRejected):
        backend_call(refused, "t")
    assert len(attempts) == 1
