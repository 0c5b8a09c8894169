"""Revoking leases for real: claim, call the backend, then record what the backend confirmed.

A lease is claimed (`claimed_by`, `claimed_until`) in a short transaction that skips rows
another replica holds, so nothing is revoked twice; a replica that dies mid-way leaves a claim
that lapses and is taken over. A backend that refuses or cannot be reached leaves the lease
`revoke_pending`, retried with backoff, audited each time: it is never marked revoked on hope.
Native leases need no backend call and are finished inside the claim transaction.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_
from sqlmodel import Session, col, select

from broker.audit.service import AuditEvent, append
from broker.db import is_postgres, transaction, utcnow
from broker.errors import BrokerError
from broker.models import Lease, SessionRow
from broker.providers.base import RevokeTarget
from broker.runtime import Broker

log = logging.getLogger("broker.revocation")

LIVE = ("minting", "active", "revoke_pending")
NO_BACKEND_CALL = {"native"}
MAX_BACKOFF_SECONDS = 300


@dataclass
class RevokeSummary:
    revoked: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def merge(self, other: RevokeSummary) -> None:
        self.revoked += other.revoked
        self.pending += other.pending
        self.skipped += other.skipped


def backoff_seconds(attempt: int) -> float:
    """Exponential with full jitter (1, 2, 4 ... capped), so replicas do not retry in step."""
    ceiling = min(MAX_BACKOFF_SECONDS, 2 ** max(0, attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def final_status(reason: str) -> str:
    return "expired" if reason == "expired" else "revoked"


def _claimable(now: datetime) -> object:
    return or_(col(Lease.claimed_until).is_(None), col(Lease.claimed_until) <= now)


def _revoke_event(session: SessionRow | None, lease: Lease, type_: str, outcome: str, actor: str,
                  reason: str, detail: dict[str, object] | None = None) -> AuditEvent:
    return AuditEvent(
        type=type_,
        outcome=outcome,
        human_principal=session.human if session else None,
        agent={"id": session.agent if session else None, "session_id": lease.session_id,
               "task_id": session.task_id if session else None},
        request={"tool": None, "operation": "revoke", "resource": lease.resource, "access": lease.access,
                 "tier": lease.tier, "parameters": None, "actor": actor, "reason": reason},
        policy_decision=None,
        jit_grant={"status": lease.status, "capability_id": lease.id, "provider": lease.provider,
                   "ttl_seconds": lease.ttl_seconds, "credential_fingerprint": lease.fingerprint,
                   "attempts": lease.revoke_attempts},
        detail=detail,
    )


def _sessions(db: Session, leases: Sequence[Lease]) -> dict[str, SessionRow]:
    ids = {lease.session_id for lease in leases}
    if not ids:
        return {}
    return {s.id: s for s in db.exec(select(SessionRow).where(col(SessionRow.id).in_(ids))).all()}


def finish_revocation(db: Session, lease: Lease, session: SessionRow | None, reason: str, actor: str, now: datetime) -> None:
    lease.status = final_status(reason)
    lease.status_reason = reason
    lease.ended_at = now
    lease.sealed_secret = None  # nothing left to revoke with: the secret goes
    lease.claimed_by = lease.claimed_until = lease.next_attempt_at = None
    db.add(lease)
    append(db, _revoke_event(session, lease, f"capability.{lease.status}", lease.status, actor, reason))


def revoke_leases(
    broker: Broker, lease_ids: Sequence[str], *, reason: str, actor: str, use_lease_reason: bool = False
) -> RevokeSummary:
    """Revoke each lease once. `use_lease_reason` keeps the reason recorded when it was first
    asked for (retries and taken-over claims)."""
    summary = RevokeSummary()
    if not lease_ids:
        return summary
    now = utcnow()
    claimed: list[tuple[Lease, SessionRow | None, str]] = []
    with transaction(broker.engine) as db:
        stmt = (
            select(Lease)
            .where(col(Lease.id).in_(list(lease_ids)), col(Lease.status).in_(LIVE), _claimable(now))
            .order_by(Lease.id)  # one lock order everywhere: no deadlocks between replicas
        )
        stmt = stmt.with_for_update(skip_locked=True) if is_postgres(broker.engine) else stmt
        leases = list(db.exec(stmt).all())
        sessions = _sessions(db, leases)
        found = {lease.id for lease in leases}
        summary.skipped += [i for i in lease_ids if i not in found]
        for lease in leases:
            why = (lease.revoke_reason or reason) if use_lease_reason else reason
            session = sessions.get(lease.session_id)
            if lease.status == "minting":
                # Its mint is still under way: the minting request sees this and revokes
                # what it gets; if that request died, the reconciler finishes it.
                lease.status, lease.revoke_reason = "revoke_pending", why
                lease.next_attempt_at = now + timedelta(seconds=broker.settings.claim_seconds)
                db.add(lease)
                append(db, _revoke_event(session, lease, "capability.revoke_pending", "revoke_pending", actor, why,
                                         {"note": "revoked while minting"}))
                summary.pending.append(lease.id)
            elif lease.provider in NO_BACKEND_CALL:
                finish_revocation(db, lease, session, why, actor, now)
                summary.revoked.append(lease.id)
            else:
                lease.claimed_by = broker.replica_id
                lease.claimed_until = now + timedelta(seconds=broker.settings.claim_seconds)
                lease.revoke_reason = why
                db.add(lease)
                claimed.append((lease, session, why))
    for lease, session, why in claimed:
        summary.merge(_revoke_at_backend(broker, lease, session, why, actor))
    return summary


def _revoke_at_backend(broker: Broker, lease: Lease, session: SessionRow | None, reason: str, actor: str) -> RevokeSummary:
    summary = RevokeSummary()
    error: BrokerError | Exception | None = None
    try:
        secret = broker.sealer.unseal(lease.sealed_secret, lease.id) if lease.sealed_secret else None
        broker.provider(lease.provider).revoke(
            RevokeTarget(
                capability_id=lease.id, session_id=lease.session_id, resource=lease.resource, access=lease.access,
                handle=lease.handle or {}, expires_at=lease.backend_expires_at or lease.expires_at,
                revocation_secret=secret,
            )
        )
    except Exception as exc:  # every failure, translated or not, keeps the lease visible
        error = exc
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.exec(select(Lease).where(Lease.id == lease.id).with_for_update()).one()
        if row.claimed_by != broker.replica_id or row.status not in LIVE:
            summary.skipped.append(row.id)  # our claim lapsed and another replica took it
            return summary
        if error is None:
            finish_revocation(db, row, session, reason, actor, now)
            summary.revoked.append(row.id)
        else:
            row.status = "revoke_pending"
            row.revoke_attempts += 1
            row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.revoke_attempts))
            row.claimed_by = row.claimed_until = None
            row.status_reason = getattr(error, "code", error.__class__.__name__)
            db.add(row)
            append(db, _revoke_event(session, row, "capability.revoke_failed", "revoke_pending", actor, reason,
                                     {"error": row.status_reason, "next_attempt_at": row.next_attempt_at.isoformat()}))
            log.warning("revoke of %s failed (%s); retry #%d scheduled", row.id, row.status_reason, row.revoke_attempts)
            summary.pending.append(row.id)
    return summary


def due_for_expiry(broker: Broker, now: datetime, limit: int) -> list[str]:
    with transaction(broker.engine) as db:
        return list(
            db.exec(
                select(Lease.id)
                .where(Lease.status == "active", Lease.expires_at <= now, _claimable(now))
                .order_by(Lease.expires_at)
                .limit(limit)
            ).all()
        )


def due_for_retry(broker: Broker, now: datetime, limit: int) -> list[str]:
    """revoke_pending whose backoff has passed, and claims a dead replica left behind."""
    with transaction(broker.engine) as db:
        pending = db.exec(
            select(Lease.id)
            .where(Lease.status == "revoke_pending", col(Lease.next_attempt_at) <= now, _claimable(now))
            .order_by(Lease.next_attempt_at)
            .limit(limit)
        ).all()
        lapsed = db.exec(
            select(Lease.id)
            .where(Lease.status == "active", col(Lease.claimed_until) <= now)
            .limit(limit)
        ).all()
    return list(pending) + list(lapsed)
