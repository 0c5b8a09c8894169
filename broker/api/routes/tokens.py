"""Public keys of everything the broker signs, and RFC 7662 introspection of native tokens."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep
from broker.api.schemas.common import Jwks, error_responses
from broker.errors import InvalidRequest
from broker.leases.outcomes import Introspection
from broker.leases.queries import introspect

router = APIRouter(tags=["tokens"])
_TOKEN = {"type": "string", "minLength": 1, "maxLength": 8192}


@router.get("/.well-known/jwks.json", response_model=Jwks)
def jwks(broker: BrokerDep, response: Response) -> Jwks:
    response.headers["Cache-Control"] = "public, max-age=300"
    return Jwks.model_validate(broker.keyring.jwks())


@router.post(
    "/v1/introspect",
    response_model=Introspection,
    response_model_exclude_none=True,  # inactive is {"active": false}, nothing more (RFC 7662)
    responses=error_responses(400, 413),
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "required": ["token"], "properties": {"token": _TOKEN}}
                },
                "application/json": {
                    "schema": {"type": "object", "required": ["token"], "properties": {"token": _TOKEN}}
                },
            }
        }
    },
)
async def introspect_token(request: Request, broker: BrokerDep, response: Response) -> Introspection:
    """Form-encoded as RFC 7662 says (JSON accepted too). Inactive says nothing more, by design.

    Unauthenticated on purpose: the answer reveals only whether a token the caller already
    holds is live, and tokens carry 128 bits of signature, so scanning finds nothing."""
    raw = await request.body()
    ctype = request.headers.get("content-type", "")
    token: Any = None
    if ctype.startswith("application/json"):
        try:
            token = json.loads(raw or b"{}").get("token")
        except (ValueError, AttributeError, RecursionError):
            raise InvalidRequest("body is not valid JSON", code="invalid-json") from None
    else:
        token = next(iter(parse_qs(raw.decode(errors="replace")).get("token") or []), None)
    if not isinstance(token, str) or not token or len(token) > 8192:
        raise InvalidRequest("introspection needs a `token` parameter", code="invalid-request")
    response.headers["Cache-Control"] = "no-store"
    return await run_in_threadpool(introspect, broker, token)
