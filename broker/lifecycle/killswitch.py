"""The kill switch: revoke every live capability matching a filter, now.

Matchers (at least one, all given must hold): `session_id`, `agent`, `human` (of the
session) and `resource` (exact, or a glob with `*` within a segment and `**` across). An
admin may match anything; an orchestrator only the sessions it created; a human only the
sessions delegated by them. Sessions matched by session, agent or human are also ended, so
the agent cannot simply ask again (`end_sessions`, default: true unless a resource is given,
because a resource match is about the resource, not about the sessions that touched it).

The request is audited (`revocation.requested`, with the filter and what it matched) in the
transaction that selects the leases, before any of them is revoked; each lease then gets its
own `capability.revoked` (or `revoke_failed`) record through the usual path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from sqlmodel import col, select

from broker.audit.events import AgentRef, AuditEvent, RequestRef
from broker.audit.service import append
from broker.db import transaction
from broker.errors import InvalidRequest
from broker.identity.access import human_is, managed_by
from broker.identity.callers import Caller
from broker.leases.revocation import RevokeSummary, revoke_leases
from broker.leases.vocabulary import LIVE
from broker.models import Lease, SessionRow
from broker.policy.resources import glob_matches, is_glob, validate_pattern
from broker.principals import canonical_human
from broker.runtime import Broker
from broker.sessions import service as sessions

log = logging.getLogger("broker.killswitch")


@dataclass(frozen=True)
class RevocationFilter:
    reason: str = "kill-switch"  # what the receipts and audit records give as the cause
    session_id: str | None = None
    agent: str | None = None
    human: str | None = None
    resource: str | None = None
    end_sessions: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in {"session_id": self.session_id, "agent": self.agent, "human": self.human,
                                  "resource": self.resource}.items() if v is not None}

    @property
    def ends_sessions(self) -> bool:
        return self.end_sessions if self.end_sessions is not None else self.resource is None


@dataclass
class RevocationResult:
    matched_sessions: list[str] = field(default_factory=list)
    sessions_ended: int = 0
    matched_capabilities: int = 0
    summary: RevokeSummary = field(default_factory=RevokeSummary)

    def body(self) -> dict[str, Any]:
        revoked, pending = set(self.summary.revoked), set(self.summary.pending) - set(self.summary.revoked)
        return {
            "matched_sessions": len(self.matched_sessions),
            "sessions_ended": self.sessions_ended,
            "matched_capabilities": self.matched_capabilities,
            "revoked": len(revoked),
            "revoke_pending": len(pending),
            "revoke_pending_ids": sorted(pending),
            "receipts": self.summary.receipt_list(),
        }


def revoke_matching(broker: Broker, caller: Caller, flt: RevocationFilter) -> RevocationResult:
    if not flt.as_dict():
        raise InvalidRequest("give at least one of session_id, agent, human, resource", code="empty-revocation-filter")
    if flt.resource is not None:
        flt = replace(flt, resource=validate_pattern(flt.resource))
    if flt.human is not None:
        flt = replace(flt, human=canonical_human(flt.human))
    scope = managed_by(caller, "agents cannot use the kill switch; their session can be ended by its orchestrator or human")
    result = RevocationResult()
    with transaction(broker.engine) as db:
        stmt = select(Lease.id, Lease.resource, Lease.session_id).join(
            SessionRow, col(SessionRow.id) == col(Lease.session_id)
        ).where(col(Lease.status).in_(LIVE))
        sess = select(SessionRow.id, SessionRow.status)
        for cond in filter(lambda c: c is not None, (
            scope,
            SessionRow.id == flt.session_id if flt.session_id else None,
            SessionRow.agent == flt.agent if flt.agent else None,
            human_is(flt.human) if flt.human else None,
        )):
            stmt, sess = stmt.where(cond), sess.where(cond)
        if flt.resource is not None and not is_glob(flt.resource):
            stmt = stmt.where(Lease.resource == flt.resource)
        rows = [(lid, sid) for lid, res, sid in db.exec(stmt.order_by(Lease.id)).all()
                if flt.resource is None or glob_matches(flt.resource, res)]
        leases = [lid for lid, _ in rows]
        to_end: list[str] = []
        if flt.ends_sessions:
            if flt.resource is not None:
                # Only sessions that hold a matching capability: a resource alone never
                # reaches sessions that did not touch it.
                sess = sess.where(col(SessionRow.id).in_(sorted({sid for _, sid in rows})))
            matched = db.exec(sess.order_by(SessionRow.id)).all()
            result.matched_sessions = [sid for sid, _ in matched]
            to_end = [sid for sid, status in matched if status == "active"]
        result.matched_capabilities = len(leases)
        append(db, AuditEvent(
            type="revocation.requested",
            outcome="requested",
            actor=caller.principal,
            human_principal=flt.human,
            agent=AgentRef(id=flt.agent, session_id=flt.session_id),
            request=RequestRef(operation="kill-switch", resource=flt.resource, reason=flt.reason),
            detail={"filter": flt.as_dict(), "end_sessions": flt.ends_sessions,
                    "matched_capabilities": len(leases), "sessions_to_end": len(to_end)},
        ))
    reason = f"kill-switch:{flt.reason}" if flt.reason != "kill-switch" else "kill-switch"
    for session_id in to_end:
        # Ends the session and revokes all it holds (a resource filter would not have ended it).
        _, summary = sessions.end(broker, session_id, reason=reason, actor=caller.principal)
        result.sessions_ended += 1
        result.summary.merge(summary)
    done = set(result.summary.revoked) | set(result.summary.pending)
    rest = [i for i in leases if i not in done]
    batch = broker.settings.sweep_batch_size
    for start in range(0, len(rest), batch):
        result.summary.merge(revoke_leases(broker, rest[start:start + batch], reason=reason, actor=caller.principal))
    log.warning("kill switch by %s %s: %d capabilities matched, %d revoked, %d pending, %d sessions ended",
                caller.principal, flt.as_dict(), len(leases), len(set(result.summary.revoked)),
                len(set(result.summary.pending)), result.sessions_ended)
    return result
