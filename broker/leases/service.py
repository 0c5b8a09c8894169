"""Capabilities from request to revocation: decide, reserve a lease, mint, activate, revoke.

The order is what makes crashes safe. The lease row (`minting`) commits before the backend
is called, so a crash in between leaves a row the reconciler finds. Activation, the audit
record and the idempotent outcome commit in one transaction; if that fails, the credential
just minted is revoked at once (fail closed), never handed out unrecorded.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from broker.approvals import grants
from broker.approvals import service as approvals
from broker.approvals.service import Binding
from broker.audit.chain import canonical_json
from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import (
    BrokerError,
    Conflict,
    Forbidden,
    ProviderError,
    Unauthenticated,
)
from broker.identity.callers import Caller
from broker.leases import idempotency, records
from broker.leases.revocation import finish_revocation
from broker.metrics import DECISIONS, MINTS
from broker.models import Approval, IdempotencyRecord, JitGrant, Lease, SessionRow
from broker.permissions import service as live_permissions
from broker.policy import (
    Decision,
    LivePermission,
    RequestFacts,
    ScopeEntry,
    SessionFacts,
    approval_rule,
    evaluate_with_shadow,
)
from broker.policy.compiled import CompiledPolicy
from broker.policy.resources import canonical_resource
from broker.providers.base import Grant, Minted, RevokeTarget, TtlBounds
from broker.runtime import Broker

log = logging.getLogger("broker.leases")

LIVE = ("minting", "active", "revoke_pending")


@dataclass(frozen=True)
class CapabilityAsk:
    resource: str
    access: str
    purpose: str
    ttl_seconds: int | None = None
    tool: str | None = None
    parameters: dict[str, Any] | None = None
    approval_id: str | None = None
    # RFC 9449: the DPoP key thumbprint the token endpoint checked; not part of what is approved.
    confirmation_jkt: str | None = None

    def binding(self, session_id: str) -> Binding:
        """What an approval is bound to: any change is another request."""
        return Binding(session_id=session_id, resource=self.resource, access=self.access,
                       ttl_seconds=self.ttl_seconds, tool=self.tool, parameters=self.parameters)

    def request_hash(self, session_id: str) -> str:
        return self.binding(session_id).request_hash()

    def idempotency_hash(self, session_id: str) -> str:
        body = {**self.__dict__, "session_id": session_id}
        if body["confirmation_jkt"] is None:
            del body["confirmation_jkt"]  # hashes of requests without DPoP stay as they were
        return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def new_capability_id() -> str:
    return "cap_" + secrets.token_hex(16)


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


def session_facts(db: Session, session: SessionRow, policies: Sequence[CompiledPolicy | None] | None = None) -> SessionFacts:
    """What the evaluator needs of the session. Given the policies that will judge it (current and
    shadow), the cost is bounded by the policies, not by the session's leases: the live count is
    counted only up to the largest `max_active_per_session` (the budget compares against it;
    past it the count says "at the limit"), and of the live tiers only the escalation tiers are
    looked up, one indexed EXISTS each (ix_leases_session_tier_status), all in one statement.
    Without policies (explain, grants) every live lease is read, as before."""
    if policies is None:
        tiers = db.exec(select(Lease.tier).where(Lease.session_id == session.id, col(Lease.status).in_(LIVE))).all()
        active_count, active_tiers = len(tiers), frozenset(tiers)
    else:
        judged = [p for p in policies if p is not None]
        caps = [p.max_active_per_session for p in judged if p.max_active_per_session is not None]
        escalation = sorted(set().union(*(p.escalation_tiers for p in judged)))
        # One round trip: the bounded count and one EXISTS per escalation tier.
        columns = [_LIVE_UP_TO if caps else "0"] + [_LIVE_TIER.format(i=i) for i in range(len(escalation))]
        params: dict[str, Any] = {"s": session.id, "cap": max(caps) if caps else 0}
        params.update({f"t{i}": tier for i, tier in enumerate(escalation)})
        row = db.connection().execute(text("SELECT " + ", ".join(columns)), params).one()
        active_count = int(row[0])
        active_tiers = frozenset(tier for tier, held in zip(escalation, row[1:], strict=True) if held)
    return SessionFacts(
        session_id=session.id,
        human=session.human,
        agent=session.agent,
        task_id=session.task_id,
        scope=tuple(ScopeEntry(s["resource"], tuple(s["access"])) for s in session.scope),
        status=session.status,
        expires_at=session.expires_at,
        issued_count=session.issued_count,
        active_count=active_count,
        active_tiers=active_tiers,
    )


_LIVE_STATUSES = ", ".join(f"'{status}'" for status in LIVE)
_LIVE_UP_TO = (f"(SELECT count(*) FROM (SELECT 1 FROM leases WHERE session_id = :s AND status IN ({_LIVE_STATUSES}) "
               "LIMIT :cap) AS live)")
_LIVE_TIER = ("EXISTS (SELECT 1 FROM leases WHERE session_id = :s AND tier = :t{i} AND status IN "
              f"({_LIVE_STATUSES}))")


def lock_session(db: Session, session_id: str) -> SessionRow | None:
    """Serialises decisions per session, so budgets and escalation see every sibling."""
    return db.exec(select(SessionRow).where(SessionRow.id == session_id).with_for_update()).first()


def bounds_lookup(broker: Broker) -> Any:
    def lookup(provider: str, resource: str, options: dict[str, Any]) -> TtlBounds:
        return broker.provider(provider).ttl_bounds(resource, options)

    return lookup


def _evaluate(broker: Broker, db: Session, session: SessionRow, ask: CapabilityAsk, now: datetime,
              approval: Approval | None, live: LivePermission | None) -> tuple[Decision, Decision | None, JitGrant | None]:
    """The decision; where it waits for approval, a matching grant stands in for one."""
    policy, shadow_policy = broker.policies.current, broker.policies.shadow
    facts = session_facts(db, session, (policy, shadow_policy))

    def run(ttl: int | None, approved: bool) -> tuple[Decision, Decision | None]:
        request = RequestFacts(resource=ask.resource, access=ask.access, ttl_seconds=ttl, now=now, approved=approved,
                               live=live)
        return evaluate_with_shadow(policy, shadow_policy, facts, request, bounds_lookup(broker))

    decision, shadow = run(ask.ttl_seconds, approval is not None)
    if decision.result != "approval_required" or approval is not None or decision.tier is None:
        return decision, shadow, None
    grant = grants.find_usable(db, session.id, ask.resource, ask.access, now)
    if grant is None or approval_rule(policy, decision.tier).min_approvals > 1:
        return decision, shadow, None
    # Nothing minted under a grant outlives it.
    left = math.floor((grant.expires_at - now).total_seconds())
    granted, granted_shadow = run(min(ask.ttl_seconds or left, left), True)
    if granted.result != "allow":
        return decision, shadow, None
    return granted, granted_shadow, grant


def request_capability(
    broker: Broker, caller: Caller, ask: CapabilityAsk, idempotency_key: str | None
) -> tuple[int, dict[str, Any]]:
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
            assert idempotency_key is not None
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


def _decide_and_mint(
    broker: Broker, session_id: str, ask: CapabilityAsk, idem_key: str | None
) -> tuple[int, dict[str, Any]]:
    now = utcnow()
    policy = broker.policies.current
    # The human's live permission (GitHub, OpenBao ...), asked before the session lock is taken.
    live = live_permissions.for_session(broker, policy, session_id, ask.resource, ask.access)
    refusal: BrokerError | None = None
    with transaction(broker.engine) as db:
        session = lock_session(db, session_id)
        if session is None:
            raise Unauthenticated("the session behind this token does not exist")
        ticket = None
        if idem_key is not None:
            claimed = idempotency.claim(db, broker, session_id, idem_key, ask.idempotency_hash(session_id), now)
            if isinstance(claimed, tuple):
                return claimed  # the stored outcome of this key's first request
            ticket = claimed
        approval = approvals.redeem(db, ask.approval_id, session, ask.binding(session.id), now) \
            if ask.approval_id else None
        decision, shadow, grant_used = _evaluate(broker, db, session, ask, now, approval, live)
        DECISIONS.labels(result=decision.result, tier=decision.tier or "none", reason=decision.reason).inc()
        if shadow is not None and shadow.result != decision.result:
            log.info("shadow policy would %s (%s) where enforced says %s", shadow.result, shadow.reason, decision.result)
        record = records.decision_record(decision, shadow)
        if approval is not None:
            # Links the mint to the approval (and so to the request it was given for) in the audit.
            record["approval"] = {"approval_id": approval.id, "approved_by": approval.decided_by,
                                  "request_hash": approval.request_hash}
        if grant_used is not None:
            record["grant"] = {"grant_id": grant_used.id, "granted_by": grant_used.granted_by}
        if decision.result == "deny":
            refusal = records.refusal(decision)
            idempotency.finish(db, broker, ticket, refusal.status, refusal.to_body())
            append(db, records.capability_event(session, ask, "capability.denied", "denied", tier=decision.tier,
                                                decision=record))
        elif decision.result == "approval_required":
            return _pending(db, broker, session, ask, decision, record, ticket, now)
        else:
            assert decision.ttl_seconds is not None and decision.provider is not None and decision.tier is not None
            provider = broker.provider(decision.provider)
            lease = Lease(
                id=new_capability_id(),
                session_id=session.id,
                resource=ask.resource,
                access=ask.access,
                tier=decision.tier,
                provider=decision.provider,
                status="minting",
                ttl_seconds=decision.ttl_seconds,
                purpose=ask.purpose,
                tool=ask.tool,
                parameters=ask.parameters,
                created_at=now,
                expires_at=now + timedelta(seconds=decision.ttl_seconds),
            )
            session.issued_count += 1
            db.add(session)
            if approval is not None:
                approvals.mark_used(db, approval, lease.id, now)  # single use, in the lease's transaction
            if grant_used is not None:
                grants.consume(db, grant_used)
            grant = Grant(
                capability_id=lease.id,
                session_id=session.id,
                task_id=session.task_id,
                human=session.human,
                agent=session.agent,
                resource=ask.resource,
                access=ask.access,
                tier=decision.tier,
                ttl_seconds=decision.ttl_seconds,
                options=dict(decision.options),
                confirmation_jkt=ask.confirmation_jkt,
            )
            if getattr(provider, "mints_locally", False):
                # Nothing outside this database learns of the credential before COMMIT, so
                # reserving, minting and activating are one transaction: a crash leaves nothing.
                try:
                    with MINTS.labels(decision.provider).time():
                        minted = provider.mint(grant)
                except BrokerError as exc:
                    refusal = exc
                    lease.status, lease.status_reason, lease.ended_at = "failed", exc.code, now
                    db.add(lease)
                    if exc.status < 500:
                        idempotency.finish(db, broker, ticket, exc.status, exc.to_body())
                    append(db, records.mint_failed_event(session, ask, grant, provider.name, record, exc))
                else:
                    return _activate(db, broker, session, ask, lease, grant, provider.name, minted, record, ticket)
            else:
                db.add(lease)
                if ticket is not None:
                    idempotency.hold(db, ticket)
    if refusal is not None:
        raise refusal
    return _mint(broker, session, ask, grant, decision.provider, record, idem_key)


def _pending(db: Session, broker: Broker, session: SessionRow, ask: CapabilityAsk, decision: Decision,
             record: dict[str, Any], ticket: IdempotencyRecord | None, now: datetime) -> tuple[int, dict[str, Any]]:
    approval, _ = approvals.open_request(
        db, broker, session, ask.binding(session.id), tier=decision.tier or "", reason=decision.reason,
        approvers=list(decision.approvers), granted_ttl=decision.ttl_seconds, purpose=ask.purpose, now=now,
    )
    body = {
        "status": "pending_approval",
        "approval_id": approval.id,
        "expires_at": _iso(approval.expires_at),
        "reason": decision.reason,
        "approvers": list(approval.approvers),
        "min_approvals": approval.min_approvals,
        "binding_message": approval.binding_message,
        "request_hash": approval.request_hash,
    }
    idempotency.finish(db, broker, ticket, 202, body)
    append(
        db,
        records.capability_event(
            session, ask, "capability.pending", "pending_approval", tier=decision.tier, decision=record,
            grant={"status": "pending_approval", "approval_id": approval.id, "ttl_seconds": decision.ttl_seconds},
        ),
    )
    return 202, body


def _activate(db: Session, broker: Broker, session: SessionRow, ask: CapabilityAsk, lease: Lease, grant: Grant,
              provider: str, minted: Minted, record: dict[str, Any],
              ticket: IdempotencyRecord | None) -> tuple[int, dict[str, Any]]:
    """Lease active, audit record, idempotent outcome: all in the caller's transaction."""
    lease.status = "active"
    lease.minted_at = utcnow()
    lease.backend_expires_at = minted.expires_at
    lease.handle = minted.handle
    lease.fingerprint = minted.fingerprint
    if minted.revocation_secret is not None:
        lease.sealed_secret = broker.sealer.seal(minted.revocation_secret, lease.id)
    db.add(lease)
    body = {
        "capability_id": lease.id,
        "status": "active",
        "session_id": session.id,
        "resource": lease.resource,
        "access": lease.access,
        "tier": lease.tier,
        "provider": lease.provider,
        "expires_at": _iso(lease.expires_at),
        "credential": minted.credential,
    }
    idempotency.finish(db, broker, ticket, 201, body)
    # Last, so the audit head (one row every request serialises on) is held for the least time.
    append(
        db,
        records.capability_event(
            session, ask, "capability.minted", "minted", tier=grant.tier, decision=record,
            grant={"status": "active", "capability_id": lease.id, "provider": provider,
                   "ttl_seconds": grant.ttl_seconds, "expires_at": _iso(lease.expires_at),
                   "credential_fingerprint": minted.fingerprint},
        ),
    )
    return 201, body


