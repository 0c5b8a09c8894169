"""Teardown: POST /v1/sessions/{id}/end on a session holding 1,000 live capabilities.

    .venv/bin/python bench/teardown.py            # 1,000 capabilities, 3 runs per provider
    .venv/bin/python bench/teardown.py --quick    # 100 capabilities, 1 run
    .venv/bin/python bench/teardown.py --no-vault # native only

One `broker-cli serve` on a fresh PostgreSQL database. Per run: a new session, N capabilities
minted through the API (not timed), then the end call timed from the client (request sent to
response read). Providers are interleaved run by run (native, vault, native, ...) so both see
the same noise. Afterwards the database is checked (every lease of the session `revoked`) and,
for vault, a sample of the minted tokens is looked up by accessor in OpenBao: each must be gone.

With vault, the floor OpenBao itself sets is timed too (not through the broker): revoking as
many tokens by accessor one call after the other, and with 8 calls in flight.

Vault runs need broker/providers/vault/ and tests/support/openbao.py (an OpenBao dev server
started here, `bao` from the test extra); without them only native runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import psycopg
from _common import (
    REPO,
    BrokerProcess,
    Cleanup,
    Conn,
    Report,
    bench_policy,
    capability_request,
    create_pg_database,
    libpq_url,
    log,
    median,
    reported,
    temp_dir,
)

RESOURCES = {"native": ("jwt://payments-api", "read"), "vault": ("vault://secret/data/allowed", "read")}
TARGETS = {"native": 2.0, "vault": 5.0}


def vault_available() -> str | None:
    """None when the vault pieces exist, else why not."""
    for path in ("broker/providers/vault/", "tests/support/openbao.py"):
        if not (REPO / path).exists():
            return f"{path} does not exist"
    try:
        from tests.support.openbao import bao_binary

        bao_binary()
    except BaseException as exc:  # noqa: BLE001  # pytest.fail raises a BaseException subclass
        return f"no bao binary: {exc}"
    return None


async def mint_many(port: int, token: str, resource: str, access: str, n: int, clients: int = 4) -> dict[str, int]:
    statuses: dict[int, int] = {}
    todo = iter(range(n))

    async def worker() -> None:
        conn = Conn(port)
        try:
            for _ in todo:
                status, body = await asyncio.wait_for(
                    conn.send(capability_request(port, token, resource=resource, access=access, ttl=900)), 60)
                statuses[status] = statuses.get(status, 0) + 1
                if status != 201 and statuses[status] == 1:
                    log(f"mint answered {status}: {body[:300]!r}")
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return statuses


def one_run(broker: BrokerProcess, db_url: str, provider: str, n: int, vault_client: Any | None) -> dict[str, Any]:
    session = broker.create_sessions(1)[0]
    resource, access = RESOURCES[provider]
    t_mint = time.perf_counter()
    statuses = asyncio.run(mint_many(broker.port, session["session_token"], resource, access, n))
    mint_s = time.perf_counter() - t_mint
    if statuses.get(201, 0) != n:
        raise RuntimeError(f"{provider}: minting {n} capabilities answered {statuses}")
    accessors: list[str] = []
    if vault_client is not None:
        with psycopg.connect(libpq_url(db_url)) as conn:
            rows = conn.execute("SELECT handle FROM leases WHERE session_id = %s", (session["session_id"],)).fetchall()
        accessors = [json.loads(h)["accessor"] if isinstance(h, str) else h["accessor"] for (h,) in rows]
    cpu0 = broker.cpu_seconds()
    with httpx.Client(base_url=broker.base_url, timeout=600) as client:
        t0 = time.perf_counter()
        r = client.post(f"/v1/sessions/{session['session_id']}/end", headers=broker.orchestrator_headers(),
                        json={"reason": "benchmark"})
        seconds = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"end answered {r.status_code}: {r.text[:300]}")
    body = r.json()
    with psycopg.connect(libpq_url(db_url)) as conn:
        by_status = dict(conn.execute("SELECT status, count(*) FROM leases WHERE session_id = %s GROUP BY status",
                                      (session["session_id"],)).fetchall())
    result: dict[str, Any] = {"capabilities": n, "seconds": round(seconds, 3), "per_second": round(n / seconds, 1),
                              "response": body, "lease_statuses_after": by_status,
                              "server_cpu_s": round(broker.cpu_seconds() - cpu0, 2), "mint_seconds_untimed": round(mint_s, 1)}
    if vault_client is not None:
        import hvac.exceptions as hx

        sample = random.sample(accessors, min(50, len(accessors)))
        alive = unknown = 0
        for acc in sample:
            try:
                vault_client.auth.token.lookup_accessor(acc)
                alive += 1
            except hx.InvalidRequest:  # revoked: OpenBao answers 400 "invalid accessor"
                pass
            except Exception:  # noqa: BLE001  # any other answer counts the token as unknown, not alive
                unknown += 1
        result["vault_tokens_sampled"] = len(sample)
        result["vault_tokens_still_alive"] = alive + unknown
    ok = body.get("revoked") == n and by_status == {"revoked": n} and not result.get("vault_tokens_still_alive")
    result["all_revoked"] = ok
    return result


def backend_floor(vault_client: Any, role: str, n: int, threads: int = 8) -> dict[str, Any]:
    """What OpenBao alone needs to revoke n tokens by accessor: sequential (as the broker does
    it today, one call after the other) and with `threads` calls in flight. Tokens are created
    through the broker's token role with the root client (not timed)."""
    from concurrent.futures import ThreadPoolExecutor

    import hvac

    def make(count: int) -> list[str]:
        return [vault_client.auth.token.create(role_name=role, policies=["kv-allowed"], ttl="900s",
                                               explicit_max_ttl="900s", renewable=False)["auth"]["accessor"]
                for _ in range(count)]

    out: dict[str, Any] = {"tokens": n}
    accessors = make(n)
    t0 = time.perf_counter()
    for acc in accessors:
        vault_client.auth.token.revoke_accessor(acc)
    out["sequential_seconds"] = round(time.perf_counter() - t0, 3)
    accessors = make(n)
    clients = [hvac.Client(url=vault_client.url, token=vault_client.token, timeout=10) for _ in range(threads)]

    def revoke_slice(i: int) -> None:
        for acc in accessors[i::threads]:
            clients[i].auth.token.revoke_accessor(acc)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(revoke_slice, range(threads)))
    out[f"parallel_{threads}_seconds"] = round(time.perf_counter() - t0, 3)
    for c in clients:
        c.adapter.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100 capabilities, one run")
    ap.add_argument("--capabilities", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-vault", action="store_true")
    ap.add_argument("--no-backend-floor", action="store_true",
                    help="skip timing OpenBao alone (revoke-accessor, sequential and parallel)")
    args = ap.parse_args()
    if args.quick:
        args.capabilities, args.runs = 100, 1
    report = Report("teardown", args.quick)
    report.results["settings"] = {"capabilities": args.capabilities, "runs": args.runs}
    with Cleanup() as cleanup, reported(report):
        work = temp_dir(cleanup, "jitb-bench-teardown-")
        providers = ["native"]
        extra_env: dict[str, str] = {}
        vault_client = None
        why_not = "--no-vault" if args.no_vault else vault_available()
        if why_not is None:
            from tests.support.openbao import OpenBaoServer, configure_vault

            (work / "bao").mkdir()
            bao = OpenBaoServer(work / "bao")
            cleanup.push("openbao server", bao.stop)
            bao.start()
            setup = configure_vault(bao)
            vault_client = bao.client()
            extra_env = {"BROKER_VAULT_ADDR": bao.addr, "BROKER_VAULT_TOKEN": setup.broker_token,
                         "BROKER_VAULT_TOKEN_ROLE": setup.token_role}
            providers.append("vault")
            log(f"OpenBao dev server at {bao.addr}")
        else:
            report.results["vault_skipped"] = why_not
            log(f"vault runs skipped: {why_not}")
        db_url = create_pg_database(cleanup)
        (work / "broker").mkdir()
        broker = BrokerProcess(cleanup, work / "broker", db_url, policy=bench_policy(vault="vault" in providers),
                               extra_env=extra_env)
        broker.migrate()
        broker.start()
        for provider in providers:  # warm-up: pools, prepared statements, the vault login
            one_run(broker, db_url, provider, 20, None)
        runs: dict[str, list[dict[str, Any]]] = {p: [] for p in providers}
        for i in range(args.runs):
            for provider in providers:
                r = one_run(broker, db_url, provider, args.capabilities,
                            vault_client if provider == "vault" else None)
                log(f"run {i + 1}/{args.runs} {provider}: {args.capabilities} revoked in {r['seconds']} s "
                    f"(all revoked: {r['all_revoked']})")
                runs[provider].append(r)
        summary: dict[str, Any] = {}
        for provider, rs in runs.items():
            med = median([r["seconds"] for r in rs])
            summary[provider] = {
                "median_seconds": round(med, 3), "per_run_seconds": [r["seconds"] for r in rs],
                "median_revocations_per_second": round(args.capabilities / med, 1),
                "target_seconds_for_1000": TARGETS[provider],
                "met": args.capabilities == 1000 and med <= TARGETS[provider],
                "all_revoked_every_run": all(r["all_revoked"] for r in rs), "runs": rs}
        if "vault" in summary:
            summary["ratio_vault_over_native"] = round(summary["vault"]["median_seconds"]
                                                       / summary["native"]["median_seconds"], 2)
        report.results["teardown"] = summary
        if vault_client is not None and not args.no_backend_floor:
            log("OpenBao alone: revoking tokens by accessor, sequential and 8 in flight")
            report.results["vault_backend_floor"] = backend_floor(vault_client, "jit-broker", args.capabilities)
    report.emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
