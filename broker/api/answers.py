"""How an error becomes an answer: one place, for the app's exception handlers and the capability lane.

A `BrokerError` answers its own status and kebab-case code (with the OAuth challenge on a 401
and its own headers, e.g. Retry-After); a driver's or SDK's error that is an outage answers 503
(broker/outages.py); anything else is a bug: logged with its traceback, answered 500.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse

from broker.errors import BrokerError
from broker.oauth.metadata import challenge
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
