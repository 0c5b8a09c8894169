"""Which failures are outages (503 with Retry-After) and which stay bugs (500), by exception type,
through the real app's error handlers: a corpus of what the drivers and SDKs raise."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator

import botocore.exceptions as botocore_errors
import httpx
import hvac.exceptions as hvac_errors
import psycopg
import psycopg.errors
import pytest
import requests
import sqlalchemy.exc as sa
from fastapi.testclient import TestClient

from broker.app import create_app
from broker.errors import AuditWriteFailed, ProviderUnavailable
from broker.outages import outage
from tests.support.brokers import BrokerSecrets, build_broker


def _wrapped(outer: Exception, inner: BaseException) -> Exception:
    outer.__cause__ = inner
    return outer


def _pg(exc: Exception) -> sa.DBAPIError:
    """SQLAlchemy's wrapper around a psycopg error, as the engine raises it."""
    cls = sa.OperationalError if isinstance(exc, psycopg.OperationalError) else sa.DBAPIError
    return cls("SELECT 1", {}, exc)


DATABASE_OUTAGES: list[tuple[str, Callable[[], BaseException]]] = [
    ("refused", lambda: _pg(psycopg.OperationalError('connection failed: Connection refused'))),
    ("server closed", lambda: _pg(psycopg.OperationalError("server closed the connection unexpectedly"))),
    ("admin shutdown", lambda: _pg(psycopg.errors.AdminShutdown("terminating connection due to administrator command"))),
    ("starting up", lambda: _pg(psycopg.errors.CannotConnectNow("the database system is starting up"))),
    ("crash shutdown", lambda: _pg(psycopg.errors.CrashShutdown("crash"))),
    ("read-only failover", lambda: sa.InternalError("INSERT", {}, psycopg.errors.ReadOnlySqlTransaction(
        "cannot execute INSERT in a read-only transaction"))),
    ("statement timeout", lambda: _pg(psycopg.errors.QueryCanceled("canceling statement due to statement timeout"))),
    ("too many connections", lambda: _pg(psycopg.errors.TooManyConnections("sorry, too many clients already"))),
    ("raw psycopg (async path)", lambda: psycopg.OperationalError("consuming input failed")),
    ("raw admin shutdown", lambda: psycopg.errors.AdminShutdown("terminating connection")),
    ("raw read-only", lambda: psycopg.errors.ReadOnlySqlTransaction("read-only")),
    ("pool timeout", lambda: sa.TimeoutError("QueuePool limit of size 10 overflow 20 reached")),
    ("disconnection", lambda: sa.DisconnectionError("connection invalidated")),
    ("invalidated interface error", lambda: sa.InterfaceError(
        "SELECT 1", {}, psycopg.InterfaceError("the connection is closed"), connection_invalidated=True)),
    ("sqlite locked", lambda: sa.OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked"))),
    ("sqlite table locked", lambda: sqlite3.OperationalError("database table is locked: leases")),
    ("sqlite io", lambda: sa.OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))),
    ("audit write over a lost connection", lambda: _wrapped(
        AuditWriteFailed("the audit record could not be written"), _pg(psycopg.OperationalError("lost")))),
    ("in a context chain", lambda: _wrapped(RuntimeError("while rolling back"), sa.TimeoutError("pool"))),
]
try:  # the async connection pool, when installed
    import psycopg_pool

    DATABASE_OUTAGES.append(("async pool timeout", lambda: psycopg_pool.PoolTimeout("couldn't get a connection")))
except ImportError:
    pass

PROVIDER_OUTAGES: list[tuple[str, Callable[[], BaseException]]] = [
    ("vault sealed", lambda: hvac_errors.VaultDown("Vault is sealed")),
    ("vault refused", lambda: requests.ConnectionError("Connection refused")),
    ("vault timeout", lambda: requests.ReadTimeout("read timed out")),
    ("sts unreachable", lambda: botocore_errors.EndpointConnectionError(endpoint_url="https://sts.amazonaws.com")),
    ("sts connect timeout", lambda: botocore_errors.ConnectTimeoutError(endpoint_url="https://sts.amazonaws.com")),
    ("sts read timeout", lambda: botocore_errors.ReadTimeoutError(endpoint_url="https://sts.amazonaws.com")),
    ("github refused", lambda: httpx.ConnectError("All connection attempts failed")),
    ("github timeout", lambda: httpx.ReadTimeout("timed out")),
    ("github pool timeout", lambda: httpx.PoolTimeout("no connection")),
    ("translated, then wrapped", lambda: _wrapped(KeyError("x"), ProviderUnavailable("vault mint: sealed"))),
]

