"""Idempotency-Key: one key, one outcome, even under 20 concurrent identical requests; with a
remote backend (OpenBao) too, where the key is held `in_progress` while the mint is under way."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from broker.db import utcnow
from broker.models import AuditRecord, IdempotencyRecord, Lease
from tests.integration.test_errors import _block_audit
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.openbao import VaultSetup

VAULT_POLICY = """\
version: 1
tiers:
  secret: {control: auto, max_ttl: 10m}
resources:
  - match: "vault://secret/data/allowed"
    provider: vault
    access: {read: {tier: secret, policies: [kv-allowed]}}
humans:
  alice@example.com:
    grants: [{resource: "vault://**", access: ["*"]}]
agents:
  claude-code: {max_tier: secret}
"""
VAULT_ASK = {"resource": "vault://secret/data/allowed", "access": "read", "ttl_seconds": 300, "purpose": "twins"}


def burst(api: Api, session: dict[str, Any], body: dict[str, Any], key: str, n: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {session['session_token']}", "Idempotency-Key": key}

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=api.base_url, timeout=60) as client:
            return client.post("/v1/capabilities", json=body, headers=headers)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(send, range(n)))


@pytest.fixture
def vault_api(database_url: str, tmp_path: Path, vault_setup: VaultSetup) -> Iterator[Api]:
    """A served broker whose vault provider mints at the real OpenBao: a remote mint."""
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, VAULT_POLICY, vault_addr=vault_setup.server.addr,
                          vault_token=vault_setup.broker_token, vault_token_role=vault_setup.token_role)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield Api(server.base_url, secrets_, broker, client)


def test_same_key_same_body_replays_the_same_result(api: Api) -> None:
    session = api.new_session()
    body = {"resource": "jwt://payments-api", "access": "read", "ttl_seconds": 120}
    first = api.request(session, body, **{"Idempotency-Key": "k-1"})
    second = api.request(session, body, **{"Idempotency-Key": "k-1"})
    assert first.status_code == second.status_code == 201
    assert first.json() == second.json()  # same capability, same credential
    other = api.request(session, body, **{"Idempotency-Key": "k-2"})
    assert other.json()["capability_id"] != first.json()["capability_id"]


def test_same_key_different_body_is_409(api: Api) -> None:
    session = api.new_session()
    api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "k"})
    r = api.request(session, {"resource": "jwt://payments-api", "access": "write"}, **{"Idempotency-Key": "k"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency-key-reused"


def test_denials_replay_too(api: Api) -> None:
    session = api.new_session()
    body = {"resource": "jwt://nowhere", "access": "read"}
    a = api.request(session, body, **{"Idempotency-Key": "deny"})
    b = api.request(session, body, **{"Idempotency-Key": "deny"})
    assert a.status_code == b.status_code == 403 and a.json() == b.json()
    with Session(api.broker.engine) as db:
        denied = db.exec(select(AuditRecord).where(AuditRecord.type == "capability.denied")).all()
    assert len(denied) == 1  # the replay did not decide again


def test_keys_are_per_session(api: Api) -> None:
    one, two = api.new_session(), api.new_session(task_id="t2")
    body = {"resource": "jwt://payments-api", "access": "read"}
    a = api.request(one, body, **{"Idempotency-Key": "shared"})
    b = api.request(two, body, **{"Idempotency-Key": "shared"})
    assert a.status_code == b.status_code == 201 and a.json()["capability_id"] != b.json()["capability_id"]


def test_twenty_concurrent_identical_requests_mint_exactly_one(api: Api) -> None:
    session = api.new_session()
    body = {"resource": "jwt://payments-api", "access": "read", "purpose": "burst"}
    responses = burst(api, session, body, "burst-1", 20)
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    assert len({r.json()["capability_id"] for r in responses}) == 1
    assert len({r.json()["credential"]["token"] for r in responses}) == 1
    with Session(api.broker.engine) as db:
        leases = db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all()
        minted = db.exec(select(AuditRecord).where(AuditRecord.type == "capability.minted")).all()
    assert len(leases) == 1 and len(minted) == 1


def test_bad_idempotency_key_is_rejected(api: Api) -> None:
    session = api.new_session()
    r = api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "x" * 300})
    assert r.status_code == 422  # header longer than 255


def test_an_expired_key_is_free_again(api: Api) -> None:
    session = api.new_session()
    first = api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "old"})
    assert first.status_code == 201
    with Session(api.broker.engine) as db:  # the key's day is over
        row = db.get(IdempotencyRecord, (session["session_id"], "old"))
        assert row is not None and row.state == "done"
        row.expires_at = utcnow() - timedelta(seconds=1)
        db.add(row)
        db.commit()
    # Another body under the same key: not 409, a new decision, a new capability.
    second = api.request(session, {"resource": "jwt://payments-api", "access": "write"}, **{"Idempotency-Key": "old"})
    assert second.status_code == 201, second.text
    assert second.json()["capability_id"] != first.json()["capability_id"] and second.json()["access"] == "write"
    replay = api.request(session, {"resource": "jwt://payments-api", "access": "write"}, **{"Idempotency-Key": "old"})
    assert replay.json() == second.json()


def test_twins_of_a_remote_mint_wait_for_its_outcome(vault_api: Api) -> None:
    """The first request holds the key `in_progress` while OpenBao mints; its twins wait, then
    answer its outcome: one token at OpenBao, one lease, one minted record."""
    session = vault_api.new_session(scope=[{"resource": "vault://**", "access": ["*"]}])
    responses = burst(vault_api, session, VAULT_ASK, "remote-1", 8)
    assert [r.status_code for r in responses] == [201] * 8, [r.text for r in responses if r.status_code != 201]
    assert len({r.json()["capability_id"] for r in responses}) == 1
    assert len({r.json()["credential"]["accessor"] for r in responses}) == 1
    with Session(vault_api.broker.engine) as db:
        leases = db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all()
        minted = db.exec(select(AuditRecord).where(AuditRecord.type == "capability.minted")).all()
        key = db.get(IdempotencyRecord, (session["session_id"], "remote-1"))
    assert len(leases) == 1 and leases[0].status == "active" and len(minted) == 1
    assert key is not None and key.state == "done" and key.response_status == 201


def test_a_remote_mint_that_fails_5xx_frees_its_key(vault_api: Api) -> None:
    """A 5xx outcome is not stored: the key held `in_progress` is let go, and a retry under the
    same key is decided anew (here: once the audit log takes records again)."""
    session = vault_api.new_session(scope=[{"resource": "vault://**", "access": ["*"]}])
    _block_audit(vault_api)
    failed = vault_api.request(session, VAULT_ASK, **{"Idempotency-Key": "retry-me"})
    assert (failed.status_code, failed.json()["error"]["code"]) == (500, "audit-write-failed")
    with Session(vault_api.broker.engine) as db:
        assert db.get(IdempotencyRecord, (session["session_id"], "retry-me")) is None
    with vault_api.broker.engine.begin() as conn:
        conn.execute(text("DROP TRIGGER audit_offline" if conn.dialect.name == "sqlite"
                          else "DROP TRIGGER audit_offline ON audit_records"))
    retried = vault_api.request(session, VAULT_ASK, **{"Idempotency-Key": "retry-me"})
    assert retried.status_code == 201, retried.text
    with Session(vault_api.broker.engine) as db:
        leases = db.exec(select(Lease).where(Lease.session_id == session["session_id"])
                         .order_by(Lease.created_at)).all()
    assert [lease.status for lease in leases] == ["failed", "active"]
    assert leases[1].id == retried.json()["capability_id"]
