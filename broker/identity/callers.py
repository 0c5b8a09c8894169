"""Who is calling: an agent (session token), an orchestrator (API key or OIDC client
credentials), a human (OIDC token, see `broker.identity.oidc`, or a local human token in the
embedded default) or the local admin. What each may touch is `identity/access.py`'s to say.

API keys and local human tokens are compared by SHA-256 digest only; the broker never holds
them in clear.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Literal

from broker.errors import Unauthenticated
from broker.identity.keys import KeyRing
from broker.principals import canonical_human

CallerKind = Literal["agent", "orchestrator", "admin", "human"]


@dataclass(frozen=True)
class Caller:
    kind: CallerKind
    name: str  # agent name, orchestrator name, "admin", or the human's principal
    session_id: str | None = None  # agents only
    # Humans only: groups from the IdP's claim, joined with the policy's own membership
    # (`CompiledPolicy.groups_of(name, groups)`). A human's name is their canonical principal
    # (broker.principals).
    groups: frozenset[str] = frozenset()

    @property
    def principal(self) -> str:
        return f"{self.kind}:{self.name}"


def bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("missing Authorization: Bearer credentials", code="missing-credentials")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("Authorization must be 'Bearer <token>'", code="missing-credentials")
    value = value.strip()
    if len(value) > 8192:
        raise Unauthenticated("credentials too long")
    return value


def session_token_claims(
    token: str, *, keyring: KeyRing, issuer: str, audience: str
) -> dict[str, object]:
    claims = keyring.verify_cached(token, audience=audience, issuer=issuer, token_use="session")  # noqa: S106  # the token's kind, not a secret
    if not isinstance(claims.get("sid"), str) or not isinstance(claims.get("sub"), str):
        raise Unauthenticated("session token lacks sid/sub")
    return claims


class ApiKeys:
    """digest -> (kind, name). Constant-time comparison on the digest."""

    def __init__(self, orchestrators: dict[str, str], admin_sha256: str | None,
                 humans: dict[str, str] | None = None) -> None:
        self._keys: dict[str, tuple[CallerKind, str]] = {d: ("orchestrator", n) for d, n in orchestrators.items()}
        for digest, email in (humans or {}).items():
            self._keys[digest] = ("human", canonical_human(email))
        if admin_sha256:
            self._keys[admin_sha256.lower()] = ("admin", "admin")

    def lookup(self, key: str) -> Caller:
        digest = hashlib.sha256(key.encode()).hexdigest()
        found: tuple[CallerKind, str] | None = None
        for known, who in self._keys.items():
            if hmac.compare_digest(known, digest):
                found = who
        if found is None:
            raise Unauthenticated("unknown API key")
        return Caller(kind=found[0], name=found[1])
