"""The dialect implementations: each database gets its own, and they agree with the domain's words."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine

from broker.audit.sql import PostgresAuditSql, SqliteAuditSql, audit_sql
from broker.leases.vocabulary import LIVE
from broker.store.sql import LIVE_STATUSES, PostgresSql, SqliteSql, sql_for


def test_live_statuses_are_the_leases_vocabulary() -> None:
    assert tuple(str(status) for status in LIVE) == LIVE_STATUSES


@pytest.mark.parametrize(("url", "sql", "audit"), [
    ("sqlite://", SqliteSql, SqliteAuditSql),
    # Building an engine opens no connection: nothing listens here.
    ("postgresql+psycopg://nobody@127.0.0.1:1/none", PostgresSql, PostgresAuditSql),
])
def test_each_database_gets_its_implementation(url: str, sql: type, audit: type) -> None:
    engine = create_engine(url)
    try:
        assert type(sql_for(engine)) is sql
        assert type(audit_sql(engine)) is audit
    finally:
        engine.dispose()
