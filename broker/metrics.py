"""Prometheus metrics: what the broker decides, mints, revokes and waits for.

Counters and histograms are per process (one broker-cli serve worker). The state gauges
(`broker_leases`, `broker_approvals_pending`, `broker_sweeper_lag_seconds`, ...) are read from
the database at scrape time, so every replica reports the shared truth, including
`revoke_pending` rows that wait for a backend. They use the `(status, expires_at)` indexes and
count only live rows (minting, active, revoke_pending; pending approvals): a scrape costs what
is live, never the whole history. Finished leases are counted by `broker_revocations_total`.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import case, func
from sqlmodel import col, select

from broker.db import transaction, utcnow
from broker.models import Approval, BreakGlassReview, Lease

REGISTRY = CollectorRegistry(auto_describe=True)

# Latency buckets from a local signature (sub-millisecond) to a slow backend near its timeout.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Human waits: seconds to an hour (an approval expires after that).
_WAITS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# Expiry lag: the sweeper runs every second by default.
_LAG = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)

DECISIONS = Counter("broker_decisions_total", "Policy decisions on capability requests",
                    ["result", "tier", "reason"], registry=REGISTRY)
MINTS = Histogram("broker_mint_seconds", "Time for a provider to mint a credential", ["provider"],
                  buckets=_LATENCY, registry=REGISTRY)
REVOKE_SECONDS = Histogram("broker_revoke_seconds", "Time to revoke one credential at its provider (retries included)",
                           ["provider"], buckets=_LATENCY, registry=REGISTRY)
REVOKES = Counter("broker_revocations_total", "Revocation attempts by outcome (revoked, not_found, failed)",
                  ["provider", "outcome"], registry=REGISTRY)
WEBHOOKS = Counter("broker_webhooks_total", "Orchestrator webhook deliveries", ["event_type", "outcome"],
                   registry=REGISTRY)
WORKLOAD_AUTH = Counter("broker_workload_authentications_total",
                        "Workload tokens (machines under trust rules): accepted, by trust rule, or refused, by code",
                        ["role", "outcome", "trust_rule"], registry=REGISTRY)
PERMISSION_ANSWERS = Counter("broker_permission_answers_total",
                             "Live permission source answers (cached: no backend call was made)",
                             ["source", "verdict", "cached"], registry=REGISTRY)
LEFTOVERS = Counter("broker_leftovers_total",
                    "Backend state made for one capability (Vault narrowed policies) removed after its lease "
                    "ended, by outcome (released, failed)", ["provider", "outcome"], registry=REGISTRY)
RECONCILED = Counter("broker_reconciled_total", "Leases the reconciler finished after a crash or a lost teardown",
                     ["kind", "outcome"], registry=REGISTRY)
APPROVALS_OPENED = Counter("broker_approvals_opened_total", "Requests that had to wait for a human's approval",
                           ["tier"], registry=REGISTRY)
APPROVALS_REFUSED = Counter("broker_approvals_refused_total",
                            "Approvals not opened: outside the bounds, or over a pending-approval budget",
                            ["reason"], registry=REGISTRY)
APPROVAL_WAIT = Histogram("broker_approval_wait_seconds",
                          "From an approval's request to its outcome: approved/denied (decided), used, expired",
                          ["tier", "outcome"], buckets=_WAITS, registry=REGISTRY)
EXPIRY_LAG = Histogram("broker_expiry_lag_seconds", "How late past its expiry a lease was finished",
                       buckets=_LAG, registry=REGISTRY)
OUTBOX_DELIVERIES = Counter("broker_outbox_deliveries_total",
                            "Outbox pushes by kind (approval, set) and outcome (delivered; failed: retried "
                            "with backoff; dead: refused for good or given up)", ["kind", "outcome"], registry=REGISTRY)
SECURITY_EVENTS = Counter("broker_security_events_total",
                          "Security Event Tokens written to the outbox, one per receiver, by event "
                          "(session-revoked, credential-change)", ["event"], registry=REGISTRY)
WITNESS_SUBMISSIONS = Counter("broker_audit_witness_submissions_total",
                              "Checkpoints submitted to a witness (C2SP tlog-witness), by outcome (cosigned; "
                              "refused: the witness said no, see the log and the audit; failed: unreachable, retried)",
                              ["witness", "outcome"], registry=REGISTRY)
WITNESS_REFUSALS = Counter("broker_audit_witness_refusals_total",
                           "Checkpoints a witness refused, by reason (not-consistent: a rewritten or forked "
                           "history; conflict; untrusted-key; unknown-origin; bad-request; bad-cosignature)",
                           ["witness", "reason"], registry=REGISTRY)
SWEEP_SECONDS = Histogram("broker_sweep_seconds", "Duration of one sweeper pass", buckets=_LATENCY, registry=REGISTRY)
SWEEP_LAST = Gauge("broker_sweep_last_success_timestamp_seconds", "Unix time of this process's last complete sweep",
                   registry=REGISTRY)

LIVE_LEASE_STATUSES = ("minting", "active", "revoke_pending")


def observe_approval_outcome(approval: Approval, outcome: str, at: datetime | None = None) -> None:
    """Call where an approval reaches an outcome (decided, used, expired)."""
    waited = ((at or utcnow()) - approval.created_at).total_seconds()
    APPROVAL_WAIT.labels(tier=approval.tier or "none", outcome=outcome).observe(max(0.0, waited))


def observe_expiry(lease: Lease, now: datetime) -> None:
    EXPIRY_LAG.observe(max(0.0, (now - lease.expires_at).total_seconds()))


class DatabaseCollector:
    """State gauges read at scrape time (see the module docstring for their cost)."""

    def __init__(self, broker: Any) -> None:
        self._broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = utcnow()
        leases = GaugeMetricFamily("broker_leases", "Live leases by status and provider", labels=["status", "provider"])
        pending = GaugeMetricFamily("broker_approvals_pending", "Approvals waiting for a human", labels=["tier"])
        oldest = GaugeMetricFamily("broker_approval_oldest_pending_seconds", "Age of the oldest approval still waiting")
        lag = GaugeMetricFamily(
            "broker_sweeper_lag_seconds", "How far past its expiry the most overdue active lease is (0: none overdue)")
        with transaction(self._broker.engine) as db:
            rows = db.exec(select(Lease.status, Lease.provider, func.count())
                           .where(col(Lease.status).in_(LIVE_LEASE_STATUSES))
                           .group_by(Lease.status, Lease.provider)).all()
            waiting = db.exec(select(Approval.tier, func.count(), func.min(Approval.created_at))
                              .where(Approval.status == "pending", Approval.expires_at > now)
                              .group_by(Approval.tier)).all()
            overdue = db.exec(select(func.min(Lease.expires_at))
                              .where(Lease.status == "active", Lease.expires_at <= now)).first()
            # Break-glass post-reviews (broker/breakglass/): open, and open past their due time.
            reviews_open, reviews_overdue = db.exec(
                select(func.count(), func.coalesce(func.sum(case((col(BreakGlassReview.due_at) <= now, 1), else_=0)), 0))
                .where(BreakGlassReview.status == "open")).one()
        for status, provider, count in rows:
            leases.add_metric([status, provider], count)
        first_asked = None
        for tier, count, created in waiting:
            pending.add_metric([tier or "none"], count)
            first_asked = created if first_asked is None else min(first_asked, created)
        oldest.add_metric([], _age(now, first_asked))
        lag.add_metric([], _age(now, overdue))
        open_reviews = GaugeMetricFamily("broker_breakglass_reviews_open", "Break-glass uses whose post-review is open")
        open_reviews.add_metric([], int(reviews_open or 0))
        overdue_reviews = GaugeMetricFamily("broker_breakglass_reviews_overdue",
                                            "Break-glass post-reviews still open past their due time")
        overdue_reviews.add_metric([], int(reviews_overdue or 0))
        yield from (leases, pending, oldest, lag, open_reviews, overdue_reviews)

    def describe(self) -> list[Any]:
        return []


def _age(now: datetime, then: datetime | None) -> float:
    if then is None:
        return 0.0
    if then.tzinfo is None:  # SQLite hands back naive UTC from an aggregate
        then = then.replace(tzinfo=now.tzinfo)
    return max(0.0, (now - then).total_seconds())

