"""The sweeper: revokes what has expired, retries what failed, ends sessions past deadline.

Each pass reads only what is due (index on status + expiry, bounded batches), so its cost
follows what expires, not what is active. Several replicas may sweep at once: claims make
each lease revoked once. Once a minute it also lets providers prune revocation state their
credentials have outlived (AWS deny entries).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from datetime import datetime, timedelta

from broker.db import utcnow
from broker.leases.revocation import (
    RevokeSummary,
    due_for_expiry,
    due_for_retry,
    recently_revoked_resources,
    revoke_leases,
)
from broker.lifecycle.reconciler import Every, reconcile_periodic
from broker.logs import REQUEST_ID
from broker.metrics import SWEEP_LAST, SWEEP_SECONDS
from broker.runtime import Broker
from broker.sessions import service as sessions

log = logging.getLogger("broker.sweeper")


PRUNE_INTERVAL_SECONDS = 60.0  # deny entries outlive their credential by minutes anyway (bucket + grace)
# How far back to look for revoked leases whose revocation state may remain: longer than any
# credential a backend issues (STS: 12 h), so a restart does not forget a role.
PRUNE_LOOKBACK = timedelta(days=1)
_PRUNES = Every()


def prune_revocations(broker: Broker, now: datetime) -> int:
    """Let every provider drop revocation state its credentials outlived (AWS: deny entries,
    about five minutes after each credential's natural expiry). Once a minute per replica."""
    if not _PRUNES.due(broker.replica_id, PRUNE_INTERVAL_SECONDS):
        return 0
    removed = 0
    for name, provider in sorted(broker.providers.items()):
        try:
            removed += provider.prune_revocations(now, recently_revoked_resources(broker, name, now - PRUNE_LOOKBACK, now))
        except Exception:  # one backend's trouble must not stop the sweep; the next pass retries
            log.exception("pruning revocations of provider %s failed", name)
    if removed:
        log.info("pruned %d revocation entries whose credentials have expired", removed)
    return removed


def sweep_once(broker: Broker, *, now: datetime | None = None) -> RevokeSummary:
    now = now or utcnow()
    batch = broker.settings.sweep_batch_size
    total = RevokeSummary()
    for session_id in sessions.past_deadline(broker, now, batch):
        _, summary = sessions.end(broker, session_id, reason="deadline", actor="broker:sweeper")
        total.merge(summary)
    while True:
        due = due_for_expiry(broker, now, batch)
        if not due:
            break
        summary = revoke_leases(broker, due, reason="expired", actor="broker:sweeper")
        total.merge(summary)
        if len(due) < batch or not (summary.revoked or summary.pending):
            break
    retry = due_for_retry(broker, now, batch)
    if retry:
        total.merge(revoke_leases(broker, retry, reason="retry", actor="broker:sweeper", use_lease_reason=True))
    total.merge(reconcile_periodic(broker, now, batch))  # teardowns a dead replica cut short
    prune_revocations(broker, now)
    return total


class Sweeper:
    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-sweeper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        interval = self._broker.settings.sweep_interval_seconds
        while not self._stop.is_set():
            started = time.monotonic()
            token = REQUEST_ID.set("sweep_" + secrets.token_hex(6))  # ties a pass's log lines together
            try:
                with SWEEP_SECONDS.time():
                    sweep_once(self._broker)
                SWEEP_LAST.set_to_current_time()
            except Exception:  # one bad pass must not end sweeping
                log.exception("sweep failed; next pass in %.1fs", interval)
            finally:
                REQUEST_ID.reset(token)
            # A pass starts every `interval`: a long pass does not push the next one further out.
            self._stop.wait(max(0.0, interval - (time.monotonic() - started)))
