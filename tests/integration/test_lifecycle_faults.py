"""Lifecycle under faults, with real processes and real backends (OpenBao, PostgreSQL).

1. kill -9 with live capabilities (native and Vault) and half-finished mints; restart after
   expiry: every lease is finished, and OpenBao confirms the tokens are gone.
2. OpenBao down during a teardown: leases go `revoke_pending` (API, metric, audit), nothing is
   reported revoked; OpenBao back: the sweeper's retries revoke them all.
3. Three brokers on one PostgreSQL, 300 short-lived capabilities, one broker SIGKILLed mid-run:
   each lease finished exactly once, the audit chain intact; and one webhook delivered to all
   three at once ends its session once.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions as hx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import select

from broker.audit.service import query
from broker.audit.verification import verify
from broker.config import Settings
from broker.db import make_engine, transaction, utcnow
from broker.identity.webhooks import sign
from broker.migrate import upgrade
from broker.models import Lease, SessionRow
from broker.providers.base import Grant
from broker.providers.vault import VaultProvider
from broker.providers.vault.client import OpenBaoClient
from broker.runtime import Broker
from tests.support.brokers import STANDARD_TIERS, BrokerSecrets, LiveServer
from tests.support.openbao import OpenBaoServer, VaultSetup, configure_vault
from tests.support.processes import BrokerProcess, migrate

pytestmark = pytest.mark.slow

POLICY = STANDARD_TIERS + """\
resources:
  - match: "jwt://svc/*"
    provider: native
    access:
      read: {tier: read}
  - match: "vault://secret/data/allowed"
    provider: vault
    access:
      read: {tier: read, policies: [kv-allowed]}
humans:
  alice@example.com:
    grants:
      - {resource: "jwt://svc/*", access: [read]}
      - {resource: "vault://secret/data/allowed", access: [read]}
agents:
  claude-code: {max_tier: review}
