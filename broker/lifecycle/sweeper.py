"""The sweeper: revokes what has expired, retries what failed, ends sessions past deadline.

Each pass reads only what is due (index on status + expiry, bounded batches), so its cost
follows what expires, not what is active. Several replicas may sweep at once: claims make
each lease revoked once. Once a minute it also lets providers prune revocation state their
credentials have outlived (AWS deny entries) and release what was made for ended capabilities
(Vault narrowed policies), and deletes expired Idempotency-Keys (lifecycle/keys.py).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from broker.breakglass import service as breakglass
from broker.db import utcnow
from broker.leases.due import due_for_expiry, due_for_retry, live_handles, recently_revoked_resources
from broker.leases.revocation import RevokeSummary, revoke_leases
from broker.lifecycle.keys import prune_expired_keys
from broker.lifecycle.reconciler import Every, reconcile_periodic, release_leftovers
from broker.metrics import SWEEP_LAST, SWEEP_SECONDS
from broker.periodic import Periodic
from broker.providers.base import Provider
from broker.runtime import Broker
from broker.sessions import liveness
from broker.sessions import service as sessions

log = logging.getLogger("broker.sweeper")


PRUNE_INTERVAL_SECONDS = 60.0  # deny entries outlive their credential by minutes anyway (bucket + grace)
# How far back to look for revoked leases whose revocation state may remain: longer than any
# credential a backend issues (STS: 12 h), so a restart does not forget a role.
PRUNE_LOOKBACK = timedelta(days=1)
_PRUNES = Every()
# A pass revokes at most this many batches of expired leases, then does the rest of its work
# (deadlines, retries, the reconciler, expired Idempotency-Keys) and ends; the next pass starts
# at once when this one ran past the interval (periodic.py). Unbounded, a backlog that grows
# faster than the sweeper drains it (the soak, on a busy machine) made one pass last as long as
# the backlog: every receipt of it held in memory until the pass ended (RSS +26 MB at 16,500)
# and the other work starved (not one expired Idempotency-Key deleted in four minutes).
MAX_EXPIRY_BATCHES_PER_PASS = 4


def _listens(provider: Provider, hook: str) -> bool:
    """Whether `provider` overrides the base's `hook`, which ignores its argument and returns 0.
    What the hook is given is read from the leases table, and grows with it (every live lease's
    handle: a backlog of 25,000 made that a load of 25,000 rows a minute, for a native provider
    that reads none), so it is read only for a provider that reads it."""
    method = getattr(provider, hook)
    return getattr(method, "__func__", method) is not getattr(Provider, hook)


def prune_revocations(broker: Broker, now: datetime) -> int:
    """Let every provider drop revocation state its credentials outlived (AWS: deny entries,
    about five minutes after each credential's natural expiry) and state made for capabilities
    that have ended (Vault: narrowed policies). Once a minute per replica."""
    if not _PRUNES.due(broker.replica_id, PRUNE_INTERVAL_SECONDS):
        return 0
    removed = 0
    for name, provider in sorted(broker.providers.items()):
        if not _listens(provider, "prune_revocations"):
            continue
        try:
            removed += provider.prune_revocations(now, recently_revoked_resources(broker, name, now - PRUNE_LOOKBACK, now))
        except Exception:  # one backend's trouble must not stop the sweep; the next pass retries
            log.exception("pruning revocations of provider %s failed", name)
    if removed:
        log.info("pruned %d revocation entries whose credentials have expired", removed)
    removed += release_leftovers(broker).released  # Vault: narrowed policies of ended capabilities
    removed += collect_shared(broker)  # Vault: shared narrowed policies no live capability carries
    return removed


def collect_shared(broker: Broker) -> int:
    """Let every provider remove state shared between capabilities that no live one uses."""
    removed = 0
    for name, provider in sorted(broker.providers.items()):
        if not _listens(provider, "collect_shared"):
            continue
        try:
            removed += provider.collect_shared(live_handles(broker, name))
        except Exception as exc:  # noqa: BLE001  # one backend's trouble must not stop the sweep; the next pass retries
            log.warning("collecting unused shared state of provider %s failed: %s", name,
                        getattr(exc, "message", type(exc).__name__))
    if removed:
        log.info("removed %d pieces of shared backend state no live capability uses", removed)
    return removed


def sweep_once(broker: Broker, *, now: datetime | None = None) -> RevokeSummary:
    now = now or utcnow()
    batch = broker.settings.sweep_batch_size
    total = RevokeSummary()
    for session_id in sessions.past_deadline(broker, now, batch):
        _, summary = sessions.end(broker, session_id, reason="deadline", actor="broker:sweeper")
        total.merge(summary)
    # Stall (broker/sessions/liveness.py): sessions silent past their idle timeout end as if torn down.
    total.merge(liveness.end_stalled(broker, now, batch))
    for _ in range(MAX_EXPIRY_BATCHES_PER_PASS):
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
    breakglass.note_overdue(broker, now, batch)  # break-glass post-reviews past due: audited once
    prune_expired_keys(broker, now, batch)
    return total


def sweeper(broker: Broker) -> Periodic:
    """The background sweep, every `sweep_interval_seconds`."""

    def timed_pass() -> None:
        with SWEEP_SECONDS.time():
            sweep_once(broker)
        SWEEP_LAST.set_to_current_time()

    return Periodic("broker-sweeper", broker.settings.sweep_interval_seconds, timed_pass, log)
