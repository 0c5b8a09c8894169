"""Shared plumbing for the benchmarks: databases, broker processes, a light HTTP load driver.

Everything here is loopback-only (127.0.0.1) and bounded. Whatever a benchmark creates
(PostgreSQL databases, broker processes, OpenBao servers, temporary directories) is registered
with `Cleanup` and removed on exit, on an exception, and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
import psycopg  # noqa: E402

from tests.support.brokers import TEST_POLICY, BrokerSecrets  # noqa: E402  # after the sys.path line above
from tests.support.databases import (  # noqa: E402
    create_database,
    drop_database,
    libpq_url,
    postgres_available,
    postgres_server,
)
from tests.support.processes import BrokerProcess as ServedBroker  # noqa: E402

BROKER_CLI = str(Path(sys.executable).parent / "broker-cli")
HOST = "127.0.0.1"

# TEST_POLICY with budgets wide enough for a benchmark: the budget layer is still evaluated
# (it counts the session's live leases on every request), it just never says no.
BENCH_BUDGETS = "budgets: {max_issued_per_session: 100000, max_active_per_session: 100000}"


def bench_policy(*, vault: bool = False) -> str:
    policy = TEST_POLICY.replace("budgets: {max_issued_per_session: 50, max_active_per_session: 30}", BENCH_BUDGETS)
    assert BENCH_BUDGETS in policy, "TEST_POLICY's budgets line changed; update bench/_common.py"
    if vault:
        policy = policy.replace(
            "humans:\n",
            '  - match: "vault://secret/data/allowed"\n'
            "    provider: vault\n"
            "    access:\n"
            "      read: {tier: read, policies: [kv-allowed]}\n"
            "humans:\n",
        ).replace(
            '      - {resource: "jwt://svc/*", access: [read]}\n',
            '      - {resource: "jwt://svc/*", access: [read]}\n'
            '      - {resource: "vault://secret/data/allowed", access: [read]}\n',
        )
    return policy


# --- cleanup ----------------------------------------------------------------------------------


class Cleanup:
    """LIFO stack of undo actions, run once: at exit, on error, on SIGINT/SIGTERM."""

    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []
        self._done = False

    def push(self, what: str, action: Callable[[], None]) -> None:
        self._actions.append((what, action))

    def run(self) -> None:
        if self._done:
            return
        self._done = True
        while self._actions:
            what, action = self._actions.pop()
            try:
                action()
            except Exception as exc:  # noqa: BLE001  # keep cleaning whatever fails
                log(f"cleanup of {what} failed: {exc!r}")

    def __enter__(self) -> Cleanup:
        def on_signal(signum: int, _frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.run()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def temp_dir(cleanup: Cleanup, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    cleanup.push(f"temp dir {path}", lambda: shutil.rmtree(path, ignore_errors=True))
    return path


def create_pg_database(cleanup: Cleanup, prefix: str = "jitb_bench") -> str:
    """A fresh, randomly named database, dropped (WITH FORCE) at cleanup. Returns the SQLAlchemy URL."""
    server = postgres_server()  # the suite's own: BROKER_TEST_PG_DSN, else a throwaway
    if server is None:
        raise RuntimeError(f"no PostgreSQL for the benchmark: {postgres_available()}")
    name = create_database(server, prefix)
    cleanup.push(f"database {name}", lambda: drop_database(server, name))
    return server.url(name)




# --- a broker as a subprocess -------------------------------------------------------------------


class BrokerProcess(ServedBroker):
    """`broker-cli migrate` then `broker-cli serve` (one uvicorn process, as shipped), on loopback,
    stopped at cleanup; with the secrets to call it and the CPU it used."""

    def __init__(self, cleanup: Cleanup, workdir: Path, database_url: str, *, policy: str | None = None,
                 extra_env: dict[str, str] | None = None, name: str = "broker", workers: int = 1) -> None:
        self.secrets = BrokerSecrets()
        env = self.secrets.env(workdir, database_url, policy or bench_policy(), **(extra_env or {}))
        super().__init__(env, workdir, name, ("--workers", str(workers)), cwd=workdir, death_signal=signal.SIGTERM)
        self.env["BROKER_ISSUER"] = self.base_url
        cleanup.push(f"{name} process", self.stop)

    def cpu_seconds(self) -> float:
        """user+system CPU of the server process so far (from /proc)."""
        if self.proc is None:
            return 0.0
        return sum(proc_cpu_seconds(pid) for pid in process_tree(self.proc.pid))  # --workers: all of them

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def orchestrator_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets.orchestrator_key}"}

    def create_sessions(self, n: int, *, ttl: int = 3600) -> list[dict[str, Any]]:
        out = []
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            for i in range(n):
                r = client.post("/v1/sessions", headers=self.orchestrator_headers(), json={
                    "human": "alice@example.com", "agent": "claude-code", "task_id": f"bench-{i}",
                    "ttl_seconds": ttl, "scope": [{"resource": "jwt://**", "access": ["*"]},
                                                  {"resource": "vault://**", "access": ["*"]}]})
                if r.status_code != 201:
                    raise RuntimeError(f"session create: {r.status_code} {r.text[:300]}")
                out.append(r.json())
        return out


def process_tree(pid: int) -> list[int]:
    """pid and every descendant (uvicorn's worker processes), from /proc."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, for utilisation over an interval."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return total - idle, total


class PgActivitySampler:
    """Samples pg_stat_activity of one database every `interval` seconds in a thread.

    Reports, per (state, wait event, statement prefix), the average number of the broker's
    backends found in it: where the server's connections spend their time, e.g. waiting on
    a row lock held by another transaction.
    """

    def __init__(self, sqlalchemy_url: str, interval: float = 0.05) -> None:
        import threading

        self.dsn = libpq_url(sqlalchemy_url)
        self.database = sqlalchemy_url.rsplit("/", 1)[1]
        self.interval = interval
        self.samples = 0
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import re

        squash = re.compile(r"\s+")
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
            while not self._stop.wait(self.interval):
                rows = conn.execute(
                    "SELECT state, coalesce(wait_event_type || ':' || wait_event, 'on CPU'), query "
                    "FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend'", (self.database,)).fetchall()
                self.samples += 1
                for state, wait, query in rows:
                    if state == "idle":
                        key = "idle (connection parked in the pool)"
                    elif state == "idle in transaction":
                        key = f"idle in transaction (waiting for the broker; last: {squash.sub(' ', query)[:70]})"
                    else:
                        key = f"{state} [{wait}] {squash.sub(' ', query)[:90]}"
                    self.counts[key] = self.counts.get(key, 0) + 1

    def __enter__(self) -> PgActivitySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self, top: int = 12) -> dict[str, Any]:
        n = max(1, self.samples)
        rows = sorted(self.counts.items(), key=lambda kv: -kv[1])[:top]
        return {"samples": self.samples, "interval_s": self.interval,
                "avg_backends": {k: round(v / n, 2) for k, v in rows}}


