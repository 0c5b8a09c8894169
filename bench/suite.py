"""`make bench`: every figure of the scale targets in one run, written into BENCHMARKS.md.

    .venv/bin/python bench/suite.py [--quick] [--write BENCHMARKS.md] [--json FILE]

The load generator is wrk (Debian's package; `scripts/ensure-bench-tools` installs it) with
`bench/wrk/capabilities.lua`. What runs, against servers that are up side by side, on PostgreSQL:

- one broker as shipped (`broker-cli serve`, one process, audit on, the native and vault
  providers configured; OpenBao dev server beside it), and for the scaling section a broker
  under `serve --workers 2` and two separate broker processes on one database;
- per round (``--rounds``, interleaved so the noise of this shared machine hits every series
  alike): side by side at 64 connections, OpenBao's own token create, the broker's native
  capability over 64 sessions and over one session, and its narrowed vault token over 64
  sessions, each with its server's CPU per request (from /proc); native throughput at 4
  connections (64 sessions, round-robin), a fresh
  session vs one holding 10,000 live leases (4 connections each), 300 requests/s on a fixed
  schedule (p99), a vault-token mint through the broker beside OpenBao's own token create
  (1 connection each);
- during the fixed-rate run, the commit->link window of the audit log, polled every 20 ms;
- during the 64-connection runs, `pg_stat_activity` sampled every 50 ms: row-lock waits by
  statement (a session's own requests wait for each other by design; nothing else should);
- the policy decision at 1,000 rules x 1,000 humans (`bench/policy_decision.py`), teardown of
  1,000 capabilities (`bench/teardown.py --runs 1`) and expiry lag with 100k active
  (`bench/expiry_lag.py --runs 1 --intervals 1.0`).

Medians over the rounds are written between the `make bench` markers of BENCHMARKS.md, each
figure beside the command that produced it; the full JSON (every run) goes to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from _common import (
    REPO,
    BrokerProcess,
    Cleanup,
    PgActivitySampler,
    Report,
    bench_policy,
    create_pg_database,
    libpq_url,
    log,
    machine_cpu,
    proc_cpu_seconds,
    reported,
    temp_dir,
)

WRK_SCRIPT = REPO / "bench" / "wrk" / "capabilities.lua"
NATIVE_BODY = {"resource": "jwt://payments-api", "access": "read", "ttl_seconds": 900, "purpose": "benchmark"}
VAULT_BODY = {"resource": "vault://secret/data/allowed", "access": "read", "ttl_seconds": 900, "purpose": "benchmark"}
BEGIN, END = "<!-- make bench: begin -->", "<!-- make bench: end -->"

TARGETS = {
    "native_per_s": ">= 1,000/s",
    "ratio_64_over_4": ">= 1.0 (not lower)",
    "ratio_10k_over_fresh": ">= 0.90 (within 10%)",
    "p99_at_300_ms": "<= 20 ms",
    "cpu_ms_per_request": "<= 1.0 ms",
    "vault_minus_raw_ms": "<= 1.5 ms",
    "vault_over_native": ">= 0.5 (half the native rate)",
    "policy_p50_us": "<= 20 us",
    "teardown_native_s": "keep 0.2 s",
    "teardown_vault_s": "<= 2 s",
    "expiry_lag_p99_s": "keep about 1 s",
}


# --- wrk ----------------------------------------------------------------------------------------


def wrk(url: str, tokens: Path, *, connections: int, seconds: float, body: dict[str, Any] | None,
        rate: float | None = None, auth: str = "bearer", path: str = "/v1/capabilities",
        idempotency: bool = True) -> dict[str, Any]:
    threads = 1 if connections == 1 else 2
    env = dict(os.environ, BENCH_TOKENS=str(tokens), BENCH_BODY=json.dumps(body) if body is not None else "",
               BENCH_IDEMPOTENCY="1" if idempotency else "0", BENCH_AUTH=auth, BENCH_PATH=path,
               BENCH_THREADS=str(threads), BENCH_RATE=str(rate or 0))
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(WRK_SCRIPT.relative_to(REPO)), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=False, cwd=REPO)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(lines[-1])
    seconds_run = r["duration_us"] / 1e6
    good = r["requests"] - r["non_2xx"]
    return {"requests": r["requests"], "non_2xx": r["non_2xx"], "errors": r["connect"] + r["read"] + r["write"]
            + r["timeout"], "late_sends": r["late"], "seconds": round(seconds_run, 2),
            "per_s": round(good / seconds_run, 1), "p50_ms": r["p50_us"] / 1000, "p90_ms": r["p90_us"] / 1000,
            "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000, "connections": connections,
            "command": " ".join([*cmd[:-1], "URL"])}


def measured(server_cpu: Callable[[], float], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`, with the server's CPU per request and the machine's busy share over it."""
    cpu0, (busy0, total0) = server_cpu(), machine_cpu()
    result = run()
    cpu1, (busy1, total1) = server_cpu(), machine_cpu()
    result["server_cpu_ms_per_request"] = round((cpu1 - cpu0) / max(1, result["requests"]) * 1000, 3)
    result["machine_busy"] = round((busy1 - busy0) / max(1, total1 - total0), 2)
    return result


