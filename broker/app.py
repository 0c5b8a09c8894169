"""The FastAPI application: routers, one error handler, and a lifespan that starts the sweeper."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from prometheus_client.core import GaugeMetricFamily

from broker import __version__, security_events
from broker import outbox as outbox_core
from broker.api import answers
from broker.api.guard import RequestGuard, declare_guard_responses
from broker.api.lane import CapabilityLane
from broker.api.routes import (
    approvals,
    audit,
    authorize,
    capabilities,
    grants,
    health,
    hooks,
    identity,
    oauth,
    policy,
    reviews,
    revocations,
    sessions,
    ssf,
    tokens,
    webhooks,
)
from broker.approvals import outbox as approval_outbox
from broker.approvals.signals import ApprovalSignals
from broker.audit.events import AuditEvent, RequestRef
from broker.audit.linker import link_all
from broker.audit.linker import linker as audit_linker
from broker.audit.service import append, ensure_head, last_policy_loaded, lock_head
from broker.audit.witness import witness_loop as audit_witness_loop
from broker.config import Settings
from broker.console import app as console
from broker.db import transaction
from broker.identity.callers import ApiKeys
from broker.identity.ratelimit import RateLimiter
from broker.lifecycle.recheck import permission_rechecker
from broker.lifecycle.reconciler import reconcile_at_start
from broker.lifecycle.sweeper import sweeper as sweeper_loop
from broker.logs import RequestIdMiddleware, configure_logging
from broker.metrics import REGISTRY, DatabaseCollector
from broker.oauth.clients import ClientDirectory
from broker.oauth.idjag import IdJagVerifier
from broker.periodic import Periodic
from broker.runtime import Broker
from broker.ssf import streams as ssf_streams
from broker.store import open_store

log = logging.getLogger("broker")

# Who sends each kind of outbox message (broker/outbox.py).
OUTBOX_SENDERS: dict[str, outbox_core.Sender] = {approval_outbox.KIND: approval_outbox.deliver,
                                                 security_events.KIND: security_events.deliver,
                                                 ssf_streams.KIND: ssf_streams.deliver}

def record_policy_loaded(broker: Broker, trigger: str) -> bool:
    """Audit `policy.loaded` when the policy in force (enforced and shadow versions) differs
    from what the newest `policy.loaded` record says; a restart or a reload of the same file
    records nothing. Returns whether a record was written."""
    current = broker.policies.current.version
    shadow = broker.policies.shadow.version if broker.policies.shadow is not None else None
    with transaction(broker.engine) as db:
        ensure_head(db)
        lock_head(db)  # replicas starting together: one of them records the change
        last = last_policy_loaded(db)
        if last is not None and last.get("version") == current and last.get("shadow_version") == shadow:
            return False
        append(db, AuditEvent(
            type="policy.loaded", outcome="loaded", actor="broker", request=RequestRef(operation="policy.load"),
            detail={"version": current, "shadow_version": shadow, "previous_version": (last or {}).get("version"),
                    "trigger": trigger},
        ))
    return True


def oauth_clients(broker: Broker) -> ClientDirectory:
    if broker.settings.cimd_allow_loopback:
        log.warning("BROKER_CIMD_ALLOW_LOOPBACK is set: client metadata documents may be fetched over plain http "
                    "from loopback. This is for tests only, never for production.")
    return ClientDirectory(broker.settings)


@dataclass(frozen=True)
class Loop:
    """A background loop of the app, by name: built from the broker (None: nothing to do here),
    after `catch_up` ran once at start (what a crash left behind, before any request)."""

    name: str
    build: Callable[[Broker], Periodic | None]
    catch_up: Callable[[Broker], object] | None = None


def _witness(broker: Broker) -> Periodic | None:
    # Checked here: a bad witness list fails the start.
    return audit_witness_loop(broker) if broker.settings.audit_witness_list() else None


def _outbox(broker: Broker) -> Periodic | None:
    settings = broker.settings
    if settings.approval_webhook_url_list() or settings.security_event_receiver_list() or settings.ssf_receiver_hashes():
        return outbox_core.outbox_delivery(broker, OUTBOX_SENDERS)
    return None


# In start order; stopped in reverse.
LOOPS = (
    Loop("sweeper", sweeper_loop, catch_up=reconcile_at_start),  # expiry, revocation retries, ended sessions
    Loop("audit-linker", audit_linker, catch_up=link_all),  # records into the Merkle tree
    Loop("audit-witness", _witness),  # the newest checkpoint to the witnesses
    Loop("permission-recheck", permission_rechecker),  # live leases whose human lost the permission at the source
    Loop("outbox", _outbox),  # approval notifications, Security Event Tokens, SSF
)
BACKGROUND = frozenset(loop.name for loop in LOOPS)

ROUTERS = (sessions.router, capabilities.router, approvals.router, grants.router, revocations.router, webhooks.router,
           policy.router, audit.router, tokens.router, health.router, identity.router, hooks.router, oauth.router,
           authorize.router, ssf.router, reviews.router)


def _background(switch: bool | Iterable[str]) -> frozenset[str]:
    if switch is True:
        return BACKGROUND
    if switch is False:
        return frozenset()
    chosen = frozenset(switch)
    if unknown := chosen - BACKGROUND:
        raise ValueError(f"unknown background loops {sorted(unknown)}; known: {sorted(BACKGROUND)}")
    return chosen


def _wire(app: FastAPI, broker: Broker) -> None:
    """The app's state for `broker`; what a test set before is kept."""
    app.state.broker = broker
    app.state.api_keys = ApiKeys(broker.settings.orchestrator_key_hashes(), broker.settings.admin_token_sha256,
                                 broker.settings.human_token_hashes())
    app.state.rate_limiter = getattr(app.state, "rate_limiter", None) or RateLimiter()
    console.start(app, broker)
    app.state.oauth_clients = getattr(app.state, "oauth_clients", None) or oauth_clients(broker)
    app.state.idjag = getattr(app.state, "idjag", None) or IdJagVerifier(broker.settings)


