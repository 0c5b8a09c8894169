"""Humans are one principal whatever the case: stored canonical, compared case-insensitively."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from broker.identity.callers import Caller
from broker.identity.principals import canonical_human
from broker.models import SessionRow
from broker.sessions.service import may_manage


@pytest.mark.parametrize("written", ["alice@example.com", "ALICE@Example.COM", "Alice@example.com"])
def test_canonical_human(written: str) -> None:
    assert canonical_human(written) == "alice@example.com"


@pytest.mark.parametrize(("stored", "caller"), [
    ("alice@example.com", "ALICE@Example.COM"),
    ("ALICE@Example.COM", "alice@example.com"),  # a row from before sessions stored the canonical form
])
def test_a_human_sees_their_sessions_whatever_the_case(stored: str, caller: str) -> None:
    now = datetime.now(UTC)
    row = SessionRow(id="ses_1", human=stored, agent="a", task_id="t", scope=[], labels={}, status="active",
                     created_by="orch", created_at=now, expires_at=now)
    assert may_manage(Caller(kind="human", name=caller), row)
    assert not may_manage(Caller(kind="human", name="mallory@example.com"), row)
