"""The broker's own capability tokens: Ed25519-signed JWTs for resource servers that trust it.

A resource server checks them offline against `/.well-known/jwks.json`, or asks
`POST /v1/introspect`, which answers `active: false` as soon as the lease is revoked.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import ClassVar

from broker.errors import Denied, ProviderMisconfigured
from broker.grammar import ResourceGrammar
from broker.identity.keys import KeyRing
from broker.providers.base import (
    Grant,
    Minted,
    Provider,
    ProviderContext,
    ProviderHealth,
    Revoked,
    RevokeTarget,
    fingerprint,
)
from broker.times import rfc3339


class NativeProvider(Provider):
    name: ClassVar[str] = "native"
    # Signing is local: the lease service reserves, mints and activates in one transaction.
    mints_locally: ClassVar[bool] = True
    grammar: ClassVar[ResourceGrammar] = ResourceGrammar("jwt")  # any non-empty run of segments, as written

    def __init__(self, keyring: KeyRing, issuer: str, broker_audience: str) -> None:
        self._keyring = keyring
        self._issuer = issuer
        self._broker_audience = broker_audience

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> NativeProvider:
        if ctx.keyring is None:
            raise ProviderMisconfigured("the native provider needs the broker's signing keys")
        return cls(ctx.keyring, ctx.settings.issuer, ctx.settings.audience)

    def audience_for(self, grant: Grant) -> str:
        audience = str(grant.options.get("audience") or grant.resource_path)
        if audience == self._broker_audience:
            # A capability token with the broker's own audience could pose as a session token.
            raise ProviderMisconfigured("a native resource may not use the broker's own audience")
        return audience

    def mint(self, grant: Grant) -> Minted:
        now = datetime.now(UTC).replace(microsecond=0)
        expires = now + timedelta(seconds=grant.ttl_seconds)
        audience = self.audience_for(grant)
        scope = str(grant.options.get("scope") or grant.access)
        if grant.options.get("dpop") == "required" and grant.confirmation_jkt is None:
            # Fail closed: a resource that demands proof of possession never gets a bare bearer token.
            raise Denied("this resource requires a DPoP-bound token: exchange at /v1/oauth/token with a DPoP proof",
                         code="dpop-required")
        claims = {
            "iss": self._issuer,
            "sub": grant.human,
            "act": {"sub": grant.agent},  # RFC 8693: the agent acts for the human
            "sid": grant.session_id,
            "scope": scope,
            "aud": audience,
            "jti": grant.capability_id,
            "iat": int(now.timestamp()),
            "nbf": int(now.timestamp()),
            "exp": int(expires.timestamp()),
            "token_use": "capability",
        }
        if grant.confirmation_jkt is not None:
            claims["cnf"] = {"jkt": grant.confirmation_jkt}  # RFC 9449 section 6.1
        token = self._keyring.sign(claims, typ="at+jwt")
        return Minted(
            credential={"type": "jwt", "token": token, "token_type": "DPoP" if grant.confirmation_jkt else "Bearer",
                        "audience": audience},
            handle={"jti": grant.capability_id, "kid": self._keyring.active.kid},
            expires_at=expires,
            fingerprint=fingerprint(token),
        )

    def revoke(self, target: RevokeTarget) -> Revoked:
        # Nothing outside the broker to tell: the lease status is the revocation, and
        # introspection reads it. But the token is a signed JWT: a resource server that checks
        # it offline against the JWKS cannot learn of the revocation and accepts it until `exp`.
        # The broker cannot know which kind of resource server holds it, so it does not claim
        # more than it can: the receipt says `expires_naturally` at `exp`.
        return Revoked(
            detail="marked revoked: introspection answers active=false from now on; a resource server that "
                   f"verifies the token offline against the JWKS accepts it until its exp, {rfc3339(target.expires_at)}",
            valid_until=target.expires_at,
        )

    def health(self) -> ProviderHealth:
        return ProviderHealth(True, f"signing with {self._keyring.active.kid}")
