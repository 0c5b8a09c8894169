"""Messages out and requests in, each handled once: the outbox, idempotency keys, webhook
deliveries already processed and DPoP proofs already seen.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, Text
from sqlmodel import Field, SQLModel

from broker.models.columns import ts


class OutboxMessage(SQLModel, table=True):
    """A message to push, written in the transaction of the change it announces (broker/outbox.py).

    One row per (event, destination): each destination is retried on its own. `kind` says how
    it is sent: `approval` (HMAC-signed JSON notification; `body` is the exact JSON sent) or `set`
    (a Security Event Token; `body` is its claims, signed with the broker's key at send time).
    Signatures are made at send time so a retry is never stale.
    """

    __tablename__ = "outbox"

    id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(default="approval", max_length=16)  # approval | set (0008)
    event_id: str = Field(max_length=64)  # the same for every destination: receivers dedupe on it
    type: str = Field(max_length=64)
    receiver: str | None = Field(default=None, max_length=64)  # set: the configured receiver's name (0008)
    url: str = Field(sa_column=Column(Text, nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending | delivered | dead
    attempts: int = 0
    next_attempt_at: datetime = ts()
    last_error: str | None = Field(default=None, max_length=512)
    created_at: datetime = ts()
    delivered_at: datetime | None = ts(default=None)
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = ts(default=None)

    __table_args__ = (Index("ix_outbox_due", "status", "next_attempt_at"),)


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_keys"

    session_id: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=255)
    request_hash: str = Field(max_length=80)
    state: str = Field(default="in_progress", max_length=16)  # in_progress | done
    response_status: int | None = None
    sealed_response: str | None = Field(default=None, sa_column=Column(Text))  # may hold a credential
    created_at: datetime = ts()
    expires_at: datetime = ts(index=True)


class WebhookDelivery(SQLModel, table=True):
    """Event ids already processed: a replayed delivery is refused, a duplicate is a no-op."""

    __tablename__ = "webhook_deliveries"

    event_id: str = Field(primary_key=True, max_length=128)
    received_at: datetime = ts(index=True)


class DpopProofSeen(SQLModel, table=True):
    """RFC 9449 replay protection: each DPoP proof's `jti` (hashed) is accepted once, until its window closes."""

    __tablename__ = "dpop_proofs_seen"

    jti_hash: str = Field(primary_key=True, max_length=64)
    expires_at: datetime = ts(index=True)
