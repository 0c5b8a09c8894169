"""How an error becomes an answer: one place, for the app's exception handlers and the capability lane.

A `BrokerError` answers its own status and kebab-case code (with the OAuth challenge on a 401
and its own headers, e.g. Retry-After); a driver's or SDK's error that is an outage answers 503
(broker/outages.py); anything else is a bug: logged with its traceback, answered 500.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match

from broker.errors import BrokerError
from broker.oauth.metadata import challenge
from broker.outages import FAMILIES as OUTAGE_FAMILIES
from broker.outages import outage

log = logging.getLogger("broker")

INTERNAL_ERROR = {"error": {"code": "internal-error", "message": "internal error"}}


def broker_error(request: Request, exc: BrokerError) -> JSONResponse:
    if exc.status >= 500 and exc.status != 503 and (cause := outage(exc)) is not None:
        log.warning("%s during an outage: answered as %s", exc.code, cause.code)
        exc = cause  # e.g. an audit write that failed because the database went away
    headers = challenge(getattr(request.app.state, "broker", None), exc)
    headers.update(exc.headers)  # e.g. Retry-After of a rate limit or an outage
    return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers or None)


def outage_error(request: Request, exc: Exception) -> JSONResponse | None:
    """The 503 for a driver's or SDK's error that is an outage; None when it is not one."""
    cause = outage(exc)
    if cause is None:
        return None
    log.warning("%s %s: %s (%s)", request.method, request.url.path, cause.code, type(exc).__name__)
    return JSONResponse(cause.to_body(), status_code=cause.status, headers=cause.headers)


def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """An outage wrapped in something else is still a 503; anything else is a bug."""
    answer = outage_error(request, exc)
    if answer is not None:
        return answer
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(INTERNAL_ERROR, status_code=500)


def answer_for(request: Request, exc: Exception) -> JSONResponse:
    """What the app's handlers together would answer for `exc`."""
    if isinstance(exc, BrokerError):
        return broker_error(request, exc)
    return unexpected_error(request, exc)


_STATUS_CODES = {400: "invalid-request", 401: "invalid-token", 403: "forbidden", 404: "not-found",
                 405: "method-not-allowed", 409: "conflict", 413: "payload-too-large", 415: "unsupported-media-type"}


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's own 405 names only the first route's)."""
    allowed = []
    for method in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


# The app's exception handlers (registered by create_app, in this order).


async def _broker_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BrokerError)  # noqa: S101  # registered for BrokerError only
    return broker_error(request, exc)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # noqa: S101  # registered for RequestValidationError only
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"error": {"code": "invalid-json", "message": "the body is not valid JSON"}}, 400)
    # Input values are not echoed back: they may be someone's secret pasted in the wrong field.
    problems = [{"loc": list(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
    return JSONResponse(
        {"error": {"code": "validation-failed", "message": "the request does not match the schema", "problems": problems}},
        status_code=422,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)  # noqa: S101  # registered for HTTPException only
    code = _STATUS_CODES.get(exc.status_code, "http-error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # RFC 9110: a 405 names what the resource does allow
        headers["Allow"] = _allowed_methods(request)
    return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                        headers=headers or None)


async def _outage_error(request: Request, exc: Exception) -> JSONResponse:
    """A driver's or SDK's error that reached the app: 503 when it is an outage, else a bug."""
    answer = outage_error(request, exc)
    if answer is None:
        raise exc  # to `_unexpected`: logged with its traceback, answered 500
    return answer


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return unexpected_error(request, exc)


Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]
HANDLERS: list[tuple[type[Exception], Handler]] = [
    (BrokerError, _broker_error),
    (RequestValidationError, _validation_error),
    (StarletteHTTPException, _http_error),
    # Handled inside the app, so the connection is answered and kept.
    *((family, _outage_error) for family in OUTAGE_FAMILIES),
    (Exception, _unexpected),
]
