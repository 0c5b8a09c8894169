"""The soak (`make bench`, `make soak`): many native capabilities over many sessions, the sweeper
expiring them, and the broker's resources sampled until the target is reached.

    .venv/bin/python bench/soak.py [--capabilities 500000] [--sessions 64] [--connections 16]
                                   [--window 30] [--ttl 5] [--tracemalloc] [--tracemalloc-frames 1]
                                   [--probe] [--server-env K=V ...] [--max-seconds 0] [--write BENCHMARKS.md]

One `broker-cli serve` on PostgreSQL (a fresh database), with the sweeper every second and keys
kept 60 s (the smallest Idempotency-Key lifetime). wrk (bench/wrk/capabilities.lua) sends
`POST /v1/capabilities` with a fresh Idempotency-Key each, round-robin over `--sessions` sessions,
in windows of `--window` seconds. After each window: the server's RSS, open files and threads
(from /proc, over its process tree), its connections to PostgreSQL (pg_stat_activity), the
database's table sizes, leases by status, and what wrk counted (non-2xx answers included).

The curve is judged after warm-up (the first quarter of the windows, at least one): RSS at the end
against RSS at the end of warm-up, within 5% or not. With `--tracemalloc` the server runs under
tracemalloc (bench/traced_serve.py) and a snapshot taken after warm-up is diffed against one at
the end: the top growth by source line (by traceback with `--tracemalloc-frames` above 1) is
printed and written to the report. With `--probe` the server is asked after each window where its
memory is (bench/traced_serve.py: malloc's bytes in use and free, Python's blocks, objects by
type), and the types whose count grew most after warm-up are reported. `--server-env K=V` adds to
the server's environment (e.g. MALLOC_ARENA_MAX=2), for A/B runs. `--max-seconds`, or SIGUSR2 to
the soak, ends it after the window under way; the report says how far short of the target it was.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from _common import (
    REPO,
    BrokerProcess,
    Cleanup,
    Report,
    create_pg_database,
    libpq_url,
    log,
    process_tree,
    reported,
    temp_dir,
)
from suite import write_tokens, wrk

BEGIN, END = "<!-- make soak: begin -->", "<!-- make soak: end -->"
TABLES = ("leases", "audit_records", "audit_leaves", "idempotency_keys", "sessions", "session_live_deltas", "outbox")
RSS_BOUND = 0.05  # the acceptance: RSS after warm-up stays within 5% over the run


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def _open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def sample_process(root_pid: int) -> dict[str, float]:
    pids = process_tree(root_pid)
    statuses = [_status(p) for p in pids]
    return {"rss_mb": round(sum(s.get("VmRSS", 0) for s in statuses) / 1024, 1),
            "threads": sum(s.get("Threads", 0) for s in statuses),
            "open_files": sum(_open_files(p) for p in pids)}


def sample_database(url: str) -> dict[str, Any]:
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        dbname = conn.info.dbname
        connections = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                                   (dbname,)).fetchone()
        sizes = {t: round(conn.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0] / 2**20, 2)  # type: ignore[index]
                 for t in TABLES if conn.execute("SELECT to_regclass(%s)", (t,)).fetchone()[0] is not None}  # type: ignore[index]
        leases = dict(conn.execute("SELECT status, count(*) FROM leases GROUP BY status").fetchall())
        keys = conn.execute("SELECT count(*) FROM idempotency_keys").fetchone()
        autovacuum = conn.execute("SHOW autovacuum").fetchone()
    return {"autovacuum": autovacuum[0] if autovacuum else "?",
            "db_connections": connections[0] if connections else 0, "table_mb": sizes, "leases": leases,
            "idempotency_keys": keys[0] if keys else 0}


def snapshot(broker: BrokerProcess, directory: Path, name: str, within: float = 120) -> Path:
    """SIGUSR1 to the traced server, then wait for the file it writes."""
    assert broker.proc is not None
    target = directory / f"{name}.snap"
    os.kill(broker.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + within
    while not (target.exists() and (directory / f"{name}.done").exists()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no tracemalloc snapshot {target} within {within}s")
        time.sleep(0.2)
    return target


def _stop_requested() -> list[int]:
    """SIGUSR2 to the soak itself: end after the window under way and report what was reached."""
    flag: list[int] = []
    signal.signal(signal.SIGUSR2, lambda *_: flag.append(1))
    return flag


def probe(broker: BrokerProcess, directory: Path, within: float = 60) -> dict[str, Any]:
    """SIGUSR2 to the instrumented server, then wait for the line it appends to probe.jsonl."""
    assert broker.proc is not None
    path = directory / "probe.jsonl"
    before = len(path.read_text().splitlines()) if path.exists() else 0
    os.kill(broker.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + within
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) > before:
            try:
                return dict(json.loads(lines[before]))
            except json.JSONDecodeError:
                pass  # the line is still being written
        if time.monotonic() > deadline:
            raise TimeoutError(f"no probe line in {path} within {within}s")
        time.sleep(0.2)


def type_growth(before: dict[str, int], after: dict[str, int], top: int = 12) -> list[str]:
    grown = sorted(((after.get(t, 0) - before.get(t, 0), t) for t in set(before) | set(after)), reverse=True)
    return [f"{t}: {before.get(t, 0):,} -> {after.get(t, 0):,} ({d:+,})" for d, t in grown[:top]]


def heap_diff(before: Path, after: Path, top: int = 15, frames: int = 1) -> list[str]:
    old, new = tracemalloc.Snapshot.load(str(before)), tracemalloc.Snapshot.load(str(after))
    skip = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    if frames <= 1:
        stats = new.filter_traces(skip).compare_to(old.filter_traces(skip), "lineno")
        return [str(s) for s in stats[:top]]
    out = []
    for stat in new.filter_traces(skip).compare_to(old.filter_traces(skip), "traceback")[:top]:
        out.append(f"{stat.size_diff / 1024:+.1f} KiB ({stat.count_diff:+} blocks), now {stat.size / 1024:.1f} KiB:")
        out += [f"    {line}" for line in stat.traceback.format(limit=min(frames, 12), most_recent_first=True)
                if not line.startswith("    ")]
    return out


def judge(windows: list[dict[str, Any]]) -> dict[str, Any]:
    warm = max(1, len(windows) // 4)
    base, last = windows[warm - 1], windows[-1]
    growth = (last["rss_mb"] - base["rss_mb"]) / base["rss_mb"] if base["rss_mb"] else 0.0
    after = [w["rss_mb"] for w in windows[warm - 1:]]
    return {"warmup_windows": warm, "rss_after_warmup_mb": base["rss_mb"], "rss_end_mb": last["rss_mb"],
            "rss_min_max_after_warmup_mb": [min(after), max(after)], "rss_growth_after_warmup": round(growth, 4),
            "within_bound": abs(growth) <= RSS_BOUND,
            "open_files": [base["open_files"], last["open_files"]], "threads": [base["threads"], last["threads"]],
            "db_connections": [base["db_connections"], last["db_connections"]]}


def run(args: argparse.Namespace, report: Report) -> None:
    with Cleanup() as cleanup:
        work = temp_dir(cleanup, "jb-soak-")
        url = create_pg_database(cleanup, "jitb_soak")
        env = {"BROKER_SWEEP_INTERVAL_SECONDS": "1", "BROKER_IDEMPOTENCY_TTL_SECONDS": "60", "BROKER_LOG_LEVEL": "warning"}
        broker = BrokerProcess(cleanup, work, url, extra_env=env, name="soak")
        snapshots = work / "snapshots"
        broker.env.update(args.server_env)
        if args.tracemalloc or args.probe:
            snapshots.mkdir()
            broker.command = [sys.executable, str(REPO / "bench" / "traced_serve.py")]
            broker.env["SOAK_SNAPSHOT_DIR"] = str(snapshots)
            broker.env["SOAK_TRACEMALLOC_FRAMES"] = str(args.tracemalloc_frames if args.tracemalloc else 0)
        broker.migrate()
        broker.start()
        sessions = broker.create_sessions(args.sessions, ttl=86400)
        tokens = write_tokens(work / "tokens.txt", [s["session_token"] for s in sessions])
        body = {"resource": "jwt://payments-api", "access": "read", "ttl_seconds": args.ttl, "purpose": "soak"}
        windows: list[dict[str, Any]] = []
        issued = 0
        started = time.monotonic()
        traced_base: Path | None = None
        stop = _stop_requested()
        while issued < args.capabilities:
            if stop or (args.max_seconds and time.monotonic() - started >= args.max_seconds):
                log(f"soak: stopped short of {args.capabilities:,} at {issued:,} (time limit or SIGUSR2)")
                break
            result = wrk(broker.base_url, tokens, connections=args.connections, seconds=args.window, body=body)
            issued += result["requests"] - result["non_2xx"]
            assert broker.proc is not None
            window = {"t_s": round(time.monotonic() - started, 1), "issued": issued, "per_s": result["per_s"],
                      "non_2xx": result["non_2xx"], "errors": result["errors"], "p99_ms": result["p99_ms"],
                      **sample_process(broker.proc.pid), **sample_database(url)}
            if args.probe:
                window["probe"] = probe(broker, snapshots)
            windows.append(window)
            log(f"soak: {issued:,} issued, rss {window['rss_mb']} MB, fds {window['open_files']}, "
                f"threads {window['threads']}, pg conns {window['db_connections']}, leases {window['leases']}")
            if args.tracemalloc and traced_base is None and len(windows) >= max(1, args.warmup_windows):
                traced_base = snapshot(broker, snapshots, "warm")
        summary = judge(windows)
        if args.probe:
            warm = windows[summary["warmup_windows"] - 1]["probe"]
            end = windows[-1]["probe"]
            summary["probe"] = {k: [warm[k], end[k]] for k in warm if k not in ("t", "types", "caches")}
            summary["probe"]["types_top_growth"] = type_growth(warm["types"], end["types"])
            summary["probe"]["caches"] = {k: [warm["caches"].get(k), v] for k, v in end["caches"].items()}
            log(f"soak: probe after warm-up -> end: {json.dumps(summary['probe'], indent=1)}")
        if args.tracemalloc and traced_base is not None:
            summary["tracemalloc_top_growth"] = heap_diff(traced_base, snapshot(broker, snapshots, "end"),
                                                          frames=args.tracemalloc_frames)
        report.results.update({"capabilities": issued, "target": args.capabilities, "sessions": args.sessions,
                               "connections": args.connections,
                               "window_seconds": args.window, "ttl_seconds": args.ttl, "windows": windows,
                               "summary": summary})


def _leases(by_status: dict[str, int]) -> str:
    return ", ".join(f"{n:,} {status}" for status, n in sorted(by_status.items()))


def markdown(report: Report) -> str:
    r = report.results
    s = r["summary"]
    lines = [BEGIN, "",
             f"Run {report.started}: {r['capabilities']:,} native capabilities over {r['sessions']} sessions, "
             f"{r['connections']} connections, ttl {r['ttl_seconds']} s (the sweeper expires them), "
             f"windows of {r['window_seconds']} s. Command: `{report.command}`."
             + (f" Stopped short of the target ({r['target']:,}): time limit or stop signal."
                if r["capabilities"] < r.get("target", 0) else ""), "",
             f"PostgreSQL autovacuum: {r['windows'][0].get('autovacuum')} (table sizes are bytes on disk; with "
             "autovacuum off nothing reclaims deleted rows, so a pruned table's bytes still grow while its rows level off).",
             "",
             "| t (s) | issued | per s | non-2xx | RSS MB | open files | threads | PG conns | leases "
             "| leases MB | audit MB | idempotency keys (rows) | keys MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in r["windows"]:
        t = w["table_mb"]
        lines.append(f"| {w['t_s']} | {w['issued']:,} | {w['per_s']} | {w['non_2xx']} | {w['rss_mb']} | {w['open_files']} "
                     f"| {w['threads']} | {w['db_connections']} | {_leases(w['leases'])} | {t.get('leases')} "
                     f"| {round((t.get('audit_records') or 0) + (t.get('audit_leaves') or 0), 2)} | {w['idempotency_keys']:,} "
                     f"| {t.get('idempotency_keys')} |")
    lines += ["", f"RSS after warm-up ({s['warmup_windows']} window(s)): {s['rss_after_warmup_mb']} MB -> "
              f"{s['rss_end_mb']} MB at the end ({s['rss_growth_after_warmup'] * 100:+.1f}%; range "
              f"{s['rss_min_max_after_warmup_mb']}), within 5%: **{'yes' if s['within_bound'] else 'no'}**.",
              ""]
    if s.get("tracemalloc_top_growth"):
        lines += ["tracemalloc, end vs after warm-up, top growth by line:", "", "```",
                  *s["tracemalloc_top_growth"], "```", ""]
    lines.append(END)
    return "\n".join(lines)


def rewrite(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        path.write_text(head + block + rest.split(END, 1)[1])
    else:
        path.write_text(text.rstrip("\n") + "\n\n## Soak (`make soak`, part of `make bench`)\n\n" + block + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--capabilities", type=int, default=500_000, help="stop once this many were issued")
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=0,
                    help="end after the window that passes this many seconds, short of the target if need be (0: none)")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of load between samples")
    ap.add_argument("--ttl", type=int, default=5, help="each capability's ttl_seconds: the sweeper expires it")
    ap.add_argument("--tracemalloc", action="store_true", help="diff heap snapshots (after warm-up, end)")
    ap.add_argument("--warmup-windows", type=int, default=2, help="with --tracemalloc: when the first snapshot is taken")
    ap.add_argument("--tracemalloc-frames", type=int, default=1,
                    help="with --tracemalloc: frames kept per trace; above 1 the diff groups by traceback")
    ap.add_argument("--probe", action="store_true",
                    help="after each window ask the server where its memory is (malloc, Python blocks, objects by type)")
    ap.add_argument("--server-env", action="append", default=[], metavar="K=V",
                    help="add to the server's environment (repeatable), e.g. MALLOC_ARENA_MAX=2")
    ap.add_argument("--write", type=Path, help="rewrite this file's `make soak` block (BENCHMARKS.md)")
    ap.add_argument("--json", type=Path, help="write the full JSON here")
    args = ap.parse_args()
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    report = Report("soak", args.capabilities < 500_000)
    with reported(report):
        run(args, report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    if args.write and not report.errors:
        rewrite(args.write, markdown(report))
    report.emit()
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
