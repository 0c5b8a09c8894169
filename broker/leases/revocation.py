"""Revoking leases for real: claim, call the backend, then record what the backend confirmed.

A lease is claimed (`claimed_by`, `claimed_until`) in a short transaction that skips rows
another replica holds, so nothing is revoked twice; a replica that dies mid-way leaves a claim
that lapses and is taken over. A backend that refuses or cannot be reached leaves the lease
`revoke_pending`, retried with backoff, audited each time: it is never marked revoked on hope.
Leases of providers that mint locally (native) need no backend call and are finished inside
the claim transaction.

Two retry loops, for two kinds of trouble. A blip (one `ProviderUnavailable`) is retried in
process a few times within a second (tenacity). An outage outlasts that: the lease is left
`revoke_pending` with `next_attempt_at`, and the sweeper tries again with exponential backoff,
from whichever replica gets there first, across restarts.

A lease without a handle (revoked while minting, or its minting request died) is looked up at
the backend by capability id (`find_by_capability`, where the provider is `searchable`) and revoked
there; if the backend does not have it, the lease ends `expired` with a reason saying so. Such
a credential was never handed out: the handle and the response are written in one commit.

Here: the claim, the outcome recorded, the audit. The provider calls are `leases.backend`'s;
which leases are due for all this, `leases.due`'s.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from broker import security_events
from broker.audit.events import AgentRef, AuditEvent, GrantRef, RequestRef
from broker.audit.service import append, append_many
from broker.db import transaction, utcnow
from broker.errors import BrokerError
from broker.leases import receipts
from broker.leases.backend import Outcome, call_backend, mints_locally, revoke_target
from broker.leases.due import claimable, mint_abandoned
from broker.leases.receipts import RevocationReceipt
from broker.leases.vocabulary import LIVE, LeaseStatus
from broker.metrics import REVOKE_SECONDS, REVOKES, observe_expiry
from broker.models import Lease, SessionRow
from broker.providers.base import Revoked
from broker.runtime import Broker
from broker.times import rfc3339

log = logging.getLogger("broker.revocation")

MAX_BACKOFF_SECONDS = 300
# Backend revocations in flight at once (network-bound), and leases recorded per transaction.
REVOKE_CONCURRENCY = 8
RECORD_CHUNK = 200


@dataclass
class RevokeSummary:
    """Ids by what happened to their leases (`revoked`: finished, whatever the receipt says), and a
    receipt per capability saying what happened to its credential (`leases.receipts`)."""

    revoked: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    receipts: dict[str, RevocationReceipt] = field(default_factory=dict)

    def merge(self, other: RevokeSummary) -> None:
        self.revoked += other.revoked
        self.pending += other.pending
        self.skipped += other.skipped
        self.receipts.update(other.receipts)  # the later word on a capability is the truer one

    def receipt_list(self) -> list[RevocationReceipt]:
        return [self.receipts[i] for i in sorted(self.receipts)]


def backoff_seconds(attempt: int) -> float:
    """Exponential with full jitter (1, 2, 4 ... capped), so replicas do not retry in step."""
    ceiling = min(MAX_BACKOFF_SECONDS, 2 ** max(0, attempt - 1))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311  # retry jitter, not a secret


def final_status(reason: str) -> LeaseStatus:
    return LeaseStatus.EXPIRED if reason == "expired" else LeaseStatus.REVOKED


def _revoke_event(session: SessionRow | None, lease: Lease, type_: str, outcome: str, actor: str,
                  reason: str, detail: dict[str, object] | None = None) -> AuditEvent:
    return AuditEvent(
        type=type_,
        outcome=outcome,
        actor=actor,
        human_principal=session.human if session else None,
        agent=AgentRef.of(session, session_id=lease.session_id),
        request=RequestRef(operation="revoke", resource=lease.resource, access=lease.access, tier=lease.tier,
                           reason=reason),
        jit_grant=GrantRef.of(lease),
        detail=dict(detail or {}),
    )


def _sessions(db: Session, leases: Sequence[Lease]) -> dict[str, SessionRow]:
    ids = {lease.session_id for lease in leases}
    if not ids:
        return {}
    return {s.id: s for s in db.exec(select(SessionRow).where(col(SessionRow.id).in_(ids))).all()}


def finish_revocation(db: Session, lease: Lease, session: SessionRow | None, reason: str, actor: str, now: datetime,
                      *, detail: dict[str, object] | None = None, batch: list[AuditEvent] | None = None,
                      result: Revoked | None = None, said: str | None = None) -> RevocationReceipt:
    """The backend confirmed (`result`: what it said): the lease ends, its receipt goes into the audit."""
    lease.status = final_status(reason)
    lease.status_reason = reason
    lease.ended_at = now
    if reason == "expired":
        observe_expiry(lease, now)
    lease.sealed_secret = None  # nothing left to revoke with: the secret goes
    lease.claimed_by = lease.claimed_until = lease.next_attempt_at = None
    db.add(lease)
    receipt = receipts.finished(lease, result, now, detail=said)
    event = _revoke_event(session, lease, f"capability.{lease.status}", lease.status, actor, reason,
                          {**(detail or {}), "receipt": receipt.record()})
    batch.append(event) if batch is not None else append(db, event)
    return receipt


def finish_not_found(db: Session, lease: Lease, session: SessionRow | None, reason: str, actor: str, now: datetime,
                     *, natural_expiry: datetime, searchable: bool,
                     batch: list[AuditEvent] | None = None) -> RevocationReceipt:
    """Nothing to revoke at the backend: record that, and when anything there would die anyway."""
    note = f"not found at backend; expires naturally at {rfc3339(natural_expiry)}"
    lease.status = LeaseStatus.EXPIRED
    lease.status_reason = note[:256]
    lease.ended_at = now
    if reason == "expired":
        observe_expiry(lease, now)
    lease.sealed_secret = None
    lease.claimed_by = lease.claimed_until = lease.next_attempt_at = None
    db.add(lease)
    receipt = receipts.not_found(lease, natural_expiry, searchable)
    event = _revoke_event(session, lease, "capability.expired", "expired", actor, reason,
                          {"found_at_backend": False, "backend_searchable": searchable,
                           "natural_expiry": rfc3339(natural_expiry), "note": note, "receipt": receipt.record()})
    batch.append(event) if batch is not None else append(db, event)
    return receipt


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
    events: list[AuditEvent] = []
    with transaction(broker.engine) as db:
        stmt = (
            select(Lease)
            .where(col(Lease.id).in_(list(lease_ids)), col(Lease.status).in_(LIVE), claimable(now))
            .order_by(col(Lease.id))  # one lock order everywhere: no deadlocks between replicas
            .with_for_update(skip_locked=True)
        )
        leases = list(db.exec(stmt).all())
        sessions = _sessions(db, leases)
        found = {lease.id for lease in leases}
        summary.skipped += [i for i in lease_ids if i not in found]
        for lease in leases:
            why = ((lease.revoke_reason or reason) if use_lease_reason else reason)[:128]  # the column's width
            session = sessions.get(lease.session_id)
            if lease.status == LeaseStatus.MINTING and mint_abandoned(lease, broker, now):
                # The request that reserved it is gone: look for what it may have minted.
                why = (lease.revoke_reason or (reason if reason != "retry" else "mint-abandoned"))[:128]
                if mints_locally(broker, lease.provider):
                    # Minted and activated in one transaction: a lease still `minting` issued nothing.
                    summary.receipts[lease.id] = finish_revocation(
                        db, lease, session, why, actor, now, detail={"note": "minting request died"}, batch=events,
                        said="its minting request died before anything was issued")
                    summary.revoked.append(lease.id)
                    continue
                # revoke_pending + next_attempt_at now: if this replica dies too, the claim
                # lapses and the retry pass takes it over.
                lease.status, lease.next_attempt_at = LeaseStatus.REVOKE_PENDING, now
                lease.claimed_by = broker.replica_id
                lease.claimed_until = now + timedelta(seconds=broker.settings.claim_seconds)
                lease.revoke_reason = why
                db.add(lease)
                claimed.append((lease, session, why))
            elif lease.status == LeaseStatus.MINTING:
                # Its mint is still under way: the minting request sees this and revokes
                # what it gets; if that request died, the retry pass finds it by capability id.
                lease.status, lease.revoke_reason = LeaseStatus.REVOKE_PENDING, why
                lease.next_attempt_at = now + timedelta(seconds=broker.settings.claim_seconds)
                db.add(lease)
                receipt = receipts.pending(lease, "revoked while its mint is under way: the minting request revokes "
                                                  "what it gets; should it die, the retry finds it by capability id")
                events.append(_revoke_event(session, lease, "capability.revoke_pending", "revoke_pending", actor, why,
                                            {"note": "revoked while minting", "receipt": receipt.record()}))
                summary.pending.append(lease.id)
                summary.receipts[lease.id] = receipt
            elif mints_locally(broker, lease.provider):
                with REVOKE_SECONDS.labels(lease.provider).time():  # nothing to call: the row is the credential
                    # The provider only says what the mark amounts to (native: offline verifiers until exp).
                    result = broker.provider(lease.provider).revoke(revoke_target(lease, lease.handle or {}, None))
                    summary.receipts[lease.id] = finish_revocation(db, lease, session, why, actor, now, batch=events,
                                                                   result=result)
                security_events.capability_revoked(db, broker, session, lease, reason=why, actor=actor, now=now)
                REVOKES.labels(provider=lease.provider, outcome="revoked").inc()
                summary.revoked.append(lease.id)
            else:
                lease.claimed_by = broker.replica_id
                lease.claimed_until = now + timedelta(seconds=broker.settings.claim_seconds)
                lease.revoke_reason = why
                db.add(lease)
                claimed.append((lease, session, why))
        if summary.skipped:  # ended before, or another replica holds it: say which
            for row in db.exec(select(Lease).where(col(Lease.id).in_(summary.skipped))).all():
                summary.receipts[row.id] = receipts.untouched(row)
        append_many(db, events, now=now)  # the audit head is taken once, last
    if claimed:
        summary.merge(_revoke_claimed(broker, claimed, actor))
    return summary


def _revoke_claimed(broker: Broker, claimed: list[tuple[Lease, SessionRow | None, str]], actor: str) -> RevokeSummary:
    """Backend calls a few at a time (they are network-bound), outcomes recorded in chunks."""
    summary = RevokeSummary()
    width = min(REVOKE_CONCURRENCY, len(claimed))
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="revoke") as pool:
        outcomes = list(pool.map(lambda item: call_backend(broker, item[0]), claimed))
    for start in range(0, len(claimed), RECORD_CHUNK):
        chunk = list(zip(claimed[start:start + RECORD_CHUNK], outcomes[start:start + RECORD_CHUNK], strict=True))
        summary.merge(_record_outcomes(broker, chunk, actor))
    return summary


def _record_outcomes(broker: Broker, chunk: list[tuple[tuple[Lease, SessionRow | None, str], Outcome]],
                     actor: str) -> RevokeSummary:
    """What the backends said, in one transaction: never marked revoked unless confirmed."""
    summary = RevokeSummary()
    events: list[AuditEvent] = []
    now = utcnow()
    with transaction(broker.engine) as db:
        ids = sorted(lease.id for (lease, _, _), _ in chunk)
        rows = {row.id: row for row in db.exec(select(Lease).where(col(Lease.id).in_(ids)).order_by(Lease.id)
                                                .with_for_update()).all()}
        for (lease, session, reason), outcome in chunk:
            row = rows[lease.id]
            if row.claimed_by != broker.replica_id or row.status not in LIVE:
                summary.skipped.append(row.id)  # our claim lapsed and another replica took it
                summary.receipts[row.id] = receipts.untouched(row)
            elif outcome.error is None and outcome.missing is not None:
                summary.receipts[row.id] = finish_not_found(
                    db, row, session, reason, actor, now, natural_expiry=outcome.missing[0],
                    searchable=outcome.missing[1], batch=events)
                security_events.capability_revoked(db, broker, session, row, reason=reason, actor=actor, now=now)
                REVOKES.labels(provider=row.provider, outcome="not_found").inc()
                summary.revoked.append(row.id)
            elif outcome.error is None:
                if outcome.found is not None:
                    row.handle = {**outcome.found, "found_by_capability": True}
                summary.receipts[row.id] = finish_revocation(
                    db, row, session, reason, actor, now, batch=events, result=outcome.result,
                    detail={"found_by_capability": True} if outcome.found is not None else None)
                security_events.capability_revoked(db, broker, session, row, reason=reason, actor=actor, now=now)
                REVOKES.labels(provider=row.provider, outcome="revoked").inc()
                summary.revoked.append(row.id)
            else:
                row.status = LeaseStatus.REVOKE_PENDING
                row.revoke_attempts += 1
                row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.revoke_attempts))
                row.claimed_by = row.claimed_until = None
                error = outcome.error
                row.status_reason = error.code if isinstance(error, BrokerError) else error.__class__.__name__
                db.add(row)
                receipt = receipts.pending(row, f"the backend did not confirm ({row.status_reason}); the broker retries "
                                                f"(attempt {row.revoke_attempts} failed)", error=row.status_reason)
                summary.receipts[row.id] = receipt
                events.append(_revoke_event(session, row, "capability.revoke_failed", "revoke_pending", actor, reason,
                                            {"error": row.status_reason, "next_attempt_at": rfc3339(row.next_attempt_at),
                                             "receipt": receipt.record()}))
                REVOKES.labels(provider=row.provider, outcome="failed").inc()
                log.warning("revoke of %s failed (%s); retry #%d scheduled", row.id, row.status_reason,
                            row.revoke_attempts)
                summary.pending.append(row.id)
        append_many(db, events, now=now)
    return summary

