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
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, or_
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from broker import security_events
from broker.audit.events import AgentRef, AuditEvent, GrantRef, RequestRef
from broker.audit.service import append, append_many
from broker.db import advisory_lock, is_postgres, transaction, utcnow
from broker.errors import BrokerError, ProviderMisconfigured, ProviderUnavailable
from broker.leases import receipts
from broker.leases.receipts import RevocationReceipt
from broker.leases.vocabulary import LIVE, LeaseStatus
from broker.metrics import REVOKE_SECONDS, REVOKES, observe_expiry
from broker.models import Lease, SessionRow
from broker.providers.base import Provider, Revoked, RevokeTarget
from broker.runtime import Broker
from broker.times import rfc3339

log = logging.getLogger("broker.revocation")
T = TypeVar("T")

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
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def final_status(reason: str) -> LeaseStatus:
    return LeaseStatus.EXPIRED if reason == "expired" else LeaseStatus.REVOKED


def claimable(now: datetime) -> ColumnElement[bool]:
    """No replica holds the lease, or its claim has lapsed."""
    return or_(col(Lease.claimed_until).is_(None), col(Lease.claimed_until) <= now)


def mint_abandoned(lease: Lease, broker: Broker, now: datetime) -> bool:
    """A `minting` lease older than a claim: the request that reserved it is presumed dead.

    If it is merely slow, nothing is lost: activation re-reads the lease under its row lock,
    finds it no longer `minting`, and revokes what it minted instead of handing it out.
    """
    return lease.status == LeaseStatus.MINTING and lease.created_at <= now - timedelta(seconds=broker.settings.claim_seconds)


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
        )
        stmt = stmt.with_for_update(skip_locked=True) if is_postgres(broker.engine) else stmt
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
                if _mints_locally(broker, lease.provider):
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
            elif _mints_locally(broker, lease.provider):
                with REVOKE_SECONDS.labels(lease.provider).time():  # nothing to call: the row is the credential
                    # The provider only says what the mark amounts to (native: offline verifiers until exp).
                    result = broker.provider(lease.provider).revoke(_target(lease, lease.handle or {}, None))
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
        outcomes = list(pool.map(lambda item: _call_backend(broker, item[0]), claimed))
    for start in range(0, len(claimed), RECORD_CHUNK):
        chunk = list(zip(claimed[start:start + RECORD_CHUNK], outcomes[start:start + RECORD_CHUNK], strict=True))
        summary.merge(_record_outcomes(broker, chunk, actor))
    return summary


def _mints_locally(broker: Broker, provider_name: str) -> bool:
    """Nothing outside the broker to tell (native): the lease status is the revocation."""
    try:
        return broker.provider(provider_name).mints_locally
    except ProviderMisconfigured:
        return False  # not built: the backend path fails, and the lease stays visible


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


def _target(lease: Lease, handle: dict[str, Any], secret: str | None) -> RevokeTarget:
    return RevokeTarget(
        capability_id=lease.id, session_id=lease.session_id, resource=lease.resource, access=lease.access,
        handle=handle, expires_at=lease.backend_expires_at or lease.expires_at, revocation_secret=secret,
    )


def _serialised(broker: Broker, provider: Provider, resource: str) -> AbstractContextManager[None]:
    """Backends whose revocation is read-modify-write of shared state (AWS: one deny policy per
    role) name a lock key; replicas take it in turn so no revocation overwrites another."""
    key = provider.revocation_lock_key(resource)
    return advisory_lock(broker.engine, key) if key is not None else nullcontext()


@dataclass
class _Outcome:
    error: Exception | None = None
    found: dict[str, Any] | None = None  # a handle found at the backend for a handle-less lease
    missing: tuple[datetime, bool] | None = None  # (natural expiry, searchable): nothing to revoke
    result: Revoked | None = None  # what the provider said it achieved


def _call_backend(broker: Broker, lease: Lease) -> _Outcome:
    outcome = _Outcome()
    try:
        provider = broker.provider(lease.provider)
        handle = lease.handle or None
        if handle is None and not lease.sealed_secret:
            if provider.searchable:
                found = backend_call(lambda: provider.find_by_capability(lease.id, lease.resource), f"find {lease.id}")
                outcome.found = dict(found) if found else None
            if outcome.found is None:
                outcome.missing = (_natural_expiry(broker, provider, lease, provider.searchable), provider.searchable)
            handle = outcome.found
        if handle is not None or lease.sealed_secret:
            secret = broker.sealer.unseal(lease.sealed_secret, lease.id) if lease.sealed_secret else None
            target = _target(lease, handle or {}, secret)
            with _serialised(broker, provider, lease.resource), REVOKE_SECONDS.labels(lease.provider).time():
                outcome.result = backend_call(lambda: provider.revoke(target), f"revoke {lease.id}")
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
    for start in range(0, len(wanted), RECORD_CHUNK):
        chunk = wanted[start:start + RECORD_CHUNK]
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
