"""Databases for the tests: a SQLite file, and a fresh PostgreSQL database per test run.

PostgreSQL is the real server named by BROKER_TEST_PG_DSN (default 127.0.0.1:5432, user
postgres): the one place the suite, OpenBao's database engine and bench/ learn where it is.
Where it is absent the PostgreSQL half is skipped with a reason, unless
BROKER_REQUIRE_POSTGRES=1 (CI), which makes it a failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

PG_ADMIN_DSN = os.environ.get("BROKER_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
_SERVER = conninfo_to_dict(PG_ADMIN_DSN)


def pg_url(name: str, *, driver: str = "postgresql+psycopg") -> str:
    """The URL of database `name` on the test server: SQLAlchemy's by default, or plain
    `postgresql` for libpq clients (OpenBao's database engine, psycopg)."""
    user = quote(str(_SERVER.get("user") or "postgres"))
    password = f":{quote(str(_SERVER['password']))}" if _SERVER.get("password") else ""
    host, port = _SERVER.get("host") or "127.0.0.1", _SERVER.get("port") or 5432
    return f"{driver}://{user}{password}@{host}:{port}/{name}"


def libpq_url(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def dsn_for(name: str, *, user: str, password: str) -> str:
    """A libpq key/value DSN for `name` on the test server as another user."""
    host, port = _SERVER.get("host") or "127.0.0.1", _SERVER.get("port") or 5432
    return make_conninfo(host=host, port=port, dbname=name, user=user, password=password, connect_timeout=3)


def create_database(prefix: str = "jitb") -> str:
    """A new, randomly named database; returns its name."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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
        name = create_database(prefix)
        self.created.append(name)
        return pg_url(name)

    def drop_all(self) -> None:
        for name in self.created:
            drop_database(name)


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
