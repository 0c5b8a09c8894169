"""Post-reviews of break-glass uses: listed for, and closed by, the reviewers the policy names."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from broker.api.deps import BrokerDep, HumanCaller
from broker.api.schemas.approvals import ReviewClose, ReviewView
from broker.api.schemas.common import error_responses
from broker.breakglass import service

router = APIRouter(prefix="/v1/reviews", tags=["approvals"])
ERRORS = error_responses(400, 401, 403, 404, 409, 422)


@router.get("", response_model=list[ReviewView], responses=ERRORS)
def list_reviews(
    broker: BrokerDep, caller: HumanCaller,
    status: Annotated[str | None, Query(pattern="^(open|closed)$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[ReviewView]:
    """The reviews the caller is named to close (admins: all), soonest due first."""
    return [ReviewView.model_validate(r) for r in service.list_reviews(broker, caller, status, limit)]


@router.post("/{review_id}/close", response_model=ReviewView, responses=ERRORS)
def close_review(review_id: str, body: ReviewClose, broker: BrokerDep, caller: HumanCaller) -> ReviewView:
    """Close one review with a verdict (`appropriate` | `inappropriate`) and an optional note; once."""
    return ReviewView.model_validate(service.close(broker, caller, review_id, verdict=body.verdict, note=body.note))
