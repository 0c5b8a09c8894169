"""Shared Signals (SSF): the streams receivers configured, their subjects and the events queued for them.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from broker.models.columns import ts


class SsfStream(SQLModel, table=True):
    """An OpenID SSF 1.0 stream a receiver created: where and how its SETs go (broker/ssf/)."""

    __tablename__ = "ssf_streams"

    id: str = Field(primary_key=True, max_length=64)
    receiver: str = Field(max_length=63, index=True)  # the authenticated receiver that owns it
    audience: str = Field(max_length=255)
    description: str | None = Field(default=None, max_length=255)
    delivery_method: str = Field(max_length=64)  # urn:ietf:rfc:8935 (push) | urn:ietf:rfc:8936 (poll)
    endpoint_url: str | None = Field(default=None, max_length=2048)  # push only: the receiver's
    authorization_header: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # sealed
    events_requested: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    events_delivered: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="enabled", max_length=16)  # enabled | paused | disabled
    status_reason: str | None = Field(default=None, max_length=256)
    verified_at: datetime | None = ts(default=None)  # the last verification request: min_verification_interval
    created_at: datetime = ts()
    updated_at: datetime = ts()


class SsfSubject(SQLModel, table=True):
    """A subject a receiver added to its stream: only events about added subjects go to it."""

    __tablename__ = "ssf_subjects"
    __table_args__ = (UniqueConstraint("stream_id", "subject_key"),)

    id: int | None = Field(default=None, primary_key=True)
    stream_id: str = Field(max_length=64, index=True)
    subject_key: str = Field(max_length=1100)  # canonical JSON of the subject
    added_at: datetime = ts()


class SsfEvent(SQLModel, table=True):
    """A SET waiting for its stream: a poll stream's until acknowledged (RFC 8936), a paused
    push stream's until it is enabled again. The claims; signed when handed out."""

    __tablename__ = "ssf_events"

    jti: str = Field(primary_key=True, max_length=64)
    stream_id: str = Field(max_length=64, index=True)
    body: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = ts(index=True)
