"""Engine, transactions and the column types every table shares.

SQLite (the embedded default) runs in WAL mode and takes its write lock at BEGIN
(`BEGIN IMMEDIATE`), so two writers never deadlock upgrading a read lock. PostgreSQL is the
production store; row claims there use `FOR UPDATE SKIP LOCKED` (see `leases/revocation.py`;
SQLAlchemy leaves the clause out on SQLite), and `advisory_lock` serialises work on shared
backend state across replicas. What else differs by database lives in `store/sql.py` and
`audit/sql.py`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, TypeDecorator, create_engine, event
from sqlalchemy.engine import Engine
from sqlmodel import Session


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC, always hands back timezone-aware UTC (SQLite has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN itself
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # No pre-ping: it cost a round trip per checkout on the hot path. A connection the server
    # dropped fails its one request, and SQLAlchemy then invalidates the whole pool; recycling
    # keeps connections younger than any idle timeout in between.
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size * 2, pool_pre_ping=False,
                         pool_recycle=1800)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


_LOCAL_LOCKS: dict[str, threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()


@contextmanager
def advisory_lock(engine: Engine, key: str) -> Iterator[None]:
    """Serialise work on `key` across every replica sharing this PostgreSQL (a session-level
    advisory lock on its own connection). SQLite brokers are single-node: a lock in this
    process does it there (the keys are few: one per backend object, e.g. an AWS role)."""
    if not is_postgres(engine):
        with _LOCAL_LOCKS_GUARD:
            lock = _LOCAL_LOCKS.setdefault(key, threading.Lock())
        with lock:
            yield
        return
    number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT pg_advisory_lock(%s)", (number,))
        try:
            yield
        finally:
            conn.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (number,))
            conn.commit()


@contextmanager
def transaction(engine: Engine) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    with Session(engine, expire_on_commit=False) as db:
        try:
            yield db
            db.commit()
        except BaseException:
            db.rollback()
            raise
