"""A native capability is one store call: on PostgreSQL one round trip (counted on the wire, in
libpq's protocol trace) and no statement through SQLAlchemy; on SQLite one transaction. What the
locked session row says still decides: an ended session, a full budget, a live escalation tier
or a used key make the call write nothing, and the full path answers as it always has."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from psycopg import AsyncConnection, pq
from sqlalchemy import event, text

from broker.app import create_app
from broker.audit.verification import verify
from broker.db import make_engine, transaction
from broker.runtime import Broker
from broker.store.postgres import PostgresStore
from tests.integration.test_least_privilege import API_KEY
from tests.integration.test_least_privilege import POLICY as VAULT_POLICY
from tests.integration.test_least_privilege import SCOPE as VAULT_SCOPE
from tests.support.brokers import BrokerSecrets, build_broker
from tests.support.openbao import VaultSetup


class WireTrace:
    """libpq's trace of every connection the store opens: one ReadyForQuery per round trip."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "libpq.trace"
        self._file = self.path.open("w")

    async def configure(self, conn: AsyncConnection[Any]) -> None:
        conn.pgconn.trace(os.dup(self._file.fileno()))
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def round_trips(self) -> int:
        return sum(1 for line in self.path.read_text().splitlines() if line.startswith("B") and "ReadyForQuery" in line)


class Statements:
    """What goes through SQLAlchemy's engine (the full path, the background loops)."""

    def __init__(self, broker: Broker) -> None:
        self.seen: list[str] = []
        self.begins = 0
        event.listen(broker.engine, "before_cursor_execute", self._statement)
        event.listen(broker.engine, "begin", self._begin)

    def _statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.seen.append(statement)

    def _begin(self, conn: Any) -> None:
        self.begins += 1

    def reset(self) -> None:
        self.seen.clear()
        self.begins = 0


@pytest.fixture
def in_process(database_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Broker, BrokerSecrets]]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_)
    with TestClient(create_app(broker=broker, background=False)) as client:
        yield client, broker, secrets_
    broker.engine.dispose()


def _session(client: TestClient, secrets_: BrokerSecrets, **extra: Any) -> dict[str, Any]:
    body = {"human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 3600,
            "scope": [{"resource": "jwt://**", "access": ["*"]}], **extra}
    r = client.post("/v1/sessions", json=body, headers={"Authorization": f"Bearer {secrets_.orchestrator_key}"})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _ask(client: TestClient, session: dict[str, Any], resource: str = "jwt://svc/a", key: str | None = None,
         access: str = "read") -> Any:
    headers = {"Authorization": f"Bearer {session['session_token']}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/v1/capabilities", json={"resource": resource, "access": access, "purpose": "t"},
                       headers=headers)


def test_postgres_native_capability_is_one_round_trip(postgres_url: str, tmp_path: Path) -> None:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, postgres_url, secrets_)
    trace = WireTrace(tmp_path)
    with TestClient(create_app(broker=broker, background=False)) as client:
        # The lifespan's store, swapped for one whose single connection is traced.
        assert isinstance(broker.store, PostgresStore) and client.portal is not None
        portal = client.portal
        portal.call(broker.store.close)
        broker.store = portal.call(lambda: PostgresStore.open(broker.engine, size=1, configure=trace.configure))
        statements = Statements(broker)
        session = _session(client, secrets_)
        assert _ask(client, session, key="warm-up").status_code == 201  # reads the session; prepares the call
        statements.reset()
        before = trace.round_trips()
        for i in range(5):
            r = _ask(client, session, f"jwt://svc/k{i}", key=f"key-{i}")
            assert r.status_code == 201, r.text
            assert r.json()["credential"]["token"]
        # With and without a key: one round trip each, nothing through SQLAlchemy.
        assert _ask(client, session, "jwt://svc/nokey").status_code == 201
        assert trace.round_trips() - before == 6
        assert statements.seen == []
        # A replay is the full path's (the store wrote nothing, and said why): same answer.
        first = _ask(client, session, "jwt://svc/k0", key="key-0")
        assert first.status_code == 201 and statements.seen
        portal.call(broker.store.close)
        broker.store = None
    with transaction(broker.engine) as db:
        assert db.execute(text("SELECT count(*) FROM leases WHERE status = 'active'")).scalar_one() == 7
        assert db.execute(text("SELECT issued_count FROM sessions")).scalar_one() == 7
        assert verify(db).ok
    broker.engine.dispose()