def _mint(
    broker: Broker, session: SessionRow, ask: CapabilityAsk, grant: Grant, provider_name: str,
    record: dict[str, Any], idem_key: str | None,
) -> tuple[int, dict[str, Any]]:
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
        assert failure is not None
        with transaction(broker.engine) as db:
            lease = db.get(Lease, grant.capability_id, with_for_update=True)
            assert lease is not None
            lease.status, lease.status_reason, lease.ended_at = "failed", failure.code, utcnow()
            db.add(lease)
            if failure.status < 500:
                idempotency.finish(db, broker, idempotency.reload(db, session.id, idem_key), failure.status,
                                   failure.to_body())
            append(db, records.mint_failed_event(session, ask, grant, provider_name, record, failure))
        raise failure
    try:
        with transaction(broker.engine) as db:
            lease = db.get(Lease, grant.capability_id, with_for_update=True)
            assert lease is not None
            if lease.status != "minting":
                # Torn down while we were minting: what we hold must die now.
                raise Conflict("the session ended while the capability was being minted", code="session-ended")
            return _activate(db, broker, session, ask, lease, grant, provider_name, minted, record,
                             idempotency.reload(db, session.id, idem_key))
    except BaseException:
        _revoke_unrecorded(broker, provider, grant, minted)
        raise


