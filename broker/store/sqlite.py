"""The store on SQLite (the embedded default): the same steps as migration 0010's function, in
Python, in one transaction. SQLite's driver blocks, so each call runs in a worker thread; its
writers are serialised by `BEGIN IMMEDIATE` (broker/db.py), which stands in for the row lock."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import anyio
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.engine import Engine

from broker.audit.service import append_template
from broker.db import transaction
from broker.models import IdempotencyRecord, Lease, SessionRow, SessionSnapshot
from broker.store.base import Issue, IssueResult, refusal_of

_SESSIONS = SessionRow.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation
_LEASES = Lease.__table__  # type: ignore[attr-defined]
_KEYS = IdempotencyRecord.__table__  # type: ignore[attr-defined]
_SESSION = select(*(_SESSIONS.c[f.name] for f in fields(SessionSnapshot))).where(_SESSIONS.c.id == bindparam("s"))
_KEY_TAKEN = select(_KEYS.c.key).where((_KEYS.c.session_id == bindparam("s")) & (_KEYS.c.key == bindparam("k")))
_FOLD = text("UPDATE sessions SET live_count = live_count + "
             "(SELECT coalesce(sum(delta), 0) FROM session_live_deltas WHERE session_id = :s) WHERE id = :s "
             "RETURNING live_count")
_CLEAR = text("DELETE FROM session_live_deltas WHERE session_id = :s")
_COUNT_ISSUED = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("s"))
                 .values(issued_count=_SESSIONS.c.issued_count + 1))


def _escalated(tiers: tuple[str, ...]) -> Any:
    names = ", ".join(f":t{i}" for i in range(len(tiers)))
    return text(f"SELECT EXISTS (SELECT 1 FROM leases WHERE session_id = :s AND tier IN ({names}) "
                "AND status IN ('minting', 'active', 'revoke_pending'))")


class SQLiteStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def close(self) -> None:
        return None

    async def session(self, session_id: str) -> SessionSnapshot | None:
        return await anyio.to_thread.run_sync(self._session, session_id)

    async def issue(self, issue: Issue) -> IssueResult:
        return await anyio.to_thread.run_sync(self._issue, issue)

    def _session(self, session_id: str) -> SessionSnapshot | None:
        with self._engine.connect() as conn:
            row = conn.execute(_SESSION, {"s": session_id}).first()
        return None if row is None else SessionSnapshot(**row._mapping)

    def _issue(self, issue: Issue) -> IssueResult:
        sid = issue.lease.session_id
        with transaction(self._engine) as db:
            conn = db.connection()
            row = conn.execute(select(_SESSIONS.c.status, _SESSIONS.c.issued_count)
                               .where(_SESSIONS.c.id == bindparam("s")), {"s": sid}).first()
            if row is None:
                return "no-session"
            key_taken = issue.key_row is not None and conn.execute(
                _KEY_TAKEN, {"s": sid, "k": issue.key_row["key"]}).first() is not None
            live = conn.execute(_FOLD, {"s": sid}).scalar_one()
            conn.execute(_CLEAR, {"s": sid})
            escalated = bool(issue.escalation) and bool(conn.execute(
                _escalated(issue.escalation), {"s": sid, **{f"t{i}": t for i, t in enumerate(issue.escalation)}},
            ).scalar_one())
            refused = refusal_of(status=row.status, key_taken=key_taken, issued=row.issued_count, live=live,
                                 max_issued=issue.max_issued, max_active=issue.max_active, escalated=escalated)
            if refused is not None:
                return refused
            conn.execute(insert(_LEASES), [asdict(issue.lease)])
            conn.execute(_COUNT_ISSUED, {"s": sid})
            if issue.key_row is not None:
                conn.execute(insert(_KEYS), [issue.key_row])
            append_template(db, issue.audit)
        return "issued"
