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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlmodel import Session

from broker.db import transaction
from broker.errors import BrokerError, Conflict, InvalidRequest
from broker.leases.outcomes import CapabilityIssued, CapabilityOutcome, PendingApproval
from broker.models import IdempotencyRecord
from broker.runtime import Broker
from broker.store.sql import INSERT_KEY

WAIT_SECONDS = 15.0
MAX_KEY_LENGTH = 255


class InProgress(Exception):
    """The key's first request is still minting at a remote backend: wait, then replay."""


@dataclass
class Ticket:
    """A claimed key, owned by the request that claimed it. `stored`: its row exists already
    (held `in_progress` for a remote mint), so finishing it updates the row, else inserts it."""

    session_id: str
    key: str
    request_hash: str
    created_at: datetime
    expires_at: datetime
    stored: bool = False


# Core statements on the request path (the ORM's identity map and unit of work cost more CPU
# than the one row each of them touches), built once so their compiled form is cached.
_KEYS = IdempotencyRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation
_THIS_KEY = (_KEYS.c.session_id == bindparam("s")) & (_KEYS.c.key == bindparam("k"))
_GET = select(_KEYS.c.request_hash, _KEYS.c.state, _KEYS.c.response_status, _KEYS.c.sealed_response,
              _KEYS.c.expires_at).where(_THIS_KEY)
_DELETE = delete(_KEYS).where(_THIS_KEY)
_ABANDON = _DELETE.where(_KEYS.c.state == "in_progress")
_STORE = update(_KEYS).where(_THIS_KEY).values(state=bindparam("state"), response_status=bindparam("status"),
                                              sealed_response=bindparam("sealed"))


def _aad(session_id: str, key: str) -> str:
    return f"idempotency:{session_id}:{key}"


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest("Idempotency-Key must be 1-255 printable characters", code="invalid-idempotency-key")


# How an outcome is stored: its HTTP status names its kind (the column predates the models).
_STORED_AS: dict[type[CapabilityIssued | PendingApproval], int] = {CapabilityIssued: 201, PendingApproval: 202}


def _replay(broker: Broker, session_id: str, key: str, state: str, status: int | None,
            sealed: str | None) -> CapabilityOutcome | None:
    """The stored outcome, or None while the first request is still under way. A stored
    refusal is raised again, as it was the first time."""
    if not (state == "done" and sealed and status):
        return None
    body: dict[str, Any] = json.loads(broker.sealer.unseal(sealed, _aad(session_id, key)))
    if status == _STORED_AS[CapabilityIssued]:
        return CapabilityIssued.model_validate(body)
    if status == _STORED_AS[PendingApproval]:
        return PendingApproval.model_validate(body)
    error = dict(body.get("error") or {})
    message, code = str(error.pop("message", "")), str(error.pop("code", "error"))
    raise BrokerError(message, code=code, status=status, **error)


def claim(db: Session, broker: Broker, session_id: str, key: str, request_hash: str,
          now: datetime) -> Ticket | CapabilityOutcome:
    """Inside the caller's transaction, with the session row locked. Returns the stored outcome,
    or a ticket the caller owns: no row yet, so an outcome known in this transaction is
    written once, complete (`finish`), and a remote mint stores it `in_progress` (`hold`).
    Raises InProgress, Conflict, or the stored refusal."""
    conn = db.connection()
    row = conn.execute(_GET, {"s": session_id, "k": key}).first()
    if row is not None and row.expires_at <= now:
        conn.execute(_DELETE, {"s": session_id, "k": key})  # an expired key is free again
        row = None
    if row is None:
        return new_ticket(broker, session_id, key, request_hash, now)
    if row.request_hash != request_hash:
        raise Conflict("this Idempotency-Key was used with a different request", code="idempotency-key-reused")
    replay = _replay(broker, session_id, key, row.state, row.response_status, row.sealed_response)
    if replay is None:
        raise InProgress
    return replay


def new_ticket(broker: Broker, session_id: str, key: str, request_hash: str, now: datetime) -> Ticket:
    """A key no row holds yet, as its first request owns it."""
    return Ticket(session_id=session_id, key=key, request_hash=request_hash, created_at=now,
                  expires_at=now + timedelta(seconds=broker.settings.idempotency_ttl_seconds))