BUGS: list[tuple[str, Callable[[], BaseException]]] = [
    ("undefined table", lambda: sa.ProgrammingError("SELECT", {}, psycopg.errors.UndefinedTable("no such relation"))),
    ("syntax", lambda: sa.ProgrammingError("SELEC", {}, psycopg.errors.SyntaxError("syntax error"))),
    ("unique violation", lambda: sa.IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("duplicate key"))),
    ("data error", lambda: sa.DataError("INSERT", {}, psycopg.errors.NumericValueOutOfRange("out of range"))),
    ("sqlite no such table", lambda: sa.OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: x"))),
    ("sqlite syntax", lambda: sqlite3.OperationalError('near "SELEC": syntax error')),
    ("interface misuse", lambda: sa.InterfaceError("SELECT", {}, psycopg.InterfaceError("bad param"))),
    ("resource closed", lambda: sa.ResourceClosedError("This result object is closed.")),
    ("vault forbidden", lambda: hvac_errors.Forbidden("permission denied")),
    ("vault invalid", lambda: hvac_errors.InvalidRequest("bad path")),
    ("boto params", lambda: botocore_errors.ParamValidationError(report="bad")),
    ("requests bad url", lambda: requests.exceptions.InvalidURL("x")),
    ("plain bug", lambda: ValueError("oops")),
    ("key error", lambda: KeyError("missing")),
]


@pytest.mark.parametrize(("name", "make"), DATABASE_OUTAGES, ids=[n for n, _ in DATABASE_OUTAGES])
def test_database_outages_are_recognised(name: str, make: Callable[[], BaseException]) -> None:
    found = outage(make())
    assert found is not None and (found.status, found.code) == (503, "database-unavailable"), name


@pytest.mark.parametrize(("name", "make"), PROVIDER_OUTAGES, ids=[n for n, _ in PROVIDER_OUTAGES])
def test_provider_outages_are_recognised(name: str, make: Callable[[], BaseException]) -> None:
    found = outage(make())
    assert found is not None and (found.status, found.code) == (503, "provider-unavailable"), name


@pytest.mark.parametrize(("name", "make"), BUGS, ids=[n for n, _ in BUGS])
def test_bugs_are_not_disguised_as_outages(name: str, make: Callable[[], BaseException]) -> None:
    assert outage(make()) is None, name


def test_a_cycle_of_causes_ends() -> None:
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert outage(a) is None


ALL = [(n, m, 503, "database-unavailable") for n, m in DATABASE_OUTAGES] + \
      [(n, m, 503, "provider-unavailable") for n, m in PROVIDER_OUTAGES] + \
      [(n, m, 500, None) for n, m in BUGS]


@pytest.fixture(scope="module")
def raising_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The real app with one extra route that raises the corpus entry named in the path."""
    directory = tmp_path_factory.mktemp("outages")
    broker = build_broker(directory, f"sqlite:///{directory}/broker.db", BrokerSecrets())
    app = create_app(broker=broker)
    by_name = {name: make for name, make, _, _ in ALL}

    def boom(name: str) -> None:
        raise by_name[name]()

    app.add_api_route("/test-raise/{name}", boom)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client
    broker.engine.dispose()


@pytest.mark.parametrize(("name", "status", "code"), [(n, s, c) for n, _, s, c in ALL], ids=[n for n, *_ in ALL])
def test_the_app_answers_outages_503_with_retry_after_and_bugs_500(
        raising_app: TestClient, name: str, status: int, code: str | None) -> None:
    r = raising_app.get(f"/test-raise/{name}")
    assert r.status_code == status, r.text
    body = r.json()["error"]
    if status == 503:
        assert body["code"] == code
        assert int(r.headers["Retry-After"]) >= 1
        # The driver's own text (hosts, users, SQL) does not leave the process.
        assert "SELECT" not in body["message"] and "INSERT" not in body["message"]
    else:
        assert body == {"code": "internal-error", "message": "internal error"}
        assert "Retry-After" not in r.headers
