"""The one way the broker writes a point in time: RFC 3339, UTC, whole seconds, `Z`.

API answers, audit details and log lines all use it, so a client parses one format. (The
audit record's own `timestamp` keeps microseconds, `rfc3339_precise`: it orders events.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import PlainSerializer, WithJsonSchema


def rfc3339(ts: datetime) -> str:
    """`2026-01-02T03:04:05Z`. A naive datetime is refused: every time here is UTC-aware."""
    if ts.tzinfo is None:
        raise ValueError("naive datetime: the broker keeps every time timezone-aware (UTC)")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_precise(ts: datetime) -> str:
    """`2026-01-02T03:04:05.123456Z`: for the audit record's own timestamp."""
    if ts.tzinfo is None:
        raise ValueError("naive datetime: the broker keeps every time timezone-aware (UTC)")
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# A datetime field of an API answer: always written by `rfc3339`, documented as date-time.
Timestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time", "examples": ["2026-01-02T03:04:05Z"]}),
]
