"""`create_app(background=...)` says which background loops run, and runs exactly those."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from broker.app import BACKGROUND, create_app
from tests.support.brokers import BrokerSecrets, build_broker


def _loop_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("broker-")}


@pytest.mark.parametrize("background", [True, False, ("sweeper",), ("audit-linker", "permission-recheck"), ()])
def test_exactly_the_named_loops_run_and_stop(database_url: str, tmp_path: Path,
                                             background: bool | tuple[str, ...]) -> None:
    broker = build_broker(tmp_path, database_url, BrokerSecrets())
    before = _loop_threads()
    with TestClient(create_app(broker=broker, background=background)):
        running = _loop_threads() - before
    # No witnesses are configured here, so their loop never starts; the test secrets name an SSF
    # receiver, so the outbox has work.
    wanted = BACKGROUND - {"audit-witness"} if background is True else \
        set() if background is False else set(background)
    assert running == {f"broker-{name}" for name in wanted}
    assert not (_loop_threads() - before), "every loop stops with the app"


def test_an_unknown_loop_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="unknown background loops"):
        create_app(background=("sweeper", "sweeper2"))
    assert {"sweeper", "audit-linker", "audit-witness", "permission-recheck", "outbox"} == BACKGROUND
