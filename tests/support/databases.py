"""Databases for the tests: a SQLite file, and a fresh PostgreSQL database per test run.

PostgreSQL is the real server at 127.0.0.1:5432. Where it is absent the PostgreSQL half is
skipped with a reason, unless BROKER_REQUIRE_POSTGRES=1 (CI), which makes it a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest

PG_ADMIN_DSN = os.environ.get("BROKER_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


def postgres_available() -> str | None:
    try:
        with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__


def require_postgres() -> None:
    problem = postgres_available()
    if problem is None:
        return
    if os.environ.get("BROKER_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (BROKER_REQUIRE_POSTGRES=1) but unreachable: {problem}")
    pytest.skip(f"PostgreSQL unreachable: {problem}")


class PgDatabases:
    """Creates databases with random names and drops them all at the end of the run."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def create(self, prefix: str = "jitb") -> str:
        require_postgres()
        name = f"{prefix}_{secrets.token_hex(6)}"
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"

    def drop_all(self) -> None:
        if not self.created:
            return
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases) -> str:
    """Every test that uses this runs once per database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db')}/broker.db"
    return pg_databases.create()


@pytest.fixture
def postgres_url(pg_databases: PgDatabases) -> str:
    return pg_databases.create()
