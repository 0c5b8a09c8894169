"""The consent page of the authorization endpoint: a person signed in to the console sees what an
MCP client asks for and approves or denies it (`broker.oauth.authorize.describe/decide`, the
functions `POST /v1/oauth/authorizations/{id}/decision` calls too)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from broker.console.browser import browser_of, check_csrf
from broker.console.pages import Person
from broker.console.render import render, render_error
from broker.oauth import authorize
from broker.oauth.errors import OAuthError
from broker.runtime import Broker

router = APIRouter(prefix="/console/oauth", include_in_schema=False)


@router.get("/authorize/{authz_id}")
async def consent_page(request: Request, authz_id: str, me: Person) -> Response:
    broker: Broker = request.app.state.broker
    try:
        ask = await run_in_threadpool(authorize.describe, broker, authz_id)
    except OAuthError as exc:
        return render_error(request, exc.status, exc.code, exc.description)
    return render(request, "oauth_consent.html", {"ask": ask, "me": me.name})


@router.post("/authorize/{authz_id}")
async def consent_answer(request: Request, authz_id: str, me: Person, csrf_token: Annotated[str, Form()] = "",
                         decision: Annotated[str, Form()] = "") -> Response:
    broker: Broker = request.app.state.broker
    if not check_csrf(browser_of(request), csrf_token):
        return render_error(request, 403, "csrf-failed", "The form expired or did not come from this console; "
                            "reload the page and try again.")
    if decision not in ("approve", "deny"):
        return render_error(request, 400, "invalid-decision", "Choose approve or deny.")
    try:
        answer = await run_in_threadpool(authorize.decide, broker, me, authz_id, decision == "approve")
    except OAuthError as exc:
        return render_error(request, exc.status, exc.code, exc.description)
    if isinstance(answer, authorize.Waiting):
        ask = await run_in_threadpool(authorize.describe, broker, authz_id)
        return render(request, "oauth_consent.html", {"ask": ask, "me": me.name, "waiting": answer}, status_code=202)
    # Not a 303: the console's CSP says form-action 'self', which browsers apply to a form's
    # redirects too, so the way back to the client (another origin) is a page that navigates.
    client = await run_in_threadpool(ask_name, broker, authz_id)
    return render(request, "oauth_continue.html", {"location": answer.location, "me": me.name, "client": client,
                                                   "heading": "Approved" if answer.code_issued else "Denied"})


def ask_name(broker: Broker, authz_id: str) -> str:
    ask = authorize.describe(broker, authz_id)
    return str(ask["client_name"] or ask["client_id"])
