"""POST /v1/webhooks/orchestrator against a real broker (uvicorn, SQLite and PostgreSQL).

Rejections (bad signature, stale timestamp, replayed id, malformed body) each with their
status and code; the same valid event delivered five times, one after another and all at once,
ends its session exactly once.
"""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlmodel import select

from broker.audit.service import query
from broker.audit.verification import verify
from broker.db import transaction, utcnow
from broker.identity.webhooks import sign
from broker.models import AuditRecord, Lease, SessionRow, WebhookDelivery
from tests.support.brokers import Api

PATH = "/v1/webhooks/orchestrator"


def event_id() -> str:
    return "evt_" + secrets.token_hex(8)


def deliver(api: Api, event: dict[str, Any] | bytes, *, secret: str | None = None, t: int | None = None,
            header: str | None = None, client: httpx.Client | None = None) -> httpx.Response:
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    signature = header if header is not None else sign(body, secret or api.secrets.webhook_secret, t)
    return (client or api.client).post(PATH, content=body, headers={"X-Broker-Signature": signature,
                                                                   "Content-Type": "application/json"})


def records(api: Api, type_: str, session_id: str | None = None) -> list[dict[str, Any]]:
    with transaction(api.broker.engine) as db:
        rows = query(db, session_id=session_id, types=[type_], limit=10_000)
    return [json.loads(r.record) for r in rows]


def session_row(api: Api, session_id: str) -> SessionRow:
    with transaction(api.broker.engine) as db:
        row = db.get(SessionRow, session_id)
        assert row is not None
        return row


def leases_of(api: Api, session_id: str) -> list[Lease]:
    with transaction(api.broker.engine) as db:
        return list(db.exec(select(Lease).where(Lease.session_id == session_id)).all())


def with_capabilities(api: Api, n: int = 2, **session_kw: Any) -> dict[str, Any]:
    session = api.new_session(**session_kw)
    for _ in range(n):
        r = api.request(session, {"resource": "jwt://payments-api", "access": "read"})
        assert r.status_code == 201, r.text
    return session


def test_signed_teardown_ends_the_session_and_revokes_everything(api: Api) -> None:
    session = with_capabilities(api, 3)
    sid = session["session_id"]
    evt = {"id": event_id(), "type": "task.completed", "session_id": sid, "occurred_at": "2025-01-01T00:00:00Z"}
    r = deliver(api, evt)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "processed" and body["reason"] == "completed"
    receipts = body["sessions"][0].pop("receipts")
    assert body["sessions"] == [{"session_id": sid, "status": "ended", "already_ended": False,
                                 "revoked": 3, "revoke_pending": 0}]
    assert sorted(rc["capability_id"] for rc in receipts) == sorted(lease.id for lease in leases_of(api, sid))
    assert {rc["outcome"] for rc in receipts} == {"expires_naturally"}  # native: offline verifiers until exp
    row = session_row(api, sid)
    assert row.status == "ended" and row.end_reason == "completed"
    assert {lease.status for lease in leases_of(api, sid)} == {"revoked"}

    [received] = records(api, "webhook.received", sid)
    assert received["outcome"] == "processed"
    assert received["detail"]["event_id"] == evt["id"] and received["detail"]["event_type"] == "task.completed"
    [ended] = records(api, "session.ended", sid)
    assert ended["actor"] == "webhook:orchestrator" and ended["detail"]["webhook_event_id"] == evt["id"]
    assert ended["seq"] == received["seq"] + 1  # one transaction: delivery, receipt, session end
    revoked = records(api, "capability.revoked", sid)
    assert sorted((rec["detail"]["receipt"] for rec in revoked), key=lambda rc: rc["capability_id"]) == receipts
    with transaction(api.broker.engine) as db:
        assert db.get(WebhookDelivery, evt["id"]) is not None
        assert verify(db).ok


