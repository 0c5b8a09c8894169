"""Revoking leases for real: claim, call the backend, then record what the backend confirmed.

A lease is claimed (`claimed_by`, `claimed_until`) in a short transaction that skips rows
another replica holds, so nothing is revoked twice; a replica that dies mid-way leaves a claim
that lapses and is taken over. A backend that refuses or cannot be reached leaves the lease
`revoke_pending`, retried with backoff, audited each time: it is never marked revoked on hope.
Native leases need no backend call and are finished inside the claim transaction.

Two retry loops, for two kinds of trouble. A blip (one `ProviderUnavailable`) is retried in
process a few times within a second (tenacity). An outage outlasts that: the lease is left
`revoke_pending` with `next_attempt_at`, and the sweeper tries again with exponential backoff,
from whichever replica gets there first, across restarts.

A lease without a handle (revoked while minting, or its minting request died) is looked up at
the backend by capability id (`find_by_capability`, where the provider has one) and revoked
there; if the backend does not have it, the lease ends `expired` with a reason saying so. Such
a credential was never handed out: the handle and the response are written in one commit.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import or_
from sqlmodel import Session, col, select
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from broker.audit.service import AuditEvent, append, append_many
from broker.db import advisory_lock, is_postgres, transaction, utcnow
from broker.errors import ProviderUnavailable
from broker.metrics import REVOKE_SECONDS, REVOKES, observe_expiry
from broker.models import Lease, SessionRow
from broker.providers.base import Provider, RevokeTarget
from broker.runtime import Broker

log = logging.getLogger("broker.revocation")
T = TypeVar("T")

LIVE = ("minting", "active", "revoke_pending")
NO_BACKEND_CALL = {"native"}
MAX_BACKOFF_SECONDS = 300
# Backend revocations in flight at once (network-bound), and leases recorded per transaction.
REVOKE_CONCURRENCY = 8
RECORD_CHUNK = 200
# The in-process retry around one backend call: a blip, not an outage (that is next_attempt_at's).
BLIP_ATTEMPTS = 3
BLIP_WAIT_INITIAL_SECONDS = 0.1
BLIP_WAIT_MAX_SECONDS = 1.0
BLIP_JITTER_SECONDS = 0.1


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


def mint_abandoned(lease: Lease, broker: Broker, now: datetime) -> bool:
    """A `minting` lease older than a claim: the request that reserved it is presumed dead.

    If it is merely slow, nothing is lost: activation re-reads the lease under its row lock,
    finds it no longer `minting`, and revokes what it minted instead of handing it out.
    """
    return lease.status == "minting" and lease.created_at <= now - timedelta(seconds=broker.settings.claim_seconds)


def backend_call(fn: Callable[[], T], what: str) -> T:
    """One backend call, retried briefly when the backend is unavailable (never when it refuses)."""
    retrying = Retrying(
        retry=retry_if_exception_type(ProviderUnavailable),
        stop=stop_after_attempt(BLIP_ATTEMPTS),
        # 0.1 s, 0.2 s ... plus jitter (spelled out: wait_exponential_jitter renamed its knobs in 9.x)
        wait=wait_exponential(multiplier=BLIP_WAIT_INITIAL_SECONDS, max=BLIP_WAIT_MAX_SECONDS)
        + wait_random(0, BLIP_JITTER_SECONDS),
        reraise=True,
        before_sleep=lambda state: log.info("%s: backend unavailable (attempt %d), retrying", what,
                                            state.attempt_number),
    )
    return retrying(fn)


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


def finish_revocation(db: Session, lease: Lease, session: SessionRow | None, reason: str, actor: str, now: datetime,
                      *, detail: dict[str, object] | None = None, batch: list[AuditEvent] | None = None) -> None:
    lease.status = final_status(reason)
    lease.status_reason = reason
    lease.ended_at = now
    if reason == "expired":
        observe_expiry(lease, now)
    lease.sealed_secret = None  # nothing left to revoke with: the secret goes
    lease.claimed_by = lease.claimed_until = lease.next_attempt_at = None
    db.add(lease)
    event = _revoke_event(session, lease, f"capability.{lease.status}", lease.status, actor, reason, detail)
    batch.append(event) if batch is not None else append(db, event)


def finish_not_found(db: Session, lease: Lease, session: SessionRow | None, reason: str, actor: str, now: datetime,
                     *, natural_expiry: datetime, searchable: bool, batch: list[AuditEvent] | None = None) -> None:
    """Nothing to revoke at the backend: record that, and when anything there would die anyway."""
    note = f"not found at backend; expires naturally at {natural_expiry.strftime('%Y-%m-%dT%H:%M:%SZ')}"
    lease.status = "expired"
    lease.status_reason = note[:256]
    lease.ended_at = now
    if reason == "expired":
        observe_expiry(lease, now)
    lease.sealed_secret = None
    lease.claimed_by = lease.claimed_until = lease.next_attempt_at = None
    db.add(lease)
    event = _revoke_event(session, lease, "capability.expired", "expired", actor, reason,
                          {"found_at_backend": False, "backend_searchable": searchable,
                           "natural_expiry": natural_expiry.isoformat(), "note": note})
    batch.append(event) if batch is not None else append(db, event)


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
            .where(col(Lease.id).in_(list(lease_ids)), col(Lease.status).in_(LIVE), _claimable(now))
            .order_by(Lease.id)  # one lock order everywhere: no deadlocks between replicas
        )
        stmt = stmt.with_for_update(skip_locked=True) if is_postgres(broker.engine) else stmt
        leases = list(db.exec(stmt).all())
        sessions = _sessions(db, leases)
        found = {lease.id for lease in leases}
        summary.skipped += [i for i in lease_ids if i not in found]
        for lease in leases:
            why = ((lease.revoke_reason or reason) if use_lease_reason else reason)[:128]  # the column's width
            session = sessions.get(lease.session_id)
            if lease.status == "minting" and mint_abandoned(lease, broker, now):
                # The request that reserved it is gone: look for what it may have minted.
                why = (lease.revoke_reason or (reason if reason != "retry" else "mint-abandoned"))[:128]
                if lease.provider in NO_BACKEND_CALL:
                    finish_revocation(db, lease, session, why, actor, now, detail={"note": "minting request died"},
                                      batch=events)
                    summary.revoked.append(lease.id)
                    continue
                # revoke_pending + next_attempt_at now: if this replica dies too, the claim
                # lapses and the retry pass takes it over.
                lease.status, lease.next_attempt_at = "revoke_pending", now
                lease.claimed_by = broker.replica_id
                lease.claimed_until = now + timedelta(seconds=broker.settings.claim_seconds)
                lease.revoke_reason = why
                db.add(lease)
                claimed.append((lease, session, why))
            elif lease.status == "minting":
                # Its mint is still under way: the minting request sees this and revokes
                # what it gets; if that request died, the retry pass finds it by capability id.
                lease.status, lease.revoke_reason = "revoke_pending", why
                lease.next_attempt_at = now + timedelta(seconds=broker.settings.claim_seconds)
                db.add(lease)
                events.append(_revoke_event(session, lease, "capability.revoke_pending", "revoke_pending", actor, why,
                                            {"note": "revoked while minting"}))
                summary.pending.append(lease.id)
            elif lease.provider in NO_BACKEND_CALL:
                with REVOKE_SECONDS.labels(lease.provider).time():  # nothing to call: the row is the credential
                    finish_revocation(db, lease, session, why, actor, now, batch=events)
                REVOKES.labels(provider=lease.provider, outcome="revoked").inc()
                summary.revoked.append(lease.id)
            else:
                lease.claimed_by = broker.replica_id
                lease.claimed_until = now + timedelta(seconds=broker.settings.claim_seconds)
                lease.revoke_reason = why
                db.add(lease)
                claimed.append((lease, session, why))
        append_many(db, events, now=now)  # the audit head is taken once, last
    if claimed:
        summary.merge(_revoke_claimed(broker, claimed, actor))
    return summary


def _revoke_claimed(broker: Broker, claimed: list[tuple[Lease, SessionRow | None, str]], actor: str) -> RevokeSummary:
    """Backend calls a few at a time (they are network-bound), outcomes recorded in chunks."""
    summary = RevokeSummary()
    width = min(REVOKE_CONCURRENCY, len(claimed))
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="revoke") as pool:
        outcomes = list(pool.map(lambda item: _call_backend(broker, item[0]), claimed))
    for start in range(0, len(claimed), RECORD_CHUNK):
        chunk = list(zip(claimed[start:start + RECORD_CHUNK], outcomes[start:start + RECORD_CHUNK]))
        summary.merge(_record_outcomes(broker, chunk, actor))
    return summary


def _finder(provider: Provider) -> Callable[[Lease], dict[str, Any] | None] | None:
    """`find_by_capability(capability_id[, resource=...])` where the provider has one."""
    find = getattr(provider, "find_by_capability", None)
    if find is None:
        return None
    wants_resource = "resource" in inspect.signature(find).parameters  # AWS derives the session from it

    def locate(lease: Lease) -> dict[str, Any] | None:
        found = find(lease.id, resource=lease.resource) if wants_resource else find(lease.id)
        return dict(found) if found else None

    return locate


def _natural_expiry(broker: Broker, provider: Provider | None, lease: Lease, searchable: bool) -> datetime:
    """When a credential we cannot see would die on its own."""
    known = lease.backend_expires_at or lease.expires_at
    if searchable or provider is None:
        return max(known, lease.expires_at)
    try:  # unsearchable backends (GitHub's fixed hour): their own upper bound from the mint's start
        bound = provider.ttl_bounds(lease.resource, {}).max_seconds
    except Exception:
        return max(known, lease.expires_at)
    slack = timedelta(seconds=broker.settings.provider_timeout_seconds)
    return max(known, lease.expires_at, lease.created_at + timedelta(seconds=bound) + slack)


def _serialised(broker: Broker, provider: Provider, resource: str) -> Any:
    """Backends whose revocation is read-modify-write of shared state (AWS: one deny policy per
    role) name a lock key; replicas take it in turn so no revocation overwrites another."""
    key_of = getattr(provider, "revocation_lock_key", None)
    return advisory_lock(broker.engine, key_of(resource)) if key_of else nullcontext()


@dataclass
class _Outcome:
    error: Exception | None = None
    found: dict[str, Any] | None = None  # a handle found at the backend for a handle-less lease
    missing: tuple[datetime, bool] | None = None  # (natural expiry, searchable): nothing to revoke


def _call_backend(broker: Broker, lease: Lease) -> _Outcome:
    outcome = _Outcome()
    try:
        provider = broker.provider(lease.provider)
        handle = lease.handle or None
        if handle is None and not lease.sealed_secret:
            locate = _finder(provider)
            outcome.found = backend_call(lambda: locate(lease), f"find {lease.id}") if locate else None
            if outcome.found is None:
                outcome.missing = (_natural_expiry(broker, provider, lease, locate is not None), locate is not None)
            handle = outcome.found
        if handle is not None or lease.sealed_secret:
            secret = broker.sealer.unseal(lease.sealed_secret, lease.id) if lease.sealed_secret else None
            target = RevokeTarget(
                capability_id=lease.id, session_id=lease.session_id, resource=lease.resource, access=lease.access,
                handle=handle or {}, expires_at=lease.backend_expires_at or lease.expires_at,
                revocation_secret=secret,
            )
            with _serialised(broker, provider, lease.resource), REVOKE_SECONDS.labels(lease.provider).time():
                backend_call(lambda: provider.revoke(target), f"revoke {lease.id}")
    except Exception as exc:  # every failure, translated or not, keeps the lease visible
        outcome.error = exc
    return outcome


def _record_outcomes(broker: Broker, chunk: list[tuple[tuple[Lease, SessionRow | None, str], _Outcome]],
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
            elif outcome.error is None and outcome.missing is not None:
                finish_not_found(db, row, session, reason, actor, now, natural_expiry=outcome.missing[0],
                                 searchable=outcome.missing[1], batch=events)
                REVOKES.labels(provider=row.provider, outcome="not_found").inc()
                summary.revoked.append(row.id)
            elif outcome.error is None:
                if outcome.found is not None:
                    row.handle = {**outcome.found, "found_by_capability": True}
                finish_revocation(db, row, session, reason, actor, now, batch=events,
                                  detail={"found_by_capability": True} if outcome.found is not None else None)
                REVOKES.labels(provider=row.provider, outcome="revoked").inc()
                summary.revoked.append(row.id)
            else:
                row.status = "revoke_pending"
                row.revoke_attempts += 1
                row.next_attempt_at = now + timedelta(seconds=backoff_seconds(row.revoke_attempts))
                row.claimed_by = row.claimed_until = None
                row.status_reason = getattr(outcome.error, "code", outcome.error.__class__.__name__)
                db.add(row)
                events.append(_revoke_event(session, row, "capability.revoke_failed", "revoke_pending", actor, reason,
                                            {"error": row.status_reason, "next_attempt_at": row.next_attempt_at.isoformat()}))
                REVOKES.labels(provider=row.provider, outcome="failed").inc()
                log.warning("revoke of %s failed (%s); retry #%d scheduled", row.id, row.status_reason,
                            row.revoke_attempts)
                summary.pending.append(row.id)
        append_many(db, events, now=now)
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
    """revoke_pending whose backoff has passed, claims a dead replica left behind, and
    `minting` leases whose request died (older than a claim)."""
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
        abandoned = db.exec(
            select(Lease.id)
            .where(Lease.status == "minting",
                   col(Lease.created_at) <= now - timedelta(seconds=broker.settings.claim_seconds), _claimable(now))
            .order_by(Lease.created_at)
            .limit(limit)
        ).all()
    return list(pending) + list(lapsed) + list(abandoned)
