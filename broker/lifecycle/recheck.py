"""Revocation follows the truth: live capabilities are checked again against their live source.

Every `permission_recheck_seconds`, each active lease whose resource rule names a live source
and that was not checked (or minted) within the interval is taken, its human's permission asked
again bypassing the cache (one call per distinct human, resource and access in a pass), and
revoked where the source now says deny: the human lost the permission since the mint. Each such
lease gets a `capability.permission_lost` audit record (the source and what it said) and then
the ordinary revocation with reason `human-permission-lost` (receipt and audit as any revoke).

An `unknown` answer (the source is down) revokes nothing: requests already fail closed while a
source cannot answer, and ending every running task on a GitHub blip would be worse than the
at most one interval a lost permission may outlive it once the source answers again.

Several replicas: a pass claims the leases it checks by setting `live_checked_at` in a short
transaction that skips rows another replica holds (`FOR UPDATE SKIP LOCKED` on PostgreSQL), so
each lease is checked by one replica per interval; a replica dying mid-pass delays those
leases' check by one interval, and revocation itself is claim-safe (`revoke_leases`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_
from sqlmodel import col, select

from broker.audit.events import AgentRef, AuditEvent, DecisionRef, GrantRef, RequestRef
from broker.audit.service import append_many
from broker.db import transaction, utcnow
from broker.leases.revocation import revoke_leases
from broker.models import Lease, SessionRow
from broker.periodic import Periodic
from broker.policy import CompiledPolicy, LivePermission
from broker.runtime import Broker

log = logging.getLogger("broker.lifecycle.recheck")

REASON = "human-permission-lost"
ACTOR = "broker:permission-recheck"


@dataclass
class RecheckReport:
    checked: int = 0
    asked: int = 0  # backend questions (distinct human, resource, access)
    receipts: list[dict[str, Any]] = field(default_factory=list)  # one per revoked capability


@dataclass(frozen=True)
class _Claimed:
    lease_id: str
    session_id: str
    human: str
    agent: str
    task_id: str
    resource: str
    access: str
    tier: str
    provider: str


def recheck_once(broker: Broker) -> RecheckReport:
    report = RecheckReport()
    policy = broker.policies.current
    if not policy.live_sources():
        return report
    batch = broker.settings.sweep_batch_size
    answers: dict[tuple[str, str, str], LivePermission | None] = {}  # one question per pass, not per batch
    while True:
        now = utcnow()
        claimed = _claim_due(broker, policy, now, batch)
        report.checked += len(claimed)
        lost: list[tuple[_Claimed, LivePermission]] = []
        for lease in claimed:
            key = (lease.human, lease.resource, lease.access)
            if key not in answers:
                answers[key] = broker.permissions.consult(policy, lease.human, lease.resource, lease.access, fresh=True)
                report.asked += 1
            live = answers[key]
            if live is not None and live.verdict == "deny":
                lost.append((lease, live))
            elif live is not None and live.verdict == "unknown":
                log.warning("re-check of %s: %s could not answer (%s); kept until it can", lease.lease_id,
                            live.source, live.evidence.get("summary"))
        if lost:
            report.receipts += _revoke_lost(broker, policy, lost)
        if len(claimed) < batch:
            return report


def _claim_due(broker: Broker, policy: CompiledPolicy, now: datetime, limit: int) -> list[_Claimed]:
    """Active leases of active sessions not checked within the interval; marked checked as they are taken."""
    due_before = now - timedelta(seconds=broker.settings.permission_recheck_seconds)
    last_look = func.coalesce(col(Lease.live_checked_at), col(Lease.minted_at), col(Lease.created_at))
    with transaction(broker.engine) as db:
        stmt = (
            select(Lease, SessionRow)
            .join(SessionRow, col(SessionRow.id) == col(Lease.session_id))
            .where(Lease.status == "active", SessionRow.status == "active", last_look <= due_before,
                   or_(col(Lease.claimed_until).is_(None), col(Lease.claimed_until) <= now))
            .order_by(Lease.id)
            .limit(limit)
            .with_for_update(skip_locked=True, of=Lease)
        )
        rows = db.exec(stmt).all()
        out = []
        for lease, session in rows:
            lease.live_checked_at = now  # the claim: not due again for an interval, on any replica
            db.add(lease)
            rule = policy.match_resource(lease.resource)
            if rule is not None and rule.human_permission is not None:
                out.append(_Claimed(lease.id, session.id, session.human, session.agent, session.task_id,
                                    lease.resource, lease.access, lease.tier, lease.provider))
    return out


def _revoke_lost(broker: Broker, policy: CompiledPolicy,
                 lost: list[tuple[_Claimed, LivePermission]]) -> list[dict[str, Any]]:
    now = utcnow()
    events = [
        AuditEvent(
            type="capability.permission_lost",
            outcome="revoking",
            actor=ACTOR,
            human_principal=lease.human,
            agent=AgentRef(lease.agent, lease.session_id, lease.task_id),
            request=RequestRef(operation="recheck", resource=lease.resource, access=lease.access, tier=lease.tier,
                               reason=REASON),
            policy_decision=DecisionRef("deny", "human-lacks-permission", _rule_of(policy, lease), policy.version,
                                        human_permission=live.to_dict()),
            jit_grant=GrantRef(status="active", capability_id=lease.lease_id, provider=lease.provider),
            detail={"why": f"{live.source} no longer allows {lease.access} on {lease.resource}: "
                           f"{live.evidence.get('summary', '')}"},
        )
        for lease, live in lost
    ]
    with transaction(broker.engine) as db:
        append_many(db, events, now=now)  # why, before the revocation itself: fail closed if it cannot be written
    summary = revoke_leases(broker, [lease.lease_id for lease, _ in lost], reason=REASON, actor=ACTOR)
    receipts = []
    for lease, live in lost:
        status = ("revoked" if lease.lease_id in summary.revoked
                  else "revoke_pending" if lease.lease_id in summary.pending else "skipped")
        receipts.append({"capability_id": lease.lease_id, "status": status, "reason": REASON, "source": live.source,
                         "evidence": dict(live.evidence)})
        log.info("re-check: %s %s (%s lost %s on %s: %s)", lease.lease_id, status, lease.human, lease.access,
                 lease.resource, live.evidence.get("summary"))
    return receipts


def _rule_of(policy: CompiledPolicy, lease: _Claimed) -> str | None:
    rule = policy.match_resource(lease.resource)
    return rule.human_permission.rule if rule is not None and rule.human_permission is not None else None


def permission_rechecker(broker: Broker) -> Periodic:
    """`recheck_once` every `permission_recheck_seconds`, beside the sweeper. Each lease is due
    once per interval, so a finer tick gains nothing."""
    return Periodic("broker-permission-recheck", broker.settings.permission_recheck_seconds,
                    lambda: recheck_once(broker), log)
