"""Capability endpoints: agents ask; agents, their humans and admins read and revoke."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response

from broker.api.deps import AgentCaller, AnyCaller, BrokerDep
from broker.api.schemas.common import error_responses
from broker.api.schemas.sessions import CapabilityRequest
from broker.identity.callers import Caller
from broker.ids import SESSION_ID_PATTERN
from broker.leases import queries
from broker.leases.on_loop import request_capability_async
from broker.leases.outcomes import CapabilityIssued, CapabilityRevoked, CapabilityView, PendingApproval
from broker.leases.vocabulary import CapabilityAsk, LeaseStatus
from broker.runtime import Broker

router = APIRouter(prefix="/v1/capabilities", tags=["capabilities"])
ERRORS = error_responses(400, 401, 403, 404, 409, 422, 429, 502, 503)


# A credential, or the way to one: never cached (the guard adds Pragma for HTTP/1.0 caches).
NO_STORE = {"Cache-Control": "no-store"}


@router.post(
    "",
    status_code=201,
    response_model=CapabilityIssued | PendingApproval,
    responses={201: {"model": CapabilityIssued}, 202: {"model": PendingApproval}, **ERRORS},
)
async def create_capability(
    body: CapabilityRequest,
    broker: BrokerDep,
    caller: AgentCaller,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> Response:
    # The capability lane (broker/api/lane.py) answers most of these requests before FastAPI's
    # routing; what it does not take comes here, and both end in `answer`.
    return await answer(broker, caller, body, idempotency_key)


async def answer(broker: Broker, caller: Caller, body: CapabilityRequest, idempotency_key: str | None) -> Response:
    """The agent's capability, or its pending approval; a refusal is raised (BrokerError)."""
    ask = CapabilityAsk(
        resource=body.resource, access=body.access, purpose=body.purpose, ttl_seconds=body.ttl_seconds,
        tool=body.tool, parameters=body.parameters, approval_id=body.approval_id, justification=body.justification,
    )
    # async: the request path runs on the event loop (leases/on_loop.py); what it cannot do
    # there, it hands to a worker thread itself.
    outcome = await request_capability_async(broker, caller, ask, idempotency_key)
    # The model writes its own JSON: `response_model` (the schema, for OpenAPI) would only have
    # FastAPI validate and serialise the same object again, on the busiest route.
    return Response(outcome.model_dump_json(), status_code=202 if isinstance(outcome, PendingApproval) else 201,
                    media_type="application/json", headers=NO_STORE)


@router.get("", response_model=list[CapabilityView], responses=ERRORS)
def list_capabilities(
    broker: BrokerDep, caller: AnyCaller,
    session_id: Annotated[str | None, Query(pattern=SESSION_ID_PATTERN)] = None,
    status: Annotated[LeaseStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[CapabilityView]:
    return [CapabilityView.of(lease) for lease in queries.list_for(broker, caller, session_id, status, limit)]


@router.get("/{capability_id}", response_model=CapabilityView, responses=ERRORS)
def get_capability(capability_id: str, broker: BrokerDep, caller: AnyCaller) -> CapabilityView:
    return CapabilityView.of(queries.get(broker, caller, capability_id))


@router.delete("/{capability_id}", response_model=CapabilityRevoked, responses=ERRORS)
def revoke_capability(capability_id: str, broker: BrokerDep, caller: AnyCaller) -> CapabilityRevoked:
    lease, receipt = queries.revoke(broker, caller, capability_id)
    return CapabilityRevoked.after(lease, receipt)
