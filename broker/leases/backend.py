"""The backend side of a revocation: one provider call per claimed lease (a blip retried in
process, never a refusal), finding a handle-less lease's credential by capability id, and when
a credential nobody can see would die on its own. No row is written here: the outcome goes
back to `revocation`, which records it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential, wait_random

from broker.db import advisory_lock
from broker.errors import ProviderMisconfigured, ProviderUnavailable
from broker.metrics import REVOKE_SECONDS
from broker.models import Lease
from broker.providers.base import Provider, Revoked, RevokeTarget
from broker.runtime import Broker

log = logging.getLogger("broker.revocation")
T = TypeVar("T")

# The in-process retry around one backend call: a blip, not an outage (that is next_attempt_at's).
BLIP_ATTEMPTS = 3
BLIP_WAIT_INITIAL_SECONDS = 0.1
BLIP_WAIT_MAX_SECONDS = 1.0
BLIP_JITTER_SECONDS = 0.1


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


def mints_locally(broker: Broker, provider_name: str) -> bool:
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
    except Exception:  # noqa: BLE001  # a bound is advice: without it the mint's own expiry stands
        return max(known, lease.expires_at)
    slack = timedelta(seconds=broker.settings.provider_timeout_seconds)
    return max(known, lease.expires_at, lease.created_at + timedelta(seconds=bound) + slack)


def revoke_target(lease: Lease, handle: dict[str, Any], secret: str | None) -> RevokeTarget:
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
class Outcome:
    error: Exception | None = None
    found: dict[str, Any] | None = None  # a handle found at the backend for a handle-less lease
    missing: tuple[datetime, bool] | None = None  # (natural expiry, searchable): nothing to revoke
    result: Revoked | None = None  # what the provider said it achieved


def call_backend(broker: Broker, lease: Lease) -> Outcome:
    outcome = Outcome()
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
            target = revoke_target(lease, handle or {}, secret)
            with _serialised(broker, provider, lease.resource), REVOKE_SECONDS.labels(lease.provider).time():
                outcome.result = backend_call(lambda: provider.revoke(target), f"revoke {lease.id}")
    except Exception as exc:  # noqa: BLE001  # every failure, translated or not, keeps the lease visible
        outcome.error = exc
    return outcome
