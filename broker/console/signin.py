"""Signing a person in to the console.

- **At the IdP**: authorization code + PKCE (S256) through authlib's Starlette client, as a
  confidential web client (`BROKER_CONSOLE_OIDC_CLIENT_ID`/`_SECRET`), redirect URI
  `{BROKER_PUBLIC_URL}/console/auth/callback`. authlib keeps state, nonce and the PKCE verifier
  in the server-side browser session and checks the ID token (signature, issuer, audience,
  nonce). Who the person is then comes from the access token, verified by the very verifier the
  REST API uses (`broker.identity.oidc`): one principal claim, one groups claim, one audience.
  The console keeps no IdP token: it remembers the principal and the IdP's groups until the
  console session ends (`BROKER_CONSOLE_SESSION_TTL_SECONDS`).
- **With a local human token** (`BROKER_HUMAN_TOKENS`, e.g. `.broker/human-token` written by
  `broker-cli dev`): the token is pasted into a form once and checked like an API bearer token.
  This is how the embedded default, which has no IdP, signs its trial human in.
"""

from __future__ import annotations

import logging
import warnings
from typing import Annotated, Any

from authlib.deprecate import AuthlibDeprecationWarning  # first: it sets authlib's own "always" filter
from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from broker.console.browser import browser_of, check_csrf
from broker.console.render import render, render_error
from broker.db import utcnow
from broker.errors import BrokerError, Unauthenticated
from broker.identity.callers import ApiKeys, Caller
from broker.runtime import Broker

with warnings.catch_warnings():
    # authlib's httpx integration announces a future move to httpx2 at import; nothing to act on yet.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.integrations.starlette_client import OAuth, OAuthError

log = logging.getLogger("broker.console")

router = APIRouter(prefix="/console", include_in_schema=False)
CLIENT_NAME = "idp"


def build_oauth(broker: Broker) -> OAuth | None:
    """The IdP client of the console, or None when the console has no IdP sign-in."""
    s = broker.settings
    if not (s.oidc_issuer and s.console_oidc_client_id and s.console_oidc_client_secret):
        return None
    oauth = OAuth()
    oauth.register(
        CLIENT_NAME,
        client_id=s.console_oidc_client_id,
        client_secret=s.console_oidc_client_secret.get_secret_value(),
        server_metadata_url=s.oidc_issuer.rstrip("/") + "/.well-known/openid-configuration",
        # PKCE even for a confidential client (OAuth 2.0 Security BCP): a stolen code is useless.
        client_kwargs={"scope": s.console_oidc_scope, "code_challenge_method": "S256",
                       "token_endpoint_auth_method": "client_secret_basic", "timeout": s.oidc_timeout_seconds},
    )
    return oauth


