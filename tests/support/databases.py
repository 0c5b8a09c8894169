"""Databases for the tests: a SQLite file, and a fresh PostgreSQL database per test run.

The one home of the test PostgreSQL. It is, in this order:

1. the server at `BROKER_TEST_PG_DSN` (default 127.0.0.1:5432, user postgres, trust auth), when
   something answers there (`scripts/ensure-postgres` starts a local cluster where one is
   installed);
2. otherwise a throwaway PostgreSQL from PyPI's `pgserver` package (in the `test` extra: it ships
   the server binaries), initialised in a temporary directory, listening on a free loopback port,
   and stopped and deleted when the test run ends. A fresh machine without PostgreSQL still runs
   the whole suite;
3. otherwise the PostgreSQL half is skipped with the reason, unless BROKER_REQUIRE_POSTGRES=1 (CI),
   which makes it a failure.

Everything else (the per-test databases, OpenBao's database secrets engine) takes host, port and
user from `postgres_server()`, never from a literal.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.support.children import die_with_parent
from tests.support.ports import free_port

CONFIGURED_DSN = os.environ.get("BROKER_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")


@dataclass(frozen=True)
class PgServer:
    """Where the test PostgreSQL answers. Trust authentication for `user`."""

    host: str
    port: int
    user: str
    admin_dbname: str
    origin: str  # "configured" (BROKER_TEST_PG_DSN) or "pgserver" (a throwaway)

    @property
    def admin_dsn(self) -> str:
        return self.dsn(self.admin_dbname)

    def dsn(self, dbname: str, user: str | None = None, password: str | None = None) -> str:
        out = f"host={self.host} port={self.port} dbname={dbname} user={user or self.user} connect_timeout=3"
        return out + (f" password={password}" if password is not None else "")

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL the broker takes (BROKER_DATABASE_URL)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def libpq_url(self, dbname: str) -> str:
        """libpq URL, for peers such as OpenBao's database plugin."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}?sslmode=disable"


def _problem(dsn: str) -> str | None:
    """None when `dsn` answers, else the first line of why not."""
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return None
    except psycopg.Error as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else exc.__class__.__name__


def _configured(dsn: str) -> PgServer:
    parts = conninfo_to_dict(dsn)
    return PgServer(host=str(parts.get("host") or "127.0.0.1"), port=int(parts.get("port") or 5432),
                    user=str(parts.get("user") or "postgres"), admin_dbname=str(parts.get("dbname") or "postgres"),
                    origin="configured")


# --- a throwaway PostgreSQL from the pgserver package -----------------------------------------


