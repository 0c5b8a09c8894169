"""`POST /v1/revocations`: the kill switch (admin; orchestrators and humans for their own sessions)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import BaseModel, Field, StringConstraints

from broker.api.deps import AnyCaller, BrokerDep
from broker.api.schemas.common import RECEIPTS_DESCRIPTION, AgentName, Principal, SessionId, Strict, error_responses
from broker.leases.receipts import RevocationReceipt
from broker.lifecycle.killswitch import RevocationFilter, revoke_matching

router = APIRouter(prefix="/v1/revocations", tags=["revocations"])
ERRORS = error_responses(400, 401, 403, 422)


class RevocationRequest(Strict):
    session_id: SessionId | None = None
    agent: AgentName | None = None
    human: Principal | None = None
    resource: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        default=None, description="exact resource URI, or a glob (`*` within a segment, `**` across)")
    reason: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")] = "kill-switch"
    end_sessions: bool | None = Field(
        default=None, description="also end the matched sessions; default: yes unless `resource` is given")


class RevocationResponse(BaseModel):
    matched_sessions: int
    sessions_ended: int
    matched_capabilities: int
    revoked: int = Field(description="capabilities finished (receipt `revoked` or `expires_naturally`)")
    revoke_pending: int
    revoke_pending_ids: list[str]
    receipts: list[RevocationReceipt] = Field(description=RECEIPTS_DESCRIPTION)


@router.post("", response_model=RevocationResponse, responses=ERRORS)
def revoke(body: RevocationRequest, broker: BrokerDep, caller: AnyCaller) -> RevocationResponse:
    result = revoke_matching(broker, caller, RevocationFilter(**body.model_dump()))
    return RevocationResponse(**result.body())
