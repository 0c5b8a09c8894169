"""The capability lane: `POST /v1/capabilities` answered before FastAPI's routing.

The busiest route spends more of its CPU in the framework (routing through every router,
dependency resolution, the exception and body-limit middlewares, a second validation) than in
the decision. The lane takes a request only when it is plainly well formed: a JSON body (by its
content type) that the route's own model accepts, one `Authorization` header, an
`Idempotency-Key` within the route's bound. Anything else goes on to the FastAPI route untouched (its body replayed), which
answers it as it always has: the lane decides nothing the route would not.

What the lane does is the route's own code: the same caller check (`api.deps.get_caller`, then
agents only), the same `answer`, and errors rendered by the same functions as the app's
exception handlers (`api.answers`). It sits inside the request guard (body bounds, NUL bytes,
no-store) and the request id middleware, so those hold for it as for every route.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from email.message import Message as MimeMessage
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from broker.api.answers import answer_for
from broker.api.deps import get_caller, require_kind
from broker.api.routes.capabilities import answer
from broker.api.schemas.sessions import CapabilityRequest

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = "/v1/capabilities"
MAX_IDEMPOTENCY_KEY = 255  # the route's Header(max_length=...)


class CapabilityLane:
    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != PATH:
            await self.app(scope, receive, send)
            return
        body, more = await _read_body(receive)
        taken = None if more is not None else _well_formed(scope, body)
        if taken is None:
            await self.app(scope, _replay(body, more, receive), send)
            return
        request, authorization, key = Request(scope, receive), *taken[1:]
        try:
            caller = require_kind(await get_caller(request, authorization), ("agent",))
            response = await answer(scope["app"].state.broker, caller, taken[0], key)
        except Exception as exc:  # noqa: BLE001  # what the app's exception handlers would answer
            response = answer_for(request, exc)
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> tuple[bytes, Message | None]:
    """The body when it comes in one message (the guard replays it so); else the first message."""
    message = await receive()
    if message["type"] == "http.request" and not message.get("more_body", False):
        return message.get("body", b""), None
    return b"", message


def _replay(body: bytes, first: Message | None, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return first if first is not None else {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _well_formed(scope: Scope, body: bytes) -> tuple[CapabilityRequest, str, str | None] | None:
    """(the body, the Authorization header, the Idempotency-Key) when the lane may answer; else None."""
    authorization = key = content_type = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            if authorization is not None:
                return None
            authorization = value.decode("latin-1")
        elif name == b"idempotency-key":
            if key is not None:
                return None
            key = value.decode("latin-1")
        elif name == b"content-type":
            if content_type is not None:
                return None
            content_type = value.decode("latin-1")
    if authorization is None or not body or (key is not None and len(key) > MAX_IDEMPOTENCY_KEY):
        return None
    if content_type is None:
        return None  # FastAPI's strict content type: no type, no JSON
    if content_type.lower() != "application/json":  # as FastAPI reads a body: application/json or +json
        mime = MimeMessage()
        mime["content-type"] = content_type
        subtype = mime.get_content_subtype()
        if mime.get_content_maintype() != "application" or (subtype != "json" and not subtype.endswith("+json")):
            return None
    try:
        parsed = json.loads(body)
        if not isinstance(parsed, dict):
            return None
        return CapabilityRequest.model_validate(parsed), authorization, key
    except (ValueError, ValidationError):
        return None
