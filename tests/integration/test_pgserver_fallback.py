"""A fresh machine without PostgreSQL still runs the whole suite: when nothing answers at the
configured DSN, tests/support/databases.py starts a throwaway PostgreSQL from pgserver."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import text

from broker.db import make_engine
from broker.migrate import upgrade
from tests.support.brokers import free_port
from tests.support.databases import resolve


def test_a_closed_port_gets_a_working_throwaway_postgres() -> None:
    closed = f"host=127.0.0.1 port={free_port()} user=postgres dbname=test"
    server, problem, throwaway = resolve(closed)
    assert problem is None and server is not None and throwaway is not None
    try:
        assert server.origin == "pgserver" and server.port != int(closed.split("port=")[1].split()[0])
        with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
            conn.execute('CREATE DATABASE "jb_fallback"')
        # The broker's own schema migrates and works there, triggers included.
        upgrade(server.url("jb_fallback"))
        engine = make_engine(server.url("jb_fallback"), pool_size=1)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("SELECT seq FROM audit_head")).scalar_one() == 0
                assert conn.execute(text("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'audit_records_no_%'")
                                    ).scalar_one() == 3
        finally:
            engine.dispose()
    finally:
        throwaway.stop()
    assert not throwaway.base.exists()
    with pytest.raises(psycopg.OperationalError):  # stopped: its port answers no more
        psycopg.connect(server.admin_dsn, connect_timeout=2).close()


def test_without_the_fallback_a_closed_port_is_reported() -> None:
    closed = f"host=127.0.0.1 port={free_port()} user=postgres dbname=test"
    server, problem, throwaway = resolve(closed, fallback=False)
    assert server is None and throwaway is None
    assert problem is not None and "nothing answers" in problem
