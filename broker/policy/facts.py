"""The decision's vocabulary: what the caller tells the evaluator (the session's and the
request's facts, a live source's answer) and what it answers (each layer's verdict, the decision).

Plain frozen dataclasses, shared by `evaluate`, the approval rules and every caller that builds
facts or reads a decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any

ALLOW, DENY, APPROVAL, SKIPPED = "allow", "deny", "approval_required", "skipped"
UNKNOWN = "unknown"  # a live source that could not answer


@dataclass(frozen=True)
class TtlBounds:
    """What a backend can issue, for the time layer. The defaults (one second to one day) are
    the only ones: a provider without its own limits answers `TtlBounds()`."""

    min_seconds: int = 1
    max_seconds: int = 86400


BoundsLookup = Callable[[str, str, dict[str, Any]], TtlBounds]  # (provider, resource, options) -> bounds


@dataclass(frozen=True)
class ScopeEntry:
    resource: str  # may be a glob
    access: tuple[str, ...]  # may contain "*"


@dataclass(frozen=True)
class SessionFacts:
    session_id: str
    human: str
    agent: str
    task_id: str
    scope: tuple[ScopeEntry, ...]
    status: str  # "active"; anything else has ended
    expires_at: datetime  # timezone-aware, UTC
    human_groups: frozenset[str] = frozenset()  # from an IdP; unioned with policy membership
    issued_count: int = 0  # capabilities minted in this session so far, any status
    active_count: int = 0
    active_tiers: frozenset[str] = frozenset()
    suspended: bool = False  # held by the deviation tripwire until a human resumes it
    idle_until: datetime | None = None  # past it, the session has stalled (the sweeper ends it)


@dataclass(frozen=True)
class LivePermission:
    """What a live permission source answered for (human, resource, access), fetched by the caller."""

    source: str
    verdict: str  # allow | deny | unknown (unreachable, or an answer it could not read)
    evidence: Mapping[str, Any]  # what the backend said, for the decision and the audit
    cached: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "verdict": self.verdict, "cached": self.cached, "evidence": dict(self.evidence)}


@dataclass(frozen=True)
class RequestFacts:
    resource: str
    access: str
    ttl_seconds: int | None
    now: datetime
    approved: bool = False  # an approval for this exact request exists
    justified: bool = False  # the request carries a written justification (break-glass)
    live: LivePermission | None = None  # the rule's live source's answer; None: not consulted


@dataclass(frozen=True)
class LayerVerdict:
    layer: str
    verdict: str  # allow | deny | approval_required | skipped
    reason: str | None
    matched_rule: str | None
    detail: str
    evidence: Mapping[str, Any] | None = None  # the live layer: the source, its answer, cached or not

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["evidence"] = dict(self.evidence) if self.evidence is not None else None
        return out


@dataclass(frozen=True)
class Decision:
    result: str  # allow | deny | approval_required
    reason: str  # kebab-case; "allowed" when allowed
    matched_rule: str | None
    matched_line: int | None
    policy_version: str
    tier: str | None
    provider: str | None
    options: dict[str, Any]
    ttl_seconds: int | None  # the granted, clamped ttl; None when denied
    approvers: tuple[str, ...]
    layers: tuple[LayerVerdict, ...] = field(default=())
    live: LivePermission | None = None  # the live source's answer this decision used, if any

    def deciding_layer(self) -> str:
        """Which of the intersection's layers said no (else which asked for approval)."""
        for wanted in (DENY, APPROVAL):
            for layer in self.layers:
                if layer.verdict == wanted:
                    return layer.layer
        return "policy"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the shape of `policy explain` and of a 403's `decision`."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layers", "live")}
        out["options"], out["approvers"] = dict(self.options), list(self.approvers)
        out["layers"] = [layer.to_dict() for layer in self.layers]
        out["human_permission"] = self.live.to_dict() if self.live is not None else None
        return out
