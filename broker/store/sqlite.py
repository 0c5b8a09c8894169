"""The store on SQLite (the embedded default): the same steps as migration 0013's function, in
Python, in one transaction. SQLite's driver blocks, so each call runs in a worker thread; its
writers are serialised by `BEGIN IMMEDIATE` (broker/db.py), which stands in for the row lock."""

from __future__ import annotations

import functools
import logging
from dataclasses import fields
from typing import Any

import anyio
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from broker.audit.service import RecordTemplate, append_template
from broker.db import transaction, utcnow
from broker.errors import AuditWriteFailed
from broker.models import IdempotencyRecord, Lease, SessionRow, SessionSnapshot
from broker.store.base import ActivateResult, Activation, Issue, IssueResult, Reservation, refusal_of

log = logging.getLogger("broker.store")

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


_STATUS = select(_SESSIONS.c.status, _SESSIONS.c.issued_count, _SESSIONS.c.suspended_at,
                 _SESSIONS.c.idle_until).where(_SESSIONS.c.id == bindparam("s"))
_ACTIVATED = ("minted_at", "backend_expires_at", "handle", "fingerprint", "sealed_secret")
# Parameters named like a column of the UPDATE would be taken for values to SET: `v_<column>`.
_ACTIVATE = (update(_LEASES).where((_LEASES.c.id == bindparam("v_id")) & (_LEASES.c.status == "minting"))
             .values(status="active", **{c: bindparam("v_" + c, type_=_LEASES.c[c].type) for c in _ACTIVATED}))
_FINISH_KEY = (update(_KEYS).where((_KEYS.c.session_id == bindparam("s")) & (_KEYS.c.key == bindparam("k")))
               .values(state="done", response_status=bindparam("v_status"), sealed_response=bindparam("v_sealed")))


@functools.lru_cache(maxsize=16)
def _escalated(tiers: int) -> Any:
    names = ", ".join(f":t{i}" for i in range(tiers))
    return text(f"SELECT EXISTS (SELECT 1 FROM leases WHERE session_id = :s AND tier IN ({names}) "  # noqa: S608  # only bind-parameter names are formatted in
                "AND status IN ('minting', 'active', 'revoke_pending'))")


class SQLiteStore:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None  # the same engine as readiness's own database check: nothing more to ask

    async def session(self, session_id: str) -> SessionSnapshot | None:
        return await anyio.to_thread.run_sync(self._session, session_id)

    async def issue(self, issue: Issue) -> IssueResult:
        return await anyio.to_thread.run_sync(self._write, issue.reservation, issue.audit)

    async def reserve(self, reservation: Reservation) -> IssueResult:
        return await anyio.to_thread.run_sync(self._write, reservation, None)

    async def activate(self, activation: Activation) -> ActivateResult:
        return await anyio.to_thread.run_sync(self._activate, activation)

    def _session(self, session_id: str) -> SessionSnapshot | None:
        with self._engine.connect() as conn:
            row = conn.execute(_SESSION, {"s": session_id}).first()
        return None if row is None else SessionSnapshot(**row._mapping)

    def _write(self, r: Reservation, audit: RecordTemplate | None) -> IssueResult:
        """Migration 0013's broker_reserve_capability, and with `audit` its issue."""
        sid, lease = r.lease.session_id, r.lease
        try:
            with transaction(self._engine) as db:
                conn = db.connection()
                row = conn.execute(_STATUS, {"s": sid}).first()
                if row is None:
                    return "no-session"
                key_taken = r.key_row is not None and conn.execute(
                    _KEY_TAKEN, {"s": sid, "k": r.key_row["key"]}).first() is not None
                live = conn.execute(_FOLD, {"s": sid}).scalar_one()
                conn.execute(_CLEAR, {"s": sid})
                escalated = bool(r.escalation) and bool(conn.execute(
                    _escalated(len(r.escalation)), {"s": sid, **{f"t{i}": t for i, t in enumerate(r.escalation)}},
                ).scalar_one())
                held = row.suspended_at is not None or (row.idle_until is not None and row.idle_until <= utcnow())
                refused = refusal_of(status=row.status, key_taken=key_taken, issued=row.issued_count, live=live,
                                     max_issued=r.max_issued, max_active=r.max_active, escalated=escalated, held=held)
                if refused is not None:
                    return refused
                conn.execute(insert(_LEASES), [vars(r.lease)])
                conn.execute(_COUNT_ISSUED, {"s": sid})
                if r.key_row is not None:
                    conn.execute(insert(_KEYS), [r.key_row])
                if audit is None:
                    return "reserved"
                append_template(db, audit)
            return "issued"
        except SQLAlchemyError as exc:
            log.error("writing %s failed: %s", lease.id, exc.__class__.__name__)
            raise AuditWriteFailed("the capability could not be recorded; nothing was issued") from exc

    def _activate(self, a: Activation) -> ActivateResult:
        """Migration 0013's broker_activate_capability."""
        lease = a.lease
        try:
            with transaction(self._engine) as db:
                conn = db.connection()
                changed = conn.execute(_ACTIVATE, {"v_id": lease.id, **{"v_" + c: getattr(lease, c) for c in _ACTIVATED}
                                                   }).rowcount
                if changed != 1:
                    return "not-minting"
                if a.key is not None:
                    conn.execute(_FINISH_KEY, {"s": a.key.session_id, "k": a.key.key, "v_status": a.key.status,
                                               "v_sealed": a.key.sealed})
                append_template(db, a.audit)
            return "activated"
        except SQLAlchemyError as exc:
            log.error("writing %s failed: %s", lease.id, exc.__class__.__name__)
            raise AuditWriteFailed("the capability could not be recorded; nothing was issued") from exc
