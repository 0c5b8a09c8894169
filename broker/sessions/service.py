"""Sessions: provision one per task run, read it, end it (revoking everything it holds)."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import col, select

from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import Forbidden, InvalidRequest, NotFound
from broker.identity import spiffe
from broker.identity.access import managed_by, may_manage
from broker.identity.callers import Caller
from broker.ids import is_session_id
from broker.leases.teardown import end, session_event
from broker.leases.vocabulary import LIVE
from broker.models import Lease, SessionRow
from broker.policy import validate_pattern
from broker.principals import canonical_human
from broker.runtime import Broker
from broker.sessions.idle import CLAIM as IDLE_CLAIM
from broker.sessions.idle import idle_timeout_for
from broker.times import rfc3339

log = logging.getLogger("broker.sessions")

__all__ = ["SessionAsk", "create", "end", "get", "list_sessions", "past_deadline", "session_event"]


@dataclass(frozen=True)
class SessionAsk:
    human: str
    agent: str
    task_id: str
    scope: list[dict[str, Any]]  # [{resource, access: [...]}]
    ttl_seconds: int
    repository: str | None = None
    labels: dict[str, str] | None = None
    workload: tuple[str, str] | None = None  # (issuer, subject) of the agent runtime bound to it
    idle_timeout_seconds: int | None = None  # stall: the session's own, within the policy's bound


def create(broker: Broker, caller: Caller, ask: SessionAsk) -> tuple[SessionRow, str]:
    if caller.kind not in ("orchestrator", "admin"):
        raise Forbidden("only an orchestrator provisions sessions")
    if ask.ttl_seconds > broker.settings.session_max_ttl_seconds:
        raise InvalidRequest(
            f"ttl_seconds exceeds the broker's maximum session length ({broker.settings.session_max_ttl_seconds})",
            code="ttl-out-of-bounds",
        )
    if ask.workload is not None:
        issuer, subject = ask.workload
        if issuer not in broker.workload.issuers:
            raise InvalidRequest("the session's workload issuer is not on the server allowlist (BROKER_TRUSTED_ISSUERS): "
                                 "no token of it could ever be accepted", code="untrusted-issuer")
        if issuer.startswith(spiffe.SCHEME) and spiffe.trust_domain_of(subject) != issuer:
            raise InvalidRequest(f"the session's workload subject must be a SPIFFE ID of {issuer}",
                                 code="invalid-workload-binding")
    for entry in ask.scope:
        # A malformed scope is a 400, not a silent no-match; stored in canonical form.
        entry["resource"] = validate_pattern(entry["resource"])
    # Stall (broker/sessions/liveness.py): fixed now, bounded by the policy in force now.
    idle = idle_timeout_for(broker.policies.current, ask.idle_timeout_seconds)
    now = utcnow().replace(microsecond=0)
    session = SessionRow(
        id="ses_" + secrets.token_hex(16),
        human=canonical_human(ask.human),  # the canonical form, or 400 invalid-principal; never changed to fit
        agent=ask.agent,
        task_id=ask.task_id,
        repository=ask.repository,
        scope=ask.scope,
        labels=ask.labels or {},
        status="active",
        created_by=caller.name,
        created_at=now,
        expires_at=now + timedelta(seconds=ask.ttl_seconds),
        idle_timeout_seconds=idle,
        idle_until=None if idle is None else now + timedelta(seconds=idle),
    )
    claims: dict[str, Any] = {}
    if idle is not None:
        claims[IDLE_CLAIM] = idle  # so noting a request needs no read of the session
    if ask.workload is not None:
        # The binding travels in the signed session token, so checking it needs no database read.
        claims["wl"] = {"iss": ask.workload[0], "sub": ask.workload[1]}
    token = broker.keyring.sign(
        {
            **claims,
            "iss": broker.settings.issuer,
            "aud": broker.settings.audience,
            "sub": ask.agent,
            "sid": session.id,
            "jti": "stk_" + secrets.token_hex(12),
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(session.expires_at.timestamp()),  # never outlives its session
            "token_use": "session",
        }
    )
    with transaction(broker.engine) as db:
        db.add(session)
        db.flush()
        append(db, session_event(session, "session.created", "created", caller.principal,
                                 detail={"scope": ask.scope, "expires_at": rfc3339(session.expires_at),
                                         "labels": session.labels, "idle_timeout_seconds": idle,
                                         "workload_binding": claims.get("wl")}))
    return session, token


def get(broker: Broker, caller: Caller, session_id: str) -> tuple[SessionRow, list[Lease]]:
    if not is_session_id(session_id):
        raise NotFound("no such session", code="session-not-found")
    with transaction(broker.engine) as db:
        session = db.get(SessionRow, session_id)
        if session is None or not may_manage(caller, session):
            # Same answer for "absent" and "not yours": ids are not an oracle.
            raise NotFound("no such session", code="session-not-found")
        leases = db.exec(
            select(Lease).where(Lease.session_id == session_id, col(Lease.status).in_(LIVE)).order_by(col(Lease.created_at))
        ).all()
        return session, list(leases)


def list_sessions(broker: Broker, caller: Caller, status: str | None, limit: int) -> list[SessionRow]:
    with transaction(broker.engine) as db:
        stmt = select(SessionRow)
        if status:
            stmt = stmt.where(SessionRow.status == status)
        scope = managed_by(caller, "agents cannot list sessions")
        if scope is not None:
            stmt = stmt.where(scope)
        return list(db.exec(stmt.order_by(col(SessionRow.created_at).desc()).limit(limit)).all())


def past_deadline(broker: Broker, now: datetime, limit: int) -> list[str]:
    with transaction(broker.engine) as db:
        return list(
            db.exec(
                select(SessionRow.id).where(SessionRow.status == "active", SessionRow.expires_at <= now).limit(limit)
            ).all()
        )
