"""Approval notifications through the outbox (broker/outbox.py): written with the change they
announce, pushed later, signed at send time.

    POST <url>
    Content-Type: application/json
    X-Broker-Event: approval.requested | approval.decided
    X-Broker-Signature: t=<unix>,v1=<hex hmac-sha256(secret, "<t>.<raw body>")>

The signature is the orchestrator webhook's scheme (`broker/identity/webhooks.py`), made at
send time so a retry is never stale. Each message carries an event `id` the receiver dedupes
on; any 2xx is taken as delivered, anything else is retried with backoff until
`BROKER_OUTBOX_MAX_ATTEMPTS` (then `dead`, logged).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import httpx
from sqlmodel import Session

from broker import outbox
from broker.identity.webhooks import HEADER, sign
from broker.models import OutboxMessage
from broker.runtime import Broker

KIND = "approval"


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
        outbox.add(db, kind=KIND, event_id=event_id, type_=type_, url=url, body=body, now=now)
    return event_id


def deliver(broker: Broker, message: OutboxMessage, client: httpx.Client) -> outbox.Attempt:
    """One push; delivered when the receiver took it (any 2xx)."""
    secret = broker.settings.approval_webhook_secret
    if secret is None:
        return outbox.Attempt("BROKER_APPROVAL_WEBHOOK_SECRET is not set")
    raw = message.body.encode()
    headers = {"Content-Type": "application/json", "X-Broker-Event": message.type,
               "X-Broker-Delivery": message.event_id, HEADER: sign(raw, secret.get_secret_value())}
    try:
        response = client.post(message.url, content=raw, headers=headers)
    except httpx.HTTPError as exc:
        return outbox.Attempt(f"{exc.__class__.__name__}")
    if 200 <= response.status_code < 300:
        return outbox.DELIVERED
    return outbox.Attempt(f"HTTP {response.status_code}")


def deliver_due(broker: Broker, *, limit: int = 100) -> int:
    """One pass over approval notifications alone (the app's loop sends every kind)."""
    return outbox.deliver_due(broker, {KIND: deliver}, limit=limit)
