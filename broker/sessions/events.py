"""Orchestrator lifecycle events (the signed webhook): parse, refuse replays, end sessions.

One delivery is one transaction: its id goes into `webhook_deliveries`, the
`webhook.received` audit record and every `session.ended` record it causes commit together,
so an id is either fully processed or not at all. A second delivery with an id already seen
is refused as a replay (409 `webhook-replayed`) and changes nothing. The leases of the ended
sessions are revoked after that commit (backend calls never run inside a transaction); if
the broker dies in between, the reconciler finds the live leases of ended sessions.

Sessions are found by the broker's session id, or else by task id: `task_id` as given, or
`"<repository>#<issue_number>"` from an orchestrator's own field names. A task id ends every
active session of that task.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from broker import security_events
from broker.audit.events import AgentRef, AuditEvent, RequestRef
from broker.audit.service import append
from broker.db import transaction, utcnow
from broker.errors import Conflict, InvalidRequest
from broker.identity.access import managed_by, may_manage
from broker.identity.callers import Caller
from broker.leases.receipts import RevocationReceipt
from broker.metrics import WEBHOOKS
from broker.models import SessionRow, WebhookDelivery
from broker.runtime import Broker
from broker.sessions import service as sessions
from broker.sessions.service import session_event  # the same record a teardown through the API writes
from broker.times import rfc3339

log = logging.getLogger("broker.webhooks")

ACTOR = "webhook:orchestrator"
# Event type -> the end reason recorded when the body gives none.
TEARDOWN_TYPES = {
    "session.ended": "ended",
    "task.completed": "completed",
    "task.failed": "failed",
    "task.cancelled": "cancelled",
    "task.canceled": "cancelled",
}
DEFAULT_TYPE = "session.ended"  # an orchestrator's own teardown payload carries no type

Text128 = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Text256 = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class InvalidWebhook(InvalidRequest):
    code = "invalid-webhook"


class WebhookReplayed(Conflict):
    code = "webhook-replayed"


class LifecycleEvent(BaseModel):
    """The webhook body. Extra fields are ignored: an orchestrator's payload grows over time."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    id: Text128 = Field(validation_alias=AliasChoices("id", "event_id", "delivery_id"))
    type: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None, validation_alias=AliasChoices("type", "event")
    )
    session_id: Text128 | None = None
    task_id: Text256 | None = None
    repository: Text256 | None = None
    issue_number: int | None = Field(default=None, ge=0)
    reason: Text128 | None = None
    occurred_at: datetime | None = None

    @field_validator("occurred_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return v.replace(tzinfo=UTC) if v is not None and v.tzinfo is None else v  # no zone given: UTC

    @field_validator("issue_number", mode="before")
    @classmethod
    def _digits(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.isdigit():
            raise ValueError("issue_number must be a whole number")
        return v

    @property
    def event_type(self) -> str:
        return self.type or DEFAULT_TYPE

    @property
    def is_teardown(self) -> bool:
        return self.event_type in TEARDOWN_TYPES

    @property
    def derived_task_id(self) -> str | None:
        """`task_id` as given, else `<repository>#<issue_number>`."""
        if self.task_id:
            return self.task_id
        if self.repository and self.issue_number is not None:
            return f"{self.repository}#{self.issue_number}"
        return None

    @property
    def end_reason(self) -> str:
        return self.reason or TEARDOWN_TYPES.get(self.event_type, "ended")


def parse_event(body: bytes) -> LifecycleEvent:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InvalidWebhook("the webhook body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidWebhook("the webhook body must be a JSON object")
    try:
        event = LifecycleEvent.model_validate(data)
    except ValidationError as exc:
        # Values are not echoed: a misdirected payload may hold someone's secret.
        problems = [{"loc": list(e.get("loc", ())), "message": e.get("msg", "")} for e in exc.errors()]
        raise InvalidWebhook("the webhook body does not match the event schema", problems=problems) from None
    if event.is_teardown and not (event.session_id or event.derived_task_id):
        raise InvalidWebhook(
            "a teardown event needs session_id, task_id, or repository and issue_number",
            problems=[{"loc": ["session_id"], "message": "missing"}],
        )
    return event


@dataclass
class EndedSession:
    session_id: str
    already_ended: bool
    revoked: int = 0
    revoke_pending: int = 0
    receipts: list[RevocationReceipt] = field(default_factory=list)


class EndedSessionView(BaseModel):
    session_id: str
    status: Literal["ended"] = "ended"
    already_ended: bool
    revoked: int = Field(description="capabilities finished (receipt `revoked` or `expires_naturally`)")
    revoke_pending: int
    receipts: list[RevocationReceipt] = Field(description="one per capability the teardown acted on")


class WebhookOutcome(BaseModel):
    """The answer to one delivery. `ignored`: a type that ends nothing (reason, task_id null)."""

    status: Literal["processed", "unmatched", "ignored"]
    id: str
    type: str
    reason: str | None = None
    task_id: str | None = None
    sessions: list[EndedSessionView] = Field(default_factory=list)


@dataclass
class Outcome:
    status: Literal["processed", "unmatched", "ignored"]
    event: LifecycleEvent
    sessions: list[EndedSession] = field(default_factory=list)

    def answer(self) -> WebhookOutcome:
        if self.status == "ignored":
            return WebhookOutcome(status=self.status, id=self.event.id, type=self.event.event_type)
        return WebhookOutcome(
            status=self.status, id=self.event.id, type=self.event.event_type, reason=self.event.end_reason,
            task_id=self.event.derived_task_id,
            sessions=[EndedSessionView(session_id=s.session_id, already_ended=s.already_ended, revoked=s.revoked,
                                       revoke_pending=s.revoke_pending, receipts=s.receipts) for s in self.sessions],
        )


def _targets(db: Session, event: LifecycleEvent, caller: Caller | None) -> list[SessionRow]:
    """Locked, in id order (the one lock order everywhere). A signed delivery reaches every
    session; a bearer caller's only the sessions it manages (the others are not found)."""
    ids: list[str] = []
    named = db.get(SessionRow, event.session_id) if event.session_id else None
    if named is not None and (caller is None or may_manage(caller, named)):
        ids = [named.id]
    elif event.derived_task_id:
        # The session id, if any, was the orchestrator's own: fall back to the task.
        stmt = select(SessionRow.id).where(SessionRow.task_id == event.derived_task_id, SessionRow.status == "active")
        scope = managed_by(caller, "lifecycle events come from orchestrators") if caller is not None else None
        if scope is not None:
            stmt = stmt.where(scope)
        ids = list(db.exec(stmt).all())
    if not ids:
        return []
    locked = select(SessionRow).where(col(SessionRow.id).in_(ids)).order_by(SessionRow.id).with_for_update()
    return list(db.exec(locked).all())


def _received_event(event: LifecycleEvent, outcome: str, signed_at: int, targets: list[SessionRow],
                    actor: str = ACTOR) -> AuditEvent:
    one = targets[0] if len(targets) == 1 else None
    return AuditEvent(
        type="webhook.received",
        outcome=outcome,
        actor=actor,
        human_principal=one.human if one else None,
        agent=AgentRef.of(one, task_id=event.derived_task_id),
        request=RequestRef(operation="webhook", reason=event.reason),
        detail={
            "event_id": event.id,
            "event_type": event.event_type,
            "occurred_at": rfc3339(event.occurred_at) if event.occurred_at else None,
            "signed_at": signed_at,
            "proof": "signature" if actor == ACTOR else "bearer",
            "session_id": event.session_id,
            "task_id": event.derived_task_id,
            "sessions": [s.id for s in targets],
        },
    )


def receive(broker: Broker, event: LifecycleEvent, *, signed_at: int, caller: Caller | None = None) -> Outcome:
    """Apply one verified delivery. Raises WebhookReplayed for an id already seen. `caller`: the
    bearer who sent it (None: a signed delivery), whose managed sessions alone it may end."""
    now = utcnow()
    actor = caller.principal if caller is not None else ACTOR
    keep = timedelta(seconds=2 * broker.settings.webhook_tolerance_seconds)
    to_end: list[tuple[str, bool]] = []
    try:
        with transaction(broker.engine) as db:
            # Ids older than twice the window can be forgotten: their signatures can no longer
            # be fresh (the sender's clock may be off by up to the window in either direction).
            db.execute(delete(WebhookDelivery).where(col(WebhookDelivery.received_at) < now - keep))
            ledger_id = _ledger_id(event, caller)
            seen = db.get(WebhookDelivery, ledger_id)
            if seen is not None:
                raise _replayed(event, seen.received_at)
            db.add(WebhookDelivery(event_id=ledger_id, received_at=now))
            db.flush()  # a concurrent delivery of the same id blocks here, then fails: 409
            if not event.is_teardown:
                append(db, _received_event(event, "ignored", signed_at, [], actor))
                WEBHOOKS.labels(event_type="unknown", outcome="ignored").inc()
                return Outcome("ignored", event)
            targets = _targets(db, event, caller)
            outcome: Literal["processed", "unmatched"] = "processed" if targets else "unmatched"
            append(db, _received_event(event, outcome, signed_at, targets, actor))
            for session in targets:
                to_end.append((session.id, session.status != "active"))
                if session.status == "active":
                    session.status, session.ended_at, session.end_reason = "ended", now, event.end_reason[:128]
                    db.add(session)
                    append(db, session_event(session, "session.ended", "ended", actor, reason=event.end_reason,
                                             detail={"webhook_event_id": event.id}))
                    security_events.session_revoked(db, broker, session, reason=event.end_reason, actor=actor, now=now)
    except IntegrityError:
        raise _replayed(event, None) from None
    WEBHOOKS.labels(event_type=event.event_type, outcome=outcome).inc()
    result = Outcome(outcome, event)
    for session_id, already in to_end:
        # The session is ended already (above); this revokes what it still holds, idempotently.
        _, summary = sessions.end(broker, session_id, reason=event.end_reason, actor=actor)
        result.sessions.append(EndedSession(session_id, already, len(summary.revoked), len(summary.pending),
                                            summary.receipt_list()))
    log.info("webhook %s (%s): %s, %d session(s)", event.id, event.event_type, outcome, len(result.sessions))
    return result


def _ledger_id(event: LifecycleEvent, caller: Caller | None) -> str:
    """The delivery's key in the replay ledger. A signed delivery's id as sent; a bearer's id is
    its own orchestrator's, so one orchestrator cannot spend another's ids (and so block its
    teardowns with 409s) by sending them first."""
    if caller is None:
        return event.id
    return "bearer:" + hashlib.sha256(f"{caller.principal}\n{event.id}".encode()).hexdigest()


def _replayed(event: LifecycleEvent, first: datetime | None) -> WebhookReplayed:
    WEBHOOKS.labels(event_type=event.event_type if event.is_teardown else "unknown", outcome="replayed").inc()
    details: dict[str, Any] = {"id": event.id}
    if first is not None:
        details["first_received_at"] = rfc3339(first)
    return WebhookReplayed(
        "this event id was delivered before and has been processed; a replay changes nothing", **details
    )
