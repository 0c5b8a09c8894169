"""Security Event Tokens (RFC 8417, CAEP) pushed (RFC 8935) to real loopback receivers that verify
each one against the broker's JWKS: one SET per event per receiver, from every path that ends a
session or revokes a capability; retried with backoff while a receiver is down; dead at once
on a 400; and, across a kill -9 between the state change and the push, each received once."""

from __future__ import annotations

import json
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlmodel import select

from broker import outbox, security_events
from broker.app import OUTBOX_SENDERS
from broker.db import make_engine, transaction, utcnow
from broker.identity.webhooks import sign
from broker.lifecycle.sweeper import sweep_once
from broker.metrics import REGISTRY
from broker.models import OutboxMessage, SessionRow
from broker.runtime import Broker
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.processes import BrokerProcess, migrate
from tests.support.set_receiver import SetReceiver

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/credential-change"
ISSUER = "http://127.0.0.1:8080"  # BROKER_ISSUER's default: the `iss` receivers expect
ALICE = "alice@example.com"


def receivers_setting(*receivers: tuple[str, SetReceiver]) -> str:
    return json.dumps([{"name": name, "url": r.url, "audience": r.audience} for name, r in receivers])


def open_broker(tmp_path: Path, database_url: str, *receivers: tuple[str, SetReceiver],
                **settings: Any) -> tuple[Broker, BrokerSecrets]:
    secrets_ = BrokerSecrets()
    tokens = ",".join(f"{name}={r.token}" for name, r in receivers if r.token)
    broker = build_broker(tmp_path, database_url, secrets_, security_event_receivers=receivers_setting(*receivers),
                          security_event_receiver_tokens=tokens or None, outbox_interval_seconds=0.2, **settings)
    return broker, secrets_


def serve(broker: Broker, secrets_: BrokerSecrets, *receivers: SetReceiver, outbox_loop: bool = True) -> tuple[LiveServer, Api]:
    server = LiveServer(broker, outbox=outbox_loop).__enter__()
    for r in receivers:
        r.trust(server.base_url)
    return server, Api(server.base_url, secrets_, broker, httpx.Client(base_url=server.base_url, timeout=30))


def rows(broker: Broker) -> list[OutboxMessage]:
    with transaction(broker.engine) as db:
        return list(db.exec(select(OutboxMessage).where(OutboxMessage.kind == security_events.KIND)
                            .order_by(OutboxMessage.created_at)).all())


