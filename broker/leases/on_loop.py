"""The capability request on the event loop: decide -> reserve -> mint -> activate, each write one
store call (one round trip on PostgreSQL), no thread hop but the backend's own SDK.

The decision here rests on the session's facts that never change (who, the task, the scope, the
end; read once per session), with the session taken as active and nothing issued or live. The
store's reservation checks exactly those facts under the session's row lock (status, the issued
and live budgets, a live escalation tier, the idempotency key) and writes nothing if any of them
would change an allow: the request then takes the full path (`service.request_capability`, in a
worker thread), which decides again on the locked row and records what it decides. So do
approvals, denials, live permission sources and a shadow policy: their decisions need the locked
row, or a call before it.

A credential minted locally (native) is reserved and recorded in one call, `Store.issue`: it
leaves the broker only after that commits. A remote backend keeps the crash-safe order of the
full path: the `minting` lease commits (`Store.reserve`) before the backend is called, and the
credential is activated and recorded in a second call (`Store.activate`) or revoked at once.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import anyio

from broker.audit.events import DecisionRef
from broker.audit.service import record_template
from broker.db import utcnow
from broker.errors import BrokerError, Conflict, ProviderError
from broker.identity.callers import Caller
from broker.leases import idempotency
from broker.leases.facts import bounds_lookup, unchanging_facts
from broker.leases.failures import record_failed_mint, revoke_unrecorded
from broker.leases.outcomes import CapabilityIssued, CapabilityOutcome
from broker.leases.service import (
    activated,
    grant_for,
    minted_event,
    new_lease,
    request_capability,
)
from broker.leases.vocabulary import CapabilityAsk
from broker.metrics import DECISIONS, MINTS
from broker.models import NewLease, SessionSnapshot
from broker.permissions import service as live_permissions
from broker.policy import Decision, RequestFacts, evaluate
from broker.policy.resources import canonical_resource
from broker.providers.base import Grant, Minted, Provider
from broker.runtime import Broker
from broker.store import Activation, HeldKey, Issue, Reservation, Store

log = logging.getLogger("broker.leases")


async def request_capability_async(
    broker: Broker, caller: Caller, ask: CapabilityAsk, idempotency_key: str | None
) -> CapabilityOutcome:
    """Issued, or pending a human's approval; a refusal is raised (Denied, BudgetExceeded...)."""
    issued = await _on_loop(broker, caller, ask, idempotency_key)
    if issued is not None:
        return issued
    return await anyio.to_thread.run_sync(request_capability, broker, caller, ask, idempotency_key)


