"""The store on PostgreSQL: psycopg's async pool on the event loop, one round trip per decision.

`issue` is one prepared `SELECT broker_issue_capability(...)` (migration 0013) on a connection in
autocommit: the function's statements are one transaction, and there is no BEGIN or COMMIT to
send around it. Nothing here hops into a thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import Engine

from broker.audit.service import RecordTemplate
from broker.errors import AuditWriteFailed
from broker.models import SessionSnapshot
from broker.store.base import ActivateResult, Activation, Issue, IssueResult, Reservation

log = logging.getLogger("broker.store")

_SESSION = ("SELECT id, human, agent, task_id, repository, scope, labels, status, created_by, created_at, expires_at, "
            "ended_at, end_reason, issued_count FROM sessions WHERE id = %s")
_AUDIT = "%s, %s, %s, %s, %s, %s, %s, %s, %s"  # chain, three pieces, event id, timestamp, type, human, outcome
_ISSUE = f"SELECT broker_issue_capability(%s, %s, %s, %s::text[], %s::jsonb, %s::jsonb, {_AUDIT})"
_RESERVE = "SELECT broker_reserve_capability(%s, %s, %s, %s::text[], %s::jsonb, %s::jsonb)"
_ACTIVATE = f"SELECT broker_activate_capability(%s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s, %s, {_AUDIT})"


def _json(row: dict[str, Any]) -> str:
    """A row for jsonb_populate_record: timestamps as ISO 8601 with their offset."""
    return json.dumps({k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()},
                      separators=(",", ":"), ensure_ascii=False)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


# How long a request waits for one of the pool's connections before it is answered 503
# `database-unavailable` (psycopg's default is 30 s: an outage would hang every caller that long).
WAIT_SECONDS = 5.0
# psycopg's pool retries a failed connect with doubling delays and no ceiling (1, 2, 4, 8 s...):
# after a minute's outage its next try could be 30 s after the database is back, with readiness
# long green. Each retry chain gives up after a second instead, and the next request (or
# readiness probe) starts a fresh attempt at once: the request path is back within about a second.
RECONNECT_SECONDS = 1.0
# Readiness waits no longer than this for a connection of the request path's pool.
PING_SECONDS = 2.0


class PostgresStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, engine: Engine, *, size: int,
                   configure: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]] | None = None) -> PostgresStore:
        """A pool on the engine's database (its URL, SQLAlchemy's driver name dropped);
        `configure` runs on each new connection (tests trace the wire protocol with it)."""
        conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # prepare_threshold 0: every statement is prepared on its first use on a connection.
        pool = AsyncConnectionPool(conninfo, min_size=min(2, size), max_size=size, open=False, configure=configure,
                                   kwargs={"autocommit": True, "prepare_threshold": 0}, name="broker-request-path",
                                   timeout=WAIT_SECONDS, reconnect_timeout=RECONNECT_SECONDS)
        await pool.open(wait=False)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async with self._pool.connection(timeout=PING_SECONDS) as conn:
            await conn.execute("SELECT 1")

    async def session(self, session_id: str) -> SessionSnapshot | None:
        async with self._pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(_SESSION, (session_id,))
            row = await cur.fetchone()
        if row is None:
            return None
        for column in ("created_at", "expires_at", "ended_at"):
            row[column] = _utc(row[column])
        return SessionSnapshot(**row)

    async def issue(self, issue: Issue) -> IssueResult:
        return cast(IssueResult, await self._call(_ISSUE, (*_reservation(issue.reservation), *_audit(issue.audit)),
                                                  issue.reservation.lease.id))

    async def reserve(self, reservation: Reservation) -> IssueResult:
        return cast(IssueResult, await self._call(_RESERVE, _reservation(reservation), reservation.lease.id))

    async def activate(self, activation: Activation) -> ActivateResult:
        lease, key = activation.lease, activation.key
        params = (lease.id, lease.minted_at, lease.backend_expires_at,
                  None if lease.handle is None else json.dumps(lease.handle), lease.fingerprint, lease.sealed_secret,
                  lease.session_id, None if key is None else key.key, None if key is None else key.status,
                  None if key is None else key.sealed, *_audit(activation.audit))
        return cast(ActivateResult, await self._call(_ACTIVATE, params, lease.id))

    async def _call(self, statement: str, params: tuple[Any, ...], lease_id: str) -> str:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(statement, params)
                row = await cur.fetchone()
        except psycopg.Error as exc:
            # Nothing was written (each function is one transaction): fail closed, as an append does.
            log.error("writing %s failed: %s", lease_id, exc.__class__.__name__)
            raise AuditWriteFailed("the capability could not be recorded; nothing was issued") from exc
        assert row is not None  # noqa: S101  # a SELECT of a function returns one row
        return str(row[0])


def _reservation(r: Reservation) -> tuple[Any, ...]:
    return (r.lease.session_id, r.max_issued, r.max_active, list(r.escalation) or None, _json(vars(r.lease)),
            None if r.key_row is None else _json(r.key_row))


def _audit(t: RecordTemplate) -> tuple[Any, ...]:
    return (t.chain_id, *t.pieces, t.event_id, t.timestamp, t.type, t.human_principal, t.outcome)