# --- a light HTTP/1.1 client -------------------------------------------------------------------
# httpx costs a few hundred microseconds of CPU per request; on a 2-core machine that the server
# and PostgreSQL share, the load generator must stay small. These requests are pre-built bytes on
# keep-alive connections; responses are read by Content-Length.


def build_request(method: str, path: str, *, port: int, headers: dict[str, str] | None = None,
                  body: dict[str, Any] | None = None) -> bytes:
    payload = json.dumps(body).encode() if body is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append("Content-Type: application/json")
    lines.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        assert self.reader is not None
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == b"content-length":
                length = int(value.strip())
            elif lname == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def capability_request(port: int, session_token: str, *, idempotency: bool = True,
                       resource: str = "jwt://payments-api", access: str = "read", ttl: int = 900) -> bytes:
    headers = {"Authorization": f"Bearer {session_token}"}
    if idempotency:
        headers["Idempotency-Key"] = str(uuid.uuid4())
    return build_request("POST", "/v1/capabilities", port=port, headers=headers,
                         body={"resource": resource, "access": access, "ttl_seconds": ttl, "purpose": "benchmark"})


# --- numbers ----------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    s = sorted(seconds)
    if not s:
        return {}
    return {"p50_ms": round(percentile(s, 50) * 1000, 2), "p90_ms": round(percentile(s, 90) * 1000, 2),
            "p99_ms": round(percentile(s, 99) * 1000, 2), "max_ms": round(s[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(s) * 1000, 2), "n": len(s)}


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Report:
    benchmark: str
    quick: bool
    started: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    machine: dict[str, Any] = field(default_factory=lambda: machine_info())
    command: str = field(default_factory=lambda: " ".join([Path(sys.executable).name, *sys.argv]))
    results: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def emit(self) -> None:
        print(json.dumps(self.__dict__, indent=2, default=str), flush=True)


@contextlib.contextmanager
def reported(report: Report) -> Iterator[None]:
    """A failure is written into the summary (and logged), so the script still exits 0 with
    its JSON; cleanup runs in the caller's `finally`. Ctrl-C still stops it."""
    try:
        yield
    except BaseException as exc:
        import traceback

        report.errors.append("".join(traceback.format_exception_only(type(exc), exc)).strip())
        log(traceback.format_exc())
        if isinstance(exc, KeyboardInterrupt):
            raise


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "load_avg_at_start": os.getloadavg()}
    with contextlib.suppress(Exception):  # which code was measured: HEAD, and uncommitted changes under broker/
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "broker"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.splitlines()
        info["git_head"] = head
        info["uncommitted_broker_files"] = len(dirty)
    with contextlib.suppress(Exception):
        server = postgres_server()
        assert server is not None
        with psycopg.connect(server.admin_dsn, connect_timeout=3) as conn:
            info["postgres"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            info["postgres_synchronous_commit"] = conn.execute("SHOW synchronous_commit").fetchone()[0]  # type: ignore[index]
    return info
