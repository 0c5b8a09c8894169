"""The audit record's shape, one typed builder for every event type.

Every record carries the same fields, whatever its type: `type`, `outcome`, `actor` (who
caused it: `agent:<name>`, `orchestrator:<name>`, `admin:admin`, `broker:sweeper`, ...),
`human_principal`, `agent {id, session_id, task_id}`, `request {tool, operation, resource,
access, tier, parameters, purpose, reason}`, `policy_decision {result, reason, matched_rule,
policy_version, human_permission, shadow, approval, grant, rule_name, layer}` or null, `jit_grant {status,
ttl_seconds, capability_id, provider, expires_at, credential_fingerprint, approval_id, attempts,
grant_id, uses}` or null, and `detail` (an object,
possibly empty) for what only that type has. A field that does not apply is null, never
missing: in an append-only chain a missing key cannot be added later. A record a machine caused
(a workload token under a trust rule) carries `detail.workload {issuer, subject, trust_rule,
matched_rule, role}`.

No secret value enters a record: credentials appear only as SHA-256 fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.models import AnySession, Lease, NewLease
    from broker.policy import Decision


# The machine (workload identity) behind the request being served: issuer, subject and the
# trust rule that let it in. Set per request by the API's caller dependency, None otherwise;
# every record built while it is set carries it as `detail.workload`, so no code path that
# writes a record can forget who caused it.
machine_caller: ContextVar[Mapping[str, str] | None] = ContextVar("machine_caller", default=None)


@dataclass(frozen=True)
class AgentRef:
    id: str | None = None
    session_id: str | None = None
    task_id: str | None = None

    @classmethod
    def of(cls, session: AnySession | None, *, session_id: str | None = None, task_id: str | None = None) -> AgentRef:
        """The agent of `session`; `session_id`/`task_id` where the session row is gone or unknown."""
        if session is None:
            return cls(None, session_id, task_id)
        return cls(session.agent, session.id, session.task_id)


@dataclass(frozen=True)
class RequestRef:
    operation: str  # what was asked: request, revoke, session.created, kill-switch, webhook, policy.load
    tool: str | None = None
    resource: str | None = None
    access: str | None = None
    tier: str | None = None
    parameters: dict[str, Any] | None = None
    purpose: str | None = None
    reason: str | None = None  # why (revocations, teardowns): not the decision's reason


@dataclass(frozen=True)
class DecisionRef:
    result: str | None
    reason: str | None
    matched_rule: str | None
    policy_version: str | None
    human_permission: dict[str, Any] | None = None  # the live layer: its source, answer, cached or not
    shadow: dict[str, Any] | None = None
    approval: dict[str, Any] | None = None  # the approval redeemed: approval_id, approved_by, request_hash
    grant: dict[str, Any] | None = None  # the pre-approval (broker-cli grant) used: grant_id, granted_by
    rule_name: str | None = None  # the tool-call gate's rule, by name
    layer: str | None = None  # which of the intersection's layers said no (or asked); null when allowed

    @classmethod
    def of(cls, decision: Decision, shadow: Decision | None = None, *, approval: dict[str, Any] | None = None,
           grant: dict[str, Any] | None = None) -> DecisionRef:
        return cls(
            decision.result, decision.reason, decision.matched_rule, decision.policy_version,
            decision.live.to_dict() if decision.live is not None else None,
            None if shadow is None else {"result": shadow.result, "reason": shadow.reason,
                                         "matched_rule": shadow.matched_rule,
                                         "policy_version": shadow.policy_version},
            approval, grant, None,
            decision.deciding_layer() if decision.result != "allow" else None,
        )


@dataclass(frozen=True)
class GrantRef:
    status: str
    ttl_seconds: int | None = None
    capability_id: str | None = None
    provider: str | None = None
    expires_at: str | None = None  # rfc3339
    credential_fingerprint: str | None = None
    approval_id: str | None = None
    attempts: int | None = None  # revocation attempts so far
    grant_id: str | None = None  # a pre-approval (broker-cli grant)
    uses: int | None = None  # the pre-approval's uses

    @classmethod
    def of(cls, lease: Lease | NewLease, *, expires_at: str | None = None) -> GrantRef:
        return cls(status=lease.status, ttl_seconds=lease.ttl_seconds, capability_id=lease.id,
                   provider=lease.provider, expires_at=expires_at, credential_fingerprint=lease.fingerprint,
                   attempts=lease.revoke_attempts)


@dataclass(frozen=True)
class AuditEvent:
    """One event before it is chained (event_id, seq, timestamp and hashes are added on append)."""

    type: str
    outcome: str
    actor: str
    request: RequestRef
    human_principal: str | None = None
    agent: AgentRef = field(default_factory=AgentRef)
    policy_decision: DecisionRef | None = None
    jit_grant: GrantRef | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The record's fields in chain order (the appender adds event_id, seq, timestamp)."""
        return {
            "type": self.type,
            "actor": self.actor,
            "human_principal": self.human_principal,
            "agent": _fields(self.agent),
            "request": _fields(self.request),
            "policy_decision": _fields(self.policy_decision) if self.policy_decision is not None else None,
            "jit_grant": _fields(self.jit_grant) if self.jit_grant is not None else None,
            "outcome": self.outcome,
            "detail": self._detail(),
        }

    def _detail(self) -> dict[str, Any]:
        detail = dict(self.detail)
        machine = machine_caller.get()
        if machine is not None:
            detail.setdefault("workload", dict(machine))
        return detail


def _fields(part: AgentRef | RequestRef | DecisionRef | GrantRef) -> dict[str, Any]:
    """Shallow, unlike dataclasses.asdict: values (parameters of any depth) are not copied."""
    return {f.name: getattr(part, f.name) for f in fields(part)}
