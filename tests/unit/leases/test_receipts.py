"""Revocation receipts, table-driven: which outcome each situation gets, and which times it carries.

The receipts real backends produce (OpenBao, moto, the GitHub stand-in, one of them down) are
checked end to end in tests/integration/test_receipts.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker.leases import receipts
from broker.leases.receipts import ReceiptOutcome, RevocationReceipt
from broker.models import Lease
from broker.providers.base import Revoked

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
EXP = T0 + timedelta(seconds=600)


def lease(**kw: Any) -> Lease:
    base: dict[str, Any] = dict(id="cap_1", session_id="ses_1", resource="vault://kv/allowed", access="read",
                                tier="read", provider="vault", status="revoked", ttl_seconds=600, purpose="p",
                                created_at=T0, expires_at=EXP, ended_at=T0 + timedelta(seconds=60))
    return Lease(**{**base, **kw})


def times(r: RevocationReceipt) -> tuple[datetime | None, datetime | None, datetime | None]:
    return r.revoked_at, r.expires_at, r.next_attempt_at


NOW = T0 + timedelta(seconds=60)
LATER = T0 + timedelta(seconds=90)


@pytest.mark.parametrize(
    ("receipt", "outcome", "expected_times"),
    [
        # the backend confirmed: revoked now, nothing left alive
        (receipts.finished(lease(), None, NOW), ReceiptOutcome.REVOKED, (NOW, None, None)),
        (receipts.finished(lease(), Revoked("confirmed"), NOW), ReceiptOutcome.REVOKED, (NOW, None, None)),
        # the backend could not kill it everywhere: never `revoked`, and until when
        (receipts.finished(lease(provider="native"), Revoked("offline", valid_until=EXP), NOW),
         ReceiptOutcome.EXPIRES_NATURALLY, (None, EXP, None)),
        # already expired at the backend: the time is in the past, and said so
        (receipts.finished(lease(provider="aws"), Revoked("expired", valid_until=T0), NOW),
         ReceiptOutcome.EXPIRES_NATURALLY, (None, T0, None)),
        # nothing found: dies by the natural expiry
        (receipts.not_found(lease(status="expired"), EXP, True), ReceiptOutcome.EXPIRES_NATURALLY, (None, EXP, None)),
        # pending: the next try, and the backend TTL (the later of backend and lease expiry)
        (receipts.pending(lease(status="revoke_pending", next_attempt_at=LATER,
                                backend_expires_at=EXP + timedelta(seconds=30)), "down", error="provider-unavailable"),
         ReceiptOutcome.REVOKE_PENDING, (None, EXP + timedelta(seconds=30), LATER)),
        # not this call's: ended before, or another replica holds the claim
        (receipts.untouched(lease()), ReceiptOutcome.ALREADY_ENDED, (None, None, None)),
        (receipts.untouched(lease(status="active", ended_at=None, claimed_until=LATER)),
         ReceiptOutcome.REVOKE_PENDING, (None, EXP, LATER)),
    ],
)
def test_outcome_and_times(receipt: RevocationReceipt, outcome: ReceiptOutcome,
                           expected_times: tuple[datetime | None, ...]) -> None:
    assert receipt.outcome == outcome
    assert times(receipt) == expected_times
    assert receipt.detail  # always says what happened, in words


def test_the_audit_form_is_the_api_form() -> None:
    r = receipts.pending(lease(status="revoke_pending", next_attempt_at=LATER), "down", error="provider-unavailable")
    assert r.record() == {
        "capability_id": "cap_1", "session_id": "ses_1", "provider": "vault", "resource": "vault://kv/allowed",
        "access": "read", "outcome": "revoke_pending", "status": "revoke_pending", "revoked_at": None,
        "expires_at": "2026-01-01T12:10:00Z", "next_attempt_at": "2026-01-01T12:01:30Z",
        "ended_at": "2026-01-01T12:01:00Z", "error": "provider-unavailable", "detail": "down",
    }
    assert RevocationReceipt.model_validate(r.record()) == r