class ThrowawayPostgres:
    """initdb + postgres from pgserver's bundled binaries, on 127.0.0.1:<free port>, trust auth.

    PostgreSQL refuses to run as root; as root, the server runs as `nobody` (which owns only the
    temporary data directory). Unix sockets are off: TCP on loopback, as the real server is used.
    """

    def __init__(self, workdir: Path | None = None) -> None:
        # The `test` extra installs pgserver; only its bundled binaries are used (importing the
        # package would set up its own server registry and lock files).
        spec = importlib.util.find_spec("pgserver")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("the pgserver package is not installed (pip install -e '.[test]')")
        self.bin = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if not (self.bin / "postgres").exists():
            raise ImportError(f"pgserver ships no PostgreSQL binaries for this platform ({self.bin})")
        self.base = Path(tempfile.mkdtemp(prefix="jb-pgserver-", dir=workdir))
        self.pgdata = self.base / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user: str | None = "nobody" if os.geteuid() == 0 else None

    def start(self, timeout: float = 60.0) -> PgServer:
        self.pgdata.mkdir(mode=0o700)
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            self.base.chmod(0o755)
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)
        log = (self.base / "initdb.log").open("wb")
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.pgdata), "--auth=trust", "--encoding=UTF8",
                        "--no-sync", "-U", "postgres"], check=True, stdout=log, stderr=subprocess.STDOUT,
                       user=self.user, timeout=timeout)
        return self._launch(timeout)

    def _launch(self, timeout: float) -> PgServer:
        """postgres on the data directory and port this throwaway keeps across restarts."""
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.pgdata), "-h", "127.0.0.1", "-p", str(self.port),
             "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "full_page_writes=off",
             "-c", "synchronous_commit=off", "-c", "max_connections=200"],
            stdout=(self.base / "server.log").open("ab"), stderr=subprocess.STDOUT, user=self.user,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        server = PgServer(host="127.0.0.1", port=self.port, user="postgres", admin_dbname="postgres", origin="pgserver")
        deadline = time.monotonic() + timeout
        while True:
            problem = _problem(server.admin_dsn)
            if problem is None:
                return server
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.base / "server.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"pgserver's PostgreSQL did not start ({problem}):\n{tail}")
            time.sleep(0.2)

    def halt(self, mode: str = "fast") -> None:
        """Stop the server but keep its data, for `resume()`: `fast` (SIGINT) disconnects every
        client and shuts down cleanly, `immediate` (SIGQUIT) is a crash that recovers at start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if mode == "fast" else signal.SIGQUIT)
            self.proc.wait(timeout=30)

    def resume(self, timeout: float = 60.0) -> PgServer:
        """Start the halted server again, same port, same data. Call it from a thread that outlives
        the server (the test's own): the server gets SIGTERM when the thread that started it ends."""
        return self._launch(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.base, ignore_errors=True)


def resolve(dsn: str, *, fallback: bool = True) -> tuple[PgServer | None, str | None, ThrowawayPostgres | None]:
    """(server, why there is none, the throwaway to stop): the configured DSN if it answers, else a
    pgserver throwaway (when `fallback`), else None and both reasons."""
    problem = _problem(dsn)
    if problem is None:
        return _configured(dsn), None, None
    if not fallback:
        return None, f"nothing answers at {dsn!r} ({problem})", None
    try:
        throwaway = ThrowawayPostgres()
    except ImportError as exc:
        return None, f"nothing answers at {dsn!r} ({problem}), and pgserver is not installed ({exc})", None
    try:
        return throwaway.start(), None, throwaway
    except (OSError, subprocess.SubprocessError, RuntimeError, KeyError) as exc:
        return None, f"nothing answers at {dsn!r} ({problem}), and pgserver failed: {exc}", None


_lock = threading.Lock()
_resolved: tuple[PgServer | None, str | None] | None = None


def postgres_server() -> PgServer | None:
    """The run's PostgreSQL, decided once per process (a throwaway is stopped at exit)."""
    global _resolved
    with _lock:
        if _resolved is None:
            server, problem, throwaway = resolve(CONFIGURED_DSN)
            if throwaway is not None:
                atexit.register(throwaway.stop)
            _resolved = (server, problem)
        return _resolved[0]


def postgres_available() -> str | None:
    """None when the test PostgreSQL is there, else why not."""
    postgres_server()
    assert _resolved is not None
    return _resolved[1]


def require_postgres() -> PgServer:
    server = postgres_server()
    if server is not None:
        return server
    problem = postgres_available()
    if os.environ.get("BROKER_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (BROKER_REQUIRE_POSTGRES=1) but unavailable: {problem}")
    pytest.skip(f"PostgreSQL unavailable: {problem}")


def admin_dsn() -> str:
    """libpq DSN of the test PostgreSQL's admin database (skips or fails when there is none)."""
    return require_postgres().admin_dsn


def create_database(server: PgServer, prefix: str = "jitb") -> str:
    """A new, randomly named database on `server`; returns its name."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(server: PgServer, name: str) -> None:
    with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def libpq_url(sqlalchemy_url: str) -> str:
    """The broker's database URL as psycopg takes it."""
    return sqlalchemy_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _migrated_engine_free(url: str) -> None:
    """Migrate `url` to head on an engine of its own, closed after: nothing stays connected."""
    from broker.db import make_engine
    from broker.migrate import upgrade

    engine = make_engine(url, pool_size=1)
    try:
        upgrade(url, engine)
    finally:
        engine.dispose()


class PgDatabases:
    """Creates databases with random names and drops them all at the end of the run.

    `create(migrated=True)` copies a template this process migrated once (`CREATE DATABASE ...
    TEMPLATE`, about 20 ms) instead of running every migration again (about 170 ms): the broker's
    own `upgrade` then finds nothing to do. Every migration from an empty database still runs
    once per worker, for the template; `create()` without it gives an empty database."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self._template: str | None = None
        self._lock = threading.Lock()

    def create(self, prefix: str = "jitb", *, migrated: bool = False) -> str:
        server = require_postgres()
        if not migrated:
            name = create_database(server, prefix)
        else:
            template = self._migrated_template(server)
            name = f"{prefix}_{secrets.token_hex(6)}"
            with psycopg.connect(server.admin_dsn, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        self.created.append(name)
        return server.url(name)

    def _migrated_template(self, server: PgServer) -> str:
        with self._lock:
            if self._template is None:
                name = create_database(server, "jitb_template")
                self.created.append(name)
                _migrated_engine_free(server.url(name))
                self._template = name
            return self._template

    def drop_all(self) -> None:
        server = postgres_server()
        if server is not None and self.created:
            # A full run makes a few hundred databases and one DROP costs PostgreSQL about 0.2 s
            # of file removal: eight at a time takes well under half as long as one after another.
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda name: drop_database(server, name), self.created))


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[PgDatabases]:
    dbs = PgDatabases()
    yield dbs
    dbs.drop_all()


class SqliteTemplate:
    """A SQLite file this process migrated once, copied for each test that wants a migrated one."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "template.db"
        _migrated_engine_free(f"sqlite:///{self.path}")  # its WAL folded back in as the engine closed

    def copy(self, directory: Path) -> str:
        target = directory / "broker.db"
        shutil.copyfile(self.path, target)
        return f"sqlite:///{target}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> SqliteTemplate:
    return SqliteTemplate(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases,
                 sqlite_template: SqliteTemplate) -> str:
    """Every test that uses this runs once per database, already migrated to head (a copy of a
    template migrated once per worker: the broker's own `upgrade` then has nothing to do)."""
    if request.param == "sqlite":
        return sqlite_template.copy(tmp_path_factory.mktemp("db"))
    return pg_databases.create(migrated=True)


@pytest.fixture
def postgres_url(pg_databases: PgDatabases) -> str:
    """A PostgreSQL database migrated to head (see `database_url`)."""
    return pg_databases.create(migrated=True)
