"""The storage seam (`base.py`) and its two implementations; `open_store` picks by database."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from broker.store.base import (
    ActivateResult,
    Activation,
    HeldKey,
    Issue,
    IssueResult,
    Reservation,
    SessionCache,
    Store,
)

# Connections of the request path's pool (PostgreSQL): as many as SQLAlchemy's pool may open
# (10 + 20 overflow). A request holds one for a single round trip, so this is how many commits
# can be in flight at once, which PostgreSQL groups into one WAL flush: with 10, a busy broker
# queued on the pool (measured: 64 connections gave x0.67 the throughput of the thread pool's 30).
REQUEST_POOL_SIZE = 30


async def open_store(engine: Engine, *, pool_size: int = REQUEST_POOL_SIZE) -> Store:
    if engine.dialect.name == "postgresql":
        from broker.store.postgres import PostgresStore

        return await PostgresStore.open(engine, size=pool_size)
    from broker.store.sqlite import SQLiteStore

    return SQLiteStore(engine)


__all__ = ["ActivateResult", "Activation", "HeldKey", "Issue", "IssueResult", "Reservation", "SessionCache", "Store",
           "open_store"]
