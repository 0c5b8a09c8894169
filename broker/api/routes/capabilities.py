"""Capability endpoints: agents ask; agents, their humans and admins read and revoke."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from broker.api.deps import AgentCaller, AnyCaller, BrokerDep
from broker.api.schemas import (
    SESSION_ID_PATTERN,
    CapabilityIssued,
    CapabilityRequest,
    CapabilityView,
    ErrorResponse,
    PendingApproval,
)
from broker.leases import queries
from broker.leases.service import CapabilityAsk, request_capability

router = APIRouter(prefix="/v1/capabilities", tags=["capabilities"])
LeaseStatus = Literal["minting", "active", "revoke_pending", "revoked", "expired", "failed"]  # queries.STATUSES
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 422, 429, 502, 503)}


@router.post(
    "",
    status_code=201,
    response_model=CapabilityIssued,
    responses={202: {"model": PendingApproval}, **ERRORS},
)
def create_capability(
    body: CapabilityRequest,
    broker: BrokerDep,
    caller: AgentCaller,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JSONResponse:
    ask = CapabilityAsk(
        resource=body.resource, access=body.access, purpose=body.purpose, ttl_seconds=body.ttl_seconds,
        tool=body.tool, parameters=body.parameters, approval_id=body.approval_id,
    )
    status, payload = request_capability(broker, caller, ask, idempotency_key)
    return JSONResponse(payload, status_code=status, headers={"Cache-Control": "no-store"})


@router.get("", response_model=list[CapabilityView], responses=ERRORS)
def list_capabilities(
    broker: BrokerDep, caller: AnyCaller,
    session_id: Annotated[str | None, Query(pattern=SESSION_ID_PATTERN)] = None,
    status: Annotated[LeaseStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    leases = queries.list_for(broker, caller, session_id, status, limit)
    return JSONResponse(jsonable_encoder([queries.view(lease) for lease in leases]))


@router.get("/{capability_id}", response_model=CapabilityView, responses=ERRORS)
def get_capability(capability_id: str, broker: BrokerDep, caller: AnyCaller) -> JSONResponse:
    return JSONResponse(jsonable_encoder(queries.view(queries.get(broker, caller, capability_id))))


@router.delete("/{capability_id}", response_model=CapabilityView, responses=ERRORS)
def revoke_capability(capability_id: str, broker: BrokerDep, caller: AnyCaller) -> JSONResponse:
    lease, _ = queries.revoke(broker, caller, capability_id)
    return JSONResponse(jsonable_encoder(queries.view(lease)))
