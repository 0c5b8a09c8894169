"""Liveness, readiness (database, policy, every provider; live permission sources shown) and Prometheus metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from broker.api.deps import BrokerDep
from broker.api.schemas.common import Liveness, Readiness
from broker.metrics import REGISTRY
from broker.permissions.base import SourceHealth
from broker.providers.base import ProviderHealth
from broker.providers.registry import UnconfiguredProvider

PROBE_SECONDS = 3.0

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Liveness)
def healthz() -> Liveness:
    return Liveness()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(broker: BrokerDep, response: Response) -> Readiness:
    checks: dict[str, Any] = {}
    try:
        with broker.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        if broker.store is not None:  # the request path's own pool (on PostgreSQL, psycopg's async pool)
            anyio.from_thread.run(broker.store.ping)
        checks["database"] = {"ok": True}
    except Exception as exc:  # noqa: BLE001  # whatever the database raises, the answer is "not ready"
        checks["database"] = {"ok": False, "detail": exc.__class__.__name__}
    checks["policy"] = {"ok": True, "version": broker.policies.current.version}
    providers = {}
    # Probed side by side with one deadline: a hung backend makes readiness say so, not hang.
    pool = ThreadPoolExecutor(max_workers=max(1, len(broker.providers)))
    futures = {name: pool.submit(provider.health) for name, provider in broker.providers.items()}
    wait(futures.values(), timeout=PROBE_SECONDS)
    pool.shutdown(wait=False, cancel_futures=True)  # a hung probe finishes on its own thread
    for name, provider in sorted(broker.providers.items()):
        future = futures[name]
        health = future.result() if future.done() else ProviderHealth(False, f"no answer within {PROBE_SECONDS}s")
        # Placeholders exist only in the embedded default (production refuses to start
        # without a provider's config): shown, but they do not make the broker unready.
        required = not isinstance(provider, UnconfiguredProvider)
        providers[name] = {"ok": health.ok, "detail": health.detail, "required": required}
    checks["providers"] = providers
    # Live permission sources are shown, not required: while one cannot answer, the rules naming
    # it fail closed (or allow, as each rule says); every replica would be equally unready.
    sources = broker.permissions.sources
    spool = ThreadPoolExecutor(max_workers=max(1, len(sources)))
    probes = {name: spool.submit(source.health) for name, source in sources.items()}
    wait(probes.values(), timeout=PROBE_SECONDS)
    spool.shutdown(wait=False, cancel_futures=True)
    live_sources = {}
    for name, probe in sorted(probes.items()):
        said = probe.result() if probe.done() else SourceHealth(False, f"no answer within {PROBE_SECONDS}s")
        live_sources[name] = {"ok": said.ok, "detail": said.detail}
    checks["permission_sources"] = live_sources
    ready = checks["database"]["ok"] and all(p["ok"] for p in providers.values() if p["required"])
    response.status_code = 200 if ready else 503
    if not ready:  # an outage: a load balancer or a client polling this may back off for as long
        response.headers["Retry-After"] = "1"
    return Readiness(ready=ready, checks=checks)


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}})
def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
