"""The console's pages: pending approvals, sessions, a session's timeline, and their actions.

Every read and every action calls the same service function as the REST API endpoint it
mirrors, with the signed-in person as the caller, so the console can show and do exactly what
that person could through the API: `approvals.service.list_for/get/decide` (as
`GET/POST /v1/approvals...`), `sessions.service.list_sessions/get/end` and
`leases.queries.list_for/revoke` (as `/v1/sessions...`, `/v1/capabilities...`). Buttons the
person may not use are shown disabled with the service's own reason.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from broker.api.schemas.approvals import ApprovalDecide
from broker.approvals import service as approvals
from broker.approvals.approvers import session_for_approver
from broker.approvals.signals import announce_decision
from broker.audit import service as audit
from broker.audit.verification import check_records
from broker.breakglass import service as breakglass
from broker.console import views
from broker.console.browser import browser_of, check_csrf
from broker.console.render import render, render_error
from broker.db import transaction, utcnow
from broker.errors import BrokerError
from broker.identity.callers import Caller
from broker.leases import queries
from broker.runtime import Broker
from broker.sessions import deviation
from broker.sessions import service as sessions

router = APIRouter(prefix="/console", include_in_schema=False)
HASH = re.compile(r"sha256:[0-9a-f]{64}")
RECENT_SESSIONS = 50
TIMELINE_LIMIT = 5000


class SignInRequired(Exception):
    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def signed_in(request: Request) -> Caller:
    caller = browser_of(request).caller()
    if caller is None:
        raise SignInRequired(request.url.path)
    return caller


Person = Annotated[Caller, Depends(signed_in)]


def sign_in_redirect(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)  # noqa: S101  # type narrowing only: the handler is registered for it
    return RedirectResponse("/console/signin?next=" + quote(exc.next_path, safe="/"), status_code=303)


def _broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


def _refused_form(request: Request) -> Response:
    return render_error(request, 403, "csrf-failed", "The form expired or did not come from this console "
                        "(its CSRF token is missing or wrong); reload the page and try again.")


@router.get("")
@router.get("/")
def home(_: Person) -> Response:
    return RedirectResponse("/console/approvals", status_code=303)


# --- approvals ----------------------------------------------------------------------------------

@router.get("/approvals")
def approvals_page(request: Request, me: Person) -> Response:
    broker = _broker(request)
    now = utcnow()
    pending = approvals.list_for(broker, me, "pending", 100)
    recent = [a for a in approvals.list_for(broker, me, None, 30) if a["status"] != "pending"][:15]
    return render(request, "approvals.html", {
        "cards": [views.card(broker.settings, a, now) for a in pending],
        "recent": recent,
    })


@router.get("/approvals/{approval_id}")
def approval_page(request: Request, approval_id: str, me: Person) -> Response:
    broker = _broker(request)
    try:
        approval = approvals.get(broker, me, approval_id)
    except BrokerError as exc:
        return render_error(request, exc.status, exc.code, exc.message)
    return render(request, "approval.html", {"card": views.card(broker.settings, approval, utcnow())})


def _decide(request: Request, me: Caller, approval_id: str, decision: str, csrf_token: str, reason: str,
            request_hash: str) -> Response:
    if not check_csrf(browser_of(request), csrf_token):
        return _refused_form(request)
    # The hash of the request the card showed: the form always carries it, and an approval posted
    # without it approves nothing (a denial may omit it).
    if decision == "approve" and not HASH.fullmatch(request_hash):
        return render_error(request, 400, "invalid-request-hash", "The form did not carry the request hash its "
                            "card showed; reload the page, read the request and decide again.")
    try:
        body = ApprovalDecide(reason=reason.strip() or None,  # the API's own bounds on a reason
                              request_hash=request_hash if HASH.fullmatch(request_hash) else None)
    except ValidationError:
        return render_error(request, 400, "invalid-reason", "A reason is at most 1,000 characters.")
    try:
        result = approvals.decide(_broker(request), me, approval_id, decision, body.reason,
                                  shown_hash=body.request_hash)
    except BrokerError as exc:
        return render_error(request, exc.status, exc.code, exc.message)
    announce_decision(request.app.state, approval_id)
    words = {"approved": "Approved", "denied": "Denied", "pending": "Your approval is recorded; more are needed"}
    browser_of(request).flash("good" if decision == "approve" else "warn",
                              f"{words.get(result['status'], result['status'])}: {result['access']} on {result['resource']}.")
    return RedirectResponse(f"/console/approvals/{quote(approval_id)}", status_code=303)


@router.post("/approvals/{approval_id}/approve")
def approve(request: Request, approval_id: str, me: Person, csrf_token: Annotated[str, Form()] = "",
            reason: Annotated[str, Form()] = "", request_hash: Annotated[str, Form()] = "") -> Response:
    return _decide(request, me, approval_id, "approve", csrf_token, reason, request_hash)


@router.post("/approvals/{approval_id}/deny")
def deny(request: Request, approval_id: str, me: Person, csrf_token: Annotated[str, Form()] = "",
         reason: Annotated[str, Form()] = "", request_hash: Annotated[str, Form()] = "") -> Response:
    return _decide(request, me, approval_id, "deny", csrf_token, reason, request_hash)


# --- sessions -----------------------------------------------------------------------------------

def _session_row(broker: Broker, me: Caller, session: Any) -> dict[str, Any]:
    leases = queries.list_for(broker, me, session.id, None, 200)
    return {"session": session, "capabilities": leases,
            "task_url": views.task_link(broker.settings, session.task_id, session.repository, session.labels or {}),
            "live": sum(1 for lease in leases if lease.status in ("active", "minting", "revoke_pending"))}


@router.get("/sessions")
def sessions_page(request: Request, me: Person) -> Response:
    broker = _broker(request)
    rows = [_session_row(broker, me, s) for s in sessions.list_sessions(broker, me, None, RECENT_SESSIONS)]
    return render(request, "sessions.html", {
        "live": [r for r in rows if r["session"].status == "active"],
        "recent": [r for r in rows if r["session"].status != "active"],
        "now": utcnow(),
    })


@router.get("/sessions/{session_id}")
def timeline_page(request: Request, session_id: str, me: Person) -> Response:
    broker = _broker(request)
    try:
        session, _ = sessions.get(broker, me, session_id)  # who may read it: as GET /v1/sessions/{id} and /v1/audit
        row = _session_row(broker, me, session)
    except BrokerError as exc:
        # An approver asked to decide on this session's requests reads its timeline, read-only.
        asked = session_for_approver(broker, me, session_id) if exc.status == 404 else None
        if asked is None:
            return render_error(request, exc.status, exc.code, exc.message)
        session, row = asked, {"session": asked, "capabilities": [], "read_only": True, "live": None,
                               "task_url": views.task_link(broker.settings, asked.task_id, asked.repository,
                                                           asked.labels or {})}
    with transaction(broker.engine) as db:
        rows = audit.query(db, session_id=session_id, limit=TIMELINE_LIMIT)
        checks = {c.seq: c for c in check_records(db, rows)}
    entries = [views.entry(row, checks.get(row.seq)) for row in rows]
    return render(request, "timeline.html", {
        **row,
        "entries": entries,
        "verified": bool(entries) and all(e.verified for e in entries),
        "broken": next((e for e in entries if not e.verified), None),
    })


@router.post("/sessions/{session_id}/end")
def end_session(request: Request, session_id: str, me: Person, csrf_token: Annotated[str, Form()] = "") -> Response:
    if not check_csrf(browser_of(request), csrf_token):
        return _refused_form(request)
    try:
        _, summary = sessions.end(_broker(request), session_id, reason="console", actor=me.principal, caller=me)
    except BrokerError as exc:
        return render_error(request, exc.status, exc.code, exc.message)
    revoked = views.count(len(summary.revoked), "capability", "capabilities")
    browser_of(request).flash("warn", f"Session ended: {revoked} revoked, "
                                      f"{len(summary.pending)} still being revoked (retried until the backend confirms).")
    return RedirectResponse(f"/console/sessions/{quote(session_id)}", status_code=303)


@router.post("/sessions/{session_id}/resume")
def resume_session(request: Request, session_id: str, me: Person, csrf_token: Annotated[str, Form()] = "",
                   reason: Annotated[str, Form()] = "") -> Response:
    """Lift a deviation suspension: as `POST /v1/sessions/{id}/resume`."""
    if not check_csrf(browser_of(request), csrf_token):
        return _refused_form(request)
    if len(reason) > 500:
        return render_error(request, 400, "invalid-reason", "A reason is at most 500 characters.")
    try:
        deviation.resume(_broker(request), me, session_id, reason=reason.strip() or None)
    except BrokerError as exc:
        return render_error(request, exc.status, exc.code, exc.message)
    browser_of(request).flash("good", "Session resumed: new capabilities may be issued again.")
    return RedirectResponse(f"/console/sessions/{quote(session_id)}", status_code=303)


# --- break-glass post-reviews -------------------------------------------------------------------

@router.get("/reviews")
def reviews_page(request: Request, me: Person) -> Response:
    """As `GET /v1/reviews`: the break-glass uses this person is named to review."""
    broker = _broker(request)
    try:
        open_ = breakglass.list_reviews(broker, me, "open", 200)
        closed = breakglass.list_reviews(broker, me, "closed", 30)
    except BrokerError as exc:
        return render_error(request, exc.status, exc.code, exc.message)
    return render(request, "reviews.html", {"open": open_, "closed": closed})


@router.post("/reviews/{review_id}/close")
def close_review(request: Request, review_id: str, me: Person, csrf_token: Annotated[str, Form()] = "",
                 verdict: Annotated[str, Form()] = "", note: Annotated[str, Form()] = "") -> Response:
    """As `POST /v1/reviews/{id}/close`."""
    if not check_csrf(browser_of(request), csrf_token):
        return _refused_form(request)
    if verdict not in breakglass.VERDICTS:
        return render_error(request, 400, "invalid-verdict", "Choose a verdict: appropriate or inappropriate.")
    if len(note) > 4000:
        return render_error(request, 400, "invalid-note", "A note is at most 4,000 characters.")
    try:
        breakglass.close(_broker(request), me, review_id, verdict=verdict, note=note.strip() or None)
    except BrokerError as exc:
        return render_error(request, exc.status, exc.code, exc.message)
    browser_of(request).flash("good", f"Review closed: {verdict}.")
    return RedirectResponse("/console/reviews", status_code=303)


@router.post("/capabilities/{capability_id}/revoke")
def revoke_capability(request: Request, capability_id: str, me: Person,
                      csrf_token: Annotated[str, Form()] = "") -> Response:
    if not check_csrf(browser_of(request), csrf_token):
        return _refused_form(request)
    try:
        lease, _ = queries.revoke(_broker(request), me, capability_id)
    except BrokerError as exc:
        return render_error(request, exc.status, exc.code, exc.message)
    browser_of(request).flash("warn", f"Capability {lease.id} ({lease.access} on {lease.resource}): {lease.status}"
                                      + (f", {lease.status_reason}" if lease.status_reason else "") + ".")
    return RedirectResponse(f"/console/sessions/{quote(lease.session_id)}", status_code=303)