def event_of(claims: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ((uri, body),) = claims["events"].items()
    return uri, body


def native_jti(capability: dict[str, Any]) -> str:
    """The jti of a native capability token (the receiver-facing id of the credential)."""
    return str(jwt.decode(capability["credential"]["token"], options={"verify_signature": False})["jti"])


def test_a_session_end_sends_one_session_revoked_and_one_credential_change_per_capability(
        database_url: str, tmp_path: Path, set_receivers: list[SetReceiver]) -> None:
    siem = SetReceiver(audience="https://siem.example.com", issuer=ISSUER, token="rt-" + secrets.token_urlsafe(16))
    gateway = SetReceiver(audience="payments-gateway", issuer=ISSUER)
    set_receivers += [siem, gateway]
    broker, secrets_ = open_broker(tmp_path, database_url, ("siem", siem), ("gateway", gateway))
    server, api = serve(broker, secrets_, siem, gateway)
    try:
        session = api.new_session()
        caps = [api.request(session, {"resource": "jwt://payments-api", "access": "read"}).json(),
                api.request(session, {"resource": "jwt://svc/ledger", "access": "read"}).json()]
        assert all("capability_id" in c for c in caps), caps
        ended = api.client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_orchestrator(),
                                json={"reason": "completed"})
        assert ended.status_code == 200, ended.text
        for receiver in (siem, gateway):
            receiver.wait_for(3)
        time.sleep(1.0)  # a few more delivery passes: nothing else may arrive
    finally:
        server.__exit__()
        api.client.close()

    sid = session["session_id"]
    by_cap = {c["capability_id"]: c for c in caps}
    all_jtis: list[str] = []
    for receiver in (siem, gateway):
        assert receiver.rejected == [] and receiver.duplicates == []
        assert len(receiver.accepted) == 3  # one per event, exactly
        for got in receiver.accepted:
            header, claims = got["header"], got["claims"]
            assert header["typ"] == "secevent+jwt" and header["alg"] == "EdDSA"
            assert header["kid"] in {k["kid"] for k in broker.keyring.jwks()["keys"]}
            assert claims["iss"] == ISSUER and claims["aud"] == receiver.audience
            assert "sub" not in claims and "exp" not in claims
            assert claims["txn"] == f"{sid}/end"  # one cause: the session's end
            assert claims["sub_id"]["format"] == "complex"
            assert claims["sub_id"]["session"] == {"format": "opaque", "id": sid}
            assert claims["sub_id"]["user"] == {"format": "email", "email": ALICE}
            assert got["accept"] == "application/json"
            all_jtis.append(claims["jti"])
        (revoked,) = receiver.events("/session-revoked")
        uri, event = event_of(revoked)
        assert uri == SESSION_REVOKED
        assert event["reason_admin"] == {"en": "completed"} and event["initiating_entity"] == "system"
        assert event["agent"] == "claude-code" and event["task_id"] == "task-1"
        assert abs(event["event_timestamp"] - time.time()) < 120
        changes = receiver.events("/credential-change")
        assert sorted(c["sub_id"]["credential"]["jti"] for c in changes) == sorted(by_cap)
        for change in changes:
            uri, event = event_of(change)
            cap = by_cap[change["sub_id"]["credential"]["jti"]]
            assert uri == CREDENTIAL_CHANGE
            # A native token is named as the JWT it is: the credential the gateway saw has this jti.
            assert change["sub_id"]["credential"] == {"format": "jwt_id", "iss": ISSUER, "jti": native_jti(cap)}
            assert event["change_type"] == "revoke" and event["credential_type"] == "jit-broker-capability"
            assert event["status"] == "revoked" and event["capability_id"] == cap["capability_id"]
            assert event["resource"] == cap["resource"] and event["access"] == "read"
            assert event["reason_admin"] == {"en": "session-ended:completed"}
            assert event["credential_fingerprint"].startswith("sha256:")
            assert cap["credential"]["token"] not in got_raw(receiver)  # never the secret itself
    assert len(set(all_jtis)) == 6  # unique across events and receivers
    assert {r.status for r in rows(broker)} == {"delivered"} and len(rows(broker)) == 6


def got_raw(receiver: SetReceiver) -> str:
    return " ".join(json.dumps(s["claims"]) for s in receiver.accepted)


