"""The full path's statements that differ by database, one implementation per dialect.

The request path's decisions are the store's (`base.py`); these are the steps the full path
(leases, approvals) takes inside its own SQLAlchemy transaction, called without knowing the
dialect: `sql_for` picks the implementation from the engine's. PostgreSQL does each in one
statement (data-modifying CTEs) and serialises work across sessions with advisory locks;
SQLite has no data-modifying CTEs, so it runs the same steps as several statements, which one
transaction sees as one state because its writers are serialised (`BEGIN IMMEDIATE`,
broker/db.py); for the same reason it needs no lock of its own.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from sqlalchemy import TextClause, bindparam, insert, text, update
from sqlalchemy.engine import Connection, Engine

from broker.models import IdempotencyRecord, Lease, NewLease, SessionRow

# What leases/vocabulary.LIVE names (a floor above this one; tests/unit/store holds them equal).
LIVE_STATUSES = ("minting", "active", "revoke_pending")

_LEASES = Lease.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation
_SESSIONS = SessionRow.__table__  # type: ignore[attr-defined]
_KEYS = IdempotencyRecord.__table__  # type: ignore[attr-defined]
# Core statements where the ORM's unit of work would cost more CPU than the row it writes, built
# once so their compiled form is cached. The parameters are `<table>_<column>`: a parameter named
# like a column of the UPDATE would be taken for a value to SET, and so the rows can ride as
# CTEs of one statement.
INSERT_KEY = insert(_KEYS).values({c: bindparam("key_" + c.key, type_=c.type) for c in _KEYS.columns})
_NEW_LEASE = insert(_LEASES).values({_LEASES.c[f.name]: bindparam("lease_" + f.name, type_=_LEASES.c[f.name].type)
                                     for f in fields(NewLease)})
_COUNT_ISSUED = (update(_SESSIONS).where(_SESSIONS.c.id == bindparam("issued_in"))
                 .values(issued_count=_SESSIONS.c.issued_count + 1))
_ISSUE = _COUNT_ISSUED.add_cte(_NEW_LEASE.cte("new_lease"))
_ISSUE_KEYED = _ISSUE.add_cte(INSERT_KEY.cte("idempotency_key"))

_LIVE_TIER = ("EXISTS (SELECT 1 FROM leases WHERE session_id = :s AND tier = :t{i} AND status IN "  # noqa: S608  # composed from module constants only; values are bound parameters
              f"({', '.join(repr(s) for s in LIVE_STATUSES)}))")
# The session's deltas are deleted and added to its count in the statement that reads it. A
# delta of a transaction still running is not visible, and neither is its lease's new status: it
# is folded by a later request.
_PG_FOLD = ("WITH d AS (DELETE FROM session_live_deltas WHERE session_id = :s RETURNING delta), "
            "u AS (UPDATE sessions SET live_count = live_count + (SELECT coalesce(sum(delta), 0) FROM d) "
            "WHERE id = :s RETURNING live_count) ")
_SQLITE_FOLD = text("UPDATE sessions SET live_count = live_count + "
                    "(SELECT coalesce(sum(delta), 0) FROM session_live_deltas WHERE session_id = :s) WHERE id = :s")
_SQLITE_CLEAR = text("DELETE FROM session_live_deltas WHERE session_id = :s")


class Sql:
    """The contract: what the full path writes and locks, the same on every database."""

    def insert_lease(self, conn: Connection, lease: NewLease, key_row: dict[str, Any] | None) -> None:
        """Insert `lease` and count it against its session's issued budget; `key_row`: the
        idempotency key's row (`INSERT_KEY`'s parameters), written with them."""
        raise NotImplementedError

    def live_facts(self, conn: Connection, session_id: str, escalation: Sequence[str]) -> tuple[int, frozenset[str]]:
        """The session's live count, its pending deltas folded in (the caller holds the session's
        row lock), and which of the `escalation` tiers hold a live lease."""
        raise NotImplementedError

    def lock_approver(self, conn: Connection, entry: str) -> None:
        """Serialise, until commit, the counting of approvals pending for one approver entry
        across sessions (the session's lock covers one session). Take them in sorted order."""

    @staticmethod
    def _facts(row: Sequence[Any], escalation: Sequence[str]) -> tuple[int, frozenset[str]]:
        return int(row[0]), frozenset(tier for tier, held in zip(escalation, row[1:], strict=True) if held)


class PostgresSql(Sql):
    def insert_lease(self, conn: Connection, lease: NewLease, key_row: dict[str, Any] | None) -> None:
        # One statement, one round trip.
        values = {"lease_" + name: value for name, value in vars(lease).items()}
        conn.execute(_ISSUE if key_row is None else _ISSUE_KEYED,
                     {**values, "issued_in": lease.session_id, **(key_row or {})})

    def live_facts(self, conn: Connection, session_id: str, escalation: Sequence[str]) -> tuple[int, frozenset[str]]:
        # One round trip: fold the deltas, read the count, one EXISTS per escalation tier.
        params = {"s": session_id, **{f"t{i}": tier for i, tier in enumerate(escalation)}}
        return self._facts(conn.execute(_pg_facts(len(escalation)), params).one(), escalation)

    def lock_approver(self, conn: Connection, entry: str) -> None:
        number = int.from_bytes(hashlib.sha256(f"approver:{entry}".encode()).digest()[:8], "big", signed=True)
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (number,))


class SqliteSql(Sql):
    def insert_lease(self, conn: Connection, lease: NewLease, key_row: dict[str, Any] | None) -> None:
        conn.execute(_NEW_LEASE, {"lease_" + name: value for name, value in vars(lease).items()})
        conn.execute(_COUNT_ISSUED, {"issued_in": lease.session_id})
        if key_row is not None:
            conn.execute(INSERT_KEY, key_row)

    def live_facts(self, conn: Connection, session_id: str, escalation: Sequence[str]) -> tuple[int, frozenset[str]]:
        params = {"s": session_id, **{f"t{i}": tier for i, tier in enumerate(escalation)}}
        conn.execute(_SQLITE_FOLD, params)
        conn.execute(_SQLITE_CLEAR, params)
        return self._facts(conn.execute(_sqlite_facts(len(escalation)), params).one(), escalation)


@functools.lru_cache(maxsize=64)
def _pg_facts(tiers: int) -> TextClause:
    """Built once per shape (the policies change it only on reload), not on every request."""
    columns = ["(SELECT live_count FROM u)"] + [_LIVE_TIER.format(i=i) for i in range(tiers)]
    return text(_PG_FOLD + "SELECT " + ", ".join(columns))


@functools.lru_cache(maxsize=64)
def _sqlite_facts(tiers: int) -> TextClause:
    columns = ["(SELECT live_count FROM sessions WHERE id = :s)"] + [_LIVE_TIER.format(i=i) for i in range(tiers)]
    return text("SELECT " + ", ".join(columns))


_BY_DIALECT: dict[str, Sql] = {"postgresql": PostgresSql(), "sqlite": SqliteSql()}


def sql_for(bind: Engine | Connection) -> Sql:
    """The implementation for the database behind `bind`."""
    return _BY_DIALECT[bind.dialect.name]
