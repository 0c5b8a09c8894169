"""The Provider protocol: what every backend that mints and revokes credentials implements.

A provider receives a `Grant` the policy has already allowed and clamped, and returns a
`Minted`: the credential for the caller (shown once), a non-secret `handle` stored on the
lease, and, only where revocation needs it, the secret itself (the lease service seals it
with AES-256-GCM before it touches the database). Providers translate their SDK's errors into
`broker.errors.ProviderError` subclasses at this boundary; nothing else leaks out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    from broker.config import Settings
    from broker.identity.keys import KeyRing


def fingerprint(secret: str) -> str:
    """The only form in which a credential may appear in audit records and logs."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class Grant:
    """An allowed, clamped request, ready to be minted."""

    capability_id: str
    session_id: str
    task_id: str
    human: str
    agent: str
    resource: str  # full URI, e.g. "github://acme/widgets"
    access: str  # access name as declared on the resource, e.g. "write"
    tier: str
    ttl_seconds: int  # already clamped by the policy's time layer
    options: dict[str, Any] = field(default_factory=dict)  # the access entry's provider fields
    # RFC 9449: the thumbprint of the key the client proved it holds (DPoP); a provider that can
    # bind its credential to it does (native: `cnf.jkt`), others ignore it.
    confirmation_jkt: str | None = None

    @property
    def resource_path(self) -> str:
        """The part after "scheme://"."""
        return self.resource.split("://", 1)[1]


@dataclass(frozen=True)
class Minted:
    credential: dict[str, Any]  # returned to the caller once, at mint
    handle: dict[str, Any]  # non-secret: accessor, lease_id, access key id, session name...
    expires_at: datetime  # the backend's own expiry (timezone-aware, UTC)
    fingerprint: str  # fingerprint() of the primary secret, for the audit
    revocation_secret: str | None = None  # only where revoking needs the secret itself


@dataclass(frozen=True)
class RevokeTarget:
    """What a provider gets to revoke one lease."""

    capability_id: str
    session_id: str
    resource: str
    access: str
    handle: dict[str, Any]
    expires_at: datetime  # backend expiry if known, else the lease's
    revocation_secret: str | None = None  # unsealed by the lease service


@dataclass(frozen=True)
class ProviderHealth:
    ok: bool
    detail: str = ""


@dataclass(frozen=True)
class TtlBounds:
    """What the backend can issue, for the policy's time layer."""

    min_seconds: int = 1
    max_seconds: int = 86400


@runtime_checkable
class Provider(Protocol):
    """Optional class attribute `mints_locally = True`: minting calls nothing outside the
    broker (native), so the lease service may mint inside the decision's transaction."""

    name: ClassVar[str]

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds: ...

    def mint(self, grant: Grant) -> Minted: ...

    def revoke(self, target: RevokeTarget) -> None:
        """Revoke for real, or raise. Revoking something already gone is success."""
        ...

    def health(self) -> ProviderHealth: ...


@dataclass
class ProviderContext:
    """What the factory hands every provider when it is built."""

    settings: Settings
    keyring: KeyRing | None = None


class ProviderFactory(Protocol):
    """Entry point target: a class with `from_context(ctx) -> Provider`."""

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> Provider: ...
