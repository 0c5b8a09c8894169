"""Stall: a session whose agent is silent past its idle timeout ends itself, everything revoked.

**Silence** is no request with the session token (any endpoint, the heartbeat included). The
timeout is fixed at provision: the policy's `liveness.idle_timeout`, or the session's own
`idle_timeout_seconds`, never longer than `liveness.max_idle_timeout` (400 otherwise). It is
stored on the session row and signed into the session token (claim `idle`), so noting a request
needs no database read.

**No write per request.** `sessions.idle_until` (the moment past which the session has stalled)
is moved forward at most once per *granularity* `g` per session per replica:
`g = min(BROKER_LIVENESS_GRANULARITY_SECONDS, max(1, timeout // 4))`. A write sets
`idle_until = now + timeout + g`, and the writes lag the requests by less than `g`, so a session
ends after at least `timeout` and at most `timeout + g` of true silence, plus one sweep interval.
The heartbeat always writes.

**Ending.** The sweeper (`end_stalled`) picks active sessions whose `idle_until` has passed
(index on status + idle_until, bounded batches) and ends each through the ordinary session end
(receipts, audit `session.ended` with reason `idle-timeout`, CAEP session-revoked), re-checking
`idle_until` under the session's row lock: a heartbeat that won the race keeps the session, and
with several replicas the lock and the status check end it exactly once. A request arriving
after `idle_until` but before the sweep does not revive the session (the write only moves a
deadline that has not passed) and is refused `session-stalled` by the policy's session layer.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta

from sqlalchemy import bindparam, update
from sqlmodel import col, select

from broker.db import transaction, utcnow
from broker.errors import NotFound
from broker.identity.callers import Caller
from broker.leases.revocation import RevokeSummary
from broker.models import SessionRow
from broker.runtime import Broker
from broker.sessions import service as sessions
from broker.sessions.idle import CLAIM, granularity

__all__ = ["CLAIM", "end_stalled", "heartbeat", "touch", "touch_due"]

log = logging.getLogger("broker.sessions.liveness")

END_REASON = "idle-timeout"

_SESSIONS = SessionRow.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation
# Only moves a deadline that has not passed: a stalled session is never revived by a late request.
_TOUCH = (update(_SESSIONS)
          .where(_SESSIONS.c.id == bindparam("sid"), _SESSIONS.c.status == "active",
                 _SESSIONS.c.idle_until > bindparam("now"))
          .values(last_seen_at=bindparam("seen"), idle_until=bindparam("until")))


class _Throttle:
    """session id -> when this replica last wrote its liveness (monotonic). Bounded: past
    `limit` entries it forgets everything, which costs one extra write per session."""

    def __init__(self, limit: int = 100_000) -> None:
        self._last: dict[str, float] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def due(self, session_id: str, every: int, at: float) -> bool:
        with self._lock:
            last = self._last.get(session_id)
            if last is not None and at - last < every:
                return False
            if len(self._last) >= self._limit:
                self._last.clear()
            self._last[session_id] = at
            return True


_THROTTLE = _Throttle()


def touch_due(broker: Broker, session_id: str, timeout: object) -> bool:
    """Cheap, no I/O: should this request's liveness be written? (The caller then calls `touch`,
    off the event loop.)"""
    if not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0:
        return False  # a session without an idle timeout (or a token from before them)
    return _THROTTLE.due(session_id, granularity(broker, timeout), time.monotonic())


def touch(broker: Broker, session_id: str, timeout: int, *, now: datetime | None = None) -> datetime | None:
    """Record a request: move `idle_until` forward. The new deadline, or None if the session is
    not active or has already stalled."""
    now = now or utcnow()
    until = now + timedelta(seconds=timeout + granularity(broker, timeout))
    with transaction(broker.engine) as db:
        done = db.connection().execute(_TOUCH, {"sid": session_id, "now": now, "seen": now, "until": until})
    return until if done.rowcount else None


def heartbeat(broker: Broker, caller: Caller, session_id: str) -> SessionRow:
    """`POST /v1/sessions/{id}/heartbeat`, by the session's own agent: always written."""
    if caller.kind != "agent" or caller.session_id != session_id:
        # Another session's id from an agent, or a human: the same answer as an absent session.
        raise NotFound("no such session", code="session-not-found")
    now = utcnow()
    with transaction(broker.engine) as db:
        session = db.get(SessionRow, session_id)
        if session is None:
            raise NotFound("no such session", code="session-not-found")
        timeout = session.idle_timeout_seconds
    if timeout is not None:
        touch(broker, session_id, timeout, now=now)
        _THROTTLE.due(session_id, 0, time.monotonic())  # the write just made counts for this replica
    with transaction(broker.engine) as db:
        fresh = db.get(SessionRow, session_id)
        if fresh is None:
            raise RuntimeError(f"session {session_id} vanished while it was being touched")
        return fresh


def stalled(broker: Broker, now: datetime, limit: int) -> list[str]:
    """Active sessions past their idle deadline, oldest first (ix_sessions_status_idle)."""
    with transaction(broker.engine) as db:
        return list(db.exec(
            select(SessionRow.id)
            .where(SessionRow.status == "active", col(SessionRow.idle_until).is_not(None),
                   col(SessionRow.idle_until) <= now)
            .order_by(col(SessionRow.idle_until)).limit(limit)
        ).all())


def end_stalled(broker: Broker, now: datetime, limit: int) -> RevokeSummary:
    """The sweeper's pass: end every stalled session through the ordinary end."""
    total = RevokeSummary()

    def still_stalled(session: SessionRow) -> bool:  # re-read under the row lock: a heartbeat may have won
        return session.idle_until is not None and session.idle_until <= now

    for session_id in stalled(broker, now, limit):
        _, summary = sessions.end(broker, session_id, reason=END_REASON, actor="broker:sweeper", only_if=still_stalled)
        total.merge(summary)
    return total
