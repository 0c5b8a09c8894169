"""Approvals: humans list and decide what waits for them; the agent long-polls its own."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from broker.api.deps import AnyCaller, BrokerDep
from broker.api.schemas.approvals import ApprovalDecide, ApprovalView
from broker.api.schemas.common import error_responses
from broker.approvals import service
from broker.approvals.signals import ApprovalSignals, announce_decision

router = APIRouter(prefix="/v1/approvals", tags=["approvals"])
ERRORS = error_responses(400, 401, 403, 404, 409, 422)


def _signals(request: Request) -> ApprovalSignals:
    signals: ApprovalSignals = request.app.state.approval_signals
    return signals


@router.get("", response_model=list[ApprovalView], responses=ERRORS)
def list_approvals(
    broker: BrokerDep, caller: AnyCaller,
    status: Annotated[str | None, Query(max_length=16, description="pending, approved, denied, expired or used")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ApprovalView]:
    """What the caller may decide and, for a delegating human, what their sessions wait on."""
    return [ApprovalView.model_validate(a) for a in service.list_for(broker, caller, status, limit)]


@router.get("/{approval_id}", response_model=ApprovalView, responses=ERRORS)
async def get_approval(
    approval_id: str, request: Request, response: Response, broker: BrokerDep, caller: AnyCaller,
    wait: Annotated[int, Query(ge=0, le=300, description="seconds to wait while pending (bounded by the broker)")] = 0,
) -> ApprovalView:
    """One approval; with `wait`, answers as soon as it is decided (long poll), or when `wait` ends."""
    deadline = time.monotonic() + min(wait, broker.settings.approval_max_wait_seconds)
    recheck = broker.settings.approval_poll_recheck_seconds
    with _signals(request).listen(approval_id) as decided:
        body = await asyncio.to_thread(service.get, broker, caller, approval_id)
        while body["status"] == "pending" and (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):  # on a timeout, re-read: another replica may have decided
                await asyncio.wait_for(decided.wait(), timeout=min(left, recheck))
            decided.clear()
            body = await asyncio.to_thread(service.get, broker, caller, approval_id)
    response.headers["Cache-Control"] = "no-store"
    return ApprovalView.model_validate(body)


def _decide(approval_id: str, verdict: str, request: Request, broker: BrokerDep, caller: AnyCaller,
            body: ApprovalDecide | None) -> ApprovalView:
    result = service.decide(broker, caller, approval_id, verdict, body.reason if body else None,
                            shown_hash=body.request_hash if body else None)
    announce_decision(request.app.state, approval_id)
    return ApprovalView.model_validate(result)


@router.post("/{approval_id}/approve", response_model=ApprovalView, responses=ERRORS)
def approve(approval_id: str, request: Request, broker: BrokerDep, caller: AnyCaller,
            body: ApprovalDecide | None = None) -> ApprovalView:
    return _decide(approval_id, "approve", request, broker, caller, body)


@router.post("/{approval_id}/deny", response_model=ApprovalView, responses=ERRORS)
def deny(approval_id: str, request: Request, broker: BrokerDep, caller: AnyCaller,
         body: ApprovalDecide | None = None) -> ApprovalView:
    return _decide(approval_id, "deny", request, broker, caller, body)
