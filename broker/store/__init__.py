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


async def open_store(engine: Engine, *, pool_size: int = 10) -> Store:
    if engine.dialect.name == "postgresql":
        from broker.store.postgres import PostgresStore

        return await PostgresStore.open(engine, size=pool_size)
    from broker.store.sqlite import SQLiteStore

    return SQLiteStore(engine)


__all__ = ["ActivateResult", "Activation", "HeldKey", "Issue", "IssueResult", "Reservation", "SessionCache", "Store",
           "open_store"]
