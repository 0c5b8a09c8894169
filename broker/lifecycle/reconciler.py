"""Crash recovery: finish what a dead broker, or a teardown cut short, left half done.

Run once at start (from the app's lifespan, before the sweeper starts and before requests
are served), and in a light form from every sweeper pass. What it looks for:

- `minting` leases older than a claim: the broker died between reserving the lease and
  activating it. The backend is searched by capability id (`find_by_capability`: Vault by the
  token's `meta.capability`, AWS by the session name, which is the capability id); what is
  found is revoked, what is not is marked `expired` with "not found at backend; expires
  naturally at <ts>". Providers that cannot be searched (GitHub) are marked the same way with
  their own upper bound. Such a credential was never handed out (activation and the response
  are one commit), so nobody holds it. Native leases need no search.
- `active` leases of sessions that have ended: the broker died after ending the session and
  before revoking. Revoked with the session's end reason.
- `active` leases past `expires_at`, and `revoke_pending` leases whose backoff has run out:
  what the sweeper would do, done before the broker serves again.
- sessions past their deadline: ended as if torn down.
- backend state made for one capability that outlived its lease (a Vault narrowed policy whose
  delete failed, or whose token was never found after a crash): `release_leftovers`, at start
  and once a minute from the sweeper. Only capabilities whose lease has ended are released;
  ids this broker has no lease for are left alone (another deployment may share the backend).

Every lease goes through `revoke_leases`, so the same claims apply: several replicas may
reconcile at once and each lease is finished, and audited, exactly once. The start pass is
bounded in time; whatever is left is the sweeper's (same queries), so a large backlog never
keeps a replica from becoming ready.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlmodel import col, select

from broker.db import transaction, utcnow
from broker.leases.due import abandoned_mints, claimable, due_for_expiry, ended_among, pending_retries
from broker.leases.revocation import RevokeSummary, revoke_leases
from broker.leases.vocabulary import LeaseStatus
from broker.metrics import LEFTOVERS, RECONCILED
from broker.models import Lease, SessionRow
from broker.runtime import Broker
from broker.sessions import service as sessions

log = logging.getLogger("broker.reconciler")

ACTOR = "broker:reconciler"
START_BUDGET_SECONDS = 30.0  # then readiness; the sweeper carries on with the same queries


@dataclass
class Leftovers:
    released: int = 0
    failed: int = 0
    kept: int = 0  # their lease is still live, or this broker has none


@dataclass
class ReconcileReport:
    abandoned_mints: int = 0
    orphaned: int = 0
    expired: int = 0
    retried: int = 0
    sessions_ended: int = 0
    summary: RevokeSummary = field(default_factory=RevokeSummary)
    leftovers: Leftovers = field(default_factory=Leftovers)
    complete: bool = True

    @property
    def found(self) -> int:
        return self.abandoned_mints + self.orphaned + self.expired + self.retried + self.sessions_ended


def _orphans(broker: Broker, now: datetime, limit: int) -> list[tuple[str, str | None]]:
    """Active leases of sessions ended more than a claim ago (so a teardown still under way
    is not raced). Returns (lease id, the session's end reason)."""
    cutoff = now - timedelta(seconds=broker.settings.claim_seconds)
    with transaction(broker.engine) as db:
        rows = db.exec(
            select(Lease.id, SessionRow.end_reason)
            .join(SessionRow, col(SessionRow.id) == col(Lease.session_id))
            .where(Lease.status == LeaseStatus.ACTIVE, SessionRow.status == "ended", col(SessionRow.ended_at) <= cutoff,
                   claimable(now))
            .order_by(col(Lease.id)).limit(limit)
        ).all()
    return [(lease_id, reason) for lease_id, reason in rows]


def _count(summary: RevokeSummary, kind: str) -> None:
    if summary.revoked:
        RECONCILED.labels(kind=kind, outcome="finished").inc(len(summary.revoked))
    if summary.pending:
        RECONCILED.labels(kind=kind, outcome="revoke_pending").inc(len(summary.pending))


def revoke_orphans(broker: Broker, now: datetime, limit: int, exclude: set[str] | None = None) -> tuple[int, RevokeSummary]:
    total = RevokeSummary()
    found = [(i, r) for i, r in _orphans(broker, now, limit) if not exclude or i not in exclude]
    by_reason: dict[str, list[str]] = {}
    for lease_id, end_reason in found:
        by_reason.setdefault(f"session-ended:{end_reason or 'ended'}", []).append(lease_id)
        if exclude is not None:
            exclude.add(lease_id)
    for reason, ids in by_reason.items():
        total.merge(revoke_leases(broker, ids, reason=reason, actor=ACTOR))
    if found:
        log.warning("revoked %d live capabilities of already ended sessions (a teardown was cut short)", len(found))
        _count(total, "orphaned")
    return len(found), total


def release_leftovers(broker: Broker) -> Leftovers:
    """Remove per-capability backend state whose lease has ended (Vault: narrowed policies).

    A lease ends before its state is released, and an ended lease never lives again, so a mint
    under way is never touched. A release that fails is logged and counted, and found again
    on the next pass.
    """
    out = Leftovers()
    for name, provider in sorted(broker.providers.items()):
        try:
            found = provider.leftover_capabilities()
            ended = ended_among(broker, name, found) if found else []
        except Exception as exc:  # noqa: BLE001  # one backend's trouble must not stop the others
            log.warning("could not list what provider %s keeps per capability: %s", name,
                        getattr(exc, "message", type(exc).__name__))
            continue
        out.kept += len(found) - len(ended)
        for capability_id in ended:
            try:
                provider.release(capability_id)
            except Exception as exc:  # noqa: BLE001  # counted and logged; the other leftovers are still released
                out.failed += 1
                LEFTOVERS.labels(provider=name, outcome="failed").inc()
                log.warning("could not release %s's leftover state at %s (%s); retried on the next pass", capability_id,
                            name, getattr(exc, "code", type(exc).__name__))
            else:
                out.released += 1
                LEFTOVERS.labels(provider=name, outcome="released").inc()
    if out.released or out.failed:
        log.info("released backend state of %d ended capabilities (%d failed, retried on the next pass)",
                 out.released, out.failed)
    return out


def reconcile_at_start(broker: Broker, *, budget_seconds: float = START_BUDGET_SECONDS) -> ReconcileReport:
    """One catch-up pass over everything a crash can leave behind, in bounded batches."""
    report = ReconcileReport()
    started = utcnow()
    deadline = time.monotonic() + budget_seconds
    batch = broker.settings.sweep_batch_size
    attempted: set[str] = set()  # each lease once per start, whatever happens to it

    def fresh(ids: list[str]) -> list[str]:
        new = [i for i in ids if i not in attempted]
        attempted.update(new)
        return new

    def finish(ids: list[str], counter: str, kind: str, reason: str, *, retry: bool = False) -> bool:
        """Revoke what a query found (each lease once per start); count it on the report."""
        ids = fresh(ids)
        if not ids:
            return False
        setattr(report, counter, getattr(report, counter) + len(ids))
        summary = revoke_leases(broker, ids, reason=reason, actor=ACTOR, use_lease_reason=retry)
        report.summary.merge(summary)
        _count(summary, kind)
        return True

    while True:
        # A lease whose mint was interrupted is "abandoned" only once it is older than a
        # claim; the periodic pass (due_for_retry) takes the younger ones later.
        progressed = finish(abandoned_mints(broker, utcnow(), batch), "abandoned_mints", "abandoned-mint", "mint-abandoned")
        n, s = revoke_orphans(broker, utcnow(), batch, exclude=attempted)
        if n:
            report.orphaned += n
            report.summary.merge(s)
            progressed = True
        progressed |= finish(due_for_expiry(broker, started, batch), "expired", "expired", "expired")
        progressed |= finish(pending_retries(broker, started, batch), "retried", "retried", "retry", retry=True)
        for session_id in [i for i in sessions.past_deadline(broker, started, batch) if i not in attempted]:
            attempted.add(session_id)
            _, s = sessions.end(broker, session_id, reason="deadline", actor=ACTOR)
            report.sessions_ended += 1
            report.summary.merge(s)
            progressed = True
        if not progressed:
            break
        if time.monotonic() > deadline:
            report.complete = False
            log.warning("reconciliation at start ran out of its %.0fs budget; the sweeper continues", budget_seconds)
            break
    report.leftovers = release_leftovers(broker)
    if report.found:
        log.warning(
            "reconciled at start: %d abandoned mints, %d leases of ended sessions, %d expired, %d pending retried, "
            "%d sessions past deadline -> %d finished, %d still revoke_pending",
            report.abandoned_mints, report.orphaned, report.expired, report.retried, report.sessions_ended,
            len(report.summary.revoked), len(report.summary.pending),
        )
    else:
        log.info("reconciled at start: nothing left behind")
    return report


class Every:
    """At most once per `interval` per key (a broker's replica id): for periodic work that
    need not run on every sweeper pass."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, key: str, interval: float) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < interval:
                return False
            self._last[key] = now
            return True


_ORPHAN_CHECKS = Every()  # the orphan query reads every active lease: once a claim period


def reconcile_periodic(broker: Broker, now: datetime, limit: int) -> RevokeSummary:
    """The sweeper's share: leases of ended sessions, once per claim period. (Abandoned mints
    are in `due_for_retry`, which the sweeper runs every pass.)"""
    if not _ORPHAN_CHECKS.due(broker.replica_id, broker.settings.claim_seconds):
        return RevokeSummary()
    return revoke_orphans(broker, now, limit)[1]
