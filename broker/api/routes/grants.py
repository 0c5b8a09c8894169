"""`POST /v1/grants`: a human pre-approves capabilities for one session."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from broker.api.deps import AnyCaller, BrokerDep
from broker.api.schemas import ErrorResponse, GrantCreate, GrantView
from broker.approvals import grants

router = APIRouter(prefix="/v1/grants", tags=["approvals"])
ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 422)}


@router.post("", status_code=201, response_model=GrantView, responses=ERRORS)
def create_grant(body: GrantCreate, broker: BrokerDep, caller: AnyCaller) -> JSONResponse:
    """Bounded by the granter's own permissions and the tier's approvers; each use mints one capability."""
    grant = grants.create(broker, caller, grants.GrantAsk(
        session_id=body.session_id, resource=body.resource, access=body.access, ttl_seconds=body.ttl_seconds,
        uses=body.uses, reason=body.reason))
    return JSONResponse(jsonable_encoder(grant), status_code=201)
