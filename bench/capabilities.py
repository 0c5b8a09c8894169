"""POST /v1/capabilities on the native path: throughput, latency at a fixed arrival rate, profile.

    .venv/bin/python bench/capabilities.py            # full run (a few minutes)
    .venv/bin/python bench/capabilities.py --quick    # smoke run (well under a minute)
    .venv/bin/python bench/capabilities.py --profile  # also profile one run (cProfile, in a child)
    .venv/bin/python bench/capabilities.py --contention-only   # client-count sweep + pg_stat_activity

(a) Max throughput: C concurrent clients (keep-alive connections), a fixed request count, each
    client holding its own session token (a fresh session every --per-session requests, as an
    agent session would hold tens of capabilities, not thousands). Decisions+mints per second
    = 201s / wall time; median of --runs runs. PostgreSQL and SQLite brokers are up side by
    side and their runs interleaved, so the ratio is measured under the same noise.
(b) Latency at a fixed arrival rate (open loop): request i is scheduled at t0 + i/rate whatever
    happened before; latency counts from the scheduled instant, so queueing is not hidden
    (no coordinated omission). p50/p90/p99/max and the achieved completion rate.
(c) --profile: the same broker run in a child process under cProfile (event-loop thread and
    every threadpool worker, merged), CPU time (thread_time) and wall time, plus SQL statements,
    commits and threadpool hops per request. Also the service layer alone (no HTTP), with a
    few deployment knobs priced side by side, and the cost of one threadpool hop.
(d) --contention: throughput and latency for 1, 4, 16 and 64 clients with pg_stat_activity
    sampled every 50 ms, to show where the broker's connections wait.

Servers are `broker-cli serve` as shipped: one process, uvicorn (uvloop + httptools when
installed), sync endpoints on anyio's threadpool, SQLAlchemy pool 10+20. The load generator
shares the 2 cores; its own CPU use is reported beside the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    BrokerProcess,
    Cleanup,
    Conn,
    Report,
    capability_request,
    create_pg_database,
    latency_summary,
    log,
    machine_cpu,
    median,
    percentile,
    reported,  # noqa: E402
    temp_dir,
)

# The checkout this bench runs from: profile entries under it are the broker's own code.
REPO = str(Path(__file__).resolve().parent.parent)

# uvloop's loop.time() has millisecond resolution: time every request with perf_counter.
clock = time.perf_counter

try:  # the client side uses uvloop too when present: less load-generator CPU
    import uvloop

    def arun(coro: Any) -> Any:
        return uvloop.run(coro)
except ImportError:  # pragma: no cover
    arun = asyncio.run


# --- load shapes ---------------------------------------------------------------------------------


async def closed_loop(port: int, tokens: list[list[str]], per_client: list[int], per_session: int,
                      idempotency: bool) -> dict[str, Any]:
    """Each client sends its requests back to back on its own connection."""
    statuses: dict[int, int] = {}
    latencies: list[float] = []

    async def client(w: int) -> None:
        conn = Conn(port)
        try:
            for r in range(per_client[w]):
                raw = capability_request(port, tokens[w][r // per_session], idempotency=idempotency)
                t = clock()
                try:
                    status, _ = await asyncio.wait_for(conn.send(raw), 120)
                except Exception:
                    status = -1
                    conn.close()
                latencies.append(clock() - t)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            conn.close()

    busy0, own0 = machine_cpu(), time.process_time()
    t0 = clock()
    await asyncio.gather(*(client(w) for w in range(len(per_client))))
    elapsed = clock() - t0
    busy1 = machine_cpu()
    ok = statuses.get(201, 0)
    return {
        "requests": sum(per_client), "ok": ok, "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": round(elapsed, 3), "per_second": round(ok / elapsed, 1),
        "latency": latency_summary(latencies),
        "machine_cpu_busy": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3),
        "load_generator_cpu_s": round(time.process_time() - own0, 2),
    }


async def open_loop(port: int, tokens: list[str], rate: float, duration: float, idempotency: bool,
                    max_conns: int = 512) -> dict[str, Any]:
    """Request i is due at t0 + i/rate; latency is measured from when it was due."""
    n = int(rate * duration)
    free: list[Conn] = []
    sem = asyncio.Semaphore(max_conns)
    results: list[tuple[int, float, float, float]] = [(0, 0.0, 0.0, 0.0)] * n
    dispatch_lag: list[float] = [0.0] * n
    opened = 0

    async def one(i: int, due: float, raw: bytes) -> None:
        nonlocal opened
        dispatch_lag[i] = clock() - due  # the generator's own lateness
        async with sem:
            if free:
                conn = free.pop()
            else:
                conn, opened = Conn(port), opened + 1
            sent = clock()
            try:
                status, _ = await asyncio.wait_for(conn.send(raw), 120)
                free.append(conn)
            except Exception:
                status = -1
                conn.close()
            done = clock()
        results[i] = (status, done - due, sent - due, done)

    busy0, own0 = machine_cpu(), time.process_time()
    t0 = clock() + 0.1
    tasks = []
    for i in range(n):
        raw = capability_request(port, tokens[i % len(tokens)], idempotency=idempotency)
        due = t0 + i / rate
        delay = due - clock()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due, raw)))
    await asyncio.gather(*tasks)
    busy1 = machine_cpu()
    for c in free:
        c.close()
    statuses: dict[int, int] = {}
    for s, *_ in results:
        statuses[s] = statuses.get(s, 0) + 1
    ok = [r for r in results if r[0] == 201]
    last = max(r[3] for r in results)
    lag = sorted(r[2] for r in results)
    return {
        "offered_per_second": rate, "duration_s": duration, "requests": n,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "achieved_per_second": round(len(ok) / (last - t0), 1),
        "latency_from_schedule": latency_summary([r[1] for r in ok]),
        "generator_dispatch_lag_p99_ms": round(percentile(sorted(dispatch_lag), 99) * 1000, 2),
        # sent - due: dispatch lag plus waiting for one of max_conns connections (server saturated)
        "send_lag_incl_connection_wait_p99_ms": round(percentile(lag, 99) * 1000, 2),
        "max_connections": max_conns,
        "connections_opened": opened,
        "machine_cpu_busy": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3),
        "load_generator_cpu_s": round(time.process_time() - own0, 2),
    }


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def throughput_run(broker: BrokerProcess, total: int, clients: int, per_session: int,
                   idempotency: bool) -> dict[str, Any]:
    per_client = split(total, clients)
    sessions = broker.create_sessions(sum(math.ceil(n / per_session) for n in per_client))
    it = iter(s["session_token"] for s in sessions)
    tokens = [[next(it) for _ in range(math.ceil(n / per_session))] for n in per_client]
    cpu0 = broker.cpu_seconds()
    result = arun(closed_loop(broker.port, tokens, per_client, per_session, idempotency))
    result["server_cpu_s"] = round(broker.cpu_seconds() - cpu0, 2)
    result["server_cpu_ms_per_request"] = round(1000 * result["server_cpu_s"] / max(1, result["requests"]), 3)
    return result


def latency_run(broker: BrokerProcess, rate: float, duration: float, per_session: int,
                idempotency: bool) -> dict[str, Any]:
    n = int(rate * duration)
    sessions = broker.create_sessions(math.ceil(n / per_session))
    cpu0 = broker.cpu_seconds()
    result = arun(open_loop(broker.port, [s["session_token"] for s in sessions], rate, duration, idempotency))
    result["server_cpu_s"] = round(broker.cpu_seconds() - cpu0, 2)
    return result


# --- profiling (child process) ----------------------------------------------------------------------


def serve_profiled(out: Path, timer_name: str, port: int) -> None:
    """What `broker-cli serve` does, with cProfile on the loop thread and each threadpool worker.

    SIGUSR1 starts recording, SIGUSR2 stops and writes `out` (pstats) and `out.json` (counts).
    """
    import cProfile
    import logging
    import pstats
    import threading
    from collections import Counter

    import anyio.to_thread
    import uvicorn
    from sqlalchemy import event

    from broker.app import create_app
    from broker.config import Settings
    from broker.runtime import Broker

    timer = time.thread_time if timer_name == "cpu" else time.perf_counter
    settings = Settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    broker = Broker.build(settings)
    active = threading.Event()
    counts: Counter[str] = Counter()
    profilers: list[cProfile.Profile] = []
    local = threading.local()
    main_profiler = cProfile.Profile(timer)

    @event.listens_for(broker.engine, "before_cursor_execute")
    def _count_sql(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if active.is_set():
            words = statement.split(None, 3)
            kind = words[0].upper()
            table = ""
            if kind in ("SELECT", "DELETE"):
                low = statement.lower()
                match = re.search(r"\sfrom\s+(\w+)", low)
                table = match.group(1) if match else ""
                if "for update" in low:
                    kind += " FOR UPDATE"
            elif kind in ("INSERT",):
                table = words[2].lower() if len(words) > 2 else ""
            elif kind == "UPDATE":
                table = words[1].lower()
            counts[f"sql {kind} {table}".strip()] += 1
            counts["sql statements"] += 1

    @event.listens_for(broker.engine, "commit")
    def _count_commit(conn: Any) -> None:
        if active.is_set():
            counts["commits"] += 1

    @event.listens_for(broker.engine, "begin")
    def _count_begin(conn: Any) -> None:
        if active.is_set():
            counts["transactions begun"] += 1

    original = anyio.to_thread.run_sync

    async def run_sync(func: Any, *args: Any, **kwargs: Any) -> Any:
        if not active.is_set():
            return await original(func, *args, **kwargs)
        counts["threadpool hops"] += 1
        counts[f"threadpool hop: {getattr(func, 'func', func).__qualname__}"] += 1

        def profiled(*a: Any) -> Any:
            p = getattr(local, "profiler", None)
            if p is None:
                p = local.profiler = cProfile.Profile(timer)
                profilers.append(p)
            p.enable()
            try:
                return func(*a)
            finally:
                p.disable()

        return await original(profiled, *args, **kwargs)

    anyio.to_thread.run_sync = run_sync  # starlette/fastapi look it up on the module at call time

    def start(*_: Any) -> None:
        active.set()
        main_profiler.enable()

    def stop(*_: Any) -> None:
        main_profiler.disable()
        active.clear()
        time.sleep(0.2)  # let any worker still inside a call leave it
        stats = pstats.Stats(main_profiler)
        for p in profilers:
            stats.add(p)
        stats.dump_stats(str(out))
        info = {"counts": dict(counts), "worker_threads_profiled": len(profilers)}
        out.with_suffix(".json").write_text(json.dumps(info))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    config = uvicorn.Config(create_app(broker=broker), host="127.0.0.1", port=port,
                            log_level=settings.log_level, access_log=False)
    config.load()
    (out.parent / f"{out.name}.server.json").write_text(json.dumps({
        "loop": config.loop, "http": config.http,
        "http_protocol_class": getattr(config.http_protocol_class, "__name__", str(config.http_protocol_class)),
        "anyio_default_thread_limit": 40}))
    uvicorn.Server(config).run()


INTERESTING = {
    # label: (file fragment, function name)
    "whole request in the threadpool (endpoint)": ("fastapi/routing.py", "_run_sync_endpoint"),
    "request_capability": ("broker/leases/service.py", "request_capability"),
    "idempotency.begin (own transaction)": ("broker/leases/idempotency.py", "begin"),
    "idempotency.finish (seal the replay)": ("broker/leases/idempotency.py", "finish"),
    "_decide_and_mint: transaction 1 (lock session, decide, insert lease)": ("broker/leases/service.py", "_decide_and_mint"),
    "_mint: provider.mint + transaction 2 (activate, audit, idempotency)": ("broker/leases/service.py", "_mint"),
    "session_facts (bounded count + escalation-tier probes)": ("broker/leases/facts.py", "session_facts"),
    "lock_session (SELECT ... FOR UPDATE)": ("broker/leases/service.py", "lock_session"),
    "policy evaluate_with_shadow": ("broker/policy/evaluate.py", "evaluate_with_shadow"),
    "audit append (chain tip lock, canonical JSON, hash)": ("broker/audit/service.py", "append"),
    "canonical_json": ("broker/audit/chain.py", "canonical_json"),
    "native mint (build claims + EdDSA sign)": ("broker/providers/native.py", "mint"),
    "KeyRing.sign": ("broker/identity/keys.py", "sign"),
    "session token verify (get_caller)": ("broker/api/deps.py", "get_caller"),
    "Sealer.seal (AES-GCM)": ("broker/crypto.py", "seal"),
    "SQLAlchemy Session.commit": ("sqlalchemy/orm/session.py", "commit"),
    "SQLAlchemy Session.flush": ("sqlalchemy/orm/session.py", "flush"),
    "SQLAlchemy Session.execute": ("sqlalchemy/orm/session.py", "execute"),
    "SQLAlchemy Session.get": ("sqlalchemy/orm/session.py", "get"),
    "psycopg Cursor.execute": ("psycopg/cursor.py", "execute"),
    "psycopg Connection.commit": ("psycopg/connection.py", "commit"),
    "pool checkout (_ConnectionFairy._checkout)": ("sqlalchemy/pool/base.py", "_checkout"),
    "pool pre-ping (_do_ping / dialect.do_ping)": ("sqlalchemy/engine/default.py", "do_ping"),
    "logging Logger.info": ("logging/__init__.py", "info"),
    "logging Logger.handle": ("logging/__init__.py", "handle"),
    "fastapi solve_dependencies": ("fastapi/dependencies/utils.py", "solve_dependencies"),
    "fastapi serialize_response": ("fastapi/routing.py", "serialize_response"),
    "starlette JSONResponse.render": ("starlette/responses.py", "render"),
    "json.dumps": ("json/__init__.py", "dumps"),
    "uvicorn httptools on_message_complete / data_received": ("uvicorn/protocols/http/httptools_impl.py", "data_received"),
    "pydantic validate_python": ("pydantic/main.py", "model_validate"),
    "uuid4": ("uuid.py", "uuid4"),
}


def summarise_profile(path: Path, requests: int, top: int = 25) -> dict[str, Any]:
    import pstats

    stats = pstats.Stats(str(path))
    raw = stats.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())

    def short(key: tuple[str, int, str]) -> str:
        file, line, name = key
        for marker in ("site-packages/", f"{REPO}/", "lib/python3.11/"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
        return f"{file}:{line}({name})" if line else name

    by_tottime = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    rows = [{"function": short(k), "calls_per_request": round(v[1] / requests, 2),
             "self_us_per_request": round(1e6 * v[2] / requests, 1), "self_share": round(v[2] / total, 3),
             "cumulative_us_per_request": round(1e6 * v[3] / requests, 1)} for k, v in by_tottime]
    interesting: dict[str, Any] = {}
    for label, (frag, name) in INTERESTING.items():
        matches = [(k, v) for k, v in raw.items() if k[2] == name and frag in k[0]]
        if not matches:
            continue
        calls = sum(v[1] for _, v in matches)
        cum = max(v[3] for _, v in matches)  # recursion-safe enough: the outermost entry
        interesting[label] = {"calls_per_request": round(calls / requests, 2),
                              "cumulative_us_per_request": round(1e6 * cum / requests, 1)}
    groups: dict[str, float] = {}
    for key, v in raw.items():
        groups[component(key)] = groups.get(component(key), 0.0) + v[2]
    by_component = {k: {"self_us_per_request": round(1e6 * t / requests, 1), "share": round(t / total, 3)}
                    for k, t in sorted(groups.items(), key=lambda kv: -kv[1])[:18]}
    return {"profiled_seconds_total": round(total, 2), "profiled_us_per_request": round(1e6 * total / requests, 1),
            "self_time_by_component": by_component, "top_self_time": rows, "selected_cumulative": interesting}


def component(key: tuple[str, int, str]) -> str:
    """Which library (or part of the broker) a profiled function belongs to."""
    file, _, name = key
    if file == "~":  # C functions: name them by their owner where it shows
        for lib in ("cryptography", "psycopg", "pydantic_core", "select", "_io", "posix", "_hashlib", "_json", "uvloop"):
            if lib in name:
                return f"C: {lib}"
        return "C: builtins"
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if f"{REPO}/broker/" in file:
        parts = file.split(f"{REPO}/broker/", 1)[1].split("/")
        return "broker/" + (parts[0] if len(parts) > 1 else parts[0].removesuffix(".py"))
    if "lib/python3" in file:
        parts = file.split("lib/python3", 1)[1].split("/")  # ".11", "logging", "__init__.py"
        return "stdlib: " + parts[1].removesuffix(".py") if len(parts) > 1 else file
    return file


def profile_run(cleanup: Cleanup, work: Path, timer_name: str, requests: int, clients: int,
                per_session: int) -> dict[str, Any]:
    db = create_pg_database(cleanup, "jitb_bench_prof")
    d = work / f"profile-{timer_name}"
    d.mkdir()
    out = d / "profile.pstats"
    port_holder = BrokerProcess(cleanup, d, db, name=f"profiled-{timer_name}")
    port_holder.command = [sys.executable, str(Path(__file__).resolve()), "--_serve-profiled", str(out),
                           "--_timer", timer_name, "--_port", str(port_holder.port)]
    port_holder.migrate()
    port_holder.start()
    throughput_run(port_holder, 200, clients, per_session, True)  # warm-up, not recorded
    per_client = split(requests, clients)
    sessions = port_holder.create_sessions(sum(math.ceil(n / per_session) for n in per_client))
    it = iter(s["session_token"] for s in sessions)
    tokens = [[next(it) for _ in range(math.ceil(n / per_session))] for n in per_client]
    assert port_holder.proc is not None
    os.kill(port_holder.proc.pid, signal.SIGUSR1)
    time.sleep(0.2)
    result = arun(closed_loop(port_holder.port, tokens, per_client, per_session, True))
    os.kill(port_holder.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 60
    while not out.with_suffix(".json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    port_holder.stop()
    info = json.loads(out.with_suffix(".json").read_text())
    n = result["requests"]
    counts = {k: round(v / n, 2) for k, v in sorted(info["counts"].items(), key=lambda kv: -kv[1])}
    summary = summarise_profile(out, n)
    server = json.loads((d / f"{out.name}.server.json").read_text())
    return {"timer": "CPU (thread_time)" if timer_name == "cpu" else "wall (perf_counter)",
            "requests": n, "clients": clients, "throughput_under_profiler": result["per_second"],
            "server": server, "per_request_counts": counts, **summary}


def service_layer(cleanup: Cleanup, work: Path, n: int) -> dict[str, Any]:
    """CPU per capability with no HTTP at all: `request_capability` called in a loop, one thread.

    Splits the server's CPU per request into service layer (this) and HTTP/FastAPI layer (the
    rest), and prices a few deployment knobs without touching broker code: Idempotency-Key or
    not, SQLAlchemy pool_pre_ping on (as shipped) or off, broker log level INFO (default) or
    WARNING. Variants run interleaved, `rounds` times each; medians are reported.
    """
    import logging
    import uuid

    from _common import bench_policy
    from sqlalchemy import create_engine

    from broker.identity.callers import Caller
    from broker.leases.service import request_capability
    from broker.leases.vocabulary import CapabilityAsk
    from broker.runtime import Broker
    from broker.sessions import service as sessions
    from broker.sessions.service import SessionAsk
    from tests.support.brokers import BrokerSecrets, build_broker

    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    handler = logging.StreamHandler(devnull)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    url = create_pg_database(cleanup, "jitb_bench_svc")
    d = work / "service"
    d.mkdir()
    shipped = build_broker(d, url, BrokerSecrets(), policy=bench_policy())
    no_ping = Broker.build(shipped.settings, engine=create_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=False))
    orch = Caller(kind="orchestrator", name="orch")
    ask = CapabilityAsk(resource="jwt://payments-api", access="read", purpose="benchmark", ttl_seconds=900)

    def loop(broker: Broker, count: int, idem: bool, level: int) -> tuple[float, float]:
        logging.getLogger("broker").setLevel(level)
        caller = None
        t0, c0 = time.perf_counter(), time.thread_time()
        for i in range(count):
            if i % 50 == 0:  # session creation is outside the timed part
                c1, t1 = time.thread_time(), time.perf_counter()
                s, _ = sessions.create(broker, orch, SessionAsk(
                    human="alice@example.com", agent="claude-code", task_id="svc",
                    scope=[{"resource": "jwt://**", "access": ["*"]}], ttl_seconds=3600))
                caller = Caller(kind="agent", name="claude-code", session_id=s.id)
                c0 += time.thread_time() - c1
                t0 += time.perf_counter() - t1
            assert caller is not None
            status, _ = request_capability(broker, caller, ask, str(uuid.uuid4()) if idem else None)
            assert status == 201
        return (1000 * (time.thread_time() - c0) / count, 1000 * (time.perf_counter() - t0) / count)

    variants = {
        "as shipped (Idempotency-Key, pre-ping on, log INFO)": (shipped, True, logging.INFO),
        "no Idempotency-Key": (shipped, False, logging.INFO),
        "pool_pre_ping off": (no_ping, True, logging.INFO),
        "broker log level WARNING": (shipped, True, logging.WARNING),
        "pre-ping off + WARNING + no key": (no_ping, False, logging.WARNING),
    }
    try:
        loop(shipped, 100, True, logging.INFO)
        loop(no_ping, 100, True, logging.INFO)
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(3):
            for name, (broker, idem, level) in variants.items():
                got[name].append(loop(broker, n, idem, level))
    finally:
        logging.getLogger("broker").setLevel(logging.NOTSET)
        root.removeHandler(handler)
        root.setLevel(old_level)
        devnull.close()
        shipped.engine.dispose()
        no_ping.engine.dispose()
    return {name: {"cpu_ms_per_request": round(median([c for c, _ in v]), 3),
                   "wall_ms_per_request": round(median([w for _, w in v]), 3)} for name, v in got.items()}


def threadpool_hop_cost(n: int = 3000) -> dict[str, float]:
    """What one `await anyio.to_thread.run_sync(f)` of a no-op costs (FastAPI does one per sync
    dependency and one for the endpoint: 4 per POST /v1/capabilities)."""
    import anyio.to_thread

    def noop() -> None:
        return None

    async def go() -> tuple[float, float]:
        for _ in range(200):
            await anyio.to_thread.run_sync(noop)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            await anyio.to_thread.run_sync(noop)
        return (1e6 * (time.perf_counter() - t0) / n, 1e6 * (time.process_time() - c0) / n)

    wall, cpu = arun(go())
    return {"wall_us_per_hop": round(wall, 1), "process_cpu_us_per_hop": round(cpu, 1)}


def contention_sweep(cleanup: Cleanup, work: Path, clients_list: list[int], requests: int,
                     per_session: int) -> dict[str, Any]:
    """Throughput and latency against the number of concurrent clients, on a fresh PostgreSQL
    broker, with pg_stat_activity sampled every 50 ms: where the broker's connections wait."""
    from _common import PgActivitySampler

    url = create_pg_database(cleanup, "jitb_bench_sweep")
    d = work / "sweep"
    d.mkdir()
    broker = BrokerProcess(cleanup, d, url, name="broker-sweep")
    broker.migrate()
    broker.start()
    throughput_run(broker, 200, 8, per_session, True)
    out: dict[str, Any] = {}
    try:
        for clients in clients_list:
            with PgActivitySampler(url) as sampler:
                r = throughput_run(broker, requests, clients, per_session, True)
            log(f"contention sweep, {clients} clients: {r['per_second']}/s, p50 {r['latency'].get('p50_ms')} ms")
            out[f"clients_{clients}"] = {"per_second": r["per_second"], "latency": r["latency"],
                                         "server_cpu_ms_per_request": r["server_cpu_ms_per_request"],
                                         "pg_stat_activity": sampler.summary(8)}
    finally:
        broker.stop()
    return out


