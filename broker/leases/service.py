"""Capabilities from request to revocation: decide, reserve a lease, mint, activate, revoke.

The order is what makes crashes safe. The lease row (`minting`) commits before the backend
is called, so a crash in between leaves a row the reconciler finds. Activation, the audit
record and the idempotent outcome commit in one transaction; if that fails, the credential
just minted is revoked at once (fail closed), never handed out unrecorded (`leases.failures`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import fields, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam
from sqlmodel import Session, select

from broker.approvals import grants
from broker.approvals import service as approvals
from broker.approvals.binding import Binding
from broker.audit.events import AuditEvent, DecisionRef, GrantRef
from broker.audit.service import append
from broker.breakglass import service as breakglass
from broker.db import transaction, utcnow
from broker.errors import (
    BrokerError,
    Conflict,
    Forbidden,
    ProviderError,
    Unauthenticated,
)
from broker.identity.callers import Caller
from broker.leases import deviation, idempotency, records
from broker.leases.facts import bounds_lookup, session_facts
from broker.leases.failures import record_failed_mint, revoke_unrecorded
from broker.leases.outcomes import CapabilityIssued, CapabilityOutcome, PendingApproval
from broker.leases.vocabulary import CapabilityAsk, LeaseStatus, new_capability_id
from broker.metrics import DECISIONS, MINTS
from broker.models import Approval, JitGrant, Lease, NewLease, SessionRow, SessionSnapshot
from broker.permissions import service as live_permissions
from broker.policy import (
    Decision,
    LivePermission,
    RequestFacts,
    SessionFacts,
    approval_rule,
    evaluate_with_shadow,
)
from broker.policy.resources import canonical_resource
from broker.providers.base import Grant, Minted
from broker.runtime import Broker
from broker.store.sql import sql_for
from broker.times import rfc3339

log = logging.getLogger("broker.leases")

_SESSIONS = SessionRow.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation
_LOCK_SESSION = (select(*(_SESSIONS.c[f.name] for f in fields(SessionSnapshot)))
                 .where(_SESSIONS.c.id == bindparam("s")).with_for_update())


def _issue(db: Session, lease: NewLease, key_row: dict[str, Any] | None = None) -> None:
    """Insert `lease` and count it against its session's issued budget (failed mints count too);
    `key_row`: the idempotency key's row (`idempotency.finished_row`), written with them."""
    conn = db.connection()
    sql_for(conn).insert_lease(conn, lease, key_row)


def binding(ask: CapabilityAsk, session_id: str) -> Binding:
    """What an approval is bound to: any change is another request."""
    return Binding(session_id=session_id, resource=ask.resource, access=ask.access, ttl_seconds=ask.ttl_seconds,
                   tool=ask.tool, parameters=ask.parameters)


def lock_session(db: Session, session_id: str) -> SessionSnapshot | None:
    """Serialises decisions per session, so budgets and escalation see every sibling. The row
    comes back as a snapshot, outside the ORM session: read it, change the row with SQL."""
    row = db.connection().execute(_LOCK_SESSION, {"s": session_id}).first()
    return None if row is None else SessionSnapshot(**row._mapping)


def _evaluate(broker: Broker, db: Session, session: SessionSnapshot, ask: CapabilityAsk, now: datetime,
              approval: Approval | None, live: LivePermission | None) -> tuple[Decision, Decision | None, JitGrant | None]:
    """The decision; where it waits for approval, a matching grant stands in for one."""
    facts = session_facts(db, session, (broker.policies.current, broker.policies.shadow))
    return decide(broker, db, facts, ask.resource, ask.access, ask.ttl_seconds, now, approved=approval is not None,
                  live=live, justified=ask.justification is not None)


