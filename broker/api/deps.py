"""Who may call what, as annotated types: a route's signature says who its callers are."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from broker.audit.events import machine_caller
from broker.errors import Forbidden
from broker.identity.binding import check_session_workload, verify_workload
from broker.identity.callers import ApiKeys, Caller, bearer, session_token_claims
from broker.identity.oidc import unverified_issuer
from broker.identity.ratelimit import RateLimiter
from broker.identity.workload import WORKLOAD_HEADER, WorkloadIdentity
from broker.runtime import Broker
from broker.sessions import liveness


async def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


async def get_caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    # async: cheap CPU work (a cached signature check or one SHA-256) on the event loop,
    # instead of a hop through the thread pool.
    broker: Broker = request.app.state.broker
    token = bearer(authorization)
    machine_caller.set(None)  # this request's own; set below only for a verified workload
    if token.count(".") == 2:  # a JWT: the broker's own session token, the IdP's, or a workload's
        # The unverified `iss` only picks the verifier; each one checks issuer and signature itself.
        if broker.workload.issuers or broker.oidc is not None:
            iss = unverified_issuer(token)
            if iss != broker.settings.issuer and broker.workload.issuers and \
                    (broker.oidc is None or iss != broker.oidc.config.issuer):
                identity = await _workload(broker, token, role="orchestrator")
                return Caller(kind="orchestrator", name=str(identity.orchestrator))
            if broker.oidc is not None and iss != broker.settings.issuer:
                # A thread: the first token (and a rotated kid) reads the IdP's JWKS over the network.
                return await run_in_threadpool(broker.oidc.verify, token)
        claims = session_token_claims(
            token, keyring=broker.keyring, issuer=broker.settings.issuer, audience=broker.settings.audience
        )
        caller = Caller(kind="agent", name=str(claims["sub"]), session_id=str(claims["sid"]))
        # After the signature check, so nobody can spend another session's requests.
        limiter: RateLimiter = request.app.state.rate_limiter
        limiter.check(broker.policies.current.rate_limits, session_id=caller.session_id or "", agent=caller.name)
        binding, presented = claims.get("wl"), request.headers.get(WORKLOAD_HEADER)
        if binding is not None or presented is not None:
            await _agent_workload(broker, caller, binding, presented)
        # Stall (broker/sessions/liveness.py): a request with the session token is a sign of life,
        # written at most once per granularity per session on this replica.
        idle = claims.get(liveness.CLAIM)
        if liveness.touch_due(broker, caller.session_id or "", idle):
            await run_in_threadpool(liveness.touch, broker, caller.session_id or "", int(idle))  # type: ignore[call-overload]
        return caller
    keys: ApiKeys = request.app.state.api_keys
    return keys.lookup(token)


async def _workload(broker: Broker, token: str, *, role: str) -> WorkloadIdentity:
    # A thread: an unknown kid (rotation) re-reads the issuer's keys over the network.
    identity = await run_in_threadpool(verify_workload, broker, token, role=role)
    machine_caller.set(identity.audit())  # here, not in the thread: the route runs in this context
    return identity


async def _agent_workload(broker: Broker, caller: Caller, binding: object, presented: str | None) -> None:
    identity = await run_in_threadpool(check_session_workload, broker, session_id=caller.session_id or "",
                                       agent=caller.name, binding=binding, presented=presented)
    if identity is not None:
        machine_caller.set(identity.audit())


AnyCaller = Annotated[Caller, Depends(get_caller)]


def _require(*kinds: str) -> Callable[..., Coroutine[Any, Any, Caller]]:
    # One dependency that authenticates and checks, not a check over `AnyCaller`: each level of
    # dependencies costs FastAPI work on every request, and these guard the busiest routes.
    async def check(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
        return require_kind(await get_caller(request, authorization), kinds)

    return check


def require_kind(caller: Caller, kinds: tuple[str, ...]) -> Caller:
    if caller.kind not in kinds:
        raise Forbidden(f"this endpoint is for {', '.join(kinds)} callers, not {caller.kind}")
    return caller


AgentCaller = Annotated[Caller, Depends(_require("agent"))]
OrchestratorCaller = Annotated[Caller, Depends(_require("orchestrator", "admin"))]
HumanCaller = Annotated[Caller, Depends(_require("human", "admin"))]
AdminCaller = Annotated[Caller, Depends(_require("admin"))]
