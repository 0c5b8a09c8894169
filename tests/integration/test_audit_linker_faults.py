"""kill -9 a real `broker-cli serve` while its linker is folding records into the Merkle tree;
after a restart every record is linked exactly once, in order, and the log verifies."""

from __future__ import annotations

import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

from broker.audit.events import AgentRef, AuditEvent, RequestRef
from broker.audit.service import append_many
from broker.audit.verification import verify
from broker.db import make_engine, transaction
from tests.support.brokers import BrokerSecrets
from tests.support.processes import BrokerProcess, migrate

RECORDS = 3000


def _counts(engine: Engine) -> tuple[int, int]:
    with engine.connect() as conn:
        records = conn.execute(text("SELECT count(*) FROM audit_records")).scalar_one()
        leaves = conn.execute(text("SELECT count(*) FROM audit_leaves")).scalar_one()
    return int(records), int(leaves)


def test_kill_9_during_linking_then_restart_links_every_record_once_in_order(database_url: str, tmp_path: Path) -> None:
    s = BrokerSecrets()
    # Small rounds and a checkpoint every round, so the kill lands between and inside rounds.
    env = s.env(tmp_path, database_url, BROKER_AUDIT_LINK_BATCH="3", BROKER_AUDIT_CHECKPOINT_INTERVAL_SECONDS="0")
    migrate(env)
    engine = make_engine(database_url)
    # The counts are read outside the broker's engine: on SQLite its every transaction opens with
    # BEGIN IMMEDIATE (a writer's lock), which a linker committing round after round could starve
    # until it had linked everything, so the kill would never land mid-way.
    watch = create_engine(database_url) if database_url.startswith("sqlite") else engine
    try:
        for t in range(RECORDS // 10):  # what a busy broker left behind, not yet linked
            with transaction(engine) as db:
                append_many(db, [AuditEvent(type="capability.minted", outcome="minted", actor="agent:a",
                                            agent=AgentRef("a", f"ses_{t % 7}", "t"),
                                            request=RequestRef(operation="request", parameters={"n": t * 10 + i}))
                                 for i in range(10)])
        total = _counts(engine)[0]
        assert total >= RECORDS

        broker = BrokerProcess(env, tmp_path)
        broker.launch()  # its lifespan starts linking before it serves
        deadline = time.monotonic() + 120
        while _counts(watch)[1] < 30:
            assert broker.running and time.monotonic() < deadline, broker.log_tail()
            time.sleep(0.005)
        broker.kill()  # SIGKILL, mid-way
        linked_at_kill = _counts(watch)[1]
        assert 0 < linked_at_kill < total, "the kill did not land while linking"
        with engine.connect() as conn:
            indexes = [r[0] for r in conn.execute(text("SELECT leaf_index FROM audit_leaves ORDER BY leaf_index"))]
        assert indexes == list(range(linked_at_kill))  # only whole rounds were committed

        broker.start()  # links what is left at start, then the background linker carries on
        try:
            deadline = time.monotonic() + 180
            while _counts(engine)[1] < _counts(engine)[0]:
                assert broker.running and time.monotonic() < deadline, broker.log_tail()
                time.sleep(0.1)
            with engine.connect() as conn:
                leaves = conn.execute(text("SELECT leaf_index, seq FROM audit_leaves ORDER BY leaf_index")).all()
                records = [r[0] for r in conn.execute(text("SELECT seq FROM audit_records ORDER BY seq"))]
            assert [i for i, _ in leaves] == list(range(len(records)))
            # Once each, in order: these records all committed before linking began, so commit order is seq order.
            assert [seq for _, seq in leaves] == records
            with transaction(engine) as db:
                result = verify(db)
            assert result.ok and result.tree_size == len(records) and result.unlinked == 0, result
            with broker.client() as http:
                report = http.get("/v1/audit/verify", headers={"Authorization": f"Bearer {s.admin_token}"}).json()
                assert report["ok"] is True, report
                deadline = time.monotonic() + 60
                while (cp := http.get("/v1/audit/checkpoint", headers={
                        "Authorization": f"Bearer {s.admin_token}"}).json())["tree_size"] < len(records):
                    assert time.monotonic() < deadline, cp
                    time.sleep(0.1)
                assert cp["root_hash"] == result.root_hash
        finally:
            broker.stop()
    finally:
        engine.dispose()
        watch.dispose()
