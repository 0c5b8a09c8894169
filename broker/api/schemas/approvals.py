"""Approval, grant and break-glass review bodies: what an approver is shown and what they send."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StringConstraints

from broker.api.schemas.common import AccessName, Strict
from broker.times import Timestamp


class ApprovalVote(BaseModel):
    approver: str
    decision: Literal["approve", "deny"]
    reason: str | None = None
    decided_at: Timestamp


class HeldCapability(BaseModel):
    capability_id: str
    resource: str
    access: str
    tier: str
    expires_at: Timestamp


class ApprovalDisplayVote(BaseModel):
    approver: str
    decision: Literal["approve", "deny"]
    reason: str | None = None


class ApprovalDisplay(BaseModel):
    """The approval as a person must read it. Agent-controlled text with every invisible,
    direction-changing or look-alike character shown as `⟦U+XXXX⟧` (the stored fields beside it
    stay exact: they are what the request hash binds)."""

    sentence: str = Field(description="what approving lets the agent do, for how long, how many times")
    binding_code: str = Field(description="the first 8 hex digits of request_hash: the agent's screen shows the same")
    request_hash: str = Field(description="send it back with approve/deny to decide exactly what was shown")
    parameters_canonical: str | None = Field(
        description="the parameters' canonical JSON (sorted keys, no spaces): the exact text the request hash covers")
    purpose: str | None
    tool: str | None
    resource: str | None
    access: str | None
    task_id: str | None
    agent: str | None
    human: str | None
    repository: str | None
    binding_message: str | None
    justification: str | None = None
    labels: dict[str, str]
    approvals: list[ApprovalDisplayVote]
    hidden_characters: list[str] = Field(description="each marked code point found (`U+202E`, ...); empty: none")
    warning: str | None = Field(description="one line for the person when hidden_characters is not empty")


class ApprovalView(BaseModel):
    approval_id: str
    status: Literal["pending", "approved", "denied", "expired", "used"]
    session_id: str
    human: str | None
    agent: str | None
    task_id: str | None
    repository: str | None = Field(default=None, description="the session's repository, as the orchestrator named it")
    labels: dict[str, str] = Field(default_factory=dict, description="the session's labels (task links, issue numbers)")
    resource: str
    access: str
    tier: str
    ttl_seconds: int
    purpose: str
    tool: str | None
    parameters: dict[str, Any] | None
    reason: str = Field(description="approval-required or escalation-requires-approval")
    approvers: list[str]
    min_approvals: int
    approvals: list[ApprovalVote]
    binding_message: str | None
    justification: str | None = Field(default=None, description="break-glass: the agent's written reason")
    request_hash: str
    created_at: Timestamp
    expires_at: Timestamp
    decided_by: str | None
    decided_at: Timestamp | None
    decision_reason: str | None
    capability_id: str | None = Field(description="the capability minted with it, once used")
    used_at: Timestamp | None
    you_may_approve: bool | None = Field(default=None, description="humans only: whether you may approve it now")
    why_not: str | None = None
    you_may_deny: bool | None = Field(default=None, description="humans only: whether you may deny it now")
    why_not_deny: str | None = None
    held: list[HeldCapability] = Field(default_factory=list,
                                       description="the session's live capabilities: what an approval would add to")
    policy_decision: dict[str, Any] | None = Field(
        default=None, description="the decision that asked for approval: reason, matched_rule (and matched_line while "
                                  "that policy is in force), policy_version")
    display: ApprovalDisplay = Field(description="what a person deciding is shown; every human surface renders this")


class ApprovalDecide(Strict):
    reason: Annotated[str, StringConstraints(min_length=1, max_length=1000)] | None = None
    request_hash: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")] | None = Field(
        default=None, description="the request_hash the person was shown; a different one is 409 "
                                  "approval-binding-mismatch and nothing is recorded (the console and the CLI send it)")


class GrantCreate(Strict):
    session_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    resource: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    access: AccessName
    ttl_seconds: int = Field(ge=1, le=86400, description="how long the pre-approval stands; nothing minted under it outlives it")
    uses: int = Field(default=1, ge=1, le=100, description="capabilities it may mint")
    reason: Annotated[str, StringConstraints(min_length=1, max_length=1000)] | None = None


class GrantView(BaseModel):
    grant_id: str
    session_id: str
    resource: str
    access: str
    tier: str
    granted_by: str
    uses: int
    uses_left: int
    status: str
    reason: str | None
    created_at: Timestamp
    expires_at: Timestamp


class ReviewView(BaseModel):
    """The post-review of one break-glass use (docs/approvals.md#break-glass)."""

    review_id: str
    status: Literal["open", "closed"]
    overdue: bool = Field(description="open past due_at")
    session_id: str
    approval_id: str
    capability_id: str
    human: str
    agent: str
    resource: str
    access: str
    justification: str
    approved_by: list[str]
    reviewers: list[str]
    used_at: Timestamp
    due_at: Timestamp
    verdict: Literal["appropriate", "inappropriate"] | None
    note: str | None
    closed_by: str | None
    closed_at: Timestamp | None


class ReviewClose(Strict):
    verdict: Literal["appropriate", "inappropriate"]
    note: Annotated[str, StringConstraints(min_length=1, max_length=4000)] | None = None
