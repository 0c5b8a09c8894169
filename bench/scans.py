"""Does a cost grow with the data? The native rate run after run, beside PostgreSQL's own count of
the rows each table was read end to end for (`pg_stat_user_tables.seq_tup_read`).

    .venv/bin/python bench/scans.py [--runs 4] [--seconds 6] [--big 10000]

One broker (`broker-cli serve`, PostgreSQL, audit on, every background loop) and 64 sessions;
`--big N` first gives one more session N live leases. Each run is 64 wrk connections for
`--seconds`; between runs the statistics settle for 1.5 s. A table read whole on every request
or every background pass shows up as a `seq_tup_read` growing run by run while the rate falls:
how the reservation's escalation check (migration 0015) and the linker's anti-join were found.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BrokerProcess, Cleanup, bench_policy, create_pg_database, log, temp_dir
from suite import NATIVE_BODY, big_session, libpq_url, write_tokens, wrk

Counters = dict[str, tuple[int, ...]]


def table_reads(db_url: str) -> Counters:
    with psycopg.connect(libpq_url(db_url)) as conn:
        rows = conn.execute("SELECT relname, seq_scan, seq_tup_read FROM pg_stat_user_tables").fetchall()
    return {str(r[0]): (int(r[1] or 0), int(r[2] or 0)) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--big", type=int, default=0, metavar="N", help="a session holding N live leases first")
    args = ap.parse_args()
    with Cleanup() as cleanup:
        work = temp_dir(cleanup, "jitb-bench-scans-")
        db = create_pg_database(cleanup)
        (work / "broker").mkdir()
        broker = BrokerProcess(cleanup, work / "broker", db, policy=bench_policy(vault=False), name="broker-scans")
        broker.migrate()
        broker.start()
        many = write_tokens(work / "many.tokens", [s["session_token"] for s in broker.create_sessions(64)])
        if args.big:
            big_session(broker, db, args.big)
        wrk(broker.base_url, many, connections=4, seconds=1, body=NATIVE_BODY)  # warm-up
        for i in range(args.runs):
            time.sleep(1.5)
            before = table_reads(db)
            run = wrk(broker.base_url, many, connections=64, seconds=args.seconds, body=NATIVE_BODY)
            time.sleep(1.5)  # a backend's statistics reach the views when it goes idle
            after = table_reads(db)
            grown = {t: tuple(a - b for a, b in zip(after[t], before.get(t, (0, 0)), strict=True)) for t in after}
            top = sorted(((t, d) for t, d in grown.items() if d[1]), key=lambda td: -td[1][1])[:4]
            read = ", ".join(f"{t}: {d[0]} scans, {d[1]:,} rows" for t, d in top) or "no table read whole"
            log(f"run {i + 1}/{args.runs}: {run['per_s']}/s; read end to end: {read}")


if __name__ == "__main__":
    main()
