"""Expired Idempotency-Keys deleted by the sweeper: a key outlives its lifetime nowhere, nor does
its sealed answer (which may hold a credential), and the table follows the traffic of the last
`idempotency_ttl_seconds` instead of growing with every request ever made.

A key is reused freely once expired (leases/idempotency.py deletes it on claim); this removes
the ones nobody reuses. A key still `in_progress` is left for an hour past its expiry: its owner
may be a slow request on another replica.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import and_, delete, or_, select, tuple_

from broker.db import transaction
from broker.lifecycle.reconciler import Every
from broker.models import IdempotencyRecord
from broker.runtime import Broker

PRUNE_INTERVAL_SECONDS = 10.0
IN_PROGRESS_GRACE = timedelta(hours=1)
_KEYS = IdempotencyRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation
_PRUNES = Every()


def prune_expired_keys(broker: Broker, now: datetime, batch: int, *, force: bool = False) -> int:
    """Delete expired keys in batches of `batch`; at most every PRUNE_INTERVAL_SECONDS per replica."""
    if not force and not _PRUNES.due(broker.replica_id, PRUNE_INTERVAL_SECONDS):
        return 0
    expired = or_(and_(_KEYS.c.state == "done", _KEYS.c.expires_at <= now),
                  _KEYS.c.expires_at <= now - IN_PROGRESS_GRACE)
    some = select(_KEYS.c.session_id, _KEYS.c.key).where(expired).limit(batch)
    # The condition is checked again on the row deleted: a key claimed afresh between the two
    # (deleted and inserted again by a new request) has a new expiry and is kept.
    statement = delete(_KEYS).where(expired, tuple_(_KEYS.c.session_id, _KEYS.c.key).in_(some))
    removed = 0
    while True:
        with transaction(broker.engine) as db:
            count = db.connection().execute(statement).rowcount or 0
        removed += count
        if count < batch:
            return removed