def safe_next(value: str | None) -> str:
    """Only a path inside the console: never an open redirect to somewhere else."""
    if value and value.startswith("/console/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/approvals"


def _oauth(request: Request) -> OAuth | None:
    oauth: OAuth | None = request.app.state.console_oauth
    return oauth


@router.get("/signin")
def signin_page(request: Request, next: str | None = None) -> Response:  # `next`: the query parameter's name
    broker: Broker = request.app.state.broker
    browser = browser_of(request)
    if browser.signed_in:
        return RedirectResponse(safe_next(next), status_code=303)
    browser.ensure(utcnow())
    return render(request, "signin.html", {
        "next": safe_next(next), "idp": broker.settings.oidc_issuer if _oauth(request) else None,
        "local_tokens": bool(broker.settings.human_tokens),
    })


@router.get("/signin/oidc")
async def signin_oidc(request: Request, next: str | None = None) -> Response:
    oauth = _oauth(request)
    if oauth is None:
        return render_error(request, 404, "no-idp-sign-in", "This broker has no IdP sign-in for the console "
                            "(BROKER_CONSOLE_OIDC_CLIENT_ID is not set).")
    broker: Broker = request.app.state.broker
    browser = browser_of(request)
    browser.ensure(utcnow())
    browser.session_data["_next"] = safe_next(next)
    extra: dict[str, Any] = {}
    if broker.settings.console_oidc_resource:
        extra["resource"] = broker.settings.console_oidc_resource
    redirect_uri = broker.settings.public_base_url() + "/console/auth/callback"
    try:
        client = oauth.create_client(CLIENT_NAME)
        response: Response = await client.authorize_redirect(request, redirect_uri, **extra)
    except Exception as exc:  # noqa: BLE001  # discovery failed (down, misnamed, bad JSON): answered as a 503 page
        log.warning("console sign-in could not reach the IdP: %s", exc.__class__.__name__)
        return render_error(request, 503, "idp-unavailable", "The identity provider cannot be reached; try again shortly.")
    return response


@router.get("/auth/callback")
async def signin_callback(request: Request) -> Response:
    oauth = _oauth(request)
    broker: Broker = request.app.state.broker
    browser = browser_of(request)
    if oauth is None or browser.row is None:
        return render_error(request, 400, "sign-in-not-started", "This sign-in was not started in this browser; "
                            "start again from the sign-in page.")
    try:
        token = await oauth.create_client(CLIENT_NAME).authorize_access_token(request)
    except OAuthError as exc:
        log.info("console sign-in refused: %s", exc.error)
        return render_error(request, 401, "sign-in-failed", f"The identity provider did not sign you in ({exc.error}).")
    except Exception as exc:  # noqa: BLE001  # fail closed: any other token-endpoint failure is no sign-in
        log.warning("console sign-in failed at the token endpoint: %s", exc.__class__.__name__)
        return render_error(request, 401, "sign-in-failed", "The sign-in could not be completed; start again.")
    caller = await run_in_threadpool(_person, broker, token)
    if isinstance(caller, BrokerError):
        return render_error(request, 401, caller.code, caller.message)
    next_page = safe_next(browser.session_data.get("_next"))
    browser.sign_in(broker, caller.name, sorted(caller.groups), "oidc", utcnow())
    log.info("console sign-in: %s (oidc)", caller.name)
    return RedirectResponse(next_page, status_code=303)


def _person(broker: Broker, token: dict[str, Any]) -> Caller | BrokerError:
    """The person behind the tokens, by the API's own verifier: the access token if it is one
    for the broker, else the ID token (IdPs whose access tokens are opaque, where the console's
    client id is the broker's audience)."""
    if broker.oidc is None:
        raise RuntimeError("console sign-in reached without an OIDC verifier configured")
    problem: BrokerError = Unauthenticated("the IdP returned no token for the broker's audience")
    for kind in ("access_token", "id_token"):
        value = token.get(kind)
        if not isinstance(value, str) or value.count(".") != 2:
            continue
        try:
            caller = broker.oidc.verify(value)
        except BrokerError as exc:
            problem = exc
            continue
        if caller.kind != "human":
            return Unauthenticated("that token is not a person's")
        return caller
    return problem


@router.post("/signin/token")
def signin_token(request: Request, csrf_token: Annotated[str, Form()] = "", token: Annotated[str, Form()] = "",
                 next: Annotated[str, Form()] = "") -> Response:
    broker: Broker = request.app.state.broker
    browser = browser_of(request)
    if not check_csrf(browser, csrf_token):
        return render_error(request, 403, "csrf-failed", "The form expired or did not come from this console; "
                            "reload the sign-in page and try again.")
    keys: ApiKeys = request.app.state.api_keys
    try:
        caller = keys.lookup(token.strip()) if token.strip() else None
    except BrokerError:
        caller = None
    if caller is None or caller.kind != "human":
        # Admin and orchestrator keys are not people; nothing says which keys exist.
        return render(request, "signin.html", {
            "next": safe_next(next), "idp": broker.settings.oidc_issuer if _oauth(request) else None,
            "local_tokens": bool(broker.settings.human_tokens),
            "error": "That is not a local human token of this broker.",
        }, status_code=401)
    browser.sign_in(broker, caller.name, [], "local-token", utcnow())
    log.info("console sign-in: %s (local token)", caller.name)
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/signout")
def signout(request: Request, csrf_token: Annotated[str, Form()] = "") -> Response:
    browser = browser_of(request)
    if not check_csrf(browser, csrf_token):
        return render_error(request, 403, "csrf-failed", "The form expired or did not come from this console.")
    browser.sign_out()
    return RedirectResponse("/console/signin", status_code=303)