def _reloader(broker: Broker) -> Callable[[], None]:
    def reload() -> None:
        if broker.policies.reload():
            for provider in broker.providers.values():
                provider.policy_reloaded()
            record_policy_loaded(broker, "reload")
            log.info("policy reloaded: %s", broker.policies.current.version)
        else:
            log.error("policy reload refused; keeping %s", broker.policies.current.version)

    return reload


async def _start_loops(broker: Broker, names: frozenset[str]) -> list[Periodic]:
    started: list[Periodic] = []
    for loop in LOOPS:
        if loop.name not in names or (periodic := loop.build(broker)) is None:
            continue
        if loop.catch_up is not None:
            try:
                await asyncio.to_thread(loop.catch_up, broker)
            except Exception:  # the loop's passes run the same queries: delayed, not lost
                log.exception("%s: catching up at start failed; its loop will carry on", loop.name)
        periodic.start()
        started.append(periodic)
    return started


def create_app(settings: Settings | None = None, *, broker: Broker | None = None,
               background: bool | Iterable[str] = True) -> FastAPI:
    """The broker's app. `background` says which background loops run in its lifespan: True (all
    of `BACKGROUND`: sweeper, audit-linker, audit-witness, permission-recheck, outbox), False
    (none: tests that drive the broker's time themselves), or the names of some of them. A loop
    with nothing configured (no witnesses, no receivers) does not start either way."""
    loops = _background(background)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal broker
        if broker is None:
            broker = Broker.build(settings or Settings())
        _wire(app, broker)
        # Checked at every start, loops or not: a bad receiver list fails the start, not a delivery.
        broker.settings.security_event_receiver_list()
        broker.settings.ssf_receiver_hashes()
        _COLLECTOR.broker = broker
        record_policy_loaded(broker, "start")
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, _reloader(broker))
        except (NotImplementedError, RuntimeError, ValueError):
            log.info("SIGHUP reload unavailable here (not the main thread)")
        running = await _start_loops(broker, loops)
        app.state.outbox = next((p for p in running if p.name == "broker-outbox"), None)
        # The request path's store, on this event loop (PostgreSQL: an async pool, no thread hop).
        store = broker.store = await open_store(broker.engine)
        try:
            yield
        finally:
            if broker.store is store:
                broker.store = None
            await store.close()
            for periodic in reversed(running):
                periodic.stop()
            broker.permissions.close()

    app = FastAPI(
        title="jit-broker",
        version=__version__,
        description="Just-in-time credentials for AI coding agents. The contract: this document, and docs/ in the repository.",
        lifespan=lifespan,
    )
    if broker is not None:  # tests that build the broker themselves can use the app at once
        _wire(app, broker)

    for family, handler in answers.HANDLERS:
        app.add_exception_handler(family, handler)
    app.state.approval_signals = ApprovalSignals()
    for router in ROUTERS:
        app.include_router(router)
    console.install(app)  # the approver's console: HTML pages under /console/, outside the OpenAPI document
    app.add_middleware(CapabilityLane)  # inside the guard: the busiest route, past FastAPI's routing
    app.add_middleware(RequestGuard)
    app.add_middleware(RequestIdMiddleware)  # outermost: even a refused body gets an id and a log line

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = declare_guard_responses(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def app_from_environment() -> FastAPI:
    """Factory for `broker-cli serve --workers N`: each worker process builds its own broker."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)


class _CurrentBrokerCollector(DatabaseCollector):
    def __init__(self) -> None:
        super().__init__(None)

    @property
    def broker(self) -> Any:
        return self._broker

    @broker.setter
    def broker(self, value: Any) -> None:
        self._broker = value

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self._broker is None:
            return iter(())
        return super().collect()


_COLLECTOR = _CurrentBrokerCollector()
REGISTRY.register(_COLLECTOR)
