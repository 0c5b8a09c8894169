"""Idempotency-Key handling: one key, one outcome.

The key is claimed inside the decision's own transaction, after the session row is locked:
that lock already orders every request of a session, so a twin arriving second simply finds
the first one's outcome (or, for a remote mint still under way, waits for it). Same key with
a different body is 409. The stored outcome can hold a credential, so it is sealed (AES-256-GCM,
bound to session and key) and expires with the key. A 5xx outcome is not stored: the caller
may retry.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session

from broker.db import transaction
from broker.errors import BrokerError, Conflict, InvalidRequest
from broker.leases.outcomes import CapabilityIssued, CapabilityOutcome, PendingApproval
from broker.models import IdempotencyRecord
from broker.runtime import Broker

WAIT_SECONDS = 15.0
MAX_KEY_LENGTH = 255


class InProgress(Exception):
    """The key's first request is still minting at a remote backend: wait, then replay."""


def _aad(session_id: str, key: str) -> str:
    return f"idempotency:{session_id}:{key}"


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable characters", code="invalid-idempotency-key")


# How an outcome is stored: its HTTP status names its kind (the column predates the models).
_STORED_AS: dict[type[CapabilityIssued | PendingApproval], int] = {CapabilityIssued: 201, PendingApproval: 202}


def _replay(broker: Broker, row: IdempotencyRecord) -> CapabilityOutcome | None:
    """The stored outcome, or None while the first request is still under way. A stored
    refusal is raised again, as it was the first time."""
    if not (row.state == "done" and row.sealed_response and row.response_status):
        return None
    body: dict[str, Any] = json.loads(broker.sealer.unseal(row.sealed_response, _aad(row.session_id, row.key)))
    if row.response_status == _STORED_AS[CapabilityIssued]:
        return CapabilityIssued.model_validate(body)
    if row.response_status == _STORED_AS[PendingApproval]:
        return PendingApproval.model_validate(body)
    error = dict(body.get("error") or {})
    message, code = str(error.pop("message", "")), str(error.pop("code", "error"))
    raise BrokerError(message, code=code, status=row.response_status, **error)


def claim(db: Session, broker: Broker, session_id: str, key: str, request_hash: str,
          now: datetime) -> IdempotencyRecord | CapabilityOutcome:
    """Inside the caller's transaction, with the session row locked. Returns the stored outcome,
    or a new record the caller owns: not yet added, so an outcome known in this transaction is
    written once, complete (`finish`), and a remote mint adds it `in_progress` (`hold`).
    Raises InProgress, Conflict, or the stored refusal."""
    row = db.get(IdempotencyRecord, (session_id, key))
    if row is not None and row.expires_at <= now:
        db.delete(row)  # an expired key is free again
        db.flush()
        row = None
    if row is None:
        return IdempotencyRecord(
            session_id=session_id, key=key, request_hash=request_hash, created_at=now,
            expires_at=now + timedelta(seconds=broker.settings.idempotency_ttl_seconds),
        )
    if row.request_hash != request_hash:
        raise Conflict("this Idempotency-Key was used with a different request", code="idempotency-key-reused")
    replay = _replay(broker, row)
    if replay is None:
        raise InProgress
    return replay


def hold(db: Session, record: IdempotencyRecord) -> None:
    """The outcome comes in a later transaction: twins wait on this in_progress row."""
    db.add(record)


def wait_for(broker: Broker, session_id: str, key: str) -> CapabilityOutcome | None:
    """Poll until the owner finishes (its outcome) or gives up (None: claim the key again)."""
    deadline = time.monotonic() + WAIT_SECONDS
    delay = 0.01
    while True:
        with transaction(broker.engine) as db:
            row = db.get(IdempotencyRecord, (session_id, key))
            if row is None:
                return None
            replay = _replay(broker, row)
            if replay is not None:
                return replay
        if time.monotonic() > deadline:
            raise Conflict("a request with this Idempotency-Key is still in progress", code="idempotency-in-progress")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def finish(db: Session, broker: Broker, record: IdempotencyRecord | None,
           outcome: CapabilityOutcome | BrokerError) -> None:
    """Inside the caller's transaction, so the outcome and its record commit together."""
    if record is None:
        return
    if isinstance(outcome, BrokerError):
        status, body = outcome.status, outcome.to_body()
    else:
        status, body = _STORED_AS[type(outcome)], outcome.model_dump(mode="json")
    record.state = "done"
    record.response_status = status
    record.sealed_response = broker.sealer.seal(json.dumps(body), _aad(record.session_id, record.key))
    db.add(record)


def reload(db: Session, session_id: str, key: str | None) -> IdempotencyRecord | None:
    """The held record, in a later transaction."""
    return db.get(IdempotencyRecord, (session_id, key)) if key is not None else None


def abandon(broker: Broker, session_id: str, key: str) -> None:
    with transaction(broker.engine) as db:
        row = db.get(IdempotencyRecord, (session_id, key))
        if row is not None and row.state == "in_progress":
            db.delete(row)