def test_each_rejection_has_its_status_and_code_and_changes_nothing(api: Api) -> None:
    session = with_capabilities(api, 1)
    sid = session["session_id"]
    good = {"id": event_id(), "type": "session.ended", "session_id": sid}
    body = json.dumps(good).encode()
    now = int(time.time())
    tolerance = api.broker.settings.webhook_tolerance_seconds

    cases: list[tuple[str, httpx.Response, int, str]] = [
        ("wrong secret", deliver(api, good, secret="not-the-secret"), 401, "invalid-signature"),
        ("tampered body", deliver(api, body.replace(b"session.ended", b"session.ended "),
                                  header=sign(body, api.secrets.webhook_secret)), 401, "invalid-signature"),
        ("garbage header", deliver(api, good, header="sha256=abc"), 401, "invalid-signature"),
        ("missing header", api.client.post(PATH, content=body), 401, "invalid-signature"),
        ("stale", deliver(api, good, t=now - tolerance - 5), 401, "stale-signature"),
        ("from the future", deliver(api, good, t=now + tolerance + 5), 401, "stale-signature"),
        ("not JSON", deliver(api, b"{not json"), 400, "invalid-webhook"),
        ("not an object", deliver(api, b"[1, 2]"), 400, "invalid-webhook"),
        ("no id", deliver(api, {"type": "session.ended", "session_id": sid}), 400, "invalid-webhook"),
        ("no target", deliver(api, {"id": event_id(), "type": "session.ended"}), 400, "invalid-webhook"),
        ("bad issue number", deliver(api, {"id": event_id(), "repository": "acme/w", "issue_number": "x"}),
         400, "invalid-webhook"),
        ("bad occurred_at", deliver(api, {"id": event_id(), "session_id": sid, "occurred_at": "yesterday"}),
         400, "invalid-webhook"),
    ]
    for name, response, status, code in cases:
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        assert response.json()["error"]["code"] == code, name
    assert session_row(api, sid).status == "active"  # nothing above was acted on
    assert records(api, "webhook.received") == [] and records(api, "session.ended") == []

    first = deliver(api, good)
    assert first.status_code == 200, first.text
    replay = deliver(api, good)  # freshly signed, same id: a replay
    assert replay.status_code == 409
    err = replay.json()["error"]
    assert err["code"] == "webhook-replayed" and err["id"] == good["id"] and "first_received_at" in err
    assert len(records(api, "webhook.received")) == 1


def test_the_same_event_delivered_five_times_ends_the_session_once(api: Api) -> None:
    one_by_one = with_capabilities(api, 2)
    evt = {"id": event_id(), "type": "session.ended", "session_id": one_by_one["session_id"], "reason": "completed"}
    statuses = [deliver(api, evt).status_code for _ in range(5)]
    assert statuses == [200, 409, 409, 409, 409]

    at_once = with_capabilities(api, 2, task_id="task-2")
    evt2 = {"id": event_id(), "type": "task.cancelled", "session_id": at_once["session_id"]}
    body = json.dumps(evt2).encode()
    header = sign(body, api.secrets.webhook_secret)  # byte-identical deliveries, as a retrying sender makes

    def post(_: int) -> int:
        with httpx.Client(base_url=api.base_url, timeout=30) as c:
            return deliver(api, body, header=header, client=c).status_code

    with ThreadPoolExecutor(5) as pool:
        concurrent = sorted(pool.map(post, range(5)))
    assert concurrent == [200, 409, 409, 409, 409]

    for session in (one_by_one, at_once):
        sid = session["session_id"]
        assert len(records(api, "session.ended", sid)) == 1
        assert len(records(api, "webhook.received", sid)) == 1
        assert len(records(api, "capability.revoked", sid)) == 2
        assert session_row(api, sid).status == "ended"
    with transaction(api.broker.engine) as db:
        assert verify(db).ok


def test_orchestrator_field_names_find_the_session_by_task(api: Api) -> None:
    # The orchestrator's own session id means nothing to the broker; repository + issue_number
    # name the task, by the convention task_id = "<repository>#<issue_number>".
    a = with_capabilities(api, 1, task_id="acme/widgets#42", repository="acme/widgets")
    b = with_capabilities(api, 1, task_id="acme/widgets#42", repository="acme/widgets")  # a retry of the task
    other = with_capabilities(api, 1, task_id="acme/widgets#43", repository="acme/widgets")
    native = {"event_id": event_id(), "session_id": "orch-7f3a", "repository": "acme/widgets",
              "issue_number": 42, "reason": "daemon_shutdown", "worktree": "/tmp/w42"}
    r = deliver(api, native)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "session.ended" and r.json()["task_id"] == "acme/widgets#42"
    assert sorted(s["session_id"] for s in r.json()["sessions"]) == sorted([a["session_id"], b["session_id"]])
    for s in (a, b):
        row = session_row(api, s["session_id"])
        assert row.status == "ended" and row.end_reason == "daemon_shutdown"
    assert session_row(api, other["session_id"]).status == "active"

    # task_id given directly, and string issue numbers as some senders write them
    r = deliver(api, {"id": event_id(), "type": "task.failed", "repository": "acme/widgets", "issue_number": "43"})
    assert r.status_code == 200 and [s["session_id"] for s in r.json()["sessions"]] == [other["session_id"]]
    assert session_row(api, other["session_id"]).end_reason == "failed"

    # an event for a task with no live session is acknowledged and audited, nothing else
    r = deliver(api, {"id": event_id(), "type": "task.completed", "task_id": "acme/widgets#999"})
    assert r.status_code == 200 and r.json()["status"] == "unmatched" and r.json()["sessions"] == []
    assert records(api, "webhook.received")[-1]["outcome"] == "unmatched"