async def _on_loop(broker: Broker, caller: Caller, ask: CapabilityAsk, key: str | None) -> CapabilityIssued | None:
    """The capability, or None: the full path decides."""
    store, policy = broker.store, broker.policies.current
    if (store is None or caller.kind != "agent" or caller.session_id is None or ask.approval_id is not None
            or broker.policies.shadow is not None):
        return None
    try:
        ask = replace(ask, resource=canonical_resource(ask.resource))
        if key is not None:
            idempotency.check_key(key)
    except BrokerError:
        return None  # the full path refuses it, as it always has
    if live_permissions.needs_live_answer(policy, ask.resource, ask.access):
        return None
    session = await broker.sessions.get(store, caller.session_id)
    if session is None:
        return None
    # decide
    now = utcnow()
    decision = evaluate(policy, unchanging_facts(session), RequestFacts(
        resource=ask.resource, access=ask.access, ttl_seconds=ask.ttl_seconds, now=now), bounds_lookup(broker))
    if decision.result != "allow":
        return None
    provider = broker.provider(decision.provider or "")
    lease = new_lease(session, ask, decision, now)
    grant = grant_for(session, ask, decision, lease, ask.confirmation_jkt)
    ticket = None if key is None else idempotency.new_ticket(broker, session.id, key,
                                                             ask.idempotency_hash(session.id), now)
    escalation = tuple(sorted(policy.escalation_tiers)) if lease.tier in policy.escalation_tiers else ()

    def reservation(key_row: dict[str, object] | None) -> Reservation:
        return Reservation(lease=lease, key_row=key_row, max_issued=policy.max_issued_per_session,
                           max_active=policy.max_active_per_session, escalation=escalation)

    if provider.mints_locally:
        # mint, then reserve and activate in one call: nothing outside learns of it before COMMIT
        try:
            with MINTS.labels(provider.name).time():
                minted = provider.mint(grant)
        except BrokerError:
            return None  # the full path records the failed mint
        issued = activated(broker, lease, minted)
        key_row = None if ticket is None else idempotency.row_of(idempotency.finished_row(broker, ticket, issued))
        audit = record_template(minted_event(session, ask, lease, grant, DecisionRef.of(decision)))
        if await store.issue(Issue(reservation(key_row), audit)) != "issued":
            return None  # what changed is the full path's to decide and record; this credential is never seen
        _count(decision)
        return issued

    # reserve: the `minting` lease commits before the backend hears of it
    held = None if ticket is None else idempotency.row_of(idempotency.held_row(ticket))
    if await store.reserve(reservation(held)) != "reserved":
        return None
    _count(decision)
    # Shielded: once the lease is reserved, a cancelled request must still end it as the full
    # path would (activated and recorded, failed, or revoked), not leave it to the reconciler.
    with anyio.CancelScope(shield=True):
        issued = await _mint_and_activate(broker, store, session, ask, decision, provider, lease, grant, ticket)
    return issued  # noqa: RET504  # after the shielded scope: a scope may swallow a cancellation, mypy says


async def _mint_and_activate(broker: Broker, store: Store, session: SessionSnapshot, ask: CapabilityAsk,
                             decision: Decision, provider: Provider, lease: NewLease, grant: Grant,
                             ticket: idempotency.Ticket | None) -> CapabilityIssued:
    """After the reservation: every outcome is recorded, as the full path's `_mint` does."""
    record = DecisionRef.of(decision)
    key = None if ticket is None else ticket.key
    try:
        minted = await anyio.to_thread.run_sync(_mint, provider, grant)
    except BrokerError as failure:
        await anyio.to_thread.run_sync(record_failed_mint, broker, session, ask, grant, provider.name, record, key,
                                       failure)
        if key is not None and failure.status >= 500:
            await anyio.to_thread.run_sync(idempotency.abandon, broker, session.id, key)
        raise
    issued = activated(broker, lease, minted)
    held = None
    if ticket is not None:
        status, sealed = idempotency.sealed_outcome(broker, ticket, issued)
        held = HeldKey(session.id, ticket.key, status, sealed)
    audit = record_template(minted_event(session, ask, lease, grant, record))
    try:
        if await store.activate(Activation(lease, held, audit)) != "activated":
            # Torn down while we were minting: what we hold must die now.
            raise Conflict("the session ended while the capability was being minted", code="session-ended")
    except BaseException as exc:
        await _revoke(broker, provider, grant, minted)
        if key is not None and not (isinstance(exc, BrokerError) and exc.status < 500):
            await anyio.to_thread.run_sync(idempotency.abandon, broker, session.id, key)
        raise
    return issued


def _mint(provider: Provider, grant: Grant) -> Minted:
    with MINTS.labels(provider.name).time():
        try:
            return provider.mint(grant)
        except BrokerError:
            raise
        except Exception as exc:  # an SDK error the provider did not translate: still fail closed
            log.exception("provider %s raised an untranslated error", provider.name)
            raise ProviderError(f"provider {provider.name} failed: {exc.__class__.__name__}") from exc


async def _revoke(broker: Broker, provider: Provider, grant: Grant, minted: Minted) -> None:
    await anyio.to_thread.run_sync(revoke_unrecorded, broker, provider, grant, minted)


def _count(decision: Decision) -> None:
    DECISIONS.labels(result=decision.result, tier=decision.tier or "none", reason=decision.reason).inc()
