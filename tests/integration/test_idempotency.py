"""Idempotency-Key: one key, one outcome, even under 20 concurrent identical requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlmodel import Session, select

from broker.models import AuditRecord, Lease
from tests.support.brokers import Api


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
    headers = {"Authorization": f"Bearer {session['session_token']}", "Idempotency-Key": "burst-1"}
    body = {"resource": "jwt://payments-api", "access": "read", "purpose": "burst"}

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=api.base_url, timeout=60) as client:
            return client.post("/v1/capabilities", json=body, headers=headers)

    with ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(send, range(20)))
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
