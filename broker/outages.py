"""Which failures are outages: the database or a backend unreachable, answered 503 with Retry-After.

The app's error handler asks `outage(exc)` about anything that reaches it as a 500. Outages are
recognised by exception type, whichever path raised them (the sync engine, an async pool, a
provider SDK whose error escaped translation), and by the chain of causes, so an error the code
wrapped (AuditWriteFailed around a lost connection) is still answered as the outage it is:

    database-unavailable  psycopg OperationalError and subclasses (connection lost or refused,
                          AdminShutdown, CannotConnectNow, QueryCanceled, LockNotAvailable),
                          ReadOnlySqlTransaction (a failover's old primary), psycopg_pool's
                          PoolTimeout, SQLAlchemy's OperationalError, DisconnectionError, pool
                          TimeoutError and any DBAPIError that invalidated its connection, and
                          SQLite's "database is locked" / I/O errors
    provider-unavailable  hvac VaultDown (sealed, standby), requests' connection errors and
                          timeouts (hvac), botocore EndpointConnectionError / ConnectTimeoutError /
                          ReadTimeoutError, httpx TransportError (GitHub, OIDC)

Anything else stays what it is: a bug is a 500, never disguised as an outage.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import botocore.exceptions as botocore_errors
import httpx
import hvac.exceptions as hvac_errors
import psycopg
import psycopg.errors
import requests
import sqlalchemy.exc as sa

from broker.errors import BrokerError, DatabaseUnavailable, ProviderUnavailable

_DATABASE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # async connections raise the same classes
    psycopg.errors.ReadOnlySqlTransaction,
    sa.DisconnectionError,
    sa.TimeoutError,  # QueuePool: no connection free within pool_timeout
)
try:  # the async connection pool, when installed
    from psycopg_pool import PoolTimeout, TooManyRequests

    _DATABASE += (PoolTimeout, TooManyRequests)
except ImportError:  # pragma: no cover - psycopg_pool is optional
    pass

# SQLite raises OperationalError for bugs too (no such table): only these messages are outages.
_SQLITE_OUTAGES = ("database is locked", "database table is locked", "disk i/o error", "unable to open database")

_PROVIDER: tuple[type[BaseException], ...] = (
    hvac_errors.VaultDown,
    requests.ConnectionError,
    requests.Timeout,
    botocore_errors.EndpointConnectionError,
    botocore_errors.ConnectTimeoutError,
    botocore_errors.ReadTimeoutError,
    botocore_errors.ConnectionClosedError,
    httpx.TransportError,  # ConnectError, TimeoutException, RemoteProtocolError ...
)


# The families an outage comes from, for the app to route to its handler (which answers 500 for
# any member that is not an outage, as for any other bug).
FAMILIES: tuple[type[Exception], ...] = (
    sa.SQLAlchemyError, psycopg.Error, sqlite3.Error, hvac_errors.VaultError, requests.RequestException,
    botocore_errors.BotoCoreError, httpx.TransportError,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, its causes and contexts, and SQLAlchemy's wrapped driver errors; each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
        orig = getattr(current, "orig", None)
        if isinstance(orig, BaseException):
            todo.append(orig)


def _is_database_outage(exc: BaseException) -> bool:
    if isinstance(exc, _DATABASE):
        return True
    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, sqlite3.OperationalError):
        return str(exc).lower().startswith(_SQLITE_OUTAGES)
    return False


def outage(exc: BaseException) -> BrokerError | None:
    """The 503 to answer when `exc` (or what caused it) is an outage; None when it is not one."""
    for link in _chain(exc):
        if isinstance(link, BrokerError) and link.status == 503 and link is not exc:
            return link
        if _is_database_outage(link):
            # The driver's text can name hosts and users: the class name is enough for a client.
            return DatabaseUnavailable(f"the database is unavailable ({type(link).__name__}); retry shortly")
        if isinstance(link, _PROVIDER):
            return ProviderUnavailable(f"a backend is unreachable ({type(link).__name__}); retry shortly")
    return None