def test_every_path_that_ends_or_revokes_sends_its_event(database_url: str, tmp_path: Path,
                                                         set_receivers: list[SetReceiver]) -> None:
    siem = SetReceiver(audience="siem", issuer=ISSUER)
    set_receivers.append(siem)
    broker, secrets_ = open_broker(tmp_path, database_url, ("siem", siem))
    server, api = serve(broker, secrets_, siem)
    try:
        agent_session = api.new_session(task_id="delete")
        cap = api.request(agent_session, {"resource": "jwt://svc/a", "access": "read"}).json()
        agent = {"Authorization": f"Bearer {agent_session['session_token']}"}
        assert api.client.delete(f"/v1/capabilities/{cap['capability_id']}", headers=agent).status_code == 200
        siem.wait_for(1)

        short = api.request(agent_session, {"resource": "jwt://svc/b", "access": "read", "ttl_seconds": 1}).json()
        time.sleep(1.2)
        sweep_once(api.broker)  # natural expiry: the sweeper revokes it
        siem.wait_for(2)

        killed = api.new_session(task_id="kill")
        kcap = api.request(killed, {"resource": "jwt://svc/c", "access": "read"}).json()
        r = api.client.post("/v1/revocations", headers=api.as_admin(), json={"session_id": killed["session_id"]})
        assert r.status_code == 200, r.text
        siem.wait_for(4)

        hooked = api.new_session(task_id="owner/repo#7")
        body = json.dumps({"id": "evt_" + secrets.token_hex(6), "type": "task.completed",
                           "session_id": hooked["session_id"]}).encode()
        r = api.client.post("/v1/webhooks/orchestrator", content=body, headers={
            "X-Broker-Signature": sign(body, secrets_.webhook_secret), "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        siem.wait_for(5)

        deadline = api.new_session(task_id="deadline")
        with transaction(broker.engine) as db:
            row = db.get(SessionRow, deadline["session_id"])
            assert row is not None
            row.expires_at = utcnow() - timedelta(seconds=1)
            db.add(row)
        sweep_once(api.broker)
        siem.wait_for(6)
        time.sleep(1.0)
    finally:
        server.__exit__()
        api.client.close()

    assert siem.rejected == [] and siem.duplicates == [] and len(siem.accepted) == 6
    changes = {c["sub_id"]["credential"]["jti"]: c for c in siem.events("/credential-change")}
    sessions_ = {s["sub_id"]["session"]["id"]: s for s in siem.events("/session-revoked")}
    assert set(changes) == {cap["capability_id"], short["capability_id"], kcap["capability_id"]}
    assert set(sessions_) == {killed["session_id"], hooked["session_id"], deadline["session_id"]}

    def ev(claims: dict[str, Any]) -> dict[str, Any]:
        return event_of(claims)[1]

    deleted = changes[cap["capability_id"]]
    assert ev(deleted)["initiating_entity"] == "user" and ev(deleted)["status"] == "revoked"
    assert deleted["txn"] == f"{cap['capability_id']}/revoke"
    expired = changes[short["capability_id"]]
    assert ev(expired)["status"] == "expired" and ev(expired)["reason_admin"] == {"en": "expired"}
    assert ev(expired)["initiating_entity"] == "system"
    k = changes[kcap["capability_id"]]
    assert ev(k)["initiating_entity"] == "admin" and k["txn"] == f"{killed['session_id']}/end"
    assert ev(sessions_[killed["session_id"]])["initiating_entity"] == "admin"
    assert ev(sessions_[hooked["session_id"]])["reason_admin"] == {"en": "completed"}
    assert ev(sessions_[hooked["session_id"]])["task_id"] == "owner/repo#7"
    assert ev(sessions_[deadline["session_id"]])["reason_admin"] == {"en": "deadline"}


def test_a_receiver_that_is_down_is_retried_with_backoff_until_it_takes_the_set(
        database_url: str, tmp_path: Path, set_receivers: list[SetReceiver]) -> None:
    siem = SetReceiver(audience="siem", issuer=ISSUER, listening=False)  # port bound, nobody answers
    set_receivers.append(siem)
    broker, secrets_ = open_broker(tmp_path, database_url, ("siem", siem))
    server, api = serve(broker, secrets_, siem, outbox_loop=False)
    failed_before, delivered_before = deliveries("failed"), deliveries("delivered")
    try:
        session = api.new_session()
        api.client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_orchestrator())
        assert outbox.deliver_due(broker, OUTBOX_SENDERS) == 0  # connection refused
        (row,) = rows(broker)
        assert row.status == "pending" and row.attempts == 1 and row.last_error == "ConnectError"
        assert row.next_attempt_at > row.created_at  # backed off, not hammered
        assert outbox.deliver_due(broker, OUTBOX_SENDERS) == 0  # not due yet: nothing is tried
        assert rows(broker)[0].attempts == 1

        siem.start()
        siem.fail_next = 1  # up, but failing once more: 503 is retried too
        wait_until(lambda: rows(broker)[0].next_attempt_at <= utcnow(), 10)
        assert outbox.deliver_due(broker, OUTBOX_SENDERS) == 0
        row = rows(broker)[0]
        assert row.attempts == 2 and row.last_error == "HTTP 503" and row.status == "pending"
        wait_until(lambda: rows(broker)[0].next_attempt_at <= utcnow(), 10)
        assert outbox.deliver_due(broker, OUTBOX_SENDERS) == 1
    finally:
        server.__exit__()
        api.client.close()
    row = rows(broker)[0]
    assert row.status == "delivered" and row.attempts == 3
    assert len(siem.accepted) == 1 and siem.requests == 2 and siem.rejected == []
    assert (deliveries("failed") - failed_before, deliveries("delivered") - delivered_before) == (2, 1)
    assert event_of(siem.accepted[0]["claims"])[0] == SESSION_REVOKED


def test_a_400_is_final_the_set_goes_dead_and_is_not_sent_again(database_url: str, tmp_path: Path,
                                                                set_receivers: list[SetReceiver]) -> None:
    siem = SetReceiver(audience="siem", issuer=ISSUER, token="rt-" + secrets.token_urlsafe(16))
    set_receivers.append(siem)
    broker, secrets_ = open_broker(tmp_path, database_url, ("siem", siem))
    server, api = serve(broker, secrets_, siem, outbox_loop=False)
    dead_before, written_before = deliveries("dead"), REGISTRY.get_sample_value(
        "broker_security_events_total", {"event": "session-revoked"}) or 0.0
    try:
        siem.refuse_next = 1
        session = api.new_session()
        api.client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_orchestrator())
        assert outbox.deliver_due(broker, OUTBOX_SENDERS) == 0
        (row,) = rows(broker)
        assert row.status == "dead" and row.attempts == 1
        assert row.last_error == "HTTP 400 invalid_request: this receiver refuses the event"
        # Dead is dead: later passes (here or on any replica) never send it again.
        assert outbox.deliver_due(broker, OUTBOX_SENDERS) == 0
        assert outbox.deliver_due(Broker.build(broker.settings), OUTBOX_SENDERS) == 0
        assert siem.requests == 1 and siem.accepted == []
        assert deliveries("dead") - dead_before == 1
        assert REGISTRY.get_sample_value("broker_security_events_total", {"event": "session-revoked"}) - \
            written_before == 1
    finally:
        server.__exit__()
        api.client.close()


