"""Audit records are append-only at the database (migration 0002): UPDATE and DELETE are refused
on PostgreSQL and SQLite alike, while the broker keeps appending."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from broker.audit.linker import link_all
from broker.audit.verification import verify
from broker.db import transaction
from tests.support.brokers import Api


def _count(api: Api) -> int:
    with api.broker.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM audit_records")).scalar_one())


@pytest.mark.parametrize("statement", [
    "UPDATE audit_records SET outcome = 'denied'",
    "UPDATE audit_records SET record = replace(record, 'minted', 'denied') WHERE seq = 1",
    "DELETE FROM audit_records",
    "DELETE FROM audit_records WHERE seq = (SELECT max(seq) FROM audit_records)",
    # hiding a truncated chain by rewinding its tip
    "UPDATE audit_chains SET length = 0, head = '" + "0" * 64 + "'",
    "DELETE FROM audit_chains",
    # the Merkle tree's leaves and signed checkpoints (migration 0007) are append-only too
    "UPDATE audit_leaves SET seq = seq + 1000",
    "DELETE FROM audit_leaves",
    "UPDATE audit_checkpoints SET root_hash = '" + "0" * 64 + "'",
    "DELETE FROM audit_checkpoints",
])
def test_rewriting_the_audit_is_refused(api: Api, statement: str) -> None:
    session = api.new_session()
    assert api.request(session, {"resource": "jwt://payments-api", "access": "read"}).status_code == 201
    assert link_all(api.broker, wait=120).tree_size >= 2
    before = _count(api)
    assert before >= 2
    with pytest.raises(DBAPIError) as caught, api.broker.engine.begin() as conn:
        conn.execute(text(statement))
    assert "append-only" in str(caught.value) or "only moves forward" in str(caught.value)
    with api.broker.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM audit_leaves")).scalar_one() >= 2
    assert _count(api) == before
    with transaction(api.broker.engine) as db:
        assert verify(db).ok
    # ... and the broker still appends.
    assert api.request(session, {"resource": "jwt://payments-api", "access": "read"}).status_code == 201
    assert _count(api) > before


def test_truncate_is_refused_on_postgres(postgres_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from broker.db import make_engine
    from broker.migrate import upgrade

    upgrade(postgres_url)
    engine = make_engine(postgres_url, pool_size=1)
    try:
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text("TRUNCATE audit_records"))
    finally:
        engine.dispose()
