"""Approvals and what hangs off them: the votes, break-glass post-reviews and grants
(approvals given in advance).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, Index, Text
from sqlmodel import Field, SQLModel

from broker.models.columns import ts


class Approval(SQLModel, table=True):
    __tablename__ = "approvals"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", index=True, max_length=64)
    request_hash: str = Field(max_length=80)  # binds the approval to the exact request
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    tier: str = Field(max_length=32)
    ttl_seconds: int
    purpose: str = Field(sa_column=Column(Text, nullable=False))
    tool: str | None = Field(default=None, max_length=128)
    parameters: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    reason: str = Field(max_length=64)  # approval-required | escalation-requires-approval
    approvers: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending | approved | denied | expired | used
    created_at: datetime = ts()
    expires_at: datetime = ts()
    decided_by: str | None = Field(default=None, max_length=320)
    decided_at: datetime | None = ts(default=None)
    # Added by 0003: what the approver is shown, and how the approval was used.
    human: str | None = Field(default=None, max_length=320)  # the session's delegating human
    binding_message: str | None = Field(default=None, sa_column=Column(Text))
    min_approvals: int = 1  # distinct approvers needed, from the tier at request time
    decision_reason: str | None = Field(default=None, sa_column=Column(Text))  # the deny's (or last approve's) reason
    used_at: datetime | None = ts(default=None)
    capability_id: str | None = Field(default=None, max_length=64)  # the capability it was used for
    justification: str | None = Field(default=None, sa_column=Column(Text))  # break-glass: the agent's written reason (0010)

    __table_args__ = (Index("ix_approvals_status", "status", "expires_at"),)


class BreakGlassReview(SQLModel, table=True):
    """The post-review of one break-glass use (broker/breakglass/): opened at the mint, closed by
    a reviewer with a verdict; open past `due_at` it is overdue (metric, audit)."""

    __tablename__ = "breakglass_reviews"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(max_length=64, index=True)
    approval_id: str = Field(max_length=64)
    capability_id: str = Field(max_length=64)
    human: str = Field(max_length=320)
    agent: str = Field(max_length=128)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    justification: str = Field(sa_column=Column(Text, nullable=False))
    approved_by: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    reviewers: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="open", max_length=16)  # open | closed
    used_at: datetime = ts()
    due_at: datetime = ts()
    overdue_noted_at: datetime | None = ts(default=None)  # when the audit was told it is overdue
    verdict: str | None = Field(default=None, max_length=32)  # appropriate | inappropriate
    note: str | None = Field(default=None, sa_column=Column(Text))
    closed_by: str | None = Field(default=None, max_length=320)
    closed_at: datetime | None = ts(default=None)

    __table_args__ = (Index("ix_breakglass_reviews_status_due", "status", "due_at"),)


class ApprovalDecision(SQLModel, table=True):
    """One human's vote on one approval; the primary key makes N approvals N distinct people."""

    __tablename__ = "approval_decisions"

    approval_id: str = Field(primary_key=True, foreign_key="approvals.id", max_length=64)
    approver: str = Field(primary_key=True, max_length=320)  # lowercased email
    decision: str = Field(max_length=16)  # approve | deny
    reason: str | None = Field(default=None, sa_column=Column(Text))
    decided_at: datetime = ts()


class JitGrant(SQLModel, table=True):
    """A human's pre-approval of (resource, access) for one session, good for `uses` capabilities."""

    __tablename__ = "grants"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", max_length=64)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    tier: str = Field(max_length=32)
    granted_by: str = Field(max_length=320)
    uses: int
    uses_left: int
    status: str = Field(default="active", max_length=16)  # active | used_up | expired | revoked
    reason: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = ts()
    expires_at: datetime = ts()  # the pre-approval's end; nothing minted under it outlives it

    __table_args__ = (Index("ix_grants_session_match", "session_id", "resource", "access", "status"),)