def test_a_receiver_taken_out_of_the_configuration_gets_nothing_more(database_url: str, tmp_path: Path,
                                                                    set_receivers: list[SetReceiver]) -> None:
    siem = SetReceiver(audience="siem", issuer=ISSUER)
    set_receivers.append(siem)
    broker, secrets_ = open_broker(tmp_path, database_url, ("siem", siem))
    server, api = serve(broker, secrets_, siem, outbox_loop=False)
    try:
        api.client.post(f"/v1/sessions/{api.new_session()['session_id']}/end", headers=api.as_orchestrator())
    finally:
        server.__exit__()
        api.client.close()
    without = Broker.build(broker.settings.model_copy(update={"security_event_receivers": ""}))
    assert outbox.deliver_due(without, OUTBOX_SENDERS) == 0
    (row,) = rows(broker)
    assert row.status == "dead" and row.last_error == "receiver 'siem' is no longer configured"
    assert siem.requests == 0


def deliveries(outcome: str) -> float:
    return REGISTRY.get_sample_value("broker_outbox_deliveries_total", {"kind": "set", "outcome": outcome}) or 0.0


def wait_until(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_each_set_arrives_once_across_a_kill_9_between_the_state_change_and_the_push(
        database_url: str, tmp_path: Path, set_receivers: list[SetReceiver]) -> None:
    """A real broker process ends a session (two capabilities) and is SIGKILLed before its
    outbox loop runs again (an hour's interval; the receiver is not even listening). Restarted
    with a short interval, it pushes every SET, and the receiver gets each exactly once."""
    siem = SetReceiver(audience="siem", issuer=ISSUER, listening=False)
    set_receivers.append(siem)
    s = BrokerSecrets()
    receivers = receivers_setting(("siem", siem))
    env = s.env(tmp_path, database_url, BROKER_SECURITY_EVENT_RECEIVERS=receivers,
                BROKER_OUTBOX_INTERVAL_SECONDS="3600")
    migrate(env)
    engine = make_engine(database_url)
    first = BrokerProcess(env, tmp_path, name="first").start()
    try:
        with first.client() as client:
            api = Api(first.base_url, s, None, client)  # type: ignore[arg-type]
            session = api.new_session()
            caps = [api.request(session, {"resource": "jwt://svc/a", "access": "read"}).json(),
                    api.request(session, {"resource": "jwt://svc/b", "access": "read"}).json()]
            ended = client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_orchestrator())
            assert ended.status_code == 200, ended.text
        first.kill()  # SIGKILL right after the state change committed: no lifespan shutdown
    finally:
        first.stop()
    with transaction(engine) as db:
        left = list(db.exec(select(OutboxMessage).where(OutboxMessage.kind == "set")).all())
    assert len(left) == 3 and {m.status for m in left} == {"pending"}  # written with the change, not sent
    assert siem.requests == 0

    siem.start()
    second = BrokerProcess({**env, "BROKER_OUTBOX_INTERVAL_SECONDS": "0.2"}, tmp_path, name="second")
    siem.trust(second.base_url)  # its port is fixed before it starts; until it serves, the receiver answers 503
    try:
        second.start()
        siem.wait_for(3)
        time.sleep(1.5)  # several more passes: nothing is sent twice
    finally:
        second.stop()
    assert siem.rejected == [] and siem.duplicates == []
    assert len(siem.accepted) == 3
    assert len(siem.events("/session-revoked")) == 1
    assert sorted(c["sub_id"]["credential"]["jti"] for c in siem.events("/credential-change")) == \
        sorted(c["capability_id"] for c in caps)
    with transaction(engine) as db:
        assert {m.status for m in db.exec(select(OutboxMessage).where(OutboxMessage.kind == "set")).all()} == \
            {"delivered"}
    engine.dispose()
