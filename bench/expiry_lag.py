"""Expiry lag: how late the sweeper ends leases, with 100,000 active and 1,000 expiring.

    .venv/bin/python bench/expiry_lag.py           # 100,000 active, 1,000 expiring, 3 runs per interval
    .venv/bin/python bench/expiry_lag.py --quick   # 10,000 active, 200 expiring, 1 run per interval

Setup (not timed): a fresh PostgreSQL database, migrated; 100 sessions and (active - expiring)
native leases that expire in a day, bulk-inserted with COPY, then ANALYZE.

Per run: `broker-cli serve` (its sweeper included) starts with BROKER_SWEEP_INTERVAL_SECONDS
set (1.0, the default, and 0.2, interleaved run by run); once it is up, `expiring` more
native leases are COPYed in, their expires_at spread evenly over `--window` seconds starting
`--lead` seconds later, so about `active` leases are active when they fall due. Per lease:

- lag = ended_at - expires_at, both from the leases table (the brief's measure). ended_at is the
  broker's clock when its revoking transaction began.
- visible lag = when a poller (every --poll seconds, its own connection) first saw the row
  not `active` - expires_at: the commit as other readers see it; an upper bound, by up to one
  poll interval.

Also reported: the sweeper's idle CPU with everything active (its cost should follow what
expires, not what is active), and EXPLAIN ANALYZE of the due-for-expiry query.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from _common import (
    BrokerProcess,
    Cleanup,
    Report,
    create_pg_database,
    latency_summary,
    libpq_url,
    log,
    median,
    reported,
    temp_dir,
)

LEASE_COLUMNS = ("id", "session_id", "resource", "access", "tier", "provider", "status", "ttl_seconds", "purpose",
                 "created_at", "expires_at", "minted_at", "revoke_attempts")
SESSION_COLUMNS = ("id", "human", "agent", "task_id", "scope", "labels", "status", "created_by", "created_at",
                   "expires_at", "issued_count")
SESSIONS = 100
TARGET_P99_S = 2.0


def seed(dsn: str, active: int) -> list[str]:
    """Sessions and long-lived active leases, by COPY. Returns the session ids."""
    now = datetime.now(UTC)
    far = now + timedelta(days=1)
    sessions = [f"ses_bench{i:05d}" for i in range(SESSIONS)]
    scope = json.dumps([{"resource": "jwt://**", "access": ["*"]}])
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur:
            with cur.copy(f"COPY sessions ({', '.join(SESSION_COLUMNS)}) FROM STDIN") as copy:
                for sid in sessions:
                    copy.write_row((sid, "alice@example.com", "claude-code", "bench", scope, "{}", "active",
                                    "orch", now, far, 0))
            with cur.copy(f"COPY leases ({', '.join(LEASE_COLUMNS)}) FROM STDIN") as copy:
                for i in range(active):
                    copy.write_row((f"cap_live{i:07d}", sessions[i % SESSIONS], "jwt://payments-api", "read", "read",
                                    "native", "active", 86400, "benchmark", now, far, now, 0))
        conn.commit()
        conn.autocommit = True
        conn.execute("ANALYZE leases")
        conn.execute("ANALYZE sessions")
    return sessions


def insert_expiring(dsn: str, sessions: list[str], tag: str, n: int, lead: float, window: float) -> dict[str, datetime]:
    now = datetime.now(UTC)
    start = now + timedelta(seconds=lead)
    due = {f"cap_exp{tag}_{i:05d}": start + timedelta(seconds=window * i / n) for i in range(n)}
    with psycopg.connect(dsn) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY leases ({', '.join(LEASE_COLUMNS)}) FROM STDIN") as copy:
            for i, (lid, exp) in enumerate(due.items()):
                ttl = max(1, int((exp - now).total_seconds()))
                copy.write_row((lid, sessions[i % len(sessions)], "jwt://payments-api", "read", "read", "native",
                                "active", ttl, "benchmark", now, exp, now, 0))
        conn.commit()
    return due


class Poller:
    """Records, per lease id, when it was first seen not active (commit visible to others)."""

    def __init__(self, dsn: str, ids: list[str], interval: float) -> None:
        self.dsn, self.pending, self.interval = dsn, set(ids), interval
        self.seen: dict[str, datetime] = {}
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while self.pending and not self._stop.is_set():
                rows = conn.execute("SELECT id FROM leases WHERE id = ANY(%s) AND status <> 'active'",
                                    (list(self.pending),)).fetchall()
                at = datetime.now(UTC)
                self.polls += 1
                for (lid,) in rows:
                    self.seen[lid] = at
                    self.pending.discard(lid)
                self._stop.wait(self.interval)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def wait(self, timeout: float) -> None:
        self._thread.join(timeout)
        self._stop.set()
        self._thread.join(5)


def explain_due_query(dsn: str) -> dict[str, Any]:
    """The sweeper's query (broker/leases/due.py due_for_expiry), as SQL."""
    sql = ("SELECT id FROM leases WHERE status = 'active' AND expires_at <= now() "
           "AND (claimed_until IS NULL OR claimed_until <= now()) ORDER BY expires_at LIMIT 500")
    with psycopg.connect(dsn, autocommit=True) as conn:
        plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql).fetchone()[0][0]  # type: ignore[index]
    node = plan["Plan"]
    nodes = []
    while node:
        nodes.append(f"{node['Node Type']}" + (f" using {node['Index Name']}" if "Index Name" in node else ""))
        node = (node.get("Plans") or [None])[0]
    return {"plan": " -> ".join(nodes), "execution_ms": round(plan["Execution Time"], 3), "sql": sql}