def _revoke_unrecorded(broker: Broker, provider: Any, grant: Grant, minted: Minted) -> None:
    """The credential exists but its activation did not commit: kill it before anyone uses it."""
    target = RevokeTarget(
        capability_id=grant.capability_id, session_id=grant.session_id, resource=grant.resource,
        access=grant.access, handle=minted.handle, expires_at=minted.expires_at,
        revocation_secret=minted.revocation_secret,
    )
    try:
        provider.revoke(target)
    except Exception:
        log.exception("revoking an unrecorded credential for %s failed; the reconciler will retry", grant.capability_id)
        return
    try:
        with transaction(broker.engine) as db:
            lease = db.get(Lease, grant.capability_id, with_for_update=True)
            if lease is not None and lease.status == "minting":
                lease.status, lease.status_reason, lease.ended_at = "failed", "activation-failed", utcnow()
                db.add(lease)
            elif lease is not None and lease.status == "revoke_pending" and lease.handle is None:
                # Revoked (teardown) while minting: now it really is.
                lease.handle, lease.fingerprint = minted.handle, minted.fingerprint
                session = db.get(SessionRow, lease.session_id)
                finish_revocation(db, lease, session, lease.revoke_reason or "revoked", "broker", utcnow())
    except Exception:
        log.exception("could not mark %s failed; the reconciler will", grant.capability_id)
