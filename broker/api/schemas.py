"""Request and response bodies of the HTTP API. Unknown fields are refused (422), sizes bounded."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from broker import jsonbounds
from broker.ids import APPROVAL_ID_PATTERN, CAPABILITY_ID_PATTERN, SESSION_ID_PATTERN
from broker.leases.outcomes import CapabilityView
from broker.leases.receipts import RevocationReceipt
from broker.models import Lease, SessionRow
from broker.times import Timestamp

_RESOURCE_PATTERN = r"^[a-z][a-z0-9+.-]{0,31}://[!-~]{1,480}$"

Resource = Annotated[str, StringConstraints(pattern=_RESOURCE_PATTERN, max_length=512)]
AccessName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$|^\*$")]
AgentName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
# Length only here: the canonical form (broker.identity.principals) is checked by the service,
# so every principal that does not fit gets one answer, 400 invalid-principal.
Principal = Annotated[str, StringConstraints(min_length=1, max_length=320)]
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=256)]
LabelKey = Annotated[str, StringConstraints(max_length=64)]
LabelValue = Annotated[str, StringConstraints(max_length=256)]
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
ApprovalId = Annotated[str, StringConstraints(pattern=APPROVAL_ID_PATTERN)]
MAX_PARAMETERS_BYTES = jsonbounds.PARAMETERS_MAX_BYTES

__all__ = ["APPROVAL_ID_PATTERN", "CAPABILITY_ID_PATTERN", "SESSION_ID_PATTERN"]


RECEIPTS_DESCRIPTION = ("one per capability the call acted on: what really happened to its credential "
                        "(`revoked`, `revoke_pending`, `expires_naturally`, `already_ended`)")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)


class ScopeItem(Strict):
    resource: Resource = Field(description="resource URI or glob (`*` within a segment, `**` across)",
                               # the document states the '..' rule too (JSON Schema allows look-ahead)
                               json_schema_extra={"pattern": r"^(?!.*\.\.)" + _RESOURCE_PATTERN[1:]})
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


class AuditPage(BaseModel):
    records: list[dict[str, Any]] = Field(description="records in seq order (docs/audit.md), each with "
                                                      "prev_hash and hash")
    next_since: int = Field(description="give as `since` for the next page")


class AuditVerification(BaseModel):
    ok: bool
    checked: int
    first_bad_seq: int | None
    first_bad_event_id: str | None
    problem: str | None
    head_hash: str | None
    chains: int | None = Field(default=None, description="hash chains walked (one per session, a few broker chains)")
    tree_size: int | None = Field(default=None, description="leaves of the Merkle tree the linker built")
    root_hash: str | None = Field(default=None, description="RFC 6962 root of that tree, hex")
    unlinked: int | None = Field(default=None, description="committed records the linker has not folded in yet")
    bad_checkpoint: int | None = Field(default=None, description="tree size of a stored checkpoint the log does not match")


class AuditCosignatureOut(BaseModel):
    witness: str = Field(description="<name>+<hex key id> of the witness")
    timestamp: int = Field(description="when the witness cosigned, POSIX seconds (from the cosignature)")


class AuditWitnessStatus(BaseModel):
    witness: str
    cosigned_size: int = Field(description="largest tree size this witness cosigned for the broker")
    refused_size: int | None = Field(default=None, description="tree size of the checkpoint it last refused")
    refused_reason: str | None = Field(default=None, description="why (kebab-case reason, then the detail)")


class AuditCheckpoint(BaseModel):
    origin: str
    tree_size: int = Field(description="leaves (records) in the tree this checkpoint commits to")
    root_hash: str = Field(description="RFC 6962 Merkle tree hash, hex")
    timestamp: str
    key_name: str = Field(description="the kid of the broker signing key (see /.well-known/jwks.json)")
    note: str = Field(description="the C2SP signed note, with the witnesses' cosignature lines after the broker's "
                                  "signature: save it, and give it to `audit verify --checkpoint`")
    verifier_key: str | None = Field(default=None, description="the signing key as a C2SP vkey "
                                     "(<name>+<hex key id>+<base64 0x01||key>): what a witness is configured with")
    cosignatures: list[AuditCosignatureOut] = Field(default_factory=list,
                                                    description="witness cosignatures (cosignature/v1) in the note")
    witnesses: list[AuditWitnessStatus] = Field(default_factory=list,
                                                description="each configured witness's state: what it cosigned, "
                                                            "what it refused and why")


class AuditConsistency(BaseModel):
    first: int
    second: int
    proof: list[str] = Field(description="RFC 9162 section 2.1.4 consistency proof, hex node hashes")


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Any] = Field(description="database, policy, and each provider: {ok, detail, required}")


class Jwks(BaseModel):
    keys: list[dict[str, str]]
class PreToolUseInput(BaseModel):
    """Claude Code's PreToolUse hook input. Fields Claude Code adds later are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    hook_event_name: Literal["PreToolUse"] | None = Field(default=None, description="PreToolUse; other events are refused")
    tool_name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    tool_input: dict[str, Any] = Field(description="the tool's arguments, as the model wrote them")
    session_id: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        default=None, description="Claude Code's own session id (recorded; the broker session comes from the token)")
    tool_use_id: Annotated[str, StringConstraints(max_length=256)] | None = None
    cwd: Annotated[str, StringConstraints(max_length=4096)] | None = None
    permission_mode: Annotated[str, StringConstraints(max_length=64)] | None = None
    transcript_path: Annotated[str, StringConstraints(max_length=4096)] | None = None


class HookSpecificOutput(BaseModel):
    hookEventName: Literal["PreToolUse"]
    permissionDecision: Literal["allow", "ask", "deny"]
    permissionDecisionReason: str


class PreToolUseOutput(BaseModel):
    """What a Claude Code PreToolUse hook answers (the same JSON for an http hook and a command hook)."""

    hookSpecificOutput: HookSpecificOutput


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entry for the errors a route may answer with."""
    return {status: {"model": ErrorResponse} for status in statuses}


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
