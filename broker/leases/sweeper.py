"""The sweeper: revokes what has expired, retries what failed, ends sessions past deadline.

Each pass reads only what is due (index on status + expiry, bounded batches), so its cost
follows what expires, not what is active. Several replicas may sweep at once: claims make
each lease revoked once.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

from broker.db import utcnow
from broker.leases.reconciler import reconcile_periodic
from broker.leases.revocation import RevokeSummary, due_for_expiry, due_for_retry, revoke_leases
from broker.logs import REQUEST_ID
from broker.metrics import SWEEP_LAST, SWEEP_SECONDS
from broker.runtime import Broker
from broker.sessions import service as sessions

log = logging.getLogger("broker.sweeper")


def sweep_once(broker: Broker) -> RevokeSummary:
    now = utcnow()
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
