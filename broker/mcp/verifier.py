"""For MCP server authors: check the broker's access tokens in a few lines (docs/mcp.md).

    from broker.mcp.verifier import BrokerTokenVerifier
    verifier = BrokerTokenVerifier(issuer="https://broker.example.com",
                                   resource="https://mcp.example.com/mcp", introspect=True)
    server = MCPServer("files", token_verifier=verifier, auth=AuthSettings(
        issuer_url="https://broker.example.com", resource_server_url="https://mcp.example.com/mcp",
        required_scopes=["files:read"], validate_token_resource=True))

The token is an EdDSA JWT signed with a key of the broker's JWKS. It is good for this server
only if its `aud` is exactly this server's resource URL, its `iss` the broker, it has not
expired, and (with `introspect=True`) the broker still says `active` (a session that ended
revoked it). Without introspection a revoked token is accepted until its `exp`: keep the
resource's `max_ttl` short then.

The class satisfies the MCP Python SDK's `TokenVerifier` protocol; `check` is the plain,
synchronous part any other server (or language, by the same rules) can copy.
"""

from __future__ import annotations

from typing import Any

import httpx
import jwt
from starlette.concurrency import run_in_threadpool


class BrokerTokenVerifier:
    def __init__(self, *, issuer: str, resource: str, jwks_url: str | None = None, introspect: bool = True,
                 introspection_url: str | None = None, timeout: float = 5.0) -> None:
        self.issuer = issuer
        self.resource = resource
        base = issuer.rstrip("/")
        self.jwks = jwt.PyJWKClient(jwks_url or f"{base}/.well-known/jwks.json", cache_keys=True, lifespan=300,
                                    timeout=int(max(1, timeout)))
        self.introspection_url = (introspection_url or f"{base}/v1/introspect") if introspect else None
        self.timeout = timeout

    def check(self, token: str) -> dict[str, Any] | None:
        """The token's claims if it is good for this MCP server now; None otherwise."""
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
            claims: dict[str, Any] = jwt.decode(
                token, key.key,
                algorithms=["EdDSA"],  # the broker signs with Ed25519 only; never trust the header's alg
                audience=self.resource,  # exactly this server: a token for another MCP server is refused
                issuer=self.issuer,
                options={"require": ["iss", "aud", "exp", "iat", "sub", "jti"], "verify_signature": True,
                         "verify_aud": True, "verify_exp": True, "verify_iss": True},
            )
        except (jwt.PyJWTError, httpx.HTTPError):
            return None
        if claims.get("token_use") != "capability":
            return None  # a session token (aud = the broker) is never an MCP token
        if self.introspection_url is not None:
            try:
                answer = httpx.post(self.introspection_url, data={"token": token}, timeout=self.timeout)
                active = answer.status_code == 200 and answer.json().get("active") is True
            except (httpx.HTTPError, ValueError):
                active = False  # fail closed: a broker that cannot answer does not vouch for the token
            if not active:
                return None
        return claims

    async def verify_token(self, token: str) -> Any:
        """The SDK's `TokenVerifier`: an `AccessToken`, or None to answer 401."""
        from mcp.server.auth.provider import AccessToken  # the SDK is the server's dependency, not the broker's

        claims = await run_in_threadpool(self.check, token)
        if claims is None:
            return None
        act = claims.get("act")
        actor: dict[str, Any] = act if isinstance(act, dict) else {}
        return AccessToken(token=token, client_id=str(actor.get("sub") or claims["sub"]),
                           scopes=str(claims.get("scope") or "").split(), expires_at=int(claims["exp"]),
                           resource=self.resource, subject=str(claims["sub"]), claims=claims)
