"""The policy file as typed models: what a valid policy says, before it is compiled."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, JsonValue, StringConstraints, field_validator, model_validator

from broker.policy.fields import (
    DEFAULT_ESCALATION_TIERS,
    AccessName,
    AgentName,
    Approver,
    Duration,
    Email,
    GrantedAccess,
    GroupName,
    HookDecision,
    HostPattern,
    ProviderName,
    Regex,
    ResourcePattern,
    RuleName,
    Strict,
    TierName,
)
from broker.policy.trust import TrustRule


class Tier(Strict):
    control: Literal["auto", "approval", "deny"]
    max_ttl: Duration | None = None
    approvers: list[Approver] = Field(default_factory=list)
    # The delegating human may approve their own agent's request only where the tier says so.
    allow_self_approval: bool = False
    # Distinct approvers whose approval a request of this tier needs (four eyes: 2).
    min_approvals: int = Field(default=1, ge=1, le=10)


BREAK_GLASS_MAX_TTL = 900  # a break-glass capability lives at most 15 minutes (docs/approvals.md)


class BreakGlass(Strict):
    """Break-glass for one access (docs/approvals.md#break-glass): the only way to it is a
    written justification, `min_approvals` distinct approvers (or one member of `group`), never
    the delegator; single use, at most `max_ttl`; each use opens a post-review item."""

    approvers: list[Approver] = Field(min_length=1, description="who may approve (group:<name> or a user)")
    min_approvals: int = Field(default=2, ge=2, le=10, description="distinct approvers needed (at least 2)")
    group: GroupName | None = Field(default=None, description="a break-glass group: one approval by a member suffices")
    max_ttl: Duration = Field(default=BREAK_GLASS_MAX_TTL, le=BREAK_GLASS_MAX_TTL,
                              description="the capability's longest life (at most 15m)")
    reviewers: list[Approver] = Field(default_factory=list,
                                      description="who closes the post-review of each use (absent: the approvers)")
    review_within: Duration = Field(default=86400, le=30 * 86400,
                                    description="a review still open this long after the use is overdue")


class Access(Strict):
    """What one access on a resource means: its tier, and the provider fields for minting."""

    tier: TierName
    permissions: dict[str, str] | None = None  # github
    repositories: list[str] | None = None  # github
    session_policy: dict[str, JsonValue] | None = None  # aws
    max_duration: Duration | None = None  # aws
    policies: list[str] | None = None  # vault token policies: the ceiling of a narrowed token
    # vault: what a narrowed token may do on the requested path (default: what `policies` grant there);
    # the words are vault.acl.NARROWABLE, spelled out because policy/ never imports providers/
    capabilities: list[Literal["create", "read", "update", "patch", "delete"]] | None = Field(default=None, min_length=1)
    narrow: bool | None = None  # vault: false = the token carries `policies` whole (default: narrowed)
    scope: str | None = None  # native
    audience: str | None = None  # native; default: the path of the jwt:// resource
    dpop: Literal["required", "optional"] | None = None  # native (RFC 9449); unset = optional
    options: dict[str, JsonValue] | None = None  # free-form, for third-party providers
    break_glass: BreakGlass | None = None  # opt-in: this access only by break-glass (any tier, destructive too)

    @field_validator("options")
    @classmethod
    def _options_do_not_shadow_fields(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # options are merged beside the explicit fields; a clash would make one of them silent.
        clash = sorted(set(value or {}) & (set(cls.model_fields) - {"tier", "options"}))
        if clash:
            raise ValueError(f"options must not repeat the explicit field(s) {', '.join(clash)}")
        return value

    def provider_options(self) -> dict[str, Any]:
        """The provider fields that were set, with `options` merged in."""
        fields = self.model_dump(exclude={"tier", "options", "break_glass"}, exclude_none=True)
        return {**fields, **(self.options or {})}


# A value a live source reports (a GitHub role name, an OpenBao policy name): printable, no spaces.
BackendValue = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,128}$")]
IdentityKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
IdentityValue = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,256}$")]


class HumanPermission(Strict):
    """Which live source must also say the human holds the access, and how its answer maps.

    `require` maps each access of the rule to the backend answers that allow it (GitHub role
    names, OpenBao policy names): the human layer allows only where the file's grants AND the
    source allow. A source never widens what the grants say.
    """

    source: ProviderName
    require: dict[AccessName, list[BackendValue]] = Field(min_length=1)
    # What an unreachable source means: deny (fail closed, the default) or allow (the file's
    # grants alone decide while the source cannot answer).
    on_unavailable: Literal["deny", "allow"] = "deny"
    options: dict[str, JsonValue] | None = None  # source-specific, e.g. github's login_claim


class ResourceRule(Strict):
    match: ResourcePattern
    provider: ProviderName
    access: dict[AccessName, Access] = Field(min_length=1)
    human_permission: HumanPermission | None = None


class Grant(Strict):
    resource: ResourcePattern
    access: list[GrantedAccess] = Field(min_length=1)


class Human(Strict):
    groups: list[GroupName] = Field(default_factory=list)
    grants: list[Grant] = Field(default_factory=list)
    # Who this human is at the live permission sources (see HumanPermission).
    github_login: IdentityValue | None = None
    openbao_entity: IdentityValue | None = None  # the OpenBao identity entity's name
    identities: dict[IdentityKey, IdentityValue] | None = None  # for third-party sources

    @field_validator("identities")
    @classmethod
    def _identities_do_not_shadow_fields(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        clash = sorted(set(value or {}) & {"github_login", "openbao_entity"})
        if clash:
            raise ValueError(f"identities must not repeat the explicit field(s) {', '.join(clash)}")
        return value

    def identity(self) -> dict[str, str]:
        """Every identity written for this human, explicit fields and `identities` merged."""
        named = {"github_login": self.github_login, "openbao_entity": self.openbao_entity}
        return {**{k: v for k, v in named.items() if v is not None}, **(self.identities or {})}


class Group(Strict):
    members: list[Email] = Field(default_factory=list)
    grants: list[Grant] = Field(default_factory=list)


class Agent(Strict):
    max_tier: TierName
    providers: list[ProviderName] | None = None  # absent: any provider


DEFAULT_MAX_PENDING_APPROVALS_PER_SESSION = 10
DEFAULT_MAX_PENDING_APPROVALS_PER_APPROVER = 50


class Budgets(Strict):
    max_issued_per_session: int | None = Field(default=None, ge=0)  # absent: unlimited
    max_active_per_session: int | None = Field(default=None, ge=0)
    # Pending approvals are what people must read: bounded even when the policy says nothing, so
    # no session (or set of sessions) can bury its approvers. 0 lets no approval be opened.
    max_pending_approvals_per_session: int = Field(
        default=DEFAULT_MAX_PENDING_APPROVALS_PER_SESSION, ge=0, le=10_000,
        description="approvals one session may have pending at once (default 10); the next: 429 approval-budget-exceeded")
    max_pending_approvals_per_approver: int = Field(
        default=DEFAULT_MAX_PENDING_APPROVALS_PER_APPROVER, ge=0, le=100_000,
        description="approvals pending at once that name one approver entry (a group, a user), across sessions "
                    "(default 50); the next: 429 approval-budget-exceeded")


class RateLimit(Strict):
    """A token bucket: a burst of `requests`, refilled at `requests` per `per_seconds`."""

    requests: int = Field(ge=1, le=1_000_000)
    per_seconds: float = Field(gt=0, le=86400)


class RateLimits(Strict):
    """Requests made with a session token; absent: unlimited. Enforced per broker replica."""

    per_session: RateLimit | None = None  # each session on its own
    per_agent: RateLimit | None = None  # every session of one agent name together


class Escalation(Strict):
    tiers: list[TierName] = Field(default_factory=lambda: list(DEFAULT_ESCALATION_TIERS))


class Liveness(Strict):
    """Stall: a session whose agent is silent (no request with its session token, no heartbeat)
    longer than its idle timeout is ended, everything revoked (docs/lifecycle.md)."""

    idle_timeout: Duration | None = Field(
        default=None, description="the idle timeout of a session provisioned without one (absent: none)")
    max_idle_timeout: Duration | None = Field(
        default=None, description="the longest idle timeout a session may ask for at provision "
                                  "(absent: idle_timeout, or no bound if that is absent too)")

    @model_validator(mode="after")
    def _default_within_bound(self) -> Liveness:
        if self.idle_timeout is not None and self.max_idle_timeout is not None \
                and self.idle_timeout > self.max_idle_timeout:
            raise ValueError("idle_timeout is longer than max_idle_timeout")
        return self


class Deviation(Strict):
    """The deviation tripwire: `refusals` refusals of scope, tier or escalation within `window`
    suspend the session (no new capability until a human resumes it) or end it."""

    refusals: int = Field(ge=1, le=1000, description="refusals within the window that trip it (the Nth trips)")
    window: Duration = Field(le=7 * 86400, description="the sliding window the refusals are counted in")
    action: Literal["suspend", "end"] = "suspend"


class ToolRule(Strict):
    """One rule of the tool-call gate: which calls it matches, and the tier (or decision) they get.

    Every condition given must hold; none given but `tool` matches every call of that tool.
    """

    name: RuleName | None = None
    tool: Regex = ".*"  # full match on the tool name: "Bash", "Write|Edit", "mcp__github__.*"
    command: Regex | None = None  # searched in the Bash command and in each of its simple commands
    path: Regex | None = None  # searched in tool_input.file_path / path / notebook_path
    url: Regex | None = None  # searched in tool_input.url (WebFetch)
    # Matches when a URL in the call goes to a host outside tools.allowed_hosts, or none can be found.
    hosts: Literal["outside_allowlist"] | None = None
    tier: TierName | None = None  # the tier's control decides: auto -> allow, approval -> ask, deny -> deny
    decision: HookDecision | None = None  # or a decision outright
    reason: str | None = Field(default=None, max_length=500)  # shown to the agent (or the human asked)

    @model_validator(mode="after")
    def _one_outcome(self) -> ToolRule:
        if (self.tier is None) == (self.decision is None):
            raise ValueError("a tool rule names exactly one of tier or decision")
        return self


class Tools(Strict):
    """The tool-call gate (Claude Code PreToolUse hooks): rules in file order, first match wins."""

    default: HookDecision = "ask"  # for a call no rule matches
    # What a call whose tier needs approval is answered while no approval is granted: "ask" lets
    # Claude Code ask its user too; "deny" leaves the broker's approvers as the only way.
    approval_answer: Literal["ask", "deny"] = "ask"
    # A Bash command the gate cannot read plainly (compound, substitutions, wrappers ...:
    # broker/policy/shell.py) is never allowed: what it gets instead of allow (a rule's deny stays).
    unclear_command: Literal["ask", "deny"] = "ask"
    # A Bash command longer than this (UTF-8 bytes) is denied unread (`command-too-large`): the
    # gate's work stays bounded per call, and a real command is far shorter.
    max_command_bytes: int = Field(default=16_384, ge=256, le=1 << 20)
    allowed_hosts: list[HostPattern] = Field(default_factory=list)
    rules: list[ToolRule] = Field(default_factory=list)


class PolicyDocument(Strict):
    """A jit-broker policy file (version 1)."""

    model_config = ConfigDict(title="jit-broker policy")

    version: Literal[1]
    tiers: dict[TierName, Tier]
    resources: list[ResourceRule]
    humans: dict[Email, Human] = Field(default_factory=dict)
    groups: dict[GroupName, Group] = Field(default_factory=dict)
    agents: dict[AgentName, Agent] = Field(default_factory=dict)
    budgets: Budgets | None = None
    rate_limits: RateLimits | None = None
    escalation: Escalation | None = None
    liveness: Liveness | None = None
    deviation: Deviation | None = None
    tools: Tools | None = None
    # Machine callers (workload tokens) and what they act as; first match wins. See policy/trust.py.
    trust: list[TrustRule] = Field(default_factory=list)