def decide(broker: Broker, db: Session, facts: SessionFacts, resource: str, access: str, ttl_seconds: int | None,
           now: datetime, *, approved: bool, live: LivePermission | None, justified: bool = False,
           lock_grant: bool = True) -> tuple[Decision, Decision | None, JitGrant | None]:
    """The evaluator's decision for this session, and where it waits for an approval, the grant
    that stands in for one (with the decision re-made as approved, within the grant's time).
    The request path and `policy explain` both decide here, so they tell the same story.
    A break-glass decision is never stood in for by a grant (`justified`: the request carries
    its written justification)."""
    policy, shadow_policy = broker.policies.current, broker.policies.shadow

    def run(ttl: int | None, approved: bool) -> tuple[Decision, Decision | None]:
        request = RequestFacts(resource=resource, access=access, ttl_seconds=ttl, now=now, approved=approved,
                               live=live, justified=justified)
        return evaluate_with_shadow(policy, shadow_policy, facts, request, bounds_lookup(broker))

    decision, shadow = run(ttl_seconds, approved)
    if decision.result != "approval_required" or approved or decision.tier is None:
        return decision, shadow, None
    grant = grants.find_usable(db, facts.session_id, resource, access, now, lock=lock_grant)
    if grant is None or approval_rule(policy, decision.tier).min_approvals > 1 or decision.reason == breakglass.REASON:
        return decision, shadow, None
    # Nothing minted under a grant outlives it.
    left = math.floor((grant.expires_at - now).total_seconds())
    granted, granted_shadow = run(min(ttl_seconds or left, left), True)
    if granted.result != "allow":
        return decision, shadow, None
    return granted, granted_shadow, grant


def request_capability(
    broker: Broker, caller: Caller, ask: CapabilityAsk, idempotency_key: str | None
) -> CapabilityOutcome:
    """Issued, or pending a human's approval; a refusal is raised (Denied, BudgetExceeded...)."""
    if caller.kind != "agent" or caller.session_id is None:
        raise Forbidden("only an agent's session token may request capabilities")
    # Decided once, before any layer: every layer, the lease and the provider see this form.
    ask = replace(ask, resource=canonical_resource(ask.resource))
    session_id = caller.session_id
    if idempotency_key is not None:
        idempotency.check_key(idempotency_key)
    while True:
        try:
            return _decide_and_mint(broker, session_id, ask, idempotency_key)
        except idempotency.InProgress:
            assert idempotency_key is not None  # noqa: S101  # InProgress is raised only for a keyed request
            replay = idempotency.wait_for(broker, session_id, idempotency_key)
            if replay is not None:
                return replay
            # The first request gave up (5xx): this one takes the key over.
        except BrokerError as exc:
            if idempotency_key is not None and exc.status >= 500:
                idempotency.abandon(broker, session_id, idempotency_key)
            raise
        except Exception:
            if idempotency_key is not None:
                idempotency.abandon(broker, session_id, idempotency_key)
            raise


