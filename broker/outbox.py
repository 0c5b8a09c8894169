"""The outbox: messages written in the transaction of the change they announce, pushed later.

A row is added in the same transaction as the change, so a crash between the change and the
push loses nothing: the delivery loop (beside the sweeper) finds it, on this replica or another.
Each row is one message to one destination, of one `kind`, and each kind has its sender:

    approval   approval notifications, HMAC-signed JSON      broker/approvals/outbox.py
    set        Security Event Tokens, RFC 8935 push          broker/security_events.py

Delivery is at least once: a crash after the receiver's answer and before the row is marked
delivered sends it again, with the same event id (approval) or `jti` (set) to dedupe on. Rows
are claimed with `FOR UPDATE SKIP LOCKED` and a claim lease on PostgreSQL, so replicas never
push one message twice at once. A failure is retried with exponential backoff and jitter; a
refusal the receiver says is final (RFC 8935's 400) and the last of
`BROKER_OUTBOX_MAX_ATTEMPTS` attempts make the row `dead` (logged, counted).

The loop only claims the kinds it has a sender for; who sends what is wired in `broker/app.py`,
so this module imports none of the domains that write to it.
"""

from __future__ import annotations

import logging
import random
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import httpx
from sqlmodel import Session, col, or_, select

from broker.db import transaction, utcnow
from broker.metrics import OUTBOX_DELIVERIES
from broker.models import OutboxMessage
from broker.periodic import Periodic
from broker.runtime import Broker

log = logging.getLogger("broker.outbox")

MAX_BACKOFF_SECONDS = 3600
ERROR_WIDTH = 512  # the last_error column


@dataclass(frozen=True)
class Attempt:
    """What one push came to: delivered (`error` None), worth retrying, or refused for good."""

    error: str | None = None
    permanent: bool = False


DELIVERED = Attempt()


class Sender(Protocol):
    """Push one message; never raises for the receiver's trouble, says it in the Attempt."""

    def __call__(self, broker: Broker, message: OutboxMessage, client: httpx.Client) -> Attempt: ...


def add(db: Session, *, kind: str, event_id: str, type_: str, url: str, body: str, now: datetime,
        receiver: str | None = None) -> None:
    """One message for one destination, in the caller's transaction."""
    db.add(OutboxMessage(id="obx_" + secrets.token_hex(12), kind=kind, event_id=event_id, type=type_, url=url,
                         body=body, receiver=receiver, next_attempt_at=now, created_at=now))


def claim_due(broker: Broker, now: datetime, limit: int, kinds: Collection[str]) -> list[OutboxMessage]:
    """Take due messages of `kinds` for this replica for one claim lease (SKIP LOCKED on PostgreSQL)."""
    until = now + timedelta(seconds=broker.settings.claim_seconds)
    with transaction(broker.engine) as db:
        stmt = (
            select(OutboxMessage)
            .where(OutboxMessage.status == "pending", col(OutboxMessage.kind).in_(list(kinds)),
                   col(OutboxMessage.next_attempt_at) <= now,
                   or_(col(OutboxMessage.claimed_until).is_(None), col(OutboxMessage.claimed_until) <= now))
            .order_by(col(OutboxMessage.next_attempt_at))
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        rows = list(db.exec(stmt).all())
        for row in rows:
            row.claimed_by, row.claimed_until = broker.replica_id, until
            db.add(row)
        return rows


def finish(broker: Broker, message_id: str, attempt: Attempt) -> None:
    """Record one push's outcome: delivered, retried later with backoff, or dead."""
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.get(OutboxMessage, message_id, with_for_update=True)
        if row is None or row.status != "pending" or row.claimed_by != broker.replica_id:
            return  # our claim lapsed and another replica took it over
        row.attempts += 1
        row.claimed_by = row.claimed_until = None
        error = attempt.error
        if error is None:
            row.status, row.delivered_at, row.last_error = "delivered", now, None
            outcome = "delivered"
        elif attempt.permanent or row.attempts >= broker.settings.outbox_max_attempts:
            row.status, row.last_error = "dead", error[:ERROR_WIDTH]
            outcome = "dead"
            why = "refused for good" if attempt.permanent else f"given up after {row.attempts} attempts"
            log.error("%s %s (%s) to %s %s: %s", row.kind, row.event_id, row.type, row.url, why, error)
        else:
            backoff = min(MAX_BACKOFF_SECONDS, 2 ** row.attempts)
            jitter = 0.5 + random.random() / 2  # noqa: S311  # retry jitter spreads load, it is no secret
            row.next_attempt_at = now + timedelta(seconds=backoff * jitter)
            row.last_error = error[:ERROR_WIDTH]
            outcome = "failed"
            log.warning("%s %s to %s failed (attempt %d): %s", row.kind, row.event_id, row.url, row.attempts, error)
        db.add(row)
    OUTBOX_DELIVERIES.labels(kind=row.kind, outcome=outcome).inc()


def deliver_due(broker: Broker, senders: Mapping[str, Sender], *, limit: int = 100) -> int:
    """One pass: claim what is due (of the kinds in `senders`), push each, record the outcome.
    Returns how many were delivered."""
    due = claim_due(broker, utcnow(), limit, senders)
    if not due:
        return 0
    sent = 0
    with httpx.Client(timeout=broker.settings.outbox_timeout_seconds, follow_redirects=False) as client:
        for message in due:
            try:
                attempt = senders[message.kind](broker, message, client)
            except Exception as exc:  # a sender's bug must not strand the rest of the batch
                log.exception("sending %s %s failed", message.kind, message.event_id)
                attempt = Attempt(f"{exc.__class__.__name__} in the broker")
            finish(broker, message.id, attempt)
            sent += attempt.error is None
    return sent


def outbox_delivery(broker: Broker, senders: Mapping[str, Sender]) -> Periodic:
    """The delivery loop, started in the app's lifespan beside the sweeper; `wake()` after an
    enqueue pushes at once."""
    return Periodic("broker-outbox", broker.settings.outbox_interval_seconds, lambda: deliver_due(broker, senders), log)
