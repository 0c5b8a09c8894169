"""Logging: one set-up for every process, readable text by default or one JSON object a line,
and the request id that ties every line of a request together.

`configure_logging(level, format)` is the only place that touches the root logger; `serve`,
`dev`, `migrate` and each `--workers` process call it. uvicorn is started with `log_config=None`
so its own lines go through the same handler. The request id lives in a contextvar:
`RequestIdMiddleware` sets it from `X-Request-ID` (when it is a sane token) or a fresh id, and
echoes it in the response; threads started for a request's work copy it where they need it, and
the sweeper sets one per pass (`sweep-...`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal

from broker import redaction

LogFormat = Literal["text", "json"]

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("broker_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
# A caller's id is kept only when it is a short plain token: anything else (newlines, quotes,
# a pasted secret of odd shape) could forge or pollute log lines, so it is replaced.
_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"

# The attributes every LogRecord has; anything else on a record came from `extra=` and is kept.
# (uvicorn's `color_message` is its message with terminal colour codes: not for a log pipeline.)
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "color_message"}

log = logging.getLogger("broker.http")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def current_request_id() -> str | None:
    return REQUEST_ID.get()


class RequestIdFilter(logging.Filter):
    """Stamps the current request id on every record the handler sees (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id, then any
    `extra=` fields and the exception text. Values that are not JSON become their str()."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                # structured fields bypass the message's redaction: redact strings here too
                out[key] = redaction.redact(value) if isinstance(value, str) else value
        # The redacting filter leaves the redacted traceback in exc_text; never re-format the raw one.
        if record.exc_text:
            out["exception"] = redaction.redact(record.exc_text)
        elif record.exc_info:
            out["exception"] = redaction.redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redaction.redact(self.formatStack(record.stack_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


def secret_filters() -> list[logging.Filter]:
    """The secret-redacting filter (`broker/redaction.py`): on the handler, so it sees every
    record, including those propagated from SDK loggers, before any line is written."""
    return [redaction.RedactingFilter()]


def configure_logging(level: str = "info", format: LogFormat | str = "text", *,
                      stream: Any = None, extra_filters: Iterable[logging.Filter] = ()) -> logging.Handler:
    """Replace the root logger's handlers with one on stderr in the given format. Idempotent."""
    if format not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else _TextFormatter(TEXT_FORMAT))
    for f in (RequestIdFilter(), *secret_filters(), *extra_filters):
        handler.addFilter(f)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    redaction.silence_wire_loggers()  # SDK loggers that log bodies stay at WARNING whatever the level
    # uvicorn's loggers carry their own handlers only when uvicorn configured them: with
    # log_config=None they propagate here, and so get the request id and the format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.NOTSET)  # follow the root's level (an earlier uvicorn.Config may have set one)
    return handler


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Any]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RequestIdMiddleware:
    """ASGI: a request id per HTTP request, in the contextvar, the response header and one
    access line (method, path without query, status, duration; never headers or bodies)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"x-request-id"), None)
        request_id = given if given is not None and _SANE_ID.match(given) else new_request_id()
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.info("%s %s %d", scope.get("method"), scope.get("path"), status,
                     extra={"method": scope.get("method"), "path": scope.get("path"), "status": status,
                            "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
            REQUEST_ID.reset(token)