def _decide_and_mint(  # noqa: C901  # the full path's decide-record-mint order in one place, as docs/lifecycle.md tells it
    broker: Broker, session_id: str, ask: CapabilityAsk, idem_key: str | None
) -> CapabilityOutcome:
    now = utcnow()
    policy = broker.policies.current
    # The human's live permission (GitHub, OpenBao ...), asked before the session lock is taken.
    live = live_permissions.for_session(broker.engine, broker.permissions, policy, session_id, ask.resource, ask.access)
    refusal: BrokerError | None = None
    tripped: str | None = None
    with transaction(broker.engine) as db:
        session = lock_session(db, session_id)
        if session is None:
            raise Unauthenticated("the session behind this token does not exist")
        ticket = None
        if idem_key is not None:
            claimed = idempotency.claim(db, broker, session_id, idem_key, ask.idempotency_hash(session_id), now)
            if not isinstance(claimed, idempotency.Ticket):
                return claimed  # the stored outcome of this key's first request
            ticket = claimed
        approval = approvals.redeem(db, ask.approval_id, session, binding(ask, session.id), now) \
            if ask.approval_id else None
        decision, shadow, grant_used = _evaluate(broker, db, session, ask, now, approval, live)
        DECISIONS.labels(result=decision.result, tier=decision.tier or "none", reason=decision.reason).inc()
        if shadow is not None and shadow.result != decision.result:
            log.info("shadow policy would %s (%s) where enforced says %s", shadow.result, shadow.reason, decision.result)
        record = DecisionRef.of(
            decision, shadow,
            # Links the mint to the approval (and so to the request it was given for) in the audit.
            approval=None if approval is None else {"approval_id": approval.id, "approved_by": approval.decided_by,
                                                    "request_hash": approval.request_hash},
            grant=None if grant_used is None else {"grant_id": grant_used.id, "granted_by": grant_used.granted_by},
        )
        if decision.result == "deny":
            refusal = records.refusal(decision)
            idempotency.finish(db, broker, ticket, refusal)
            append(db, records.capability_event(session, ask, "capability.denied", "denied", tier=decision.tier,
                                                decision=record))
            # Deviation (broker/leases/deviation.py): count scope/tier/escalation refusals; the Nth trips.
            tripped = deviation.note_refusal(db, broker, session, ask, decision, now)
        elif decision.result == "approval_required":
            return _pending(db, broker, session, ask, decision, record, ticket, now)
        else:
            assert decision.ttl_seconds is not None and decision.provider is not None and decision.tier is not None  # noqa: S101  # an allow decision carries them (policy/evaluate.py)
            provider = broker.provider(decision.provider)
            lease = new_lease(session, ask, decision, now)
            if approval is not None:
                approvals.mark_used(db, approval, lease.id, now)  # single use, in the lease's transaction
                if breakglass.is_break_glass(approval):  # break-glass (broker/breakglass/): opens its post-review
                    breakglass.used(db, broker, session.row(), approval, lease.id, now)
            if grant_used is not None:
                grants.consume(db, grant_used)
            grant = grant_for(session, ask, decision, lease, ask.confirmation_jkt)
            if provider.mints_locally:
                # Nothing outside this database learns of the credential before COMMIT, so
                # reserving, minting and activating are one transaction: a crash leaves nothing.
                try:
                    with MINTS.labels(decision.provider).time():
                        minted = provider.mint(grant)
                except BrokerError as exc:
                    refusal = exc
                    lease.status, lease.status_reason, lease.ended_at = LeaseStatus.FAILED, exc.code, now
                    _issue(db, lease)
                    if exc.status < 500:
                        idempotency.finish(db, broker, ticket, exc)
                    append(db, records.mint_failed_event(session, ask, grant, provider.name, record, exc))
                else:
                    return _activate(db, broker, session, ask, lease, grant, provider.name, minted, record, ticket)
            else:
                _issue(db, lease)
                if ticket is not None:
                    idempotency.hold(db, ticket)
    if refusal is not None:
        deviation.end_tripped(broker, session_id, tripped)  # a tripwire whose action is `end`
        raise refusal
    return _mint(broker, session, ask, grant, provider.name, record, idem_key)


def new_lease(session: SessionSnapshot, ask: CapabilityAsk, decision: Decision, now: datetime) -> NewLease:
    """The lease an allowed decision reserves: `minting` until its credential exists."""
    assert decision.ttl_seconds is not None and decision.provider is not None and decision.tier is not None  # noqa: S101  # an allow decision carries them (policy/evaluate.py)
    return NewLease(
        id=new_capability_id(), session_id=session.id, resource=ask.resource, access=ask.access,
        tier=decision.tier, provider=decision.provider, status=LeaseStatus.MINTING,
        ttl_seconds=decision.ttl_seconds, purpose=ask.purpose, tool=ask.tool, parameters=ask.parameters,
        created_at=now, expires_at=now + timedelta(seconds=decision.ttl_seconds),
    )


def grant_for(session: SessionSnapshot, ask: CapabilityAsk, decision: Decision, lease: NewLease,
           confirmation_jkt: str | None) -> Grant:
    """What the provider is asked to mint for `lease`."""
    assert decision.tier is not None and decision.ttl_seconds is not None  # noqa: S101  # an allow decision carries them (policy/evaluate.py)
    return Grant(
        capability_id=lease.id, session_id=session.id, task_id=session.task_id, human=session.human,
        agent=session.agent, resource=ask.resource, access=ask.access, tier=decision.tier,
        ttl_seconds=decision.ttl_seconds, options=dict(decision.options), confirmation_jkt=confirmation_jkt,
    )


