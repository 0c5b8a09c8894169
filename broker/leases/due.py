"""Which leases are due, as the sweeper and the reconciler ask: for expiry, for a revocation
retry, held by a lapsed claim or left `minting` by a request that died; and what a provider's
leftover-state cleanup may read (ended, recently revoked, live handles). Reads only.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, or_
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from broker.db import transaction
from broker.leases.vocabulary import LIVE, LeaseStatus
from broker.models import Lease
from broker.runtime import Broker

READ_CHUNK = 200  # capability ids per query


def claimable(now: datetime) -> ColumnElement[bool]:
    """No replica holds the lease, or its claim has lapsed."""
    return or_(col(Lease.claimed_until).is_(None), col(Lease.claimed_until) <= now)


def mint_abandoned(lease: Lease, broker: Broker, now: datetime) -> bool:
    """A `minting` lease older than a claim: the request that reserved it is presumed dead.

    If it is merely slow, nothing is lost: activation re-reads the lease under its row lock,
    finds it no longer `minting`, and revokes what it minted instead of handing it out.
    """
    return lease.status == LeaseStatus.MINTING and lease.created_at <= now - timedelta(seconds=broker.settings.claim_seconds)


def recently_revoked_resources(broker: Broker, provider: str, since: datetime, until: datetime) -> list[str]:
    """Resources of `provider`'s revoked leases whose credentials expired in [since, until]:
    where revocation state (AWS deny entries) may be left to prune, even after a restart."""
    with transaction(broker.engine) as db:
        return sorted(set(db.exec(
            select(Lease.resource).where(Lease.status == LeaseStatus.REVOKED, Lease.provider == provider,
                                         Lease.expires_at >= since, Lease.expires_at <= until)
        ).all()))


def ended_among(broker: Broker, provider: str, capability_ids: Sequence[str]) -> list[str]:
    """Those of `capability_ids` whose lease of `provider` has ended (revoked, expired, failed):
    their per-capability backend state may go. Unknown ids are not returned: what this broker
    did not mint it does not remove."""
    ended: list[str] = []
    wanted = sorted(set(capability_ids))
    for start in range(0, len(wanted), READ_CHUNK):
        chunk = wanted[start:start + READ_CHUNK]
        with transaction(broker.engine) as db:
            ended += db.exec(select(Lease.id).where(col(Lease.id).in_(chunk), Lease.provider == provider,
                                                    col(Lease.status).not_in(LIVE))).all()
    return sorted(ended)


def live_handles(broker: Broker, provider: str) -> list[dict[str, Any]]:
    """The backend handles of `provider`'s live leases (a `minting` lease has none yet)."""
    with transaction(broker.engine) as db:
        rows = db.exec(select(Lease.handle).where(Lease.provider == provider, col(Lease.status).in_(LIVE))).all()
    return [dict(h) for h in rows if h]


def _ids(broker: Broker, stmt: SelectOfScalar[str]) -> list[str]:
    with transaction(broker.engine) as db:
        return list(db.exec(stmt).all())


def due_for_expiry(broker: Broker, now: datetime, limit: int) -> list[str]:
    return _ids(broker, select(Lease.id)
                .where(Lease.status == LeaseStatus.ACTIVE, col(Lease.expires_at) <= now, claimable(now))
                .order_by(col(Lease.expires_at)).limit(limit))


def pending_retries(broker: Broker, now: datetime, limit: int) -> list[str]:
    """revoke_pending leases whose backoff has passed."""
    return _ids(broker, select(Lease.id)
                .where(Lease.status == LeaseStatus.REVOKE_PENDING, col(Lease.next_attempt_at) <= now, claimable(now))
                .order_by(col(Lease.next_attempt_at)).limit(limit))


def lapsed_claims(broker: Broker, now: datetime, limit: int) -> list[str]:
    """Active leases a dead replica had claimed for revocation."""
    return _ids(broker, select(Lease.id)
                .where(Lease.status == LeaseStatus.ACTIVE, col(Lease.claimed_until) <= now).limit(limit))


def abandoned_mints(broker: Broker, now: datetime, limit: int) -> list[str]:
    """`minting` leases older than a claim: the request that reserved them is presumed dead."""
    cutoff = now - timedelta(seconds=broker.settings.claim_seconds)
    return _ids(broker, select(Lease.id)
                .where(Lease.status == LeaseStatus.MINTING, col(Lease.created_at) <= cutoff, claimable(now))
                .order_by(col(Lease.created_at)).limit(limit))


def due_for_retry(broker: Broker, now: datetime, limit: int) -> list[str]:
    """What the sweeper retries every pass: pending revocations, lapsed claims, abandoned mints."""
    return pending_retries(broker, now, limit) + lapsed_claims(broker, now, limit) + abandoned_mints(broker, now, limit)
