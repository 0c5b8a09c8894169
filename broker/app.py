"""The FastAPI application: routers, one error handler, and a lifespan that starts the sweeper."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker import __version__
from broker.api.routes import (
    approvals,
    audit,
    capabilities,
    grants,
    health,
    identity,
    policy,
    revocations,
    sessions,
    tokens,
    webhooks,
)
from broker.approvals.outbox import OutboxDelivery
from broker.approvals.signals import ApprovalSignals
from broker.audit.service import AuditEvent, append, ensure_head
from broker.config import Settings
from broker.console import app as console
from broker.db import transaction
from broker.errors import BrokerError
from broker.identity.callers import ApiKeys
from broker.leases.reconciler import reconcile_at_start
from broker.leases.sweeper import Sweeper
from broker.metrics import REGISTRY, LeaseCollector
from broker.runtime import Broker

log = logging.getLogger("broker")

MAX_BODY_BYTES = 1024 * 1024
_STATUS_CODES = {400: "invalid-request", 401: "invalid-token", 403: "forbidden", 404: "not-found",
                 405: "method-not-allowed", 409: "conflict", 413: "payload-too-large", 415: "unsupported-media-type"}


class BodyLimit:
    """Refuse oversize bodies by Content-Length before anything reads them."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope.get("headers", []):
                if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                    response = JSONResponse(
                        {"error": {"code": "payload-too-large", "message": f"body exceeds {self.limit} bytes"}},
                        status_code=413,
                    )
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def _record_policy_loaded(broker: Broker, trigger: str) -> None:
    with transaction(broker.engine) as db:
        ensure_head(db)
        detail: dict[str, Any] = {"version": broker.policies.current.version, "trigger": trigger}
        if broker.policies.shadow is not None:
            detail["shadow_version"] = broker.policies.shadow.version
        append(db, AuditEvent(type="policy.loaded", outcome="loaded", request={"operation": "policy.load"},
                              policy_decision={"policy_version": broker.policies.current.version}, detail=detail))


def create_app(settings: Settings | None = None, *, broker: Broker | None = None, sweeper: bool = True,
               outbox: bool | None = None) -> FastAPI:
    """`outbox` (default: as `sweeper`) runs the notification delivery loop."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal broker
        if broker is None:
            broker = Broker.build(settings or Settings())
        app.state.broker = broker
        app.state.api_keys = ApiKeys(broker.settings.orchestrator_key_hashes(), broker.settings.admin_token_sha256,
                                     broker.settings.human_token_hashes())
        console.start(app, broker)
        _COLLECTOR.broker = broker
        _record_policy_loaded(broker, "start")

        def reload() -> None:
            if broker.policies.reload():
                _record_policy_loaded(broker, "reload")
                log.info("policy reloaded: %s", broker.policies.current.version)
            else:
                log.error("policy reload refused; keeping %s", broker.policies.current.version)

        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)
        except (NotImplementedError, RuntimeError, ValueError):
            log.info("SIGHUP reload unavailable here (not the main thread)")
        background = Sweeper(broker) if sweeper else None
        if background:
            # What a crash left behind is finished before the sweeper starts and before requests.
            try:
                await asyncio.to_thread(reconcile_at_start, broker)
            except Exception:  # the sweeper runs the same queries: recovery is delayed, not lost
                log.exception("reconciliation at start failed; the sweeper will carry on")
            background.start()
        delivery = None
        if (sweeper if outbox is None else outbox) and broker.settings.approval_webhook_url_list():
            delivery = OutboxDelivery(broker)
            delivery.start()
        app.state.outbox = delivery
        try:
            yield
        finally:
            if delivery:
                delivery.stop()
            if background:
                background.stop()

    app = FastAPI(
        title="jit-broker",
        version=__version__,
        description="Just-in-time credentials for AI coding agents. Contract: DESIGN.md.",
        lifespan=lifespan,
    )
    if broker is not None:  # tests that build the broker themselves can use the app at once
        app.state.broker = broker
        app.state.api_keys = ApiKeys(broker.settings.orchestrator_key_hashes(), broker.settings.admin_token_sha256,
                                     broker.settings.human_token_hashes())
        console.start(app, broker)

    @app.exception_handler(BrokerError)
    async def broker_error(_: Request, exc: BrokerError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.to_body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"error": {"code": "invalid-json", "message": "the body is not valid JSON"}}, 400)
        # Input values are not echoed back: they may be someone's secret pasted in the wrong field.
        problems = [{"loc": list(e.get("loc", ())), "message": e.get("msg", ""), "type": e.get("type", "")} for e in errors]
        return JSONResponse(
            {"error": {"code": "validation-failed", "message": "the request does not match the schema", "problems": problems}},
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "http-error")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": {"code": "internal-error", "message": "internal error"}}, status_code=500)

    app.state.approval_signals = ApprovalSignals()
    for router in (sessions.router, capabilities.router, approvals.router, grants.router, revocations.router,
                   webhooks.router, policy.router, audit.router, tokens.router, health.router, identity.router):
        app.include_router(router)
    console.install(app)  # the approver's console: HTML pages under /console/, outside the OpenAPI document
    app.add_middleware(BodyLimit)
    return app


def app_from_environment() -> FastAPI:
    """Factory for `broker-cli serve --workers N`: each worker process builds its own broker."""
    logging.basicConfig(level=Settings().log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return create_app(Settings())


class _CurrentBrokerCollector(LeaseCollector):
    def __init__(self) -> None:
        super().__init__(None)

    @property
    def broker(self) -> Any:
        return self._broker

    @broker.setter
    def broker(self, value: Any) -> None:
        self._broker = value

    def collect(self):  # type: ignore[no-untyped-def]
        if self._broker is None:
            return iter(())
        return super().collect()


_COLLECTOR = _CurrentBrokerCollector()
REGISTRY.register(_COLLECTOR)
