"""Session bodies (create, view, heartbeat, resume, end), the capability request and `policy explain`."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from broker import jsonbounds
from broker.api.schemas.common import (
    RECEIPTS_DESCRIPTION,
    RESOURCE_PATTERN,
    AccessName,
    AgentName,
    ApprovalId,
    LabelKey,
    LabelValue,
    Principal,
    Resource,
    SessionId,
    ShortText,
    Strict,
)
from broker.leases.outcomes import CapabilityView
from broker.leases.receipts import RevocationReceipt
from broker.models import Lease, SessionRow
from broker.times import Timestamp


class ScopeItem(Strict):
    resource: Resource = Field(description="resource URI or glob (`*` within a segment, `**` across)",
                               # the document states the '..' rule too (JSON Schema allows look-ahead)
                               json_schema_extra={"pattern": r"^(?!.*\.\.)" + RESOURCE_PATTERN[1:]})
    access: list[AccessName] = Field(min_length=1, max_length=32)

    @field_validator("resource")
    @classmethod
    def _no_dotdot(cls, v: str) -> str:
        if ".." in v:
            raise ValueError("resource may not contain '..'")
        return v


class WorkloadBinding(Strict):
    """The agent runtime a session is bound to: its workload token's issuer (or SPIFFE trust
    domain) and subject (or SPIFFE ID), exactly as verified."""

    issuer: Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=r"^(https?|spiffe)://\S+$")]
    subject: Annotated[str, StringConstraints(min_length=1, max_length=1024, pattern=r"^[\x21-\x7e]+$")]


class SessionCreate(Strict):
    human: Principal
    agent: AgentName
    task_id: ShortText
    repository: Annotated[str, StringConstraints(max_length=256)] | None = None
    scope: list[ScopeItem] = Field(min_length=1, max_length=100)
    ttl_seconds: int = Field(ge=60, le=7 * 86400)
    labels: dict[LabelKey, LabelValue] | None = Field(default=None, max_length=32)
    # Bind the session to the agent runtime's workload: every agent request must then carry that
    # workload's token in X-Workload-Token, beside the session token (docs/workload-identity.md).
    workload: WorkloadBinding | None = None
    # Stall (docs/lifecycle.md): the session ends itself after this long without a request with
    # its token. Absent: the policy's liveness.idle_timeout; never above its max_idle_timeout.
    idle_timeout_seconds: int | None = Field(default=None, ge=5, le=7 * 86400)


class SessionCreated(BaseModel):
    session_id: str
    session_token: str
    expires_at: Timestamp


class SessionView(BaseModel):
    session_id: str
    human: str
    agent: str
    task_id: str
    repository: str | None
    scope: list[dict[str, Any]]
    labels: dict[str, str]
    status: str
    created_at: Timestamp
    expires_at: Timestamp
    ended_at: Timestamp | None
    end_reason: str | None
    idle_timeout_seconds: int | None = Field(default=None, description="stall: none if null")
    idle_until: Timestamp | None = Field(
        default=None, description="stall: silent past this, the session is ended (moves with requests and heartbeats)")
    suspended_at: Timestamp | None = Field(
        default=None, description="deviation: set while the tripwire holds the session (no new capabilities)")
    suspend_reason: str | None = None
    capabilities: list[CapabilityView] = Field(default_factory=list, description="live ones (GET one session only)")

    @classmethod
    def of(cls, session: SessionRow, leases: list[Lease]) -> SessionView:
        return cls(
            session_id=session.id, human=session.human, agent=session.agent, task_id=session.task_id,
            repository=session.repository, scope=session.scope, labels=session.labels, status=session.status,
            created_at=session.created_at, expires_at=session.expires_at, ended_at=session.ended_at,
            end_reason=session.end_reason, idle_timeout_seconds=session.idle_timeout_seconds,
            idle_until=session.idle_until, suspended_at=session.suspended_at, suspend_reason=session.suspend_reason,
            capabilities=[CapabilityView.of(lease) for lease in leases],
        )


class SessionHeartbeat(BaseModel):
    session_id: str
    status: str
    idle_timeout_seconds: int | None = Field(description="null: the session has no idle timeout")
    idle_until: Timestamp | None


class SessionResume(Strict):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)] | None = None


class SessionEnd(Strict):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=128)] = "api_teardown"


class SessionEnded(BaseModel):
    session_id: str
    status: str
    revoked: int = Field(description="capabilities this call finished (receipt `revoked` or `expires_naturally`)")
    revoke_pending: int
    receipts: list[RevocationReceipt] = Field(description=RECEIPTS_DESCRIPTION)


class CapabilityRequest(Strict):
    resource: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    access: AccessName
    ttl_seconds: int | None = Field(default=None, ge=1, le=86400)
    purpose: Annotated[str, StringConstraints(min_length=1, max_length=1000)]
    tool: Annotated[str, StringConstraints(max_length=128)] | None = None
    parameters: dict[str, Any] | None = None
    approval_id: ApprovalId | None = None
    # Break-glass (docs/approvals.md#break-glass): the written reason an access marked break_glass needs.
    justification: Annotated[str, StringConstraints(min_length=20, max_length=2000)] | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        try:
            jsonbounds.check_parameters(v)
        except jsonbounds.JsonBoundsError as exc:
            raise PydanticCustomError(exc.code, "parameters: {problem}", {"problem": str(exc)}) from None
        return v


class ExplainRequest(Strict):
    session_id: SessionId | None = Field(default=None, description="explain against a live session")
    human: Principal | None = None
    agent: AgentName | None = None
    task_id: ShortText | None = None
    scope: list[ScopeItem] | None = Field(default=None, max_length=100)
    resource: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    access: AccessName
    ttl_seconds: int | None = Field(default=None, ge=1, le=86400)
    session_ttl_seconds: int = Field(default=3600, ge=60, le=7 * 86400)


class Explanation(BaseModel):
    """`policy explain`: the enforced decision with every layer's verdict, and the shadow's."""

    decision: dict[str, Any] = Field(description="the evaluator's Decision.to_dict(): result, reason, matched_rule, "
                                                 "matched_line, policy_version, tier, provider, options, ttl_seconds, "
                                                 "approvers, layers (each layer's verdict), human_permission")
    shadow: dict[str, Any] | None
    grant: dict[str, Any] | None = Field(
        default=None, description="for a session: the grant that stands in for the approval the decision would "
                                  "wait for (grant_id, granted_by, uses_left, expires_at), exactly as a real "
                                  "request would use it; the decision is then the one made under it")
