"""A session bound to a workload: the agent runtime's own token must come with the session token.

The binding (`wl: {iss, sub}`) rides in the broker-signed session token, so the check needs no
database read: verify the presented workload token under a trust rule of role `agent`, and
compare its issuer and subject with the binding. Every refusal is audited, in the session's chain.
One function for every door an agent uses (the REST API's caller dependency, the RFC 8693 token
exchange), so no door checks less.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.engine import Engine

from broker.errors import BrokerError, IdentityProviderUnavailable
from broker.identity.trust_audit import record_refusal
from broker.identity.workload import (
    WORKLOAD_HEADER,
    WorkloadIdentity,
    WorkloadMismatch,
    WorkloadTokenRequired,
    WorkloadVerifier,
)
from broker.metrics import WORKLOAD_AUTH
from broker.policy.store import PolicyStore


class BindingContext(Protocol):
    """The broker as workload checks see it (the assembled `Broker` is one), so `identity/` sits
    below `runtime` (docs/architecture.md)."""

    @property
    def engine(self) -> Engine: ...
    @property
    def workload(self) -> WorkloadVerifier: ...
    @property
    def policies(self) -> PolicyStore: ...


def verify_workload(broker: BindingContext, token: str, *, role: str, session_id: str | None = None,
                    agent: str | None = None) -> WorkloadIdentity:
    """Verify a workload token under the policy in force; audit a refusal (not an outage)."""
    try:
        identity = broker.workload.verify(token, role=role, trust=broker.policies.current.trust)
    except BrokerError as exc:
        refused(broker, exc, token, role=role, session_id=session_id, agent=agent)
        raise
    WORKLOAD_AUTH.labels(role=role, outcome="accepted", trust_rule=identity.rule).inc()
    return identity


def refused(broker: BindingContext, exc: BrokerError, token: str | None, *, role: str, session_id: str | None,
            agent: str | None) -> None:
    WORKLOAD_AUTH.labels(role=role, outcome=exc.code, trust_rule="").inc()
    if isinstance(exc, IdentityProviderUnavailable):
        return  # an outage, not a refusal: the caller retries (503)
    iss, sub = WorkloadVerifier.unverified(token) if token else (None, None)
    record_refusal(broker.engine, exc, role=role, issuer=WorkloadVerifier.issuer_of(iss, sub), subject=sub,
                   session_id=session_id, agent=agent)


def check_session_workload(broker: BindingContext, *, session_id: str, agent: str, binding: object,
                           presented: str | None) -> WorkloadIdentity | None:
    """The agent runtime behind a session token's request: required and the bound one when the
    session is bound; verified when sent with an unbound session; None when neither."""
    if binding is None and presented is None:
        return None
    if presented is None:
        missing = WorkloadTokenRequired(f"this session is bound to a workload: send its token in {WORKLOAD_HEADER}")
        refused(broker, missing, None, role="agent", session_id=session_id, agent=agent)
        raise missing
    token = presented.strip()
    identity = verify_workload(broker, token, role="agent", session_id=session_id, agent=agent)
    if binding is not None and (not isinstance(binding, dict) or
                                (binding.get("iss"), binding.get("sub")) != (identity.issuer, identity.subject)):
        mismatch = WorkloadMismatch("the workload token is not the one this session is bound to")
        refused(broker, mismatch, token, role="agent", session_id=session_id, agent=agent)
        raise mismatch
    return identity
