"""Leases: one row per capability, and `NewLease`, the columns a request writes before the row exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text
from sqlmodel import Field, SQLModel

from broker.models.columns import ts


class Lease(SQLModel, table=True):
    """One capability. `id` is the capability id (and the native token's jti)."""

    __tablename__ = "leases"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", index=True, max_length=64)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    tier: str = Field(max_length=32)
    provider: str = Field(max_length=32)
    # minting -> active -> revoked | expired ; minting -> failed ; active -> revoke_pending -> revoked | expired
    status: str = Field(default="minting", max_length=16)
    status_reason: str | None = Field(default=None, max_length=256)
    ttl_seconds: int
    purpose: str = Field(sa_column=Column(Text, nullable=False))
    tool: str | None = Field(default=None, max_length=128)
    parameters: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = ts()
    expires_at: datetime = ts()  # the lease's end: the sweeper revokes at this moment
    minted_at: datetime | None = ts(default=None)
    backend_expires_at: datetime | None = ts(default=None)
    ended_at: datetime | None = ts(default=None)
    handle: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # non-secret
    sealed_secret: str | None = Field(default=None, sa_column=Column(Text))  # AES-GCM, AD = id
    fingerprint: str | None = Field(default=None, max_length=80, index=True)  # RFC 7009 finds provider tokens by it
    revoke_reason: str | None = Field(default=None, max_length=128)  # why it is being revoked
    revoke_attempts: int = 0
    next_attempt_at: datetime | None = ts(default=None)
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = ts(default=None)
    # When the live permission re-check last asked the human's live source about this lease
    # (None: not since mint). Setting it is also how a replica claims the lease for a check.
    live_checked_at: datetime | None = ts(default=None)

    __table_args__ = (
        # The sweeper's only query: what is due, oldest first. Cost follows what expires.
        Index("ix_leases_status_expires", "status", "expires_at"),
        Index("ix_leases_session_status", "session_id", "status"),
        # Escalation: does the session hold a live lease of this tier? One index probe (0007).
        Index("ix_leases_session_tier_status", "session_id", "tier", "status"),
    )


@dataclass
class NewLease:
    """A lease as a request creates it, before its row exists: the columns it sets, in a plain
    dataclass (building the ORM object would cost more CPU than the INSERT that writes it). The
    columns it leaves out take their defaults. `store/sql.py` inserts it with Core SQL."""

    id: str
    session_id: str
    resource: str
    access: str
    tier: str
    provider: str
    status: str
    ttl_seconds: int
    purpose: str
    tool: str | None
    parameters: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime
    status_reason: str | None = None
    minted_at: datetime | None = None
    backend_expires_at: datetime | None = None
    ended_at: datetime | None = None
    handle: dict[str, Any] | None = None
    sealed_secret: str | None = None
    fingerprint: str | None = None
    revoke_attempts: int = 0
