"""Session endpoints: provisioned by the orchestrator, read and ended by it, its human or admin."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from broker.api.deps import AgentCaller, AnyCaller, BrokerDep, OrchestratorCaller
from broker.api.schemas.common import error_responses
from broker.api.schemas.sessions import (
    SessionCreate,
    SessionCreated,
    SessionEnd,
    SessionEnded,
    SessionHeartbeat,
    SessionResume,
    SessionView,
)
from broker.sessions import deviation, liveness, service
from broker.sessions.service import SessionAsk

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
ERRORS = error_responses(400, 401, 403, 404, 422)


@router.post("", status_code=201, response_model=SessionCreated, responses=ERRORS)
def create_session(body: SessionCreate, broker: BrokerDep, caller: OrchestratorCaller) -> SessionCreated:
    session, token = service.create(
        broker,
        caller,
        SessionAsk(
            human=body.human, agent=body.agent, task_id=body.task_id,
            scope=[s.model_dump() for s in body.scope], ttl_seconds=body.ttl_seconds,
            repository=body.repository, labels=body.labels,
            workload=(body.workload.issuer, body.workload.subject) if body.workload else None,
            idle_timeout_seconds=body.idle_timeout_seconds,
        ),
    )
    return SessionCreated(session_id=session.id, session_token=token, expires_at=session.expires_at)


@router.get("", response_model=list[SessionView], responses=ERRORS)
def list_sessions(
    broker: BrokerDep, caller: AnyCaller,
    status: Annotated[str | None, Query(pattern="^(active|ended)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[SessionView]:
    return [SessionView.of(s, []) for s in service.list_sessions(broker, caller, status, limit)]


@router.get("/{session_id}", response_model=SessionView, responses=ERRORS)
def get_session(session_id: str, broker: BrokerDep, caller: AnyCaller) -> SessionView:
    session, leases = service.get(broker, caller, session_id)
    return SessionView.of(session, leases)


@router.post("/{session_id}/end", response_model=SessionEnded, responses=ERRORS)
def end_session(session_id: str, broker: BrokerDep, caller: AnyCaller, body: SessionEnd | None = None) -> SessionEnded:
    reason = body.reason if body else "api_teardown"
    session, summary = service.end(broker, session_id, reason=reason, actor=caller.principal, caller=caller)
    return SessionEnded(session_id=session.id, status=session.status, revoked=len(summary.revoked),
                        revoke_pending=len(summary.pending), receipts=summary.receipt_list())


@router.post("/{session_id}/heartbeat", response_model=SessionHeartbeat, responses=ERRORS)
def heartbeat(session_id: str, broker: BrokerDep, caller: AgentCaller) -> SessionHeartbeat:
    """The session's agent: a sign of life that keeps a long, quiet step from being taken for a stall."""
    session = liveness.heartbeat(broker, caller, session_id)
    return SessionHeartbeat(session_id=session.id, status=session.status,
                            idle_timeout_seconds=session.idle_timeout_seconds, idle_until=session.idle_until)


@router.post("/{session_id}/resume", response_model=SessionView, responses=error_responses(400, 401, 403, 404, 409, 422))
def resume(session_id: str, broker: BrokerDep, caller: AnyCaller, body: SessionResume | None = None) -> SessionView:
    """Its human or an admin: lift a suspension by the deviation tripwire."""
    session = deviation.resume(broker, caller, session_id, reason=body.reason if body else None)
    return SessionView.of(session, [])
