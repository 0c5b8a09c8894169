"""Prometheus metrics. Lease counts by status are read at scrape time, so every replica
reports the shared truth, including `revoke_pending` that waits for a backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func
from sqlmodel import select

from broker.db import transaction
from broker.models import Lease

REGISTRY = CollectorRegistry(auto_describe=True)
DECISIONS = Counter("broker_decisions_total", "Policy decisions", ["result", "reason"], registry=REGISTRY)
MINTS = Histogram("broker_mint_seconds", "Time for a provider to mint", ["provider"], registry=REGISTRY)
REVOKES = Counter("broker_revocations_total", "Revocation attempts", ["provider", "outcome"], registry=REGISTRY)
WEBHOOKS = Counter("broker_webhooks_total", "Orchestrator webhook deliveries", ["event_type", "outcome"],
                   registry=REGISTRY)
PERMISSION_ANSWERS = Counter("broker_permission_answers_total",
                             "Live permission source answers (cached: no backend call was made)",
                             ["source", "verdict", "cached"], registry=REGISTRY)
RECONCILED = Counter("broker_reconciled_total", "Leases the reconciler finished after a crash or a lost teardown",
                     ["kind", "outcome"], registry=REGISTRY)


class LeaseCollector:
    def __init__(self, broker: Any) -> None:
        self._broker = broker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("broker_leases", "Leases by status and provider", labels=["status", "provider"])
        with transaction(self._broker.engine) as db:
            rows = db.exec(select(Lease.status, Lease.provider, func.count()).group_by(Lease.status, Lease.provider)).all()
        for status, provider, count in rows:
            gauge.add_metric([status, provider], count)
        yield gauge

    def describe(self) -> list[Any]:
        return []
