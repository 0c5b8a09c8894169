"""approval.requested / approval.decided pushed to a real local receiver that checks every
signature: each event arrives once, with full parameters and the binding message, also when
the broker stops between the state change and the push, and after the receiver failed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from broker.approvals import outbox
from broker.db import transaction
from broker.models import OutboxMessage
from broker.outbox import claim_due
from broker.runtime import Broker
from tests.support.approvals import DEPLOY, open_broker
from tests.support.brokers import Api, LiveServer
from tests.support.receiver import Receiver

BOB = "bob@example.com"


def _settings(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {"approval_webhook_urls": receiver.url, "approval_webhook_secret": receiver.secret.decode(),
            "outbox_interval_seconds": 0.2, **extra}


def _events(receiver: Receiver) -> list[tuple[str, str]]:
    return [(e["type"], e["approval"]["status"]) for e in receiver.events]


def test_each_event_arrives_once_signed_with_full_parameters(database_url: str, tmp_path: Path,
                                                               receiver: Receiver) -> None:
    broker, secrets_ = open_broker(tmp_path, database_url, **_settings(receiver))
    with LiveServer(broker, outbox=True) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session()
        pending = api.request(session, DEPLOY).json()
        requested = receiver.wait_for(1)[0]
        assert requested["type"] == "approval.requested" and requested["_headers"]["event"] == "approval.requested"
        approval = requested["approval"]
        assert approval["approval_id"] == pending["approval_id"]
        assert approval["parameters"] == DEPLOY["parameters"] and approval["tool"] == "deploy-cli"
        assert approval["binding_message"] == pending["binding_message"]
        assert approval["approvers"] == ["group:maintainers"] and approval["human"] == "alice@example.com"
        # What a receiver shows people: the sentence, the binding code, the canonical parameters.
        shown = approval["display"]
        assert shown["sentence"].startswith("Approving lets claude-code (acting for alice@example.com) mint one "
                                            "`deploy` credential for jwt://payments-api via `deploy-cli`")
        assert shown["binding_code"] in pending["binding_message"]
        assert shown["parameters_canonical"] == '{"env":"prod","version":"1.4.2"}' and shown["warning"] is None
        r = client.post(f"/v1/approvals/{pending['approval_id']}/approve", headers=api.as_human(BOB),
                        json={"reason": "ok"})
        assert r.status_code == 200
        decided = receiver.wait_for(2)[1]
        assert decided["type"] == "approval.decided" and decided["approval"]["status"] == "approved"
        assert decided["approval"]["decided_by"] == BOB and decided["approval"]["decision_reason"] == "ok"
        assert decided["approval"]["binding_message"] == pending["binding_message"]
        # Asking again (same binding) pages nobody twice.
        assert api.request(session, DEPLOY).status_code == 202
    assert _events(receiver) == [("approval.requested", "pending"), ("approval.decided", "approved")]
    assert len({e["id"] for e in receiver.events}) == 2 and receiver.rejected == []
    with transaction(broker.engine) as db:
        rows = db.exec(OutboxMessage.__table__.select()).all()  # type: ignore[attr-defined]
        assert {row.status for row in rows} == {"delivered"}


def test_nothing_is_lost_when_the_broker_stops_before_the_push(database_url: str, tmp_path: Path,
                                                                 receiver: Receiver) -> None:
    broker, secrets_ = open_broker(tmp_path, database_url, **_settings(receiver))
    # First life: state changes commit, but this broker never pushes (as if it died right after).
    with LiveServer(broker, outbox=False) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session()
        aid = api.request(session, DEPLOY).json()["approval_id"]
        deny = client.post(f"/v1/approvals/{aid}/deny", headers=api.as_human(BOB), json={"reason": "freeze"})
        assert deny.status_code == 200
    assert receiver.events == []
    # Second life, same database: the outbox is delivered, each event once.
    restarted = Broker.build(broker.settings)
    with LiveServer(restarted, outbox=True):
        events = receiver.wait_for(2)
    assert _events(receiver) == [("approval.requested", "pending"), ("approval.decided", "denied")]
    assert events[1]["approval"]["decision_reason"] == "freeze"
    # A third life finds nothing left to send.
    again = Broker.build(broker.settings)
    assert outbox.deliver_due(again) == 0
    assert len(receiver.events) == 2


def test_a_failing_receiver_is_retried_with_backoff(database_url: str, tmp_path: Path, receiver: Receiver) -> None:
    broker, secrets_ = open_broker(tmp_path, database_url, **_settings(receiver))
    receiver.fail_next = 2
    with LiveServer(broker, outbox=False) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        api.request(api.new_session(), DEPLOY)
    assert outbox.deliver_due(broker) == 0
    with transaction(broker.engine) as db:
        row = db.exec(OutboxMessage.__table__.select()).one()  # type: ignore[attr-defined]
        assert row.attempts == 1 and row.status == "pending" and row.last_error == "HTTP 503"
        assert row.next_attempt_at > row.created_at  # backed off, not hammered
    with LiveServer(Broker.build(broker.settings), outbox=True):
        receiver.wait_for(1)
    assert _events(receiver) == [("approval.requested", "pending")]
    with transaction(broker.engine) as db:
        row = db.exec(OutboxMessage.__table__.select()).one()  # type: ignore[attr-defined]
        assert row.status == "delivered" and row.attempts == 3


def test_replicas_claim_disjoint_messages(database_url: str, tmp_path: Path, receiver: Receiver) -> None:
    broker, secrets_ = open_broker(tmp_path, database_url, **_settings(receiver))
    with LiveServer(broker, outbox=False) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session()
        for version in range(4):
            api.request(session, {**DEPLOY, "parameters": {"version": str(version)}})
    other = Broker.build(broker.settings)
    from broker.db import utcnow

    mine = claim_due(broker, utcnow(), 100, [outbox.KIND])
    theirs = claim_due(other, utcnow(), 100, [outbox.KIND])
    assert len(mine) == 4 and theirs == []  # claimed rows are not handed out again while the claim lasts