# --- main ------------------------------------------------------------------------------------------


def measure(cleanup: Cleanup, work: Path, args: argparse.Namespace, report: Report) -> None:
    servers: dict[str, BrokerProcess] = {}
    pg_url = create_pg_database(cleanup)
    (work / "pg").mkdir()
    servers["postgres"] = BrokerProcess(cleanup, work / "pg", pg_url, name="broker-pg")
    if not args.no_sqlite:
        (work / "sqlite").mkdir()
        servers["sqlite"] = BrokerProcess(cleanup, work / "sqlite", f"sqlite:///{work}/sqlite/broker.db",
                                          name="broker-sqlite")
    if args.workers > 1:
        (work / "pgw").mkdir()
        servers["postgres_workers"] = BrokerProcess(cleanup, work / "pgw", create_pg_database(cleanup),
                                                    name="broker-pg-workers", workers=args.workers)
    for name, server in servers.items():
        server.migrate()
        server.start()
        log(f"{name} broker up at {server.base_url}; warming up")
        throughput_run(server, 300 if not args.quick else 100, args.clients, args.per_session, True)

    series = [("postgres", "postgres", True)]
    if not args.no_idempotency_variant:
        series.append(("postgres_no_idempotency_key", "postgres", False))
    if "sqlite" in servers:
        series.append(("sqlite", "sqlite", True))
    if "postgres_workers" in servers:
        series.append((f"postgres_{args.workers}_workers", "postgres_workers", True))
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, *_ in series}
    for i in range(args.runs):
        for label, server_name, idem in series:  # interleaved: same noise for each series
            r = throughput_run(servers[server_name], args.requests, args.clients, args.per_session, idem)
            log(f"throughput run {i + 1}/{args.runs} {label}: {r['per_second']}/s "
                f"(p50 {r['latency'].get('p50_ms')} ms, statuses {r['statuses']})")
            runs[label].append(r)
    throughput = {}
    for label, rs in runs.items():
        throughput[label] = {"median_per_second": median([r["per_second"] for r in rs]),
                             "per_run": [r["per_second"] for r in rs],
                             "median_server_cpu_ms_per_request": median([r["server_cpu_ms_per_request"] for r in rs]),
                             "runs": rs}
    pg_med = throughput["postgres"]["median_per_second"]
    if "sqlite" in throughput:
        throughput["ratio_postgres_over_sqlite"] = round(pg_med / throughput["sqlite"]["median_per_second"], 3)
    if "postgres_no_idempotency_key" in throughput:
        throughput["ratio_with_key_over_without"] = round(
            pg_med / throughput["postgres_no_idempotency_key"]["median_per_second"], 3)
    report.results["throughput"] = throughput

    log(f"open loop: {args.rate}/s for {args.duration}s on postgres")
    lat = latency_run(servers["postgres"], args.rate, args.duration, args.per_session, True)
    log(f"open loop: achieved {lat['achieved_per_second']}/s, {lat['latency_from_schedule']}")
    report.results["latency_open_loop_postgres"] = lat
    for rate in args.extra_rates:
        log(f"open loop (reference, below capacity): {rate}/s for {args.low_rate_duration}s on postgres")
        ref = latency_run(servers["postgres"], rate, args.low_rate_duration, args.per_session, True)
        log(f"open loop: achieved {ref['achieved_per_second']}/s, {ref['latency_from_schedule']}")
        report.results[f"latency_open_loop_postgres_{rate:g}_per_second"] = ref
    report.results["targets"] = {
        "throughput_postgres_per_second": {"target": ">= 1000", "measured_median": pg_med,
                                           "met": pg_med >= 1000},
        "p99_ms_at_300_per_second": {"target": "<= 20", "measured": lat["latency_from_schedule"].get("p99_ms"),
                                     "met": (lat["latency_from_schedule"].get("p99_ms") or 1e9) <= 20
                                     and lat["statuses"].get("201") == lat["requests"]},
    }
    for server in servers.values():
        server.stop()



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: small counts, one run")
    ap.add_argument("--requests", type=int, default=5000, help="requests per throughput run")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (connections) for throughput")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--per-session", type=int, default=50, help="capabilities per session before a fresh one")
    ap.add_argument("--rate", type=float, default=300.0, help="open-loop arrival rate (requests/s)")
    ap.add_argument("--duration", type=float, default=20.0, help="open-loop duration (s)")
    ap.add_argument("--extra-rates", type=float, nargs="*", default=[50.0],
                    help="further open-loop rates, below capacity, for reference latencies")
    ap.add_argument("--low-rate-duration", type=float, default=20.0)
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--workers", type=int, default=2,
                    help="also measure `broker-cli serve --workers N` on PostgreSQL (1 to skip)")
    ap.add_argument("--no-idempotency-variant", action="store_true",
                    help="skip the PostgreSQL series without Idempotency-Key")
    ap.add_argument("--profile", action="store_true", help="also profile one PostgreSQL run (CPU and wall)")
    ap.add_argument("--profile-requests", type=int, default=3000)
    ap.add_argument("--profile-only", action="store_true", help="skip (a) and (b); implies --profile")
    ap.add_argument("--contention", action="store_true",
                    help="also sweep the client count with pg_stat_activity sampled (where connections wait)")
    ap.add_argument("--contention-only", action="store_true", help="skip (a) and (b); implies --contention")
    ap.add_argument("--sweep-clients", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--sweep-requests", type=int, default=1500)
    ap.add_argument("--service-requests", type=int, default=500, help="per variant and round, service-layer test")
    ap.add_argument("--_serve-profiled", dest="serve_profiled", help=argparse.SUPPRESS)
    ap.add_argument("--_timer", dest="timer", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--_port", dest="port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve_profiled:
        serve_profiled(Path(args.serve_profiled), args.timer, args.port)
        return 0

    if args.quick:
        args.requests, args.runs, args.duration, args.profile_requests = 600, 1, 3.0, 400
        args.service_requests, args.low_rate_duration, args.sweep_requests = 100, 3.0, 200
    report = Report("capabilities", args.quick)
    report.results["settings"] = {k: getattr(args, k) for k in
                                  ("requests", "clients", "runs", "per_session", "rate", "duration",
                                                            "extra_rates", "low_rate_duration")}
    with Cleanup() as cleanup:
        with reported(report):
            work = temp_dir(cleanup, "jitb-bench-caps-")
            if args.profile_only or args.contention_only:
                args.profile = args.profile or args.profile_only
                args.contention = args.contention or args.contention_only
            else:
                measure(cleanup, work, args, report)
            if args.contention:
                log(f"contention sweep: {args.sweep_clients} clients")
                report.results["contention_sweep_postgres"] = contention_sweep(
                    cleanup, work, args.sweep_clients, args.sweep_requests, args.per_session)
            if args.profile:
                log("service layer without HTTP, and what a threadpool hop costs")
                report.results["service_layer_no_http"] = service_layer(cleanup, work, args.service_requests)
                report.results["threadpool_hop"] = threadpool_hop_cost()
                report.results["profile"] = {}
                for timer_name in ("cpu", "wall"):
                    log(f"profiling one run ({timer_name} timer)")
                    report.results["profile"][timer_name] = profile_run(
                        cleanup, work, timer_name, args.profile_requests, args.clients, args.per_session)
    report.emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