_COUNT_WRITES = """
CREATE TABLE test_row_writes (tbl text, op text);
CREATE FUNCTION test_count_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO test_row_writes VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$;
CREATE TRIGGER test_count_sessions AFTER INSERT OR UPDATE ON sessions
    FOR EACH ROW EXECUTE FUNCTION test_count_write();
CREATE TRIGGER test_count_chains AFTER INSERT OR UPDATE ON audit_chains
    FOR EACH ROW EXECUTE FUNCTION test_count_write();
"""


def test_postgres_native_capability_writes_each_hot_row_once(postgres_url: str, tmp_path: Path) -> None:
    """Migration 0015: a capability writes its session's row once (live and issued counts
    together) and its chain's tip once (length and head together): every extra write of these
    rows is a dead version PostgreSQL must skip until a vacuum. Counted by a trigger the test adds."""
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, postgres_url, secrets_)
    with broker.engine.begin() as conn:
        conn.exec_driver_sql(_COUNT_WRITES)
    budgeted = copy.copy(broker.policies.current)
    budgeted.max_active_per_session = 50  # a live budget: each capability's fold decides
    broker.policies._current = budgeted  # as a reload would
    with TestClient(create_app(broker=broker, background=False)) as client:
        session = _session(client, secrets_)
        assert _ask(client, session, key="warm-up").status_code == 201  # the chain's first records
        with broker.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM test_row_writes")
        for i in range(6):
            assert _ask(client, session, f"jwt://svc/w{i}", key=None if i % 2 else f"w-{i}").status_code == 201
        with broker.engine.begin() as conn:
            writes = conn.execute(text("SELECT tbl, op, count(*) FROM test_row_writes GROUP BY tbl, op")).all()
            live, issued = conn.execute(text("SELECT live_count, issued_count FROM sessions")).one()
        assert sorted(tuple(w) for w in writes) == [("audit_chains", "UPDATE", 6), ("sessions", "UPDATE", 6)]
        # The counts stay right: each capability folds the one before it (the lease's +1 delta).
        assert (live, issued) == (7 - 1, 7)
        with transaction(broker.engine) as db:
            assert verify(db).ok
    broker.engine.dispose()