def write_tokens(path: Path, tokens: list[str]) -> Path:
    path.write_text("\n".join(tokens) + "\n")
    return path


# --- the commit -> link window --------------------------------------------------------------------


class LinkWindow:
    """Polls the database: when each audit record is first seen committed but not yet in the
    Merkle tree, and when it is first seen linked. Records committed and linked between two polls
    are counted as under one poll interval."""

    _UNLINKED = ("SELECT r.seq FROM audit_records r WHERE r.seq > %s AND NOT EXISTS "
                 "(SELECT 1 FROM audit_leaves l WHERE l.seq = r.seq)")

    def __init__(self, dsn: str, interval: float = 0.02) -> None:
        self.dsn, self.interval = dsn, interval
        self.windows: list[float] = []
        self.first_seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.floor = 0
        self.records = 0
        self.error: str | None = None

    def _run(self) -> None:
        try:
            self._poll()
        except Exception as exc:  # noqa: BLE001  # reported, not swallowed: the summary would read as "nothing seen"
            self.error = repr(exc)
            log(f"link window poller failed: {exc!r}")

    def _poll(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.floor = conn.execute("SELECT coalesce(max(seq), 0) FROM audit_records").fetchone()[0]  # type: ignore[index]
            while not self._stop.wait(self.interval):
                now = time.monotonic()
                unlinked = {row[0] for row in conn.execute(self._UNLINKED, (self.floor,))}
                for seq in unlinked:
                    self.first_seen.setdefault(seq, now)
                for seq in [s for s in self.first_seen if s not in unlinked]:
                    self.windows.append(now - self.first_seen.pop(seq))
            self.records = conn.execute("SELECT count(*) FROM audit_records WHERE seq > %s",  # type: ignore[index]
                                        (self.floor,)).fetchone()[0]

    def __enter__(self) -> LinkWindow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.5)  # let the linker catch up with the last records
        self._stop.set()
        self._thread.join(30)

    def summary(self) -> dict[str, Any]:
        w = sorted(self.windows)

        def q(p: float) -> float:
            return round(w[min(len(w) - 1, int(len(w) * p))] * 1000, 1) if w else 0.0

        return {"error": self.error, "records": self.records, "seen_unlinked": len(w), "still_unlinked": len(self.first_seen),
                "poll_ms": self.interval * 1000, "p50_ms": q(0.5), "p99_ms": q(0.99),
                "max_ms": round(w[-1] * 1000, 1) if w else 0.0}


def lock_waits(summary: dict[str, Any]) -> dict[str, Any]:
    """From a PgActivitySampler summary: average backends waiting on a row lock (`Lock:tuple`,
    `Lock:transactionid`), split into the session row (a session's requests are ordered by
    design) and every other row; other heavyweight locks (`Lock:extend`: a table growing by a
    page) are reported apart, they are not rows."""
    session_row = other = 0.0
    where: dict[str, float] = {}
    others: dict[str, float] = {}
    for key, avg in summary["avg_backends"].items():
        if "[Lock:" not in key:
            continue
        if "[Lock:tuple]" not in key and "[Lock:transactionid]" not in key:
            others[key] = avg
        elif ("FROM sessions" in key and "FOR UPDATE" in key.upper()) or "sessions.id" in key:
            session_row += avg
        else:
            other += avg
            where[key] = avg
    return {"session_row": round(session_row, 2), "shared_rows": round(other, 2), "shared_row_statements": where,
            "other_locks": others}


# --- where the CPU goes -------------------------------------------------------------------------

COMPONENTS = (  # first match on the innermost frame's file decides
    ("sqlalchemy", "SQLAlchemy (ORM, Core, compile, results)"), ("sqlmodel", "SQLAlchemy (ORM, Core, compile, results)"),
    ("psycopg", "psycopg (send, wait, rows)"), ("uvicorn", "uvicorn + httptools"),
    ("starlette", "Starlette + FastAPI + anyio (routing, dependencies, middleware, thread hops)"),
    ("fastapi", "Starlette + FastAPI + anyio (routing, dependencies, middleware, thread hops)"),
    ("anyio", "Starlette + FastAPI + anyio (routing, dependencies, middleware, thread hops)"),
    ("pydantic", "pydantic (validation, serialisation)"), ("jwt/", "PyJWT + cryptography"),
    ("cryptography", "PyJWT + cryptography"), ("/broker/", "the broker's own code"),
    ("asyncio", "asyncio event loop"), ("threading", "threads, queues (hand-offs)"), ("queue", "threads, queues (hand-offs)"),
)


