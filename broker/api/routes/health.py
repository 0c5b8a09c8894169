"""Liveness, readiness (database, policy, every provider) and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from broker.api.deps import BrokerDep
from broker.metrics import REGISTRY

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(broker: BrokerDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    try:
        with broker.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "detail": exc.__class__.__name__}
    checks["policy"] = {"ok": True, "version": broker.policies.current.version}
    providers = {}
    for name, provider in sorted(broker.providers.items()):
        health = provider.health()
        providers[name] = {"ok": health.ok, "detail": health.detail}
    checks["providers"] = providers
    ready = checks["database"]["ok"] and all(p["ok"] for p in providers.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
