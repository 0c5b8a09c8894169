"""How a lease without a handle is looked up at its backend, and what "expires naturally" means.

The providers here are stand-ins for the documented signatures only (Vault's
`find_by_capability(id)`, AWS's `find_by_capability(id, resource=None)`, GitHub without one);
the real backends are exercised in tests/integration/test_lifecycle_faults.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from broker.errors import ProviderRejected, ProviderUnavailable
from broker.leases import revocation
from broker.leases.revocation import _finder, _natural_expiry, backend_call
from broker.models import Lease
from broker.providers.base import TtlBounds

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def lease(**kw: Any) -> Lease:
    base: dict[str, Any] = dict(id="cap_1", session_id="ses_1", resource="aws://123456789012/role/r", access="read",
                                tier="read", provider="x", status="revoke_pending", ttl_seconds=600, purpose="p",
                                created_at=T0, expires_at=T0 + timedelta(seconds=600))
    return Lease(**{**base, **kw})


class ById:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def find_by_capability(self, capability_id: str) -> dict[str, Any] | None:
        self.calls.append((capability_id,))
        return {"kind": "token", "accessor": "acc"} if capability_id == "cap_1" else None


class ByIdAndResource:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def find_by_capability(self, capability_id: str, resource: str | None = None) -> dict[str, Any]:
        self.calls.append((capability_id, resource))
        return {"session_name": capability_id}


class Unsearchable:
    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        return TtlBounds(1, 3600)


def test_finder_passes_the_resource_only_to_providers_that_take_it() -> None:
    by_id, by_both = ById(), ByIdAndResource()
    assert _finder(by_id)(lease()) == {"kind": "token", "accessor": "acc"}  # type: ignore[arg-type,misc]
    assert _finder(by_id)(lease(id="cap_2")) is None  # type: ignore[arg-type,misc]
    assert by_id.calls == [("cap_1",), ("cap_2",)]
    assert _finder(by_both)(lease()) == {"session_name": "cap_1"}  # type: ignore[arg-type,misc]
    assert by_both.calls == [("cap_1", "aws://123456789012/role/r")]
    assert _finder(Unsearchable()) is None  # type: ignore[arg-type]


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
    assert _natural_expiry(broker, Unsearchable(), row, searchable) == expected  # type: ignore[arg-type]


def test_backend_call_retries_blips_but_not_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revocation, "BLIP_WAIT_INITIAL_SECONDS", 0.001)
    monkeypatch.setattr(revocation, "BLIP_JITTER_SECONDS", 0.001)
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
    assert len(attempts) == revocation.BLIP_ATTEMPTS  # then the persisted backoff takes over

    attempts.clear()

    def refused() -> None:
        attempts.append(1)
        raise ProviderRejected("no")

    with pytest.raises(ProviderRejected):
        backend_call(refused, "t")
    assert len(attempts) == 1