budgets: {max_issued_per_session: 1000, max_active_per_session: 1000}
"""
VAULT = "vault://secret/data/allowed"
FINAL = {"revoked", "expired", "failed"}
TERMINAL_RECORDS = ("capability.revoked", "capability.expired")
# Short everything: the sweeper looks five times a second, a dead replica's claims lapse in 5 s.
FAST = {"BROKER_SWEEP_INTERVAL_SECONDS": "0.2", "BROKER_CLAIM_SECONDS": "5", "BROKER_LOG_LEVEL": "warning"}


def vault_env(setup: VaultSetup) -> dict[str, str]:
    return {"BROKER_VAULT_ADDR": setup.server.addr, "BROKER_VAULT_TOKEN": setup.broker_token,
            "BROKER_VAULT_TOKEN_ROLE": setup.token_role, "BROKER_PROVIDER_TIMEOUT_SECONDS": "3"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_session(client: httpx.Client, s: BrokerSecrets, task_id: str = "task") -> dict[str, Any]:
    r = client.post("/v1/sessions", headers=bearer(s.orchestrator_key), json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": task_id, "ttl_seconds": 3600,
        "scope": [{"resource": "jwt://svc/*", "access": ["read"]}, {"resource": VAULT, "access": ["read"]}]})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def request_cap(client: httpx.Client, session: dict[str, Any], resource: str, ttl: int) -> dict[str, Any]:
    r = client.post("/v1/capabilities", headers=bearer(session["session_token"]),
                    json={"resource": resource, "access": "read", "ttl_seconds": ttl, "purpose": "fault test"})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def all_leases(engine: Engine) -> dict[str, Lease]:
    with transaction(engine) as db:
        return {lease.id: lease for lease in db.exec(select(Lease)).all()}


def terminal_records(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """capability id -> its capability.revoked / capability.expired records."""
    out: dict[str, list[dict[str, Any]]] = {}
    with transaction(engine) as db:
        for row in query(db, types=list(TERMINAL_RECORDS), limit=1_000_000):
            record = json.loads(row.record)
            out.setdefault(record["jit_grant"]["capability_id"], []).append(record)
    return out


def records_of(engine: Engine, capability_id: str) -> list[dict[str, Any]]:
    with transaction(engine) as db:
        rows = query(db, limit=1_000_000)
    found = [json.loads(r.record) for r in rows]
    return [r for r in found if (r.get("jit_grant") or {}).get("capability_id") == capability_id]


def accessor_alive(root: hvac.Client, accessor: str) -> bool:
    try:
        root.auth.token.lookup_accessor(accessor)
        return True
    except (hx.InvalidRequest, hx.Forbidden):
        return False  # "invalid accessor": revoked or expired


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def plant_minting_lease(engine: Engine, session_id: str, provider: str, resource: str, *, age_seconds: int = 120) -> str:
    """A lease as a broker leaves it when it dies between reserving the lease and activating it."""
    now = utcnow()
    lease = Lease(id="cap_" + secrets.token_hex(16), session_id=session_id, resource=resource, access="read",
                  tier="read", provider=provider, status="minting", ttl_seconds=600, purpose="crashed mid-mint",
                  created_at=now - timedelta(seconds=age_seconds),
                  expires_at=now - timedelta(seconds=age_seconds) + timedelta(seconds=600))
    with transaction(engine) as db:
        db.add(lease)
    return lease.id


# --- 1. kill -9, restart after expiry ------------------------------------------------------------


def test_kill_9_then_restart_after_expiry_finishes_every_lease(
    database_url: str, tmp_path: Path, vault_setup: VaultSetup
) -> None:
    s = BrokerSecrets()
    env = s.env(tmp_path, database_url, POLICY, **vault_env(vault_setup), **FAST)
    migrate(env)
    engine = make_engine(database_url)
    root = vault_setup.server.client()
    broker = BrokerProcess(env, tmp_path).start()
    try:
        with broker.client() as client:
            session = new_session(client, s)
            # ttl 8: long enough that the 50 mints are all still alive when checked below on a loaded machine
            caps = [request_cap(client, session, "jwt://svc/ledger" if i % 2 else VAULT, ttl=8) for i in range(50)]
            torn = new_session(client, s, task_id="torn-down")
            long_lived = [request_cap(client, torn, VAULT, ttl=600), request_cap(client, torn, "jwt://svc/x", ttl=600)]
        vault_caps = [c for c in caps if c["provider"] == "vault"]
        assert len(vault_caps) == 25 and all(accessor_alive(root, c["credential"]["accessor"]) for c in vault_caps)

        broker.kill()  # SIGKILL: no shutdown hook runs
        # As if it died right after committing a teardown and before revoking anything.
        with transaction(engine) as db:
            row = db.get(SessionRow, torn["session_id"])
            assert row is not None
            row.status, row.end_reason, row.ended_at = "ended", "completed", utcnow() - timedelta(seconds=60)
            db.add(row)

        # What the dead broker also left behind: mints cut short after and before the backend call.
        sid = session["session_id"]
        orphan_vault = plant_minting_lease(engine, sid, "vault", VAULT)
        provider = VaultProvider(OpenBaoClient(addr=vault_setup.server.addr, token=vault_setup.broker_token),
                                 token_role=vault_setup.token_role)
        minted = provider.mint(Grant(capability_id=orphan_vault, session_id=sid, task_id="task",
                                     human="alice@example.com", agent="claude-code", resource=VAULT, access="read",
                                     tier="read", ttl_seconds=600, options={"policies": ["kv-allowed"]}))
        orphan_accessor = minted.handle["accessor"]
        never_minted = plant_minting_lease(engine, sid, "vault", VAULT)
        native_orphan = plant_minting_lease(engine, sid, "native", "jwt://svc/ledger")

        latest = max(all_leases(engine)[c["capability_id"]].expires_at for c in caps)
        time.sleep(max(0.0, (latest - utcnow()).total_seconds()) + 0.5)
        leases = all_leases(engine)
        assert sum(lease.status == "active" for lease in leases.values()) == 52  # nobody revoked while it was down
        assert accessor_alive(root, orphan_accessor)

        broker.start()  # lifespan: reconcile first, then the sweeper, then requests
        leases = all_leases(engine)
        assert {lid: lease.status for lid, lease in leases.items() if lease.status not in FINAL} == {}
        for cap in caps:
            assert leases[cap["capability_id"]].status == "expired", cap["capability_id"]
        assert all(not accessor_alive(root, c["credential"]["accessor"]) for c in vault_caps)

        # Found at OpenBao by its meta.capability and revoked there: the token had 10 minutes left.
        assert leases[orphan_vault].status == "revoked"
        assert leases[orphan_vault].handle and leases[orphan_vault].handle["accessor"] == orphan_accessor
        assert not accessor_alive(root, orphan_accessor)
        # Never reached OpenBao: nothing to revoke, and the lease says so.
        assert leases[never_minted].status == "expired"
        assert (leases[never_minted].status_reason or "").startswith("not found at backend; expires naturally at ")
        assert leases[native_orphan].status == "revoked"
        # No narrowed policy outlives its token: deleted at revoke, or released once the lease ended.
        policies = set(root.sys.list_acl_policies()["data"]["keys"])
        assert not {f"jit-{lid}" for lid, lease in leases.items() if lease.provider == "vault"} & policies
        # The cut-short teardown is finished, with the session's reason; OpenBao confirms.
        for cap in long_lived:
            lease = leases[cap["capability_id"]]
            assert lease.status == "revoked" and lease.status_reason == "session-ended:completed"
        assert not accessor_alive(root, long_lived[0]["credential"]["accessor"])

        finished = terminal_records(engine)
        for lease_id in leases:
            assert len(finished.get(lease_id, [])) == 1, (lease_id, finished.get(lease_id))
            assert finished[lease_id][0]["actor"] == "broker:reconciler"
        assert finished[never_minted][0]["detail"]["found_at_backend"] is False
        with transaction(engine) as db:
            assert verify(db).ok
    finally:
        broker.stop()
        engine.dispose()


# --- 1b. teardown while a mint is in flight, and the minting request dies ---------------------------


def test_teardown_during_a_mint_whose_request_died_is_found_by_capability(
    database_url: str, tmp_path: Path, vault_setup: VaultSetup
) -> None:
    s = BrokerSecrets()
    env = s.env(tmp_path, database_url, POLICY, **vault_env(vault_setup), **FAST)
    settings = Settings(**{k.removeprefix("BROKER_").lower(): v for k, v in env.items()})
    upgrade(settings.database_url)
    root = vault_setup.server.client()
    with LiveServer(Broker.build(settings), sweeper=True) as server, \
            httpx.Client(base_url=server.base_url, timeout=30) as client:
        engine = server.broker.engine
        session = new_session(client, s)
        sid = session["session_id"]
        # Two requests reserved their leases; one reached OpenBao, neither came back.
        reached = plant_minting_lease(engine, sid, "vault", VAULT, age_seconds=0)
        minted = VaultProvider(OpenBaoClient(addr=vault_setup.server.addr, token=vault_setup.broker_token)).mint(
            Grant(capability_id=reached, session_id=sid, task_id="task", human="alice@example.com",
                  agent="claude-code", resource=VAULT, access="read", tier="read", ttl_seconds=600,
                  options={"policies": ["kv-allowed"]}))
        lost = plant_minting_lease(engine, sid, "vault", VAULT, age_seconds=0)

        r = client.post(f"/v1/sessions/{sid}/end", headers=bearer(s.orchestrator_key), json={"reason": "completed"})
        assert r.status_code == 200 and r.json()["revoke_pending"] == 2
        assert {all_leases(engine)[i].status for i in (reached, lost)} == {"revoke_pending"}

        # A claim later the retry pass looks them up by capability id (no handle to revoke with).
        wait_for(lambda: all(all_leases(engine)[i].status in FINAL for i in (reached, lost)), 30,
                 "both handle-less leases finished")
    leases = all_leases(engine)
    assert leases[reached].status == "revoked" and leases[reached].handle["accessor"] == minted.handle["accessor"]
    assert not accessor_alive(root, minted.handle["accessor"])
    assert leases[lost].status == "expired"
    assert (leases[lost].status_reason or "").startswith("not found at backend; expires naturally at ")
    for lease_id in (reached, lost):
        trail = [r["type"] for r in records_of(engine, lease_id)]
        # no revoke_failed: a missing handle is looked up, not sent to the backend empty
        assert trail in (["capability.revoke_pending", "capability.revoked"],
                         ["capability.revoke_pending", "capability.expired"]), trail


# --- 2. OpenBao down during teardown --------------------------------------------------------------


def configure_with_retry(server: OpenBaoServer) -> VaultSetup:
    """A fresh raft server answers 400 for a moment while KV v2 upgrades its mount; configuring is idempotent."""
    deadline = time.monotonic() + 20
    while True:
        try:
            return configure_vault(server)
        except hx.InvalidRequest as exc:
            if "Upgrading from non-versioned to versioned data" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture
def bao_down_broker(database_url: str, tmp_path: Path,
                    openbao_restartable: OpenBaoServer) -> Iterator[tuple[LiveServer, BrokerSecrets, OpenBaoServer]]:
    setup = configure_with_retry(openbao_restartable)
    s = BrokerSecrets()
    env = s.env(tmp_path, database_url, POLICY, **vault_env(setup), **FAST)
    settings = Settings(**{k.removeprefix("BROKER_").lower(): v for k, v in env.items()})
    upgrade(settings.database_url)
    with LiveServer(Broker.build(settings), sweeper=True) as server:
        yield server, s, openbao_restartable


def test_backend_down_leaves_revoke_pending_until_it_returns(
    bao_down_broker: tuple[LiveServer, BrokerSecrets, OpenBaoServer],
) -> None:
    server, s, bao = bao_down_broker
    engine = server.broker.engine
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        session = new_session(client, s)
        vault_caps = [request_cap(client, session, VAULT, ttl=600) for _ in range(5)]
        native_caps = [request_cap(client, session, "jwt://svc/ledger", ttl=600) for _ in range(2)]
        accessors = {c["capability_id"]: c["credential"]["accessor"] for c in vault_caps}

        bao.stop()
        r = client.post(f"/v1/sessions/{session['session_id']}/end", headers=bearer(s.orchestrator_key),
                        json={"reason": "completed"})
        assert r.status_code == 200, r.text
        assert r.json()["revoked"] == 2 and r.json()["revoke_pending"] == 5  # nothing reported revoked on hope

        listed = client.get("/v1/capabilities", params={"session_id": session["session_id"]},
                            headers=bearer(s.admin_token)).json()
        by_id = {c["capability_id"]: c for c in listed}
        for cap_id in accessors:
            assert by_id[cap_id]["status"] == "revoke_pending"
            assert by_id[cap_id]["status_reason"] == "provider-unavailable" and by_id[cap_id]["revoke_attempts"] >= 1
        assert all(by_id[c["capability_id"]]["status"] == "revoked" for c in native_caps)
        metrics = client.get("/metrics").text
        assert re.search(r'^broker_leases\{(?=.*status="revoke_pending")(?=.*provider="vault").*\} 5\.0$', metrics,
                         re.MULTILINE), metrics

        # The sweeper keeps trying while OpenBao is down; each try is on the record.
        wait_for(lambda: all(lease.revoke_attempts >= 2 for lid, lease in all_leases(engine).items()
                             if lid in accessors), 20, "a second failed attempt for every vault lease")
        assert all(all_leases(engine)[lid].status == "revoke_pending" for lid in accessors)

        bao.start()
        wait_for(lambda: all(all_leases(engine)[lid].status == "revoked" for lid in accessors), 40,
                 "every vault lease revoked once OpenBao is back")

    root = bao.client()
    assert all(not accessor_alive(root, accessor) for accessor in accessors.values())
    for cap_id in accessors:
        trail = [r["type"] for r in records_of(engine, cap_id)]
        failed = trail.count("capability.revoke_failed")
        assert failed >= 2 and trail.count("capability.revoked") == 1, trail
        assert trail[-1] == "capability.revoked" and trail[-1 - failed:-1] == ["capability.revoke_failed"] * failed
        final = records_of(engine, cap_id)[-1]
        assert final["jit_grant"]["attempts"] >= 2 and final["request"]["reason"] == "session-ended:completed"
    with transaction(engine) as db:
        assert verify(db).ok


# --- 3. three replicas, one killed ---------------------------------------------------------------


def test_three_replicas_one_killed_each_lease_finished_exactly_once(
    postgres_url: str, tmp_path: Path, vault_setup: VaultSetup
) -> None:
    s = BrokerSecrets()
    env = s.env(tmp_path, postgres_url, POLICY, **vault_env(vault_setup), **FAST, BROKER_SWEEP_BATCH_SIZE="40")
    migrate(env)
    engine = make_engine(postgres_url)
    replicas = [BrokerProcess(env, tmp_path, name=f"replica-{i}") for i in range(3)]
    for p in replicas:
        p.launch()  # from this thread: the children's death signal is tied to it
    for p in replicas:
        p.wait_ready()
    victim = replicas[1]
    clients = [p.client() for p in replicas]  # shared by the request threads (httpx clients are thread-safe)
    try:
        sessions = [new_session(clients[0], s, task_id=f"task-{i}") for i in range(6)]

        # One webhook, delivered five times at once, spread over the three replicas.
        hooked = new_session(clients[0], s, task_id="acme/widgets#7")
        request_cap(clients[0], hooked, "jwt://svc/ledger", ttl=600)
        body = json.dumps({"id": "evt_" + secrets.token_hex(6), "type": "task.completed",
                           "repository": "acme/widgets", "issue_number": 7}).encode()
        header = sign(body, s.webhook_secret)

        def hook(i: int) -> int:
            return clients[i % 3].post("/v1/webhooks/orchestrator", content=body,
                                       headers={"X-Broker-Signature": header}).status_code

        with ThreadPoolExecutor(5) as pool:
            assert sorted(pool.map(hook, range(5))) == [200, 409, 409, 409, 409]

        # 300 short-lived capabilities over the replicas; one replica dies halfway through.
        issued: list[str] = []
        lock = threading.Lock()
        killed = threading.Event()

        def one(i: int) -> None:
            resource = VAULT if i % 10 == 0 else "jwt://svc/ledger"
            for attempt in range(6):
                index = (i + attempt) % 3
                if replicas[index] is victim and killed.is_set():
                    continue
                try:
                    cap = request_cap(clients[index], sessions[i % 6], resource, ttl=1 + i % 4)
                except httpx.HTTPError:
                    continue  # the replica died under this request; ask another
                with lock:
                    issued.append(cap["capability_id"])
                    if len(issued) == 150 and not killed.is_set():
                        killed.set()
                        victim.kill()
                return
            raise AssertionError(f"capability {i} could not be issued by any replica")

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(one, range(300)))
        assert killed.is_set() and not victim.running and len(issued) == 300

        def settled() -> bool:
            return all(lease.status in FINAL for lease in all_leases(engine).values())

        wait_for(settled, 60, "every lease revoked or expired by the surviving replicas", interval=0.5)
        leases = all_leases(engine)
        live = {lid: lease.status for lid, lease in leases.items() if lease.status not in FINAL}
        assert live == {}, live
        finished = terminal_records(engine)
        counts = Counter({lid: len(finished.get(lid, [])) for lid in leases})
        assert {lid: n for lid, n in counts.items() if leases[lid].status != "failed" and n != 1} == {}
        assert {lid: n for lid, n in counts.items() if leases[lid].status == "failed" and n != 0} == {}
        assert set(issued) <= {lid for lid, lease in leases.items() if lease.status in ("revoked", "expired")}

        with transaction(engine) as db:
            ended = db.get(SessionRow, hooked["session_id"])
            assert ended is not None and ended.status == "ended"
            assert len(query(db, session_id=hooked["session_id"], types=["session.ended"])) == 1
            assert verify(db).ok
        report = clients[0].get("/v1/audit/verify", headers=bearer(s.admin_token)).json()
        assert report["ok"] is True, report

        # The surviving replicas' linkers fold every record into the tree (the dead one's too).
        def all_linked() -> bool:
            with engine.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM audit_records r WHERE NOT EXISTS "
                                         "(SELECT 1 FROM audit_leaves l WHERE l.seq = r.seq)")).scalar_one() == 0
        wait_for(all_linked, 120, "every audit record linked into the Merkle tree", interval=0.2)
        with transaction(engine) as db:
            records = db.connection().execute(text("SELECT count(*) FROM audit_records")).scalar_one()
            tree = verify(db)
        assert tree.ok and tree.tree_size == records and tree.unlinked == 0, tree
        root = vault_setup.server.client()
        vault_leases = [lease for lease in leases.values() if lease.provider == "vault" and lease.handle]
        assert vault_leases and all(not accessor_alive(root, lease.handle["accessor"]) for lease in vault_leases)
    finally:
        for p in replicas:
            p.stop()
        for c in clients:
            c.close()
        engine.dispose()
