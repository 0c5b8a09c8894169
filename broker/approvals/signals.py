"""Wake-ups for long polls: a decision made in this process wakes its waiters at once.

Decisions are made in worker threads; waiters are coroutines on the event loop. `notify` may
be called from any thread. Decisions on other replicas are seen by the waiter's periodic
database re-check (`BROKER_APPROVAL_POLL_RECHECK_SECONDS`), so nothing spins on the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager


class ApprovalSignals:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def listen(self, approval_id: str) -> Iterator[asyncio.Event]:
        """Register before reading the state, so a decision in between is not missed."""
        self._loop = asyncio.get_running_loop()
        event = asyncio.Event()
        self._events.setdefault(approval_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._events.get(approval_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._events[approval_id]

    def notify(self, approval_id: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._wake, approval_id)

    def _wake(self, approval_id: str) -> None:
        for event in self._events.get(approval_id, ()):
            event.set()

    def waiting(self) -> int:
        return sum(len(v) for v in self._events.values())


def announce_decision(app_state: object, approval_id: str) -> None:
    """After a decision (REST API or console alike): wake this process's long polls on it, and
    push the notifications it enqueued now rather than at the outbox's next tick."""
    signals = getattr(app_state, "approval_signals", None)
    if signals is not None:
        signals.notify(approval_id)
    outbox = getattr(app_state, "outbox", None)
    if outbox is not None:
        outbox.wake()
