"""The provider contract: everything a backend that mints and revokes credentials implements.

A provider receives a `Grant` the policy has already allowed and clamped, and returns a
`Minted`: the credential for the caller (shown once), a non-secret `handle` stored on the
lease, and, only where revocation needs it, the secret itself (the lease service seals it
with AES-256-GCM before it touches the database). Providers translate their SDK's errors into
`broker.errors.ProviderError` subclasses at this boundary; nothing else leaks out.

A deployment adds a backend by subclassing `Provider` and declaring an entry point in the
`jit_broker.providers` group; what every plugin is (its build context, its settings, its
resource grammar, its health) is `broker.plugins.Plugin`. A provider is a package
(`broker/providers/<name>/`): its settings model, its resource grammar, its client, its
provider and, where the backend can say what a human may do, its permission source.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

from broker.plugins import Plugin, PluginContext, PluginHealth
from broker.policy.facts import TtlBounds

# One build context and one health for every plugin; the provider contract uses these names.
ProviderContext = PluginContext
ProviderHealth = PluginHealth


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
class Revoked:
    """What a provider's `revoke` achieved, when it says more than "the backend confirmed it dead".

    `revoke` returning None (or `Revoked()` with no `valid_until`) means the backend confirmed
    the credential unusable from now on. `valid_until` says the backend could not make it so
    everywhere: somewhere it is still accepted until then (a native token a resource server
    verifies offline; a credential found already expired, with its past expiry). The receipt
    then says `expires_naturally`, never `revoked`. `detail` is one plain sentence for the
    receipt (no secret in it).
    """

    detail: str = ""
    valid_until: datetime | None = None


class Provider(Plugin):
    """Everything a provider is and may do. A new backend subclasses this and reads nothing else.

    Required: `name`, `from_context`, `mint`, `revoke`. `grammar` (the resource scheme it
    defines), `health`, `policy_check` and `close` come from `Plugin`. Everything below has a default
    that is right for a backend without the feature; override only what the backend has.
    The rest of the broker calls these methods and attributes directly, never probing.
    """

    #: Minting calls nothing outside the broker (native signing): the lease service may then
    #: reserve, mint and activate in one transaction, and revocation needs no backend call.
    mints_locally: ClassVar[bool] = False

    #: `find_by_capability` can search the backend. Leave False where it cannot (GitHub): a
    #: lease whose handle was lost then ends at the backend's own upper bound (`ttl_bounds`).
    searchable: ClassVar[bool] = False

    @abstractmethod
    def mint(self, grant: Grant) -> Minted:
        """Create the credential at the backend, or raise a ProviderError."""

    @abstractmethod
    def revoke(self, target: RevokeTarget) -> Revoked | None:
        """Revoke for real, or raise. Revoking something already gone is success.

        Returns None or a `Revoked` when the backend confirmed; a `Revoked` with `valid_until`
        where the credential stays usable somewhere until then (the revocation receipt says
        so). Where `mints_locally`, it is called inside the transaction that finishes the
        lease: no I/O, and it must not raise."""

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        """What the backend can issue for this resource (the policy's time layer clamps to it)."""
        return TtlBounds()

    def find_by_capability(self, capability_id: str, resource: str) -> dict[str, Any] | None:
        """The handle of what was minted for `capability_id` (on `resource`), or None if the
        backend has nothing. Called only when `searchable` (crash recovery: a lease whose
        mint was interrupted has no handle)."""
        return None

    def revocation_lock_key(self, resource: str) -> str | None:
        """A key under which revocations on `resource` must run one at a time across replicas
        (read-modify-write of shared backend state, e.g. one deny policy per AWS role); None
        when revocations are independent."""
        return None

    def prune_revocations(self, now: datetime, resources: Iterable[str] = ()) -> int:
        """Drop revocation state that outlived its credentials; the sweeper calls this
        periodically. `resources` are those of leases that ended recently, so state written
        before a restart is found too. Returns how many entries went."""
        return 0

    def leftover_capabilities(self) -> list[str]:
        """Capability ids for which the backend still keeps state made for that one capability,
        besides the credential (Vault: the narrowed policy `jit-<id>`). The sweeper and the
        reconciler `release` those whose lease has ended; the rest are left alone."""
        return []

    def release(self, capability_id: str) -> None:
        """Remove what `leftover_capabilities` reported for an ended capability; gone already is
        success, a failure raises (and is retried on the next pass)."""
        return

    def collect_shared(self, live_handles: Iterable[dict[str, Any]]) -> int:
        """Remove backend state shared between capabilities (Vault: narrowed policies named by
        what they grant) that none of `live_handles` (the handles of this provider's live
        leases) names any more; the sweeper calls this periodically. Returns how many went."""
        return 0

    def policy_reloaded(self) -> None:
        """The broker's policy was (re)loaded: drop what was cached about what its rules grant."""
        return


__all__ = ["Grant", "Minted", "Provider", "ProviderContext", "ProviderHealth", "RevokeTarget", "Revoked", "TtlBounds",
           "fingerprint"]
