"""What the audit log does differently on each database, one implementation per dialect.

Appending, linking and the witness loop call these without knowing the dialect; `audit_sql`
picks the implementation from the engine's. PostgreSQL numbers records from a sequence (stamped
with the writing transaction's id, so the linker can wait for transactions still running),
writes one record and its chain's tip in one statement, and keeps replicas apart with advisory
locks. SQLite, one writer at a time (`BEGIN IMMEDIATE`, broker/db.py), numbers from max(seq) + 1,
links in seq order and needs no lock between replicas: it has none.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import bindparam, insert, text, update
from sqlalchemy.engine import Connection, Engine

from broker.audit.chain import GENESIS
from broker.models import AuditChain, AuditRecord

# Takes the chain's tip row lock (creating the row for a new chain) and reads the tip in one
# round trip; the head is unchanged by it, so RETURNING yields the previous record's hash.
_UPSERT = ("INSERT INTO audit_chains (chain_id, length, head) VALUES (:c, :n, :g) ON CONFLICT (chain_id) "
           "DO UPDATE SET length = audit_chains.length + :n RETURNING length, head")
_ADVANCE = text(_UPSERT)
_ADVANCE_ONE = text(_UPSERT + ", nextval('audit_seq'), pg_current_xact_id()::text::bigint")
_NEXT_SEQS = text("SELECT nextval('audit_seq'), pg_current_xact_id()::text::bigint FROM generate_series(1, :n)")
_MAX_SEQ = text("SELECT coalesce(max(seq), 0) FROM audit_records")
_SET_TIP = text("UPDATE audit_chains SET head = :h WHERE chain_id = :c")
_RECORDS = AuditRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation
_CHAINS = AuditChain.__table__  # type: ignore[attr-defined]
# PostgreSQL, one record: the record and its chain's new tip in one statement (a data-modifying
# CTE). The record's parameters are `r_<column>`: a parameter named like a column of the UPDATE
# would be taken for a value to SET.
_RECORD_AND_TIP = (update(_CHAINS).where(_CHAINS.c.chain_id == bindparam("c")).values(head=bindparam("h"))
                   .add_cte(insert(_RECORDS).values({c: bindparam("r_" + c.key, type_=c.type) for c in _RECORDS.columns})
                            .cte("record")))

_LINK_LOCK = 0x6A69_7461_7564  # "jitaud": the advisory lock every replica's linker tries
_UNLINKED = ("SELECT r.seq, r.hash FROM audit_records r WHERE NOT EXISTS "
             "(SELECT 1 FROM audit_leaves l WHERE l.seq = r.seq)")
# PostgreSQL: the same, with the leaf looked up per record by its unique index. As an anti-join
# the planner read audit_leaves whole on every linker pass (a cost growing with the tree, three
# times a second); OFFSET 0 keeps the subquery from being turned into that join.
_UNLINKED_PG = _UNLINKED.replace("l.seq = r.seq)", "l.seq = r.seq OFFSET 0)")
_ORDER = " ORDER BY r.seq LIMIT :n"
_PG_XMIN = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
_PG_ELIGIBLE = " AND (r.txid IS NULL OR r.txid < :xmin)"
_PG_SINCE = " AND r.txid >= :watermark"  # records from before 0007 (txid NULL) all went in the first drained round
_SQLITE_SINCE = " AND r.seq > :watermark"

Tips = dict[str, tuple[int, str]]  # chain -> (records before the new ones, tip hash)


class AuditSql:
    """The contract, and the steps both databases share."""

    def take_tips(self, conn: Connection, counts: dict[str, int]) -> tuple[Tips, list[int], int | None]:
        """Lock and advance the tip of each chain in `counts` (chain -> records to add), in chain
        order so two appenders never deadlock; number the records. Answers the tips, the records'
        seqs in order, and the writing transaction's id where the database has one."""
        raise NotImplementedError

    def write(self, conn: Connection, records: list[dict[str, Any]], tips: dict[str, str]) -> None:
        """Insert `records` (column -> value) and set each chain's new tip hash."""
        conn.execute(_RECORDS.insert(), records)
        conn.execute(_SET_TIP, [{"c": c, "h": h} for c, h in tips.items()])

    def link_horizon(self, conn: Connection) -> int | None:
        """Run first in a linker round: the line below which every writing transaction has
        finished (PostgreSQL's snapshot xmin), or None where seq order is commit order."""
        return None

    def try_link_lock(self, conn: Connection) -> bool:
        """Whether this replica does the linker's round (held until the transaction ends)."""
        return True

    def unlinked(self, conn: Connection, watermark: int | None, horizon: int | None,
                 batch: int) -> list[tuple[int, str]]:
        """Up to `batch` (seq, hash) of records the linker may take now, in seq order."""
        raise NotImplementedError

    def drained_watermark(self, horizon: int | None, rows: list[tuple[int, str]], previous: int | None) -> int | None:
        """The watermark kept after a round that linked `rows` and left nothing eligible."""
        raise NotImplementedError

    @contextmanager
    def one_replica(self, engine: Engine, key: int) -> Iterator[bool]:
        """Whether this replica holds `key` among all replicas, until the block ends (tried, never
        waited for)."""
        yield True

    def _unlinked(self, conn: Connection, sql: str, params: Mapping[str, object]) -> list[tuple[int, str]]:
        return [(int(r[0]), str(r[1])) for r in conn.execute(text(_UNLINKED + sql + _ORDER), params).all()]


