"""The words every module of `leases/` shares: the capability ask, lease statuses, ids."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from broker.audit.chain import canonical_json


class LeaseStatus(StrEnum):
    """minting -> active -> revoked | expired; minting -> failed; active -> revoke_pending -> revoked | expired."""

    MINTING = "minting"
    ACTIVE = "active"
    REVOKE_PENDING = "revoke_pending"
    REVOKED = "revoked"
    EXPIRED = "expired"
    FAILED = "failed"


# Statuses in which a lease may still hold a live credential: counted against budgets and
# escalation, revoked at teardown.
LIVE: tuple[LeaseStatus, ...] = (LeaseStatus.MINTING, LeaseStatus.ACTIVE, LeaseStatus.REVOKE_PENDING)


def new_capability_id() -> str:
    return "cap_" + secrets.token_hex(16)


def _digest(body: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


@dataclass(frozen=True)
class CapabilityAsk:
    """What an agent asks for (`POST /v1/capabilities`), before any decision. What an approval
    is bound to is the approvals' to say (`leases.service.binding`)."""

    resource: str
    access: str
    purpose: str
    ttl_seconds: int | None = None
    tool: str | None = None
    parameters: dict[str, Any] | None = None
    approval_id: str | None = None
    # RFC 9449: the DPoP key thumbprint the token endpoint checked; not part of what is approved.
    confirmation_jkt: str | None = None
    justification: str | None = None  # break-glass: the agent's written reason (broker/breakglass/)

    def idempotency_hash(self, session_id: str) -> str:
        """What an Idempotency-Key is bound to: the whole ask."""
        body = {**asdict(self), "session_id": session_id}
        if body["confirmation_jkt"] is None:
            del body["confirmation_jkt"]  # hashes of requests without DPoP stay as they were
        if body["justification"] is None:
            del body["justification"]  # nor those without a break-glass justification
        return _digest(body)
