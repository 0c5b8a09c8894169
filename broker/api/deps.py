"""Who may call what, as annotated types: a route's signature says who its callers are."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from broker.audit.events import machine_caller
from broker.errors import BrokerError, Forbidden, IdentityProviderUnavailable
from broker.identity.callers import ApiKeys, Caller, bearer, session_token_claims
from broker.identity.oidc import unverified_issuer
from broker.identity.ratelimit import RateLimiter
from broker.identity.trust_audit import record_refusal
from broker.identity.workload import (
    WORKLOAD_HEADER,
    WorkloadIdentity,
    WorkloadMismatch,
    WorkloadTokenRequired,
    WorkloadVerifier,
)
from broker.runtime import Broker


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
        return caller
    keys: ApiKeys = request.app.state.api_keys
    return keys.lookup(token)


async def _workload(broker: Broker, token: str, *, role: str, session_id: str | None = None,
                    agent: str | None = None) -> WorkloadIdentity:
    """Verify a workload token under the policy's trust rules; audit a refusal; mark the request."""
    try:
        # A thread: an unknown kid (rotation) re-reads the issuer's keys over the network.
        identity = await run_in_threadpool(broker.workload.verify, token, role=role,
                                           trust=broker.policies.current.trust)
    except BrokerError as exc:
        await _refused(broker, exc, token, role=role, session_id=session_id, agent=agent)
        raise
    machine_caller.set(identity.audit())
    return identity


async def _refused(broker: Broker, exc: BrokerError, token: str | None, *, role: str, session_id: str | None,
                   agent: str | None) -> None:
    if isinstance(exc, IdentityProviderUnavailable):
        return  # an outage, not a refusal: the caller retries (503)
    iss, sub = WorkloadVerifier.unverified(token) if token else (None, None)
    await run_in_threadpool(record_refusal, broker.engine, exc, role=role, issuer=WorkloadVerifier.issuer_of(iss, sub),
                            subject=sub, session_id=session_id, agent=agent)


async def _agent_workload(broker: Broker, caller: Caller, binding: object, presented: str | None) -> None:
    """The agent runtime's own workload token beside its session token: required, and must be the
    bound workload's, when the session was provisioned bound to one (`wl` in the session token)."""
    if presented is None:
        missing = WorkloadTokenRequired(f"this session is bound to a workload: send its token in {WORKLOAD_HEADER}")
        await _refused(broker, missing, None, role="agent", session_id=caller.session_id, agent=caller.name)
        raise missing
    token = presented.strip()
    identity = await _workload(broker, token, role="agent", session_id=caller.session_id, agent=caller.name)
    if isinstance(binding, dict) and (binding.get("iss"), binding.get("sub")) != (identity.issuer, identity.subject):
        machine_caller.set(None)
        exc = WorkloadMismatch("the workload token is not the one this session is bound to")
        await _refused(broker, exc, token, role="agent", session_id=caller.session_id, agent=caller.name)
        raise exc


AnyCaller = Annotated[Caller, Depends(get_caller)]


def _require(*kinds: str) -> Callable[..., Coroutine[Any, Any, Caller]]:
    # One dependency that authenticates and checks, not a check over `AnyCaller`: each level of
    # dependencies costs FastAPI work on every request, and these guard the busiest routes.
    async def check(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
        caller = await get_caller(request, authorization)
        if caller.kind not in kinds:
            raise Forbidden(f"this endpoint is for {', '.join(kinds)} callers, not {caller.kind}")
        return caller

    return check


AgentCaller = Annotated[Caller, Depends(_require("agent"))]
OrchestratorCaller = Annotated[Caller, Depends(_require("orchestrator", "admin"))]
HumanCaller = Annotated[Caller, Depends(_require("human", "admin"))]
AdminCaller = Annotated[Caller, Depends(_require("admin"))]