def _pending(db: Session, broker: Broker, session: SessionSnapshot, ask: CapabilityAsk, decision: Decision,
             record: DecisionRef, ticket: idempotency.Ticket | None, now: datetime) -> PendingApproval:
    approval, _ = approvals.open_request(
        db, broker, session.row(), binding(ask, session.id), tier=decision.tier or "", reason=decision.reason,
        approvers=list(decision.approvers), granted_ttl=decision.ttl_seconds, purpose=ask.purpose, now=now,
        justification=ask.justification,
    )
    pending = PendingApproval(
        approval_id=approval.id, expires_at=approval.expires_at, reason=decision.reason,
        approvers=list(approval.approvers), min_approvals=approval.min_approvals,
        binding_message=approval.binding_message, request_hash=approval.request_hash,
    )
    idempotency.finish(db, broker, ticket, pending)
    append(
        db,
        records.capability_event(
            session, ask, "capability.pending", "pending_approval", tier=decision.tier, decision=record,
            grant=GrantRef(status="pending_approval", approval_id=approval.id, ttl_seconds=decision.ttl_seconds),
        ),
    )
    return pending


def _activate(db: Session, broker: Broker, session: SessionSnapshot, ask: CapabilityAsk, lease: Lease | NewLease,
              grant: Grant, provider: str, minted: Minted, record: DecisionRef,
              ticket: idempotency.Ticket | None) -> CapabilityIssued:
    """Lease active, audit record, idempotent outcome: all in the caller's transaction. A
    NewLease (minted locally) is issued here, complete; a remote mint's `minting` row is updated."""
    issued = activated(broker, lease, minted)
    if isinstance(lease, NewLease):
        _issue(db, lease, None if ticket is None else idempotency.finished_row(broker, ticket, issued))
    else:
        db.add(lease)
        idempotency.finish(db, broker, ticket, issued)
    # Last, so the session's chain tip is held for the least time.
    append(db, minted_event(session, ask, lease, grant, record))
    return issued


def activated(broker: Broker, lease: Lease | NewLease, minted: Minted) -> CapabilityIssued:
    """`lease` active with what the provider minted; the answer the caller gets."""
    lease.status = LeaseStatus.ACTIVE
    lease.minted_at = utcnow()
    lease.backend_expires_at = minted.expires_at
    lease.handle = minted.handle
    lease.fingerprint = minted.fingerprint
    if minted.revocation_secret is not None:
        lease.sealed_secret = broker.sealer.seal(minted.revocation_secret, lease.id)
    return CapabilityIssued(capability_id=lease.id, session_id=lease.session_id, resource=lease.resource,
                            access=lease.access, tier=lease.tier, provider=lease.provider,
                            expires_at=lease.expires_at, credential=minted.credential)


def minted_event(session: SessionSnapshot, ask: CapabilityAsk, lease: Lease | NewLease, grant: Grant,
                  record: DecisionRef) -> AuditEvent:
    return records.capability_event(session, ask, "capability.minted", "minted", tier=grant.tier, decision=record,
                                    grant=GrantRef.of(lease, expires_at=rfc3339(lease.expires_at)))


def _mint(
    broker: Broker, session: SessionSnapshot, ask: CapabilityAsk, grant: Grant, provider_name: str,
    record: DecisionRef, idem_key: str | None,
) -> CapabilityIssued:
    """A remote backend: the `minting` row is committed; call out, then activate in a new transaction."""
    provider = broker.provider(provider_name)
    minted: Minted | None = None
    failure: BrokerError | None = None
    try:
        with MINTS.labels(provider_name).time():
            minted = provider.mint(grant)
    except BrokerError as exc:
        failure = exc
    except Exception as exc:  # an SDK error the provider did not translate: still fail closed
        log.exception("provider %s raised an untranslated error", provider_name)
        failure = ProviderError(f"provider {provider_name} failed: {exc.__class__.__name__}")
    if failure is not None or minted is None:
        assert failure is not None  # noqa: S101  # type narrowing: one of the two is set
        record_failed_mint(broker, session, ask, grant, provider_name, record, idem_key, failure)
        raise failure
    try:
        with transaction(broker.engine) as db:
            lease = db.get(Lease, grant.capability_id, with_for_update=True)
            assert lease is not None  # noqa: S101  # the lease was reserved before the mint
            if lease.status != LeaseStatus.MINTING:
                # Torn down while we were minting: what we hold must die now.
                raise Conflict("the session ended while the capability was being minted", code="session-ended")
            return _activate(db, broker, session, ask, lease, grant, provider_name, minted, record,
                             idempotency.reload(db, session.id, idem_key))
    except BaseException:
        revoke_unrecorded(broker, provider, grant, minted)
        raise
