"""Sessions: the row, the delta log its live count folds in, the request path's snapshot of it
(`AnySession`: either), and the refusals its deviation tripwire counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index
from sqlmodel import Field, SQLModel

from broker.models.columns import ts


class SessionRow(SQLModel, table=True):
    __tablename__ = "sessions"

    id: str = Field(primary_key=True, max_length=64)
    human: str = Field(max_length=320)
    agent: str = Field(max_length=128)
    task_id: str = Field(max_length=256, index=True)
    repository: str | None = Field(default=None, max_length=256)
    scope: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="active", max_length=16)  # active | ended
    created_by: str = Field(max_length=128)
    created_at: datetime = ts()
    expires_at: datetime = ts()
    ended_at: datetime | None = ts(default=None)
    end_reason: str | None = Field(default=None, max_length=128)
    issued_count: int = 0  # capabilities ever minted here: the issued budget counts these
    # Live leases (minting, active, revoke_pending), as of the last fold: the exact count is this
    # plus the session's rows in session_live_deltas (written by triggers on leases, 0009).
    live_count: int = 0
    # Stall (0010, broker/sessions/liveness.py): the idle timeout fixed at provision (None: none),
    # and the moment past which a silent session is ended. Moved forward by requests with the
    # session token at most once per granularity per replica, and by heartbeats.
    idle_timeout_seconds: int | None = None
    idle_until: datetime | None = ts(default=None)
    last_seen_at: datetime | None = ts(default=None)
    # Deviation (0010, broker/sessions/deviation.py): set while the tripwire holds the session;
    # no new capability is issued until a human resumes it.
    suspended_at: datetime | None = ts(default=None)
    suspend_reason: str | None = Field(default=None, max_length=128)

    __table_args__ = (Index("ix_sessions_status_expires", "status", "expires_at"),
                      Index("ix_sessions_status_idle", "status", "idle_until"))


class SessionLiveDelta(SQLModel, table=True):
    """+1 / -1 per lease entering or leaving the live statuses, inserted by database triggers
    on `leases` (migration 0009) whatever code path changes a lease. Insert-only for every writer
    but one: the request path, holding the session's row lock, folds a session's rows into
    `sessions.live_count`. So a live count costs what changed since the session's last request,
    not what it holds, and no path that ends leases locks a session row for it."""

    __tablename__ = "session_live_deltas"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(max_length=64, index=True)
    delta: int


@dataclass(frozen=True)
class SessionSnapshot:
    """A session as the request path reads it: under the row's lock, by Core SQL, tracked by no
    ORM session (building a SessionRow would cost more CPU than the SELECT that reads it). Read
    it; change the row with SQL. `row()`: the same values as a SessionRow outside any ORM
    session, for the code that takes one."""

    id: str
    human: str
    agent: str
    task_id: str
    repository: str | None
    scope: list[dict[str, Any]]
    labels: dict[str, str]
    status: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    issued_count: int
    idle_timeout_seconds: int | None = None
    idle_until: datetime | None = None
    last_seen_at: datetime | None = None
    suspended_at: datetime | None = None
    suspend_reason: str | None = None

    def row(self) -> SessionRow:
        return SessionRow(**vars(self))


# What only reads a session takes either: the ORM row, or the request path's snapshot.
AnySession = SessionRow | SessionSnapshot


class SessionRefusal(SQLModel, table=True):
    """One refusal that counts toward a session's deviation tripwire (scope, tier, escalation),
    written in the refusal's transaction. Counted over the policy's window; pruned with it."""

    __tablename__ = "session_refusals"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(max_length=64)
    reason: str = Field(max_length=64)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    at: datetime = ts()

    __table_args__ = (Index("ix_session_refusals_session_at", "session_id", "at"),)
