"""Revocation receipts: per capability, what a revocation really achieved.

Every revocation answer (session end, DELETE, the kill switch, the webhook) carries one
receipt per capability, and the audit record of that revocation carries the same receipt
(`detail.receipt`). The outcome says what is true of the credential, not of the lease row:

- `revoked`: the backend confirmed it unusable (`revoked_at`): OpenBao/Vault revoked the
  accessor or lease, GitHub answered 204 to `DELETE /installation/token`, IAM accepted the deny
  that matches the STS session. Also where the backend no longer knew it (already gone).
- `revoke_pending`: not confirmed; the broker keeps trying (`next_attempt_at`, `error`).
  `expires_at` is the backend's own TTL: the latest the credential lives if every retry fails.
- `expires_naturally`: the backend cannot make it unusable everywhere; it dies at `expires_at`.
  Native tokens: the broker marks them revoked and introspection answers inactive, but a
  resource server that checks them offline against the JWKS accepts them until `exp`, and the
  broker cannot know which kind holds the token. Also credentials already past their expiry,
  and ones never found at the backend (a mint cut short).
- `already_ended`: the lease had ended before this call (`status`, `ended_at`); nothing done now.

`expires_at` is set exactly when the credential may still be accepted somewhere until then.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from broker.leases.vocabulary import LIVE
from broker.models import Lease
from broker.providers.base import Revoked
from broker.times import Timestamp, rfc3339


class ReceiptOutcome(StrEnum):
    REVOKED = "revoked"
    REVOKE_PENDING = "revoke_pending"
    EXPIRES_NATURALLY = "expires_naturally"
    ALREADY_ENDED = "already_ended"


class RevocationReceipt(BaseModel):
    """What one revocation did to one capability's credential."""

    capability_id: str
    session_id: str
    provider: str
    resource: str
    access: str
    outcome: ReceiptOutcome
    status: str = Field(description="the lease's status after this call")
    revoked_at: Timestamp | None = Field(default=None, description="`revoked`: when the backend confirmed")
    expires_at: Timestamp | None = Field(
        default=None, description="`expires_naturally`: when it dies; `revoke_pending`: the backend's own TTL bound")
    next_attempt_at: Timestamp | None = Field(default=None, description="`revoke_pending`: the next try")
    ended_at: Timestamp | None = Field(default=None, description="when the broker ended the lease")
    error: str | None = Field(default=None, description="`revoke_pending`: why the last try failed (an error code)")
    detail: str = Field(description="one plain sentence saying what happened at the backend")

    def record(self) -> dict[str, Any]:
        """The form the audit record holds: the same JSON the API answers."""
        return self.model_dump(mode="json")


def _base(lease: Lease) -> dict[str, Any]:
    return {"capability_id": lease.id, "session_id": lease.session_id, "provider": lease.provider,
            "resource": lease.resource, "access": lease.access, "status": lease.status, "ended_at": lease.ended_at}


def credential_expiry(lease: Lease) -> datetime:
    """The latest the credential itself can live: the backend's TTL, or the lease's when that is later."""
    return max(lease.backend_expires_at or lease.expires_at, lease.expires_at)


def finished(lease: Lease, result: Revoked | None, now: datetime, *, detail: str | None = None) -> RevocationReceipt:
    """The backend call (or, for native, the local mark) succeeded; `result` says how far that goes."""
    said = detail or (result.detail if result is not None else "") or "the backend confirmed the revocation"
    if result is not None and result.valid_until is not None:
        return RevocationReceipt(**_base(lease), outcome=ReceiptOutcome.EXPIRES_NATURALLY,
                                 expires_at=result.valid_until, detail=said)
    return RevocationReceipt(**_base(lease), outcome=ReceiptOutcome.REVOKED, revoked_at=now, detail=said)


def not_found(lease: Lease, natural_expiry: datetime, searchable: bool) -> RevocationReceipt:
    where = "not found at the backend" if searchable else "the backend cannot be searched and the broker holds no handle"
    return RevocationReceipt(**_base(lease), outcome=ReceiptOutcome.EXPIRES_NATURALLY, expires_at=natural_expiry,
                             detail=f"{where}: nothing to revoke; anything minted dies by {rfc3339(natural_expiry)}")


def pending(lease: Lease, detail: str, *, error: str | None = None) -> RevocationReceipt:
    """Not confirmed: `lease.next_attempt_at` is the next try, the backend's TTL the latest it lives."""
    return RevocationReceipt(**_base(lease), outcome=ReceiptOutcome.REVOKE_PENDING, expires_at=credential_expiry(lease),
                             next_attempt_at=lease.next_attempt_at, error=error, detail=detail)


def untouched(lease: Lease) -> RevocationReceipt:
    """A lease this call did not revoke: ended before, or being revoked by another replica right now."""
    if lease.status in LIVE:
        return RevocationReceipt(**_base(lease), outcome=ReceiptOutcome.REVOKE_PENDING,
                                 expires_at=credential_expiry(lease),
                                 next_attempt_at=lease.claimed_until or lease.next_attempt_at,
                                 detail="another replica is revoking it now; not confirmed yet")
    return RevocationReceipt(**_base(lease), outcome=ReceiptOutcome.ALREADY_ENDED,
                             detail=f"ended before this call ({lease.status}: {lease.status_reason or 'no reason'})")
