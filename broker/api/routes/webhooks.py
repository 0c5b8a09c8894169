"""`POST /v1/webhooks/orchestrator`: signed lifecycle events from the orchestrator.

Two ways to prove the sender. The HMAC signature over the raw body (`X-Broker-Signature`), for
orchestrators that hold the shared secret; the body is read as bytes and verified before it is
parsed, and such a sender may end any session. Or, with no signature header, a bearer token
(`Authorization`) of an orchestrator, typically a workload token under a trust rule: no shared
secret at all, and it ends only sessions that orchestrator manages (those it created).
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from broker.api.deps import get_caller
from broker.api.schemas.common import error_responses
from broker.errors import BrokerError, Forbidden
from broker.identity import webhooks as signatures
from broker.metrics import WEBHOOKS
from broker.runtime import Broker
from broker.sessions import events

log = logging.getLogger("broker.webhooks")
router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
MAX_WEBHOOK_BYTES = 64 * 1024  # a lifecycle event is a few hundred bytes
ERRORS = error_responses(400, 401, 403, 409, 413)


@router.post(
    "/orchestrator",
    response_model=events.WebhookOutcome,
    responses={202: {"model": events.WebhookOutcome,
                     "description": "event type not handled: acknowledged, audited, ignored"}, **ERRORS},
    openapi_extra={
        "parameters": [{"name": signatures.HEADER, "in": "header", "required": False,
                        "description": "HMAC signature; without it, Authorization: Bearer <orchestrator token> "
                                       "(a workload token under a trust rule) proves the sender",
                        "schema": {"type": "string", "example": "t=1735689600,v1=5257a869e7..."}}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["id"],
            "properties": {
                "id": {"type": "string", "maxLength": 128,
                       "description": "unique per event; reuse is a replay (409). Aliases: event_id, delivery_id"},
                "type": {"type": "string", "default": events.DEFAULT_TYPE, "description": (
                    "session.ended, task.completed, task.failed, task.cancelled end the session; "
                    "any other type is acknowledged (202), audited and ignored. Alias: event")},
                "session_id": {"type": "string", "description": "the broker's session id"},
                "task_id": {"type": "string", "description": "default: <repository>#<issue_number>"},
                "repository": {"type": "string"}, "issue_number": {"type": "integer"},
                "reason": {"type": "string"}, "occurred_at": {"type": "string", "format": "date-time"},
            },
        }}}},
    },
)
async def orchestrator_webhook(request: Request, response: Response) -> events.WebhookOutcome:
    broker: Broker = request.app.state.broker
    body = await request.body()
    if len(body) > MAX_WEBHOOK_BYTES:
        raise BrokerError(f"webhook bodies are limited to {MAX_WEBHOOK_BYTES} bytes", code="payload-too-large",
                          status=413)
    caller = None
    try:
        authorization = request.headers.get("authorization")
        if request.headers.get(signatures.HEADER) is None and authorization is not None:
            caller = await get_caller(request, authorization)
            if caller.kind not in ("orchestrator", "admin"):
                raise Forbidden(f"lifecycle events come from orchestrators, not {caller.kind} callers")
            signed_at = int(time.time())
        else:
            signed_at = signatures.verify(
                body, request.headers.get(signatures.HEADER), broker.settings.webhook_secret_list(),
                tolerance_seconds=broker.settings.webhook_tolerance_seconds,
            )
        event = events.parse_event(body)
    except BrokerError as exc:
        # Not audited (anyone can send these), but counted and logged for whoever watches.
        WEBHOOKS.labels(event_type="unverified", outcome=exc.code).inc()
        log.warning("webhook refused from %s: %s", request.client.host if request.client else "?", exc.code)
        raise
    outcome = await run_in_threadpool(events.receive, broker, event, signed_at=signed_at, caller=caller)
    response.status_code = 202 if outcome.status == "ignored" else 200
    return outcome.answer()
