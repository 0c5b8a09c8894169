"""What the capability service answers: one model per shape, returned by the service and
sent as is by the routes (their `response_model`), stored as is for idempotent replays."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from broker.leases.receipts import RevocationReceipt
from broker.models import Lease
from broker.times import Timestamp


class CapabilityIssued(BaseModel):
    """201: the capability is active; `credential` is shown here once and never again."""

    capability_id: str
    status: Literal["active"] = "active"
    session_id: str
    resource: str
    access: str
    tier: str
    provider: str
    expires_at: Timestamp
    credential: dict[str, Any] = Field(description="shown once, never again")


class PendingApproval(BaseModel):
    """202: a human must approve; ask again with `approval_id` once approved."""

    status: Literal["pending_approval"] = "pending_approval"
    approval_id: str
    expires_at: Timestamp
    reason: str
    approvers: list[str]
    min_approvals: int = 1
    binding_message: str | None = Field(default=None, description="what the approvers are shown")
    request_hash: str | None = Field(default=None,
                                     description="the binding: session, resource, access, ttl, tool, parameters")


class CapabilityView(BaseModel):
    """A capability read back: everything but its credential."""

    capability_id: str
    session_id: str
    status: str
    resource: str
    access: str
    tier: str
    provider: str
    created_at: Timestamp
    expires_at: Timestamp
    ended_at: Timestamp | None
    status_reason: str | None
    credential_fingerprint: str | None
    revoke_attempts: int

    @classmethod
    def of(cls, lease: Lease) -> CapabilityView:
        return cls(
            capability_id=lease.id, session_id=lease.session_id, status=lease.status, resource=lease.resource,
            access=lease.access, tier=lease.tier, provider=lease.provider, created_at=lease.created_at,
            expires_at=lease.expires_at, ended_at=lease.ended_at, status_reason=lease.status_reason,
            credential_fingerprint=lease.fingerprint, revoke_attempts=lease.revoke_attempts,
        )


class CapabilityRevoked(CapabilityView):
    """DELETE's answer: the capability read back, and what the revocation did to its credential."""

    receipt: RevocationReceipt

    @classmethod
    def after(cls, lease: Lease, receipt: RevocationReceipt) -> CapabilityRevoked:
        return cls(**CapabilityView.of(lease).model_dump(), receipt=receipt)


class Introspection(BaseModel):
    """RFC 7662. An inactive token is `{"active": false}` and nothing more (the route drops nulls)."""

    active: bool
    token_type: str | None = None
    scope: str | None = None
    sub: str | None = None
    act: dict[str, Any] | None = None
    aud: str | None = None
    iss: str | None = None
    exp: int | None = None
    iat: int | None = None
    jti: str | None = None
    sid: str | None = None
    cnf: dict[str, Any] | None = None  # RFC 9449: {"jkt": ...} for a DPoP-bound token


CapabilityOutcome = CapabilityIssued | PendingApproval