def gil_profile(broker: BrokerProcess, load: Callable[[], dict[str, Any]], out: Path, seconds: float) -> dict[str, Any]:
    """py-spy (a sampling profiler outside the process: nothing in it is patched) with --gil, so
    only the thread holding the GIL is sampled: where the server's Python CPU goes, by thread
    and by component, and the broker's own functions by inclusive share."""
    import re

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    assert broker.proc is not None
    prof = subprocess.Popen([spy, "record", "--gil", "--threads", "--nonblocking", "-r", "200", "-f", "raw",
                             "-d", str(int(seconds) + 2), "-o", str(out), "-p", str(broker.proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    run_result = load()
    _, err = prof.communicate(timeout=seconds + 60)
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
    frame = re.compile(r"^(.*?) \((\S+?):\d+\)$")
    total = 0
    threads: dict[str, int] = {}
    components: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        name = re.sub(r"^thread \(\d+\): ", "", frames[0]).strip() or "?"
        name = "event loop (MainThread)" if name == "MainThread" else "request threads (AnyIO workers)" \
            if "AnyIO worker" in name else f"background: {name}"
        threads[name] = threads.get(name, 0) + n
        inner = frame.match(frames[-1])
        where = "/" + (inner.group(2) if inner else frames[-1])  # py-spy shortens paths to sys.path-relative
        label = next((lab for key, lab in COMPONENTS if key in where), "other (C builtins, stdlib)")
        components[label] = components.get(label, 0) + n
        seen = set()
        for f in frames:
            m = frame.match(f)
            if m and "/broker/" in "/" + m.group(2):
                key = ("/" + m.group(2)).split("/broker/", 1)[1] + ":" + m.group(1)
                if key not in seen:
                    seen.add(key)
                    inclusive[key] = inclusive.get(key, 0) + n

    def share(d: dict[str, int], top: int) -> dict[str, float]:
        return {k: round(v / max(1, total) * 100, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]}

    return {"samples": total, "requests": run_result["requests"], "per_s_while_profiled": run_result["per_s"],
            "by_thread_pct": share(threads, 8), "by_component_pct": share(components, 12),
            "broker_functions_inclusive_pct": share(inclusive, 15), "command": f"{Path(spy).name} record --gil "
            "--threads --nonblocking -r 200 -f raw -p PID"}


# --- seeding --------------------------------------------------------------------------------------


def big_session(broker: BrokerProcess, db_url: str, leases: int) -> str:
    """A session holding `leases` live native leases (COPY), as if it had minted them."""
    s = broker.create_sessions(1)[0]
    sid = s["session_id"]
    now = datetime.now(UTC)
    far = now + timedelta(hours=2)
    cols = ("id", "session_id", "resource", "access", "tier", "provider", "status", "ttl_seconds", "purpose",
            "created_at", "expires_at", "minted_at", "revoke_attempts")
    with psycopg.connect(libpq_url(db_url)) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY leases ({', '.join(cols)}) FROM STDIN") as copy:
            for i in range(leases):
                copy.write_row((f"cap_big{i:07d}", sid, "jwt://payments-api", "read", "read", "native", "active",
                                7200, "benchmark", now, far, now, 0))
        conn.execute("UPDATE sessions SET issued_count = issued_count + %s WHERE id = %s", (leases, sid))
        conn.commit()
        conn.autocommit = True
        conn.execute("ANALYZE leases")
    return s["session_token"]


def vault_raw_body(role_policies: list[str]) -> dict[str, Any]:
    """What the vault provider sends to create a token, sent by wrk straight to OpenBao."""
    return {"policies": role_policies, "no_default_policy": True, "ttl": "900s", "explicit_max_ttl": "900s",
            "renewable": False, "display_name": "cap_bench", "meta": {"session": "ses_bench", "capability": "cap_bench",
                                                                       "agent": "claude-code", "human": "alice@example.com",
                                                                       "task": "bench"}}


# --- the run --------------------------------------------------------------------------------------


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def sub_benchmark(args: list[str], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, *args]
    log("running " + " ".join(["python", *args]))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO)
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"errors": [f"exit {out.returncode}: {out.stderr[-800:]}"]}


def run(args: argparse.Namespace, report: Report) -> None:
    from tests.support.openbao import OpenBaoServer, configure_vault

    quick = args.quick
    secs = 2.0 if quick else args.seconds
    rounds = 1 if quick else args.rounds
    results = report.results
    with Cleanup() as cleanup:
        work = temp_dir(cleanup, "jitb-bench-suite-")
        (work / "bao").mkdir()
        bao = OpenBaoServer(work / "bao")
        cleanup.push("openbao server", bao.stop)
        bao.start()
        vault = configure_vault(bao)
        vault_env = {"BROKER_VAULT_ADDR": bao.addr, "BROKER_VAULT_TOKEN": vault.broker_token,
                     "BROKER_VAULT_TOKEN_ROLE": vault.token_role}

        def broker(name: str, db_url: str, workers: int = 1, code: Path | None = None) -> BrokerProcess:
            (work / name).mkdir()
            env = dict(vault_env, PYTHONPATH=str(code)) if code is not None else vault_env
            b = BrokerProcess(cleanup, work / name, db_url, policy=bench_policy(vault=True), extra_env=env,
                              name=name, workers=workers)
            b.migrate()
            b.start()
            return b

        main_db = create_pg_database(cleanup)
        pg = broker("broker-pg", main_db)
        log(f"broker on PostgreSQL at {pg.base_url}; OpenBao at {bao.addr}")
        # 64 connections over 64 sessions (each wrk thread walks its own half of them).
        many = write_tokens(work / "many.tokens", [s["session_token"] for s in pg.create_sessions(64)])
        one = write_tokens(work / "one.tokens", [pg.create_sessions(1)[0]["session_token"]])
        vault_tok = write_tokens(work / "vault.tokens", [pg.create_sessions(1)[0]["session_token"]])
        big = write_tokens(work / "big.tokens", [big_session(pg, main_db, 1000 if quick else 10_000)])
        raw_tok = write_tokens(work / "raw.tokens", [vault.broker_token])
        raw_path = f"/v1/auth/token/create/{vault.token_role}"
        base = base_tokens = None
        if args.baseline:
            # The same server from an earlier commit (a git worktree), up beside this one: its
            # figures are measured in the same rounds, so before/after is a ratio of one run.
            tree = work / "baseline-tree"
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline], cwd=REPO, check=True,
                           capture_output=True)
            cleanup.push("baseline worktree", lambda: subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False, capture_output=True))
            base = broker("broker-baseline", create_pg_database(cleanup), code=tree)
            base_tokens = write_tokens(work / "base.tokens", [s["session_token"] for s in base.create_sessions(64)])
            wrk(base.base_url, base_tokens, connections=4, seconds=1, body=NATIVE_BODY)
            series_base: list[dict[str, Any]] = []
        # Warm-up: pools, prepared statements, the vault login.
        wrk(pg.base_url, many, connections=4, seconds=1, body=NATIVE_BODY)
        wrk(pg.base_url, vault_tok, connections=1, seconds=1, body=VAULT_BODY)

        series: dict[str, list[dict[str, Any]]] = {k: [] for k in (
            "native_c4", "native_c64", "fresh_session", "session_10k", "rate_300", "vault_mint", "openbao_raw",
            "openbao_raw_c64", "native_one_session_c64", "vault_c64")}
        assert bao.proc is not None
        bao_pid = bao.proc.pid
        samples: list[dict[str, Any]] = []
        windows: list[dict[str, Any]] = []
        for i in range(rounds):
            log(f"round {i + 1}/{rounds}")
            fresh = write_tokens(work / f"fresh{i}.tokens", [pg.create_sessions(1)[0]["session_token"]])
            series["openbao_raw_c64"].append(measured(lambda: proc_cpu_seconds(bao_pid), lambda: wrk(
                bao.addr, raw_tok, connections=64, seconds=secs, body=vault_raw_body(["kv-allowed"]), auth="vault",
                path=raw_path, idempotency=False)))
            series["native_c4"].append(measured(pg.cpu_seconds, lambda: wrk(
                pg.base_url, many, connections=4, seconds=secs, body=NATIVE_BODY)))
            with PgActivitySampler(main_db) as sampler:
                series["native_c64"].append(measured(pg.cpu_seconds, lambda: wrk(
                    pg.base_url, many, connections=64, seconds=secs, body=NATIVE_BODY)))
            samples.append(lock_waits(sampler.summary(30)))
            if base is not None and base_tokens is not None:
                series_base.append(measured(base.cpu_seconds, lambda: wrk(
                    base.base_url, base_tokens, connections=64, seconds=secs, body=NATIVE_BODY)))
            series["native_one_session_c64"].append(measured(pg.cpu_seconds, lambda: wrk(
                pg.base_url, one, connections=64, seconds=secs, body=NATIVE_BODY)))
            series["vault_c64"].append(measured(pg.cpu_seconds, lambda: wrk(
                pg.base_url, many, connections=64, seconds=secs, body=VAULT_BODY)))
            series["fresh_session"].append(measured(pg.cpu_seconds, lambda fresh=fresh: wrk(  # type: ignore[misc]
                pg.base_url, fresh, connections=4, seconds=secs, body=NATIVE_BODY)))
            series["session_10k"].append(measured(pg.cpu_seconds, lambda: wrk(
                pg.base_url, big, connections=4, seconds=secs, body=NATIVE_BODY)))
            with LinkWindow(libpq_url(main_db)) as window:
                series["rate_300"].append(measured(pg.cpu_seconds, lambda: wrk(
                    pg.base_url, many, connections=32, seconds=max(secs, 3 if quick else 10), body=NATIVE_BODY,
                    rate=args.rate)))
            windows.append(window.summary())
            series["vault_mint"].append(measured(pg.cpu_seconds, lambda: wrk(
                pg.base_url, vault_tok, connections=1, seconds=secs * 2 / 3, body=VAULT_BODY)))
            series["openbao_raw"].append(wrk(bao.addr, raw_tok, connections=1, seconds=secs * 2 / 3,
                                             body=vault_raw_body(["kv-allowed"]), auth="vault", path=raw_path,
                                             idempotency=False))
            for name, rs in series.items():
                log(f"  {name}: {rs[-1]['per_s']}/s p50 {rs[-1]['p50_ms']} ms p99 {rs[-1]['p99_ms']} ms")
        results["series"] = series
        if shutil.which("py-spy") or (Path(sys.executable).parent / "py-spy").exists():
            log("profile: py-spy --gil on the server during one more 64-connection run")
            results["profile"] = gil_profile(pg, lambda: wrk(pg.base_url, many, connections=64, seconds=secs,
                                                             body=NATIVE_BODY), work / "profile.txt", secs)
        if base is not None:
            results["baseline"] = {"rev": args.baseline, "native_c64": series_base}
            base.stop()
        # Every 2xx must be a new lease: a replayed Idempotency-Key would inflate the figures.
        with psycopg.connect(libpq_url(main_db)) as conn:
            minted = conn.execute("SELECT count(*) FROM leases WHERE id NOT LIKE 'cap_big%'").fetchone()[0]  # type: ignore[index]
        answered = sum(r["requests"] - r["non_2xx"] for k, rs in series.items() if not k.startswith("openbao_raw")
                       for r in rs)
        results["leases_minted"], results["responses_2xx"] = minted, answered
        if minted < answered:
            raise RuntimeError(f"{answered} 2xx answers but {minted} leases: requests were replayed, not minted")
        results["lock_waits_one_process_c64"] = samples
        results["link_window"] = windows
        pg.stop()

        log("scaling: --workers 2, and two processes on one database")
        scaling: dict[str, Any] = {}
        w_db = create_pg_database(cleanup)
        w2 = broker("broker-workers2", w_db, workers=2)
        w_tokens = write_tokens(work / "w.tokens", [s["session_token"] for s in w2.create_sessions(256)])
        wrk(w2.base_url, w_tokens, connections=4, seconds=1, body=NATIVE_BODY)
        with PgActivitySampler(w_db) as sampler:
            scaling["workers_2"] = measured(w2.cpu_seconds, lambda: wrk(
                w2.base_url, w_tokens, connections=64, seconds=secs, body=NATIVE_BODY))
        scaling["workers_2"]["lock_waits"] = lock_waits(sampler.summary(30))
        w2.stop()
        two_db = create_pg_database(cleanup)
        p1 = broker("broker-p1", two_db)
        p2 = broker("broker-p2", two_db)
        t1 = write_tokens(work / "p1.tokens", [s["session_token"] for s in p1.create_sessions(128)])
        t2 = write_tokens(work / "p2.tokens", [s["session_token"] for s in p2.create_sessions(128)])
        wrk(p1.base_url, t1, connections=4, seconds=1, body=NATIVE_BODY)
        wrk(p2.base_url, t2, connections=4, seconds=1, body=NATIVE_BODY)
        both: dict[str, dict[str, Any]] = {}
        with PgActivitySampler(two_db) as sampler:
            threads = [threading.Thread(target=lambda n=n, b=b, t=t: both.__setitem__(n, wrk(  # type: ignore[misc]
                b.base_url, t, connections=32, seconds=secs, body=NATIVE_BODY)))
                for n, b, t in (("p1", p1, t1), ("p2", p2, t2))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        scaling["two_processes"] = {"per_s": round(sum(r["per_s"] for r in both.values()), 1), "runs": both,
                                    "lock_waits": lock_waits(sampler.summary(30))}
        results["scaling"] = scaling
        p1.stop()
        p2.stop()

    log("policy decision, 1,000 rules x 1,000 humans")
    from policy_decision import measure as policy_measure

    results["policy"] = policy_measure(decisions=5000 if quick else 20000)
    quick_flag = ["--quick"] if quick else []
    results["teardown"] = sub_benchmark(["bench/teardown.py", "--runs", "1", "--no-backend-floor", *quick_flag], 600)
    results["expiry_lag"] = sub_benchmark(["bench/expiry_lag.py", "--runs", "1", "--intervals", "1.0", *quick_flag],
                                          600)


# --- BENCHMARKS.md --------------------------------------------------------------------------------


def figures(results: dict[str, Any]) -> dict[str, Any]:
    s = results["series"]
    f: dict[str, Any] = {
        "native_per_s": median_of(s["native_c64"], "per_s"),
        "native_c4_per_s": median_of(s["native_c4"], "per_s"),
        "ratio_64_over_4": round(median_of(s["native_c64"], "per_s") / median_of(s["native_c4"], "per_s"), 2),
        "ratio_10k_over_fresh": round(median_of(s["session_10k"], "per_s") / median_of(s["fresh_session"], "per_s"),
                                      2),
        "p99_at_300_ms": median_of(s["rate_300"], "p99_ms"),
        "rate_300_achieved": median_of(s["rate_300"], "per_s"),
        "vault_p50_ms": median_of(s["vault_mint"], "p50_ms"),
        "raw_p50_ms": median_of(s["openbao_raw"], "p50_ms"),
        "cpu_ms_per_request": median_of(s["native_c64"], "server_cpu_ms_per_request"),
        "raw_c64_per_s": median_of(s["openbao_raw_c64"], "per_s"),
        "vault_c64_per_s": median_of(s["vault_c64"], "per_s"),
        "policy_p50_us": results["policy"]["decision_p50_us"],
    }
    f["vault_minus_raw_ms"] = round(f["vault_p50_ms"] - f["raw_p50_ms"], 3)
    f["vault_over_native"] = round(f["vault_c64_per_s"] / f["native_per_s"], 2)
    f["native_over_raw"] = round(f["native_per_s"] / f["raw_c64_per_s"], 2)
    td = results.get("teardown", {}).get("results", {}).get("teardown", {})
    f["teardown_native_s"] = td.get("native", {}).get("median_seconds")
    f["teardown_vault_s"] = td.get("vault", {}).get("median_seconds")
    lag = results.get("expiry_lag", {}).get("results", {})
    f["expiry_lag_p99_s"] = _expiry_p99(lag)
    return f


def _expiry_p99(results: dict[str, Any]) -> float | None:
    """bench/expiry_lag.py's median p99 lag (ended_at - expires_at) at the 1 s sweep, in seconds."""
    one = results.get("expiry_lag", {}).get("interval_1s", {}).get("median_of_runs", {})
    return round(one["lag_p99_ms"] / 1000, 3) if "lag_p99_ms" in one else None


def met(key: str, value: Any) -> str:
    if value is None:
        return "not measured"
    checks: dict[str, Callable[[float], bool]] = {
        "native_per_s": lambda v: v >= 1000, "ratio_64_over_4": lambda v: v >= 1.0,
        "ratio_10k_over_fresh": lambda v: v >= 0.9, "p99_at_300_ms": lambda v: v <= 20,
        "vault_minus_raw_ms": lambda v: v <= 1.5, "policy_p50_us": lambda v: v <= 20,
        "cpu_ms_per_request": lambda v: v <= 1.0, "vault_over_native": lambda v: v >= 0.5,
        "teardown_native_s": lambda v: v <= 0.3, "teardown_vault_s": lambda v: v <= 2.0,
        "expiry_lag_p99_s": lambda v: v <= 1.2}
    return "**yes**" if checks[key](float(value)) else "**no**"


def markdown(report: Report) -> str:
    r = report.results
    f = figures(r)
    s = r["series"]
    rounds = len(s["native_c64"])
    per = lambda key, field: ", ".join(str(x[field]) for x in s[key])  # noqa: E731
    m = report.machine
    lines = [
        BEGIN,
        f"Written by `make bench` (`{report.command}`), started {report.started}, code `{m.get('git_head')}`"
        f" ({m.get('uncommitted_broker_files', '?')} uncommitted files under broker/), {m.get('cpus')} CPUs,"
        f" load average at start {', '.join(f'{x:.2f}' for x in m.get('load_avg_at_start', []))},"
        f" PostgreSQL {m.get('postgres')} (synchronous_commit={m.get('postgres_synchronous_commit')}),"
        f" Python {m.get('python')}. Medians of {rounds} interleaved rounds; load from wrk {wrk_version()}.",
        "",
        "Side by side, 64 connections, each row's server CPU per request from /proc (user + system, all "
        "threads; OpenBao's for its own row):",
        "",
        "| what | requests/s | CPU per request | runs (requests/s) |",
        "|---|---|---|---|",
        *side_by_side(s),
        "",
        f"Native / raw OpenBao token create, same run: **x{f['native_over_raw']}**; vault / native: "
        f"**x{f['vault_over_native']}**.",
        "",
        "| figure | target | measured (median) | runs | met? | command |",
        "|---|---|---|---|---|---|",
        f"| native capabilities/s, PostgreSQL, audit on, one process as shipped, 64 connections over 64 sessions | "
        f"{TARGETS['native_per_s']} | **{f['native_per_s']}/s** | {per('native_c64', 'per_s')} | "
        f"{met('native_per_s', f['native_per_s'])} | `{s['native_c64'][0]['command']}` |",
        f"| broker CPU per native capability (64 connections) | {TARGETS['cpu_ms_per_request']} | "
        f"**{f['cpu_ms_per_request']} ms** | {per('native_c64', 'server_cpu_ms_per_request')} | "
        f"{met('cpu_ms_per_request', f['cpu_ms_per_request'])} | same |",
        f"| vault capabilities/s at 64 connections vs native | {TARGETS['vault_over_native']} | "
        f"**x{f['vault_over_native']}** ({f['vault_c64_per_s']} vs {f['native_per_s']}/s) | "
        f"{per('vault_c64', 'per_s')} | {met('vault_over_native', f['vault_over_native'])} | same, vault resource |",
        f"| throughput at 64 vs 4 connections | {TARGETS['ratio_64_over_4']} | **{f['ratio_64_over_4']}** "
        f"({f['native_per_s']} vs {f['native_c4_per_s']}/s) | 4: {per('native_c4', 'per_s')} | "
        f"{met('ratio_64_over_4', f['ratio_64_over_4'])} | same, `-c4` |",
        f"| a session holding 10,000 live leases vs a fresh one (4 connections, one session) | "
        f"{TARGETS['ratio_10k_over_fresh']} | **{f['ratio_10k_over_fresh']}** "
        f"({median_of(s['session_10k'], 'per_s')} vs {median_of(s['fresh_session'], 'per_s')}/s) | "
        f"10k: {per('session_10k', 'per_s')}; fresh: {per('fresh_session', 'per_s')} | "
        f"{met('ratio_10k_over_fresh', f['ratio_10k_over_fresh'])} | same, `-c4`, one session's token |",
        f"| p99 latency at a fixed 300 requests/s | {TARGETS['p99_at_300_ms']} | **{f['p99_at_300_ms']} ms** "
        f"(achieved {f['rate_300_achieved']}/s; p50 {median_of(s['rate_300'], 'p50_ms')} ms) | "
        f"{per('rate_300', 'p99_ms')} | {met('p99_at_300_ms', f['p99_at_300_ms'])} | "
        f"`{s['rate_300'][0]['command']}` with `BENCH_RATE=300` |",
        f"| vault-token mint p50 minus raw OpenBao token-create p50, 1 connection, same run | "
        f"{TARGETS['vault_minus_raw_ms']} | **{f['vault_minus_raw_ms']} ms** ({f['vault_p50_ms']} - "
        f"{f['raw_p50_ms']} ms) | broker: {per('vault_mint', 'p50_ms')}; OpenBao: {per('openbao_raw', 'p50_ms')} | "
        f"{met('vault_minus_raw_ms', f['vault_minus_raw_ms'])} | `-c1`, vault resource / `POST "
        f"/v1/auth/token/create/<role>` with `BENCH_AUTH=vault` |",
        f"| policy decision p50 at 1,000 rules x 1,000 humans | {TARGETS['policy_p50_us']} | "
        f"**{f['policy_p50_us']} us** (p99 {r['policy']['decision_p99_us']} us; resource match: index "
        f"{r['policy']['resource_match_index_p50_us']} us vs scan {r['policy']['resource_match_scan_p50_us']} us) | "
        f"{r['policy']['decisions']} decisions | {met('policy_p50_us', f['policy_p50_us'])} | "
        f"`python bench/policy_decision.py` |",
        f"| teardown of 1,000 capabilities, native / vault | {TARGETS['teardown_native_s']} / "
        f"{TARGETS['teardown_vault_s']} | **{f['teardown_native_s']} s / {f['teardown_vault_s']} s** | 1 run each | "
        f"{met('teardown_native_s', f['teardown_native_s'])} / {met('teardown_vault_s', f['teardown_vault_s'])} | "
        f"`python bench/teardown.py --runs 1 --no-backend-floor` |",
        f"| expiry lag p99, 100k active, sweep every 1 s | {TARGETS['expiry_lag_p99_s']} | "
        f"**{f['expiry_lag_p99_s']} s** | 1 run | {met('expiry_lag_p99_s', f['expiry_lag_p99_s'])} | "
        f"`python bench/expiry_lag.py --runs 1 --intervals 1.0` |",
        "",
        "| also measured | value |",
        "|---|---|",
        f"| broker CPU per request (64 connections, one process) | {f['cpu_ms_per_request']} ms "
        f"(runs: {per('native_c64', 'server_cpu_ms_per_request')}); machine busy "
        f"{per('native_c64', 'machine_busy')} |",
        "| audit commit -> link window (records seen committed and not yet in the tree, polled every 20 ms, "
        "during the 300/s runs) | " + "; ".join(
            f"p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, max {w['max_ms']} ms over {w['seen_unlinked']} of "
            f"{w['records']} records ({w['still_unlinked']} unlinked at the end)" for w in r["link_window"]) + " |",
        *baseline_rows(r, f),
        "| row-lock waits, one process, 64 connections (avg backends waiting: session row / any other row) | "
        + "; ".join(f"{x['session_row']} / {x['shared_rows']}" for x in r["lock_waits_one_process_c64"]) + " |",
        f"| `serve --workers 2`, 64 connections | {r['scaling']['workers_2']['per_s']}/s; lock waits session row / "
        f"other rows: {r['scaling']['workers_2']['lock_waits']['session_row']} / "
        f"{r['scaling']['workers_2']['lock_waits']['shared_rows']} |",
        f"| two broker processes on one database, 32 connections each | {r['scaling']['two_processes']['per_s']}/s "
        f"in all; lock waits session row / other rows: "
        f"{r['scaling']['two_processes']['lock_waits']['session_row']} / "
        f"{r['scaling']['two_processes']['lock_waits']['shared_rows']} |",
        *profile_rows(r.get("profile")),
        END,
    ]
    return "\n".join(lines)


def side_by_side(s: dict[str, list[dict[str, Any]]]) -> list[str]:
    rows = [("raw OpenBao token create (`POST /v1/auth/token/create/<role>`)", "openbao_raw_c64"),
            ("broker, native capability, 64 sessions", "native_c64"),
            ("broker, native capability, one session", "native_one_session_c64"),
            ("broker, narrowed vault token, 64 sessions", "vault_c64")]
    return [f"| {label} | **{median_of(s[key], 'per_s')}** | {median_of(s[key], 'server_cpu_ms_per_request')} ms | "
            f"{', '.join(str(x['per_s']) for x in s[key])} |" for label, key in rows]


def profile_rows(p: dict[str, Any] | None) -> list[str]:
    if not p or "by_component_pct" not in p:
        return []
    rows = ["", f"Where the server's Python CPU goes (`{p['command']}` during one more 64-connection run, "
            f"{p['samples']} samples of the thread holding the GIL, {p['requests']} requests):", "",
            "| by thread | share | by component (innermost frame) | share |", "|---|---|---|---|"]
    threads, comps = list(p["by_thread_pct"].items()), list(p["by_component_pct"].items())
    for i in range(max(len(threads), len(comps))):
        t = threads[i] if i < len(threads) else ("", "")
        c = comps[i] if i < len(comps) else ("", "")
        rows.append(f"| {t[0]} | {t[1]}{'%' if t[1] != '' else ''} | {c[0]} | {c[1]}{'%' if c[1] != '' else ''} |")
    rows += ["", "| the broker's functions (inclusive: with what they call) | share |", "|---|---|"]
    rows += [f"| `{k}` | {v}% |" for k, v in p["broker_functions_inclusive_pct"].items()]
    return rows


def baseline_rows(r: dict[str, Any], f: dict[str, Any]) -> list[str]:
    b = r.get("baseline")
    if not b:
        return []
    runs = b["native_c64"]
    per_s, cpu = median_of(runs, "per_s"), median_of(runs, "server_cpu_ms_per_request")
    return [f"| before/after (`--baseline {b['rev']}`, same rounds, 64 connections) | {b['rev']}: {per_s}/s, "
            f"{cpu} ms CPU per request; now: {f['native_per_s']}/s, {f['cpu_ms_per_request']} ms "
            f"(throughput x{round(f['native_per_s'] / per_s, 2)}, CPU per request x{round(f['cpu_ms_per_request'] / cpu, 2)}) |"]


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).split()
    return text[1] if len(text) > 1 else "?"


def rewrite(path: Path, block: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(head + block + tail)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: one short round, small seeds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each wrk run")
    ap.add_argument("--rate", type=float, default=300.0, help="the fixed arrival rate (requests/s)")
    ap.add_argument("--baseline", metavar="REV", help="also run the 64-connection series against REV's code "
                    "(a git worktree), interleaved, for a before/after of throughput and CPU per request")
    ap.add_argument("--write", type=Path, help="rewrite this file's `make bench` block (BENCHMARKS.md)")
    ap.add_argument("--json", type=Path, help="write the full JSON here")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (scripts/ensure-bench-tools installs it)", file=sys.stderr)
        return 2
    report = Report("suite", args.quick)
    started = time.monotonic()
    with reported(report):
        run(args, report)
    report.results["wall_seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    if report.errors:
        print("\n".join(report.errors), file=sys.stderr)
        return 1
    block = markdown(report)
    print(block)
    if args.write:
        rewrite(args.write, block)
        log(f"rewrote the make bench block of {args.write}")
    log(f"done in {report.results['wall_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