def test_an_already_ended_session_is_not_ended_again(api: Api) -> None:
    session = with_capabilities(api, 1)
    sid = session["session_id"]
    r = api.client.post(f"/v1/sessions/{sid}/end", json={"reason": "api_teardown"}, headers=api.as_orchestrator())
    assert r.status_code == 200
    r = deliver(api, {"id": event_id(), "type": "task.completed", "session_id": sid})
    assert r.status_code == 200 and r.json()["sessions"][0]["already_ended"] is True
    assert len(records(api, "session.ended", sid)) == 1
    assert session_row(api, sid).end_reason == "api_teardown"


def test_unknown_event_types_are_acknowledged_audited_and_ignored(api: Api) -> None:
    session = with_capabilities(api, 1)
    evt = {"id": event_id(), "type": "task.started", "session_id": session["session_id"]}
    r = deliver(api, evt)
    assert r.status_code == 202 and r.json() == {"status": "ignored", "id": evt["id"], "type": "task.started",
                                          "reason": None, "task_id": None, "sessions": []}
    assert session_row(api, session["session_id"]).status == "active"
    [received] = records(api, "webhook.received")
    assert received["outcome"] == "ignored" and received["detail"]["event_type"] == "task.started"
    assert deliver(api, evt).status_code == 409  # its id is spent all the same


def test_secret_rotation_accepts_old_and_new(api: Api) -> None:
    old = api.secrets.webhook_secret
    api.broker.settings = api.broker.settings.model_copy(update={"webhook_secrets": SecretStr(f"whsec-new, {old}")})
    s1, s2, s3 = (with_capabilities(api, 0) for _ in range(3))
    assert deliver(api, {"id": event_id(), "session_id": s1["session_id"]}, secret=old).status_code == 200
    assert deliver(api, {"id": event_id(), "session_id": s2["session_id"]}, secret="whsec-new").status_code == 200
    evt = json.dumps({"id": event_id(), "session_id": s3["session_id"]}).encode()
    t = int(time.time())
    both = f"{sign(evt, 'retired', t)},{sign(evt, 'whsec-new', t).split(',')[1]}"  # several v1 entries
    assert deliver(api, evt, header=both).status_code == 200
    api.broker.settings = api.broker.settings.model_copy(update={"webhook_secrets": SecretStr("whsec-new")})
    r = deliver(api, {"id": event_id(), "session_id": s1["session_id"]}, secret=old)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid-signature"


def test_old_delivery_ids_are_pruned_past_twice_the_window(api: Api) -> None:
    tolerance = api.broker.settings.webhook_tolerance_seconds
    now = utcnow()
    with transaction(api.broker.engine) as db:
        db.add(WebhookDelivery(event_id="evt_ancient", received_at=now - timedelta(seconds=2 * tolerance + 5)))
        db.add(WebhookDelivery(event_id="evt_recent", received_at=now - timedelta(seconds=2 * tolerance - 30)))
    session = with_capabilities(api, 0)
    assert deliver(api, {"id": event_id(), "session_id": session["session_id"]}).status_code == 200
    with transaction(api.broker.engine) as db:
        assert db.get(WebhookDelivery, "evt_ancient") is None
        assert db.get(WebhookDelivery, "evt_recent") is not None
        assert db.exec(select(AuditRecord).where(AuditRecord.type == "webhook.received")).first() is not None


@pytest.mark.parametrize("size", [70 * 1024])
def test_oversize_bodies_are_refused_before_verification(api: Api, size: int) -> None:
    r = deliver(api, b"{" + b" " * size + b"}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload-too-large"


def test_a_long_reason_fits_every_column_it_reaches(api: Api) -> None:
    session = with_capabilities(api, 1)
    reason = "r" * 128  # the longest the schema allows; leases record "session-ended:<reason>"
    r = deliver(api, {"id": event_id(), "session_id": session["session_id"], "reason": reason})
    assert r.status_code == 200 and r.json()["sessions"][0]["revoked"] == 1, r.text
    assert session_row(api, session["session_id"]).end_reason == reason
    r = deliver(api, {"id": event_id(), "session_id": session["session_id"], "reason": reason + "r"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid-webhook"
