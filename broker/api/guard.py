"""The request boundary, as pure ASGI: what every request passes before routing, parsing or auth.

- **Body size on the stream.** The body is read from the received stream (Content-Length or
  chunked alike) and counted as it arrives; past the limit the answer is `413
  payload-too-large` at once, with `Connection: close`, and the rest is never read. What is
  within the limit is buffered (at most the limit) and replayed to the app.
- **NUL bytes** in the path, the query or a header: `400 nul-byte` (PostgreSQL refuses NUL in
  text, so they would surface as a 500 much later).
- **JSON bodies** are parsed once here, bounded (`broker.jsonbounds.BODY_LIMITS`): depth,
  string, array, key count, number range, no NaN/Infinity, no NUL, no lone surrogate.
  Text that is not JSON at all is left to the route (`400 invalid-json`).
- **No caching.** Every answer that does not say otherwise gets `Cache-Control: no-store` and
  `Pragma: no-cache`: API answers carry session tokens, credentials and replays of them, and
  a cache in between must never keep one. Public documents (JWKS) set their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from prometheus_client import Histogram
from starlette.responses import JSONResponse

from broker import jsonbounds
from broker.metrics import REGISTRY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY_BYTES = 1024 * 1024
# Endpoints whose bodies are small by nature get a tighter limit.
PATH_BODY_LIMITS = {
    "/v1/introspect": 16 * 1024,  # one token (<= 8 KiB) and its hint
    "/v1/oauth/revoke": 16 * 1024,  # the same
    "/v1/oauth/token": 64 * 1024,  # a session token and one capability's parameters
    "/v1/webhooks/orchestrator": 64 * 1024,  # a lifecycle event is a few hundred bytes
}

REFUSED_BODY_BYTES = Histogram(
    "broker_refused_body_bytes", "Bytes read from a request body before it was refused as too large",
    buckets=(16 * 1024, 64 * 1024, 256 * 1024, 1024 * 1024, 2 * 1024 * 1024, 4 * 1024 * 1024),
    registry=REGISTRY,
)

NO_STORE = [(b"cache-control", b"no-store"), (b"pragma", b"no-cache")]


def body_limit_for(path: str) -> int:
    return PATH_BODY_LIMITS.get(path.rstrip("/") or "/", MAX_BODY_BYTES)


def _is_json(content_type: str) -> bool:
    # FastAPI parses a body without a content type as JSON too.
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "" or media == "application/json" or media.endswith("+json")


def _line_problem(scope: Scope) -> str | None:
    if "\x00" in scope.get("path", ""):
        return "the path contains a NUL character"
    query: bytes = scope.get("query_string", b"")
    if b"\x00" in query or b"\x00" in unquote_to_bytes(query):
        return "the query string contains a NUL character"
    for name, value in scope.get("headers", []):
        if b"\x00" in value:
            return f"the header {name.decode('latin-1')} contains a NUL character"
    return None


async def _refuse(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if close:  # uvicorn closes the connection after this answer: the rest is never read
        headers["Connection"] = "close"
    response = JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    async def nothing() -> Message:  # the body is deliberately not read
        return {"type": "http.disconnect"}

    await response({"type": "http"}, nothing, send)


async def _read_body(receive: Receive, send: Send, limit: int) -> bytes | None:
    """The whole body, or None when it was refused as too large or the client went away."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None  # nobody left to answer
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            REFUSED_BODY_BYTES.observe(size)
            await _refuse(send, 413, "payload-too-large", f"body exceeds {limit} bytes", close=True)
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _body_problem(body: bytes, headers: dict[bytes, bytes]) -> tuple[str, str] | None:
    """(code, message) of a 400 for a JSON body past its bounds or a text body with a NUL; else None."""
    if body and _is_json(headers.get(b"content-type", b"").decode("latin-1")):
        try:
            jsonbounds.loads_bounded(body, jsonbounds.BODY_LIMITS)
        except jsonbounds.JsonBoundsError as exc:
            return exc.code, f"the JSON body has {exc.message} (at {exc.path})"
        except ValueError:
            pass  # not JSON at all: the route answers invalid-json as it always has
    elif b"\x00" in body or b"%00" in body:  # forms and other text
        return "nul-byte", "the body contains a NUL character"
    return None


class RequestGuard:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        problem = _line_problem(scope)
        if problem:
            await _refuse(send, 400, "nul-byte", problem, close=True)
            return
        limit = body_limit_for(scope.get("path", ""))
        headers = {name.lower(): value for name, value in scope.get("headers", [])}
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            REFUSED_BODY_BYTES.observe(0)
            await _refuse(send, 413, "payload-too-large", f"body exceeds {limit} bytes", close=True)
            return
        body = await _read_body(receive, send, limit)
        if body is None:
            return
        refusal = _body_problem(body, headers)
        if refusal is not None:
            code, message = refusal
            await _refuse(send, 400, code, message)
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        async def no_store(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower(): value for name, value in headers}
                cache = present.get(b"cache-control")
                if cache is None:
                    headers += NO_STORE
                elif b"no-store" in cache.lower() and b"pragma" not in present:
                    headers.append((b"pragma", b"no-cache"))  # HTTP/1.0 caches know only this
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, replay, no_store)


_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
_GUARD_RESPONSES = {
    "400": "Bad input: NUL in the path, query or a header; a JSON body beyond its bounds",
    "413": "The body is larger than this endpoint's limit",
    "429": "Rate limited (agents, per the policy's rate_limits); see Retry-After",
}


def declare_guard_responses(document: dict[str, Any]) -> dict[str, Any]:
    """Add what the guard and the rate limiter may answer to every operation of the document:
    400 everywhere, 413 where there is a body, 429 where a caller authenticates (declares 401)."""
    for item in document.get("paths", {}).values():
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete", "patch") or not isinstance(operation, dict):
                continue
            responses = operation.setdefault("responses", {})
            wanted = ["400"]
            if "requestBody" in operation:
                wanted.append("413")
            # Who declares 401 authenticates a caller; the webhook's caller is a signature, not an agent.
            if "401" in responses and "webhook" not in operation.get("operationId", ""):
                wanted.append("429")
            for status in wanted:
                if status not in responses:
                    responses[status] = {"description": _GUARD_RESPONSES[status], **_ERROR}
    return document
