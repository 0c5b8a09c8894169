"""The store on PostgreSQL: psycopg's async pool on the event loop, one round trip per decision.

`issue` is one prepared `SELECT broker_issue_capability(...)` (migration 0010) on a connection in
autocommit: the function's statements are one transaction, and there is no BEGIN or COMMIT to
send around it. Nothing here hops into a thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.engine import Engine

from broker.errors import AuditWriteFailed
from broker.models import SessionSnapshot
from broker.store.base import Issue, IssueResult

log = logging.getLogger("broker.store")

_SESSION = ("SELECT id, human, agent, task_id, repository, scope, labels, status, created_by, created_at, expires_at, "
            "ended_at, end_reason, issued_count FROM sessions WHERE id = %s")
_ISSUE = ("SELECT broker_issue_capability(%s, %s, %s, %s::text[], %s::jsonb, %s::jsonb, %s, %s::text[], "
          "%s, %s, %s, %s, %s)")


def _json(row: dict[str, Any]) -> str:
    """A row for jsonb_populate_record: timestamps as ISO 8601 with their offset."""
    return json.dumps({k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()},
                      separators=(",", ":"), ensure_ascii=False)


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


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
                                   kwargs={"autocommit": True, "prepare_threshold": 0}, name="broker-request-path")
        await pool.open(wait=False)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

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
        lease, audit = issue.lease, issue.audit
        params = (
            lease.session_id, issue.max_issued, issue.max_active, list(issue.escalation),
            _json(asdict(lease)), None if issue.key_row is None else _json(issue.key_row),
            audit.chain_id, list(audit.pieces), audit.event_id, audit.timestamp, audit.type,
            audit.human_principal, audit.outcome,
        )
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(_ISSUE, params)
                row = await cur.fetchone()
        except psycopg.Error as exc:
            # Nothing was written (the function is one transaction): fail closed, as an append does.
            log.error("issuing %s failed: %s", lease.id, exc.__class__.__name__)
            raise AuditWriteFailed("the capability could not be recorded; nothing was issued") from exc
        assert row is not None
        return cast(IssueResult, row[0])