def test_postgres_reservation_reads_no_lease_unless_the_tier_escalates(postgres_url: str, tmp_path: Path) -> None:
    """Migration 0015: without an escalation chain for the lease's tier, reserving reads nothing
    of the leases table (0013's `NULL AND EXISTS (...)` scanned it whole on every capability).
    Counted by PostgreSQL's own per-transaction scan counter, in a transaction rolled back."""
    import psycopg

    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, postgres_url, secrets_)
    with TestClient(create_app(broker=broker, background=False)) as client:
        session = _session(client, secrets_)
        assert _ask(client, session).status_code == 201
    broker.engine.dispose()
    with psycopg.connect(postgres_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        row = conn.execute("SELECT to_jsonb(l) FROM leases l").fetchone()
        assert row is not None
        # Sequential scans of the table and index scans of each of its indexes.
        scans = ("SELECT pg_stat_get_xact_numscans('leases'::regclass) + (SELECT coalesce(sum("
                 "pg_stat_get_xact_numscans(indexrelid)), 0) FROM pg_index WHERE indrelid = 'leases'::regclass)")

        def reserve(lease_id: str, escalation: list[str] | None) -> tuple[str, int]:
            lease = dict(row[0], id=lease_id)
            before = conn.execute(scans).fetchone()
            said = conn.execute("SELECT broker_reserve_capability(%s, NULL, NULL, %s::text[], %s::jsonb, NULL)",
                                (session["session_id"], escalation, json.dumps(lease))).fetchone()
            after = conn.execute(scans).fetchone()
            assert before is not None and after is not None and said is not None
            return str(said[0]), int(after[0]) - int(before[0])

        assert reserve("cap_scan_none", None) == ("reserved", 0)
        assert reserve("cap_scan_empty", []) == ("reserved", 0)
        answer, scanned = reserve("cap_scan_chain", ["merge", "read"])  # the tier is "read": checked
        assert answer == "escalation" and scanned >= 1
        conn.rollback()


def test_migration_0015_downgrades_to_0013s_functions_and_back(postgres_url: str) -> None:
    from alembic import command

    from broker.migrate import alembic_config, upgrade

    def reserve_source() -> str:
        engine = make_engine(postgres_url, pool_size=1)
        try:
            with engine.begin() as conn:
                return str(conn.execute(text("SELECT prosrc FROM pg_proc WHERE proname = 'broker_reserve_capability'")
                                        ).scalar_one())
        finally:
            engine.dispose()

    upgrade(postgres_url)
    assert "d_rows" in reserve_source()
    command.downgrade(alembic_config(postgres_url), "0014")
    assert "d_rows" not in reserve_source() and "RETURNING live_count INTO s_live" in reserve_source()
    upgrade(postgres_url)
    assert "d_rows" in reserve_source()


def test_postgres_vault_capability_is_two_round_trips_around_the_backend(
        postgres_url: str, tmp_path: Path, vault_setup: VaultSetup) -> None:
    """Reserve (the `minting` lease commits first), the OpenBao call, activate: two round trips
    to PostgreSQL, nothing through SQLAlchemy; the record verifies."""
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, postgres_url, secrets_, VAULT_POLICY, vault_addr=vault_setup.server.addr,
                          vault_token=vault_setup.broker_token, vault_token_role=vault_setup.token_role)
    trace = WireTrace(tmp_path)
    with TestClient(create_app(broker=broker, background=False)) as client:
        assert isinstance(broker.store, PostgresStore) and client.portal is not None
        portal = client.portal
        portal.call(broker.store.close)
        broker.store = portal.call(lambda: PostgresStore.open(broker.engine, size=1, configure=trace.configure))
        statements = Statements(broker)
        session = _session(client, secrets_, scope=VAULT_SCOPE)
        assert _ask(client, session, API_KEY, key="warm-up").status_code == 201
        statements.reset()
        before = trace.round_trips()
        tokens = []
        for i in range(3):
            r = _ask(client, session, API_KEY, key=f"v{i}")
            assert r.status_code == 201, r.text
            tokens.append(r.json()["credential"]["token"])
        assert trace.round_trips() - before == 6
        assert statements.seen == []
        assert len(set(tokens)) == 3
        portal.call(broker.store.close)
        broker.store = None
    with transaction(broker.engine) as db:
        assert db.execute(text("SELECT count(*) FROM leases WHERE status = 'active' AND provider = 'vault'")
                          ).scalar_one() == 4
        assert db.execute(text("SELECT count(*) FROM idempotency_keys WHERE state = 'done'")).scalar_one() == 4
        assert verify(db).ok
    broker.engine.dispose()


def test_sqlite_native_capability_is_one_transaction(tmp_path: Path) -> None:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path / 'broker.db'}", secrets_)
    with TestClient(create_app(broker=broker, background=False)) as client:
        statements = Statements(broker)
        session = _session(client, secrets_)
        assert _ask(client, session).status_code == 201
        statements.reset()
        for i in range(3):
            assert _ask(client, session, f"jwt://svc/k{i}", key=f"k{i}").status_code == 201
        assert statements.begins == 3
    broker.engine.dispose()