def unlinked_count_up_to(conn: Connection, top: int) -> int:
    """Records up to seq `top` not linked yet, whatever their transactions (both databases)."""
    return int(conn.execute(text(_UNLINKED.replace("r.seq, r.hash", "count(*)") + " AND r.seq <= :top"),
                            {"top": top}).scalar_one())


class PostgresAuditSql(AuditSql):
    def take_tips(self, conn: Connection, counts: dict[str, int]) -> tuple[Tips, list[int], int | None]:
        if sum(counts.values()) == 1:
            # One record: the tip, its seq and the transaction id in one round trip.
            [(c, n)] = counts.items()
            length, head, seq, txid = conn.execute(_ADVANCE_ONE, {"c": c, "n": n, "g": GENESIS}).one()
            return {c: (length - n, head)}, [seq], txid
        tips = {}
        for c in sorted(counts):
            length, head = conn.execute(_ADVANCE, {"c": c, "n": counts[c], "g": GENESIS}).one()
            tips[c] = (length - counts[c], head)
        rows = conn.execute(_NEXT_SEQS, {"n": sum(counts.values())}).all()
        return tips, sorted(r[0] for r in rows), rows[0][1]

    def write(self, conn: Connection, records: list[dict[str, Any]], tips: dict[str, str]) -> None:
        if len(records) == 1:
            [(c, h)] = tips.items()
            conn.execute(_RECORD_AND_TIP, {**{"r_" + k: v for k, v in records[0].items()}, "c": c, "h": h})
            return
        super().write(conn, records, tips)

    def link_horizon(self, conn: Connection) -> int | None:
        # First: before this transaction has an xid of its own.
        return int(conn.execute(_PG_XMIN).scalar_one())

    def try_link_lock(self, conn: Connection) -> bool:
        return bool(conn.execute(text(f"SELECT pg_try_advisory_xact_lock({_LINK_LOCK})")).scalar_one())

    def unlinked(self, conn: Connection, watermark: int | None, horizon: int | None,
                 batch: int) -> list[tuple[int, str]]:
        sql, params = _PG_ELIGIBLE, {"n": batch, "xmin": horizon}
        if watermark is not None:
            sql += _PG_SINCE
            params["watermark"] = watermark
        rows = conn.execute(text(_UNLINKED_PG + sql + _ORDER), params).all()
        return [(int(r[0]), str(r[1])) for r in rows]

    def drained_watermark(self, horizon: int | None, rows: list[tuple[int, str]], previous: int | None) -> int | None:
        return horizon

    @contextmanager
    def one_replica(self, engine: Engine, key: int) -> Iterator[bool]:
        # A session-level lock on a connection of its own, so the work in between may commit.
        with engine.connect() as conn:
            if not conn.execute(text(f"SELECT pg_try_advisory_lock({key})")).scalar_one():
                yield False
                return
            conn.commit()
            try:
                yield True
            finally:
                conn.execute(text(f"SELECT pg_advisory_unlock({key})"))
                conn.commit()


class SqliteAuditSql(AuditSql):
    def take_tips(self, conn: Connection, counts: dict[str, int]) -> tuple[Tips, list[int], int | None]:
        tips = {}
        for c in sorted(counts):
            length, head = conn.execute(_ADVANCE, {"c": c, "n": counts[c], "g": GENESIS}).one()
            tips[c] = (length - counts[c], head)
        top = conn.execute(_MAX_SEQ).scalar_one()
        return tips, list(range(top + 1, top + 1 + sum(counts.values()))), None

    def unlinked(self, conn: Connection, watermark: int | None, horizon: int | None,
                 batch: int) -> list[tuple[int, str]]:
        if watermark is None:
            return self._unlinked(conn, "", {"n": batch})
        return self._unlinked(conn, _SQLITE_SINCE, {"n": batch, "watermark": watermark})

    def drained_watermark(self, horizon: int | None, rows: list[tuple[int, str]], previous: int | None) -> int | None:
        return rows[-1][0] if rows else previous


_BY_DIALECT: dict[str, AuditSql] = {"postgresql": PostgresAuditSql(), "sqlite": SqliteAuditSql()}


def audit_sql(bind: Engine | Connection) -> AuditSql:
    """The implementation for the database behind `bind`."""
    return _BY_DIALECT[bind.dialect.name]