def one_run(broker: BrokerProcess, dsn: str, sessions: list[str], interval: float, tag: str, args: argparse.Namespace,
            ) -> dict[str, Any]:
    broker.env["BROKER_SWEEP_INTERVAL_SECONDS"] = f"{interval:g}"
    broker.start()
    try:
        time.sleep(1.0)  # past the first sweep pass
        cpu0, t0 = broker.cpu_seconds(), time.monotonic()
        time.sleep(args.idle_seconds)
        idle_cpu_per_s = (broker.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        due = insert_expiring(dsn, sessions, tag, args.expiring, args.lead, args.window)
        poller = Poller(dsn, list(due), args.poll).start()
        poller.wait(args.lead + args.window + interval + 60)
    finally:
        broker.stop()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, status, expires_at, ended_at FROM leases WHERE id = ANY(%s)",
                            (list(due),)).fetchall()
    statuses: dict[str, int] = {}
    lag, visible = [], []
    for lid, status, exp, ended in rows:
        statuses[status] = statuses.get(status, 0) + 1
        if ended is not None:
            lag.append((ended - exp).total_seconds())
        if lid in poller.seen:
            visible.append((poller.seen[lid] - exp).total_seconds())
    early = sum(1 for x in lag if x < 0)
    return {"sweep_interval_s": interval, "expiring": len(due), "statuses_after": statuses,
            "not_ended": len(due) - len(lag), "ended_before_expiry": early,
            "lag_ended_at_minus_expires_at": latency_summary(lag),
            "visible_lag_poller": latency_summary(visible), "poller_polls": poller.polls,
            "idle_server_cpu_share_with_all_active": round(idle_cpu_per_s, 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 active, 200 expiring, one run per interval")
    ap.add_argument("--active", type=int, default=100_000, help="leases active when the expiring ones fall due")
    ap.add_argument("--expiring", type=int, default=1000)
    ap.add_argument("--window", type=float, default=3.0, help="expiries spread over this many seconds")
    ap.add_argument("--lead", type=float, default=2.0, help="first expiry this long after the insert")
    ap.add_argument("--intervals", type=float, nargs="+", default=[1.0, 0.2], help="BROKER_SWEEP_INTERVAL_SECONDS")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--poll", type=float, default=0.02, help="poller interval (s)")
    ap.add_argument("--idle-seconds", type=float, default=3.0, help="idle window for the sweeper's CPU share")
    args = ap.parse_args()
    if args.quick:
        args.active, args.expiring, args.runs, args.idle_seconds = 10_000, 200, 1, 1.0
    report = Report("expiry_lag", args.quick)
    report.results["settings"] = {k: getattr(args, k) for k in
                                  ("active", "expiring", "window", "lead", "intervals", "runs", "poll")}
    with Cleanup() as cleanup, reported(report):
        work = temp_dir(cleanup, "jitb-bench-expiry-")
        db_url = create_pg_database(cleanup)
        dsn = libpq_url(db_url)
        broker = BrokerProcess(cleanup, work, db_url)
        broker.migrate()
        t = time.perf_counter()
        sessions = seed(dsn, args.active - args.expiring)
        log(f"seeded {args.active - args.expiring} active leases in {time.perf_counter() - t:.1f}s")
        report.results["due_query_explain"] = explain_due_query(dsn)
        runs: dict[str, list[dict[str, Any]]] = {f"{i:g}": [] for i in args.intervals}
        for r in range(args.runs):
            for interval in args.intervals:  # interleaved
                res = one_run(broker, dsn, sessions, interval, f"{r}_{interval:g}".replace(".", "p"), args)
                lag = res["lag_ended_at_minus_expires_at"]
                log(f"run {r + 1}/{args.runs} interval {interval:g}s: lag p50 {lag.get('p50_ms')} ms, "
                    f"p99 {lag.get('p99_ms')} ms, max {lag.get('max_ms')} ms; statuses {res['statuses_after']}")
                runs[f"{interval:g}"].append(res)
        summary: dict[str, Any] = {}
        for interval, rs in runs.items():
            def med(field: str, key: str, rs: list[dict[str, Any]] = rs) -> float:
                return median([x[field][key] for x in rs if x[field]])
            p99 = med("lag_ended_at_minus_expires_at", "p99_ms")
            summary[f"interval_{interval}s"] = {
                "median_of_runs": {
                    "lag_p50_ms": med("lag_ended_at_minus_expires_at", "p50_ms"), "lag_p99_ms": p99,
                    "lag_max_ms": med("lag_ended_at_minus_expires_at", "max_ms"),
                    "visible_lag_p50_ms": med("visible_lag_poller", "p50_ms"),
                    "visible_lag_p99_ms": med("visible_lag_poller", "p99_ms"),
                    "visible_lag_max_ms": med("visible_lag_poller", "max_ms")},
                "worst_max_ms_over_runs": max(x["lag_ended_at_minus_expires_at"].get("max_ms", 0) for x in rs),
                "target_p99_ms": TARGET_P99_S * 1000, "met": p99 <= TARGET_P99_S * 1000
                and all(x["not_ended"] == 0 for x in rs),
                "runs": rs}
        report.results["expiry_lag"] = summary
        with psycopg.connect(dsn) as conn:
            report.results["active_leases_at_end"] = conn.execute(
                "SELECT count(*) FROM leases WHERE status = 'active'").fetchone()[0]  # type: ignore[index]
    report.emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
