"""Column helpers every table module shares."""

from __future__ import annotations

from typing import Any

from sqlmodel import Field

from broker.db import UTCDateTime


def ts(**kw: Any) -> Any:
    """A timezone-aware UTC timestamp column (`broker.db.UTCDateTime`)."""
    return Field(sa_type=UTCDateTime, **kw)
