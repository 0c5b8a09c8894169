"""Idempotency-Key handling: one key, one outcome.

The first request with a key inserts a row (`in_progress`); a concurrent twin waits for it
to finish and replays the stored outcome; the same key with a different body is 409. The
stored outcome can hold a credential, so it is sealed (AES-256-GCM, bound to session and
key) and purged when the key expires. A 5xx outcome is not stored: the caller may retry.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from broker.db import transaction, utcnow
from broker.errors import Conflict, InvalidRequest
from broker.models import IdempotencyRecord
from broker.runtime import Broker

WAIT_SECONDS = 15.0
MAX_KEY_LENGTH = 255


def _aad(session_id: str, key: str) -> str:
    return f"idempotency:{session_id}:{key}"


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable characters", code="invalid-idempotency-key")


def begin(broker: Broker, session_id: str, key: str, request_hash: str) -> tuple[int, dict[str, Any]] | None:
    """None: this caller owns the key and must call `finish`. Otherwise the stored outcome."""
    check_key(key)
    now = utcnow()
    try:
        with transaction(broker.engine) as db:
            existing = db.get(IdempotencyRecord, (session_id, key))
            if existing is not None and existing.expires_at <= now:
                db.delete(existing)  # an expired key is free again
                db.flush()
                existing = None
            if existing is None:
                db.add(
                    IdempotencyRecord(
                        session_id=session_id,
                        key=key,
                        request_hash=request_hash,
                        created_at=now,
                        expires_at=now + timedelta(seconds=broker.settings.idempotency_ttl_seconds),
                    )
                )
                return None
    except IntegrityError:
        pass  # a concurrent twin inserted first: wait for its outcome below
    deadline = time.monotonic() + WAIT_SECONDS
    delay = 0.01
    while True:
        with transaction(broker.engine) as db:
            row = db.get(IdempotencyRecord, (session_id, key))
            if row is None:  # the owner gave up (5xx): take the key over
                return begin(broker, session_id, key, request_hash)
            if row.request_hash != request_hash:
                raise Conflict(
                    "this Idempotency-Key was used with a different request", code="idempotency-key-reused"
                )
            if row.state == "done" and row.sealed_response and row.response_status:
                body = json.loads(broker.sealer.unseal(row.sealed_response, _aad(session_id, key)))
                return row.response_status, body
        if time.monotonic() > deadline:
            raise Conflict("a request with this Idempotency-Key is still in progress", code="idempotency-in-progress")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def finish(db: Session, broker: Broker, session_id: str, key: str, status: int, body: dict[str, Any]) -> None:
    """Inside the caller's transaction, so the outcome and its record commit together."""
    row = db.get(IdempotencyRecord, (session_id, key))
    if row is None:
        return
    row.state = "done"
    row.response_status = status
    row.sealed_response = broker.sealer.seal(json.dumps(body), _aad(session_id, key))
    db.add(row)


def abandon(broker: Broker, session_id: str, key: str) -> None:
    with transaction(broker.engine) as db:
        row = db.get(IdempotencyRecord, (session_id, key))
        if row is not None and row.state == "in_progress":
            db.delete(row)
