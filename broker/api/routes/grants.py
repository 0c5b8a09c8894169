"""`POST /v1/grants`: a human pre-approves capabilities for one session."""

from __future__ import annotations

from fastapi import APIRouter

from broker.api.deps import AnyCaller, BrokerDep
from broker.api.schemas.approvals import GrantCreate, GrantView
from broker.api.schemas.common import error_responses
from broker.approvals import grants
from broker.leases.facts import bounds_lookup, session_facts

router = APIRouter(prefix="/v1/grants", tags=["approvals"])
ERRORS = error_responses(400, 401, 403, 404, 422)


@router.post("", status_code=201, response_model=GrantView, responses=ERRORS)
def create_grant(body: GrantCreate, broker: BrokerDep, caller: AnyCaller) -> GrantView:
    """Bounded by the granter's own permissions and the tier's approvers; each use mints one capability."""
    grant = grants.create(broker, caller, grants.GrantAsk(
        session_id=body.session_id, resource=body.resource, access=body.access, ttl_seconds=body.ttl_seconds,
        uses=body.uses, reason=body.reason), session_facts=session_facts, bounds=bounds_lookup(broker))
    return GrantView.model_validate(grant)