def held_row(ticket: Ticket) -> dict[str, Any]:
    """`INSERT_KEY`'s parameters for a key held `in_progress` while a remote backend mints."""
    return _row(ticket, "in_progress")


def sealed_outcome(broker: Broker, ticket: Ticket, outcome: CapabilityOutcome | BrokerError) -> tuple[int, str]:
    """What a held key stores when its request is answered: (HTTP status, sealed body)."""
    return _sealed(broker, ticket, outcome)


def row_of(params: dict[str, Any]) -> dict[str, Any]:
    """`finished_row`'s parameters as the row's columns, for a store that writes the row itself."""
    return {name.removeprefix("key_"): value for name, value in params.items()}


def _row(ticket: Ticket, state: str, status: int | None = None, sealed: str | None = None) -> dict[str, Any]:
    return {"key_session_id": ticket.session_id, "key_key": ticket.key, "key_request_hash": ticket.request_hash,
            "key_state": state, "key_response_status": status, "key_sealed_response": sealed,
            "key_created_at": ticket.created_at, "key_expires_at": ticket.expires_at}


def hold(db: Session, ticket: Ticket) -> None:
    """The outcome comes in a later transaction: twins wait on this in_progress row."""
    db.connection().execute(INSERT_KEY, _row(ticket, "in_progress"))
    ticket.stored = True


def wait_for(broker: Broker, session_id: str, key: str) -> CapabilityOutcome | None:
    """Poll until the owner finishes (its outcome) or gives up (None: claim the key again)."""
    deadline = time.monotonic() + WAIT_SECONDS
    delay = 0.01
    while True:
        with transaction(broker.engine) as db:
            row = db.connection().execute(_GET, {"s": session_id, "k": key}).first()
            if row is None:
                return None
            replay = _replay(broker, session_id, key, row.state, row.response_status, row.sealed_response)
            if replay is not None:
                return replay
        if time.monotonic() > deadline:
            raise Conflict("a request with this Idempotency-Key is still in progress", code="idempotency-in-progress")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _sealed(broker: Broker, ticket: Ticket, outcome: CapabilityOutcome | BrokerError) -> tuple[int, str]:
    if isinstance(outcome, BrokerError):
        status, body = outcome.status, outcome.to_body()
    else:
        status, body = _STORED_AS[type(outcome)], outcome.model_dump(mode="json")
    return status, broker.sealer.seal(json.dumps(body), _aad(ticket.session_id, ticket.key))


def finish(db: Session, broker: Broker, ticket: Ticket | None,
           outcome: CapabilityOutcome | BrokerError) -> None:
    """Inside the caller's transaction, so the outcome and its record commit together."""
    if ticket is None:
        return
    if ticket.stored:
        status, sealed = _sealed(broker, ticket, outcome)
        db.connection().execute(_STORE, {"s": ticket.session_id, "k": ticket.key, "state": "done", "status": status,
                                         "sealed": sealed})
    else:
        db.connection().execute(INSERT_KEY, finished_row(broker, ticket, outcome))
        ticket.stored = True


def finished_row(broker: Broker, ticket: Ticket, outcome: CapabilityOutcome | BrokerError) -> dict[str, Any]:
    """`INSERT_KEY`'s parameters: a new key's row with its outcome, for a caller that writes it in
    its own statement, in the same transaction as the outcome (as `finish` would)."""
    if ticket.stored:
        raise RuntimeError("a held key is finished with finish()")
    status, sealed = _sealed(broker, ticket, outcome)
    return _row(ticket, "done", status, sealed)


def reload(db: Session, session_id: str, key: str | None) -> Ticket | None:
    """The held ticket, in a later transaction."""
    if key is None:
        return None
    row = db.get(IdempotencyRecord, (session_id, key))
    if row is None:
        return None
    return Ticket(session_id=session_id, key=key, request_hash=row.request_hash, created_at=row.created_at,
                  expires_at=row.expires_at, stored=True)


def abandon(broker: Broker, session_id: str, key: str) -> None:
    with transaction(broker.engine) as db:
        db.connection().execute(_ABANDON, {"s": session_id, "k": key})
