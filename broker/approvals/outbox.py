"""Signed notifications from an outbox: written with the change they announce, pushed later.

A message row is added in the same transaction as the approval change, so a crash between
the change and the push loses nothing: the delivery loop (beside the sweeper) finds it.
Delivery is at least once; each message carries an event `id` the receiver dedupes on (a
crash after the receiver's 2xx and before the row is marked delivered sends it again).

    POST <url>
    Content-Type: application/json
    X-Broker-Event: approval.requested | approval.decided
    X-Broker-Signature: t=<unix>,v1=<hex hmac-sha256(secret, "<t>.<raw body>")>

The signature is the orchestrator webhook's scheme (`broker/identity/webhooks.py`), made at
send time so a retry is never stale. Rows are claimed with `FOR UPDATE SKIP LOCKED` and a
claim lease on PostgreSQL, so replicas never push one message twice at once; failures are
retried with exponential backoff and jitter, and given up (`dead`, logged) after
`BROKER_OUTBOX_MAX_ATTEMPTS`.
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import threading
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlmodel import Session, col, or_, select

from broker.db import is_postgres, transaction, utcnow
from broker.identity.webhooks import HEADER, sign
from broker.models import OutboxMessage
from broker.runtime import Broker

log = logging.getLogger("broker.outbox")

MAX_BACKOFF_SECONDS = 3600


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def enqueue(db: Session, broker: Broker, type_: str, payload: dict[str, Any], now: datetime) -> str | None:
    """Add one message per configured destination to the caller's transaction; the event id."""
    urls = broker.settings.approval_webhook_url_list()
    if not urls:
        return None
    event_id = "evt_" + uuid.uuid4().hex
    body = json.dumps({"id": event_id, "type": type_, "occurred_at": _iso(now), **payload},
                      sort_keys=True, separators=(",", ":"), default=str)
    for url in urls:
        db.add(OutboxMessage(id="obx_" + secrets.token_hex(12), event_id=event_id, type=type_, url=url, body=body,
                             next_attempt_at=now, created_at=now))
    return event_id


def claim_due(broker: Broker, now: datetime, limit: int) -> list[OutboxMessage]:
    """Take due messages for this replica for one claim lease (SKIP LOCKED on PostgreSQL)."""
    until = now + timedelta(seconds=broker.settings.claim_seconds)
    with transaction(broker.engine) as db:
        stmt = (
            select(OutboxMessage)
            .where(OutboxMessage.status == "pending", col(OutboxMessage.next_attempt_at) <= now,
                   or_(col(OutboxMessage.claimed_until).is_(None), col(OutboxMessage.claimed_until) <= now))
            .order_by(col(OutboxMessage.next_attempt_at))
            .limit(limit)
        )
        if is_postgres(broker.engine):
            stmt = stmt.with_for_update(skip_locked=True)
        rows = list(db.exec(stmt).all())
        for row in rows:
            row.claimed_by, row.claimed_until = broker.replica_id, until
            db.add(row)
        return rows


def _finish(broker: Broker, message_id: str, error: str | None) -> None:
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.get(OutboxMessage, message_id, with_for_update=True)
        if row is None or row.status != "pending" or row.claimed_by != broker.replica_id:
            return  # our claim lapsed and another replica took it over
        row.attempts += 1
        row.claimed_by = row.claimed_until = None
        if error is None:
            row.status, row.delivered_at, row.last_error = "delivered", now, None
        elif row.attempts >= broker.settings.outbox_max_attempts:
            row.status, row.last_error = "dead", error[:512]
            log.error("notification %s (%s) to %s given up after %d attempts: %s",
                      row.event_id, row.type, row.url, row.attempts, error)
        else:
            backoff = min(MAX_BACKOFF_SECONDS, 2 ** row.attempts)
            row.next_attempt_at = now + timedelta(seconds=backoff * (0.5 + random.random() / 2))
            row.last_error = error[:512]
            log.warning("notification %s to %s failed (attempt %d): %s", row.event_id, row.url, row.attempts, error)
        db.add(row)


def deliver(broker: Broker, message: OutboxMessage, client: httpx.Client) -> str | None:
    """One push; None when the receiver took it (any 2xx), else what went wrong."""
    secret = broker.settings.approval_webhook_secret
    if secret is None:
        return "BROKER_APPROVAL_WEBHOOK_SECRET is not set"
    raw = message.body.encode()
    headers = {"Content-Type": "application/json", "X-Broker-Event": message.type,
               "X-Broker-Delivery": message.event_id, HEADER: sign(raw, secret.get_secret_value())}
    try:
        response = client.post(message.url, content=raw, headers=headers)
    except httpx.HTTPError as exc:
        return f"{exc.__class__.__name__}"
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}"


def deliver_due(broker: Broker, *, limit: int = 100) -> int:
    """One pass: claim what is due, push each, record the outcome. Returns how many were sent."""
    due = claim_due(broker, utcnow(), limit)
    if not due:
        return 0
    sent = 0
    with httpx.Client(timeout=broker.settings.outbox_timeout_seconds, follow_redirects=False) as client:
        for message in due:
            error = deliver(broker, message, client)
            _finish(broker, message.id, error)
            sent += error is None
    return sent


class OutboxDelivery:
    """The background loop, started in the app's lifespan beside the sweeper."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Something was just enqueued in this process: push now instead of at the next tick."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        interval = self._broker.settings.outbox_interval_seconds
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                deliver_due(self._broker)
            except Exception:  # one bad pass must not end delivery
                log.exception("outbox pass failed; next pass in %.1fs", interval)
            self._wake.wait(max(0.0, interval - (time.monotonic() - started)))
            self._wake.clear()
