"""The bounds every approval obeys before it is stored, whichever path opens it (a capability
request, the tool-call gate): the size and shape of the agent's text a person will read, and the
number of approvals pending at once per session and per approver entry (the policy's
`budgets.max_pending_approvals_per_session` / `_per_approver`).

Both are checked in `service.open_request`, the one place an approval row is created, so no
path can skip them; a refusal stores nothing (no approval, no notification).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, func, select

from broker import jsonbounds
from broker.errors import BudgetExceeded, InvalidRequest
from broker.metrics import APPROVALS_REFUSED
from broker.models import Approval, SessionRow
from broker.policy import CompiledPolicy
from broker.store.sql import sql_for

# Characters, as the capability request's schema bounds them (the gate's tool name is <= 256).
MAX_TEXT = {"purpose": 1000, "tool": 256, "resource": 512, "access": 64}


class ApprovalTooLarge(InvalidRequest, status=422, code="approval-too-large"):
    """What would be stored for approvers lies outside the bounds (`bound` says which:
    `json-too-deep`, `json-too-large`, `json-string-too-long` ...; `field` and `path` where)."""


class ApprovalBudgetExceeded(BudgetExceeded, code="approval-budget-exceeded"):
    """Too many approvals pending for this session, or naming one approver."""


def check_request(texts: dict[str, str | None], parameters: dict[str, Any] | None) -> None:
    """Raise ApprovalTooLarge for text or parameters outside the bounds (`jsonbounds`)."""
    for field, limit in MAX_TEXT.items():
        value = texts.get(field)
        if value is not None and len(value) > limit:
            APPROVALS_REFUSED.labels(reason="too-large").inc()
            raise ApprovalTooLarge(f"{field} is longer than {limit} characters; no approval was opened",
                                   bound="json-string-too-long", field=field)
    if parameters is not None:
        try:
            jsonbounds.check_parameters(parameters)
        except jsonbounds.JsonBoundsError as exc:
            APPROVALS_REFUSED.labels(reason="too-large").inc()
            raise ApprovalTooLarge(f"parameters: {exc}; no approval was opened", bound=exc.code, field="parameters",
                                   path=exc.path) from None


def _live(stmt: Any, now: datetime) -> Any:
    """Pending and counting: not past its time, its session still running."""
    return (stmt.join(SessionRow, col(SessionRow.id) == col(Approval.session_id))
            .where(Approval.status == "pending", col(Approval.expires_at) > now, SessionRow.status == "active",
                   col(SessionRow.expires_at) > now))


def check_budget(db: Session, policy: CompiledPolicy, session_id: str, approvers: list[str], now: datetime) -> None:
    """Raise ApprovalBudgetExceeded (429) when one more pending approval would pass a budget.
    A decided, used or expired approval (or one of an ended session) no longer counts."""
    per_session = policy.max_pending_approvals_per_session
    pending = db.exec(_live(select(func.count()).select_from(Approval), now)
                      .where(Approval.session_id == session_id)).one()
    if pending >= per_session:
        APPROVALS_REFUSED.labels(reason="session-budget").inc()
        raise ApprovalBudgetExceeded(
            f"this session already has {per_session} approval(s) pending "
            "(budgets.max_pending_approvals_per_session); wait for them to be decided or expire",
            scope="session", limit=per_session)
    entries = sorted(set(approvers))
    if not entries:
        return
    # Counting across sessions needs its own lock (the session lock covers one session).
    conn = db.connection()
    sql = sql_for(conn)
    for entry in entries:
        sql.lock_approver(conn, entry)
    per_approver = policy.max_pending_approvals_per_approver
    counts = dict.fromkeys(entries, 0)
    # Only the approver lists are read; their number is bounded by this very budget.
    for named in db.exec(_live(select(Approval.approvers), now)).all():
        for entry in set(named) & counts.keys():
            counts[entry] += 1
    full = [entry for entry in entries if counts[entry] >= per_approver]
    if full:
        APPROVALS_REFUSED.labels(reason="approver-budget").inc()
        raise ApprovalBudgetExceeded(
            f"{', '.join(full)} already {'has' if len(full) == 1 else 'have'} {per_approver} approval(s) pending "
            "(budgets.max_pending_approvals_per_approver); try again once some are decided",
            scope="approver", approvers=full, limit=per_approver)