def test_what_the_locked_row_says_still_decides(in_process: tuple[TestClient, Broker, BrokerSecrets]) -> None:
    """Each fact the one-call path does not decide on: the store refuses, the full path answers."""
    client, broker, secrets_ = in_process
    assert broker.store is not None
    current = broker.policies.current

    # The issued budget, counted under the lock.
    tight = copy.copy(current)
    tight.max_issued_per_session, tight.max_active_per_session = 2, None
    broker.policies._current = tight  # as a reload would
    session = _session(client, secrets_)
    assert [_ask(client, session, f"jwt://svc/b{i}").status_code for i in range(3)] == [201, 201, 429]
    assert _ask(client, session, "jwt://svc/b3").json()["error"]["code"] == "budget-exceeded"

    # The live budget: leases that are live, whichever path made them.
    tight.max_issued_per_session, tight.max_active_per_session = None, 1
    session = _session(client, secrets_)
    first = _ask(client, session, "jwt://svc/c0")
    assert first.status_code == 201
    assert _ask(client, session, "jwt://svc/c1").status_code == 429
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    assert client.delete(f"/v1/capabilities/{first.json()['capability_id']}", headers=agent).status_code == 200
    assert _ask(client, session, "jwt://svc/c2").status_code == 201  # revoked: room again
    broker.policies._current = current

    # An ended session, though its facts are cached and its token still verifies.
    session = _session(client, secrets_)
    assert _ask(client, session, "jwt://svc/d0").status_code == 201
    orchestrator = {"Authorization": f"Bearer {secrets_.orchestrator_key}"}
    assert client.post(f"/v1/sessions/{session['session_id']}/end", headers=orchestrator).status_code == 200
    r = _ask(client, session, "jwt://svc/d1")
    assert r.status_code == 403 and r.json()["error"]["code"] == "session-ended"

    # An idempotent replay answers the first outcome, once written.
    session = _session(client, secrets_)
    a, b = _ask(client, session, "jwt://svc/e", key="same"), _ask(client, session, "jwt://svc/e", key="same")
    assert a.status_code == b.status_code == 201 and a.json() == b.json()

    with transaction(broker.engine) as db:
        assert verify(db).ok
        minted = db.execute(text("SELECT count(*) FROM audit_records WHERE type = 'capability.minted'")).scalar_one()
        leases = db.execute(text("SELECT count(*) FROM leases WHERE status IN ('active', 'revoked')")).scalar_one()
        assert minted == leases


@pytest.mark.parametrize("hostile", [
    "jwt://svc/\u202eevil", "jwt://svc/a\u0000b", "jwt://svc/\"quoted\"", "jwt://svc/back\\slash",
    "jwt://svc/emoji-\U0001f600", "jwt://svc/ünïcödé", "jwt://svc/$(rm -rf ~)", "jwt://svc/{\"seq\":1}",
    "jwt://svc/pos-0123456789abcdef0123456789abcdef", "jwt://svc/\u2028line",
])
def test_records_from_the_template_verify_whatever_the_request_holds(
        in_process: tuple[TestClient, Broker, BrokerSecrets], hostile: str) -> None:
    """The record's canonical JSON is cut around its position and seq and joined by the store: it
    must hash exactly as `audit verify` recomputes it, for any purpose, parameters or resource."""
    client, broker, secrets_ = in_process
    session = _session(client, secrets_)
    headers = {"Authorization": f"Bearer {session['session_token']}"}
    body = {"resource": "jwt://svc/x", "access": "read", "purpose": hostile,
            "parameters": {"seq": hostile, "chain_pos": hostile, "nested": {"k": [hostile, 1, None]}}}
    r = client.post("/v1/capabilities", json=body, headers=headers)
    assert r.status_code in (201, 400, 422), r.text
    r = client.post("/v1/capabilities", json={"resource": "jwt://svc/y", "access": "read", "purpose": "plain",
                                              "tool": "t", "parameters": {"seq": 1, "chain_pos": "x"}},
                    headers=headers)
    assert r.status_code == 201, r.text
    with transaction(broker.engine) as db:
        result = verify(db)
        assert result.ok, result
        records = db.execute(text("SELECT record FROM audit_records WHERE type = 'capability.minted'")).all()
        assert records and all('"chain_pos":' in row[0] and '"seq":' in row[0] for row in records)

