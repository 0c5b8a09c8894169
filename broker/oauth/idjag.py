"""Enterprise-managed authorization: the RFC 7523 jwt-bearer grant with an Identity Assertion JWT
Authorization Grant (ID-JAG, draft-ietf-oauth-identity-assertion-authz-grant).

The enterprise IdP, where the person signed in to their MCP client, issues the client an ID-JAG
for this broker; the client, authenticated as a confidential client, trades it here for an
access token to one MCP server. The assertion must be:

- a JWT with header `typ: oauth-id-jag+jwt`, signed (asymmetric algorithms only) by a key of an
  IdP in `BROKER_IDJAG_ISSUERS` (its JWKS);
- for this broker (`aud` = the broker's issuer), for the client that presents it (`client_id`
  = the authenticated client), unexpired, and never seen before (`jti`, kept until `exp`);
- about a person the policy knows (`BROKER_IDJAG_PRINCIPAL_CLAIM`, default `email`).

`resource` and `scope` come from the assertion; the token request may narrow the scope and
repeat the resource, never widen or change them. The result is still the intersection: a
session for that person and the client's agent, one capability through `request_capability`.
No refresh token: the IdP decides how long the person's access lasts, by issuing ID-JAGs.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

import jwt

from broker.config import Settings
from broker.errors import BrokerError, ConfigError
from broker.identity.callers import Caller
from broker.oauth import tokens
from broker.oauth.clients import OAuthClient
from broker.oauth.dpop import DatabaseReplayCache
from broker.oauth.errors import OAuthError
from broker.oauth.form import one
from broker.oauth.vocabulary import choose_access, client_label, issuer, resource_of
from broker.principals import canonical_human
from broker.runtime import Broker
from broker.sessions import service as sessions

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TYP = "oauth-id-jag+jwt"
ALGORITHMS = ["RS256", "PS256", "ES256", "EdDSA"]  # asymmetric only: an IdP's secret is never shared with us
MAX_ASSERTION = 16 * 1024


def trusted_issuers(settings: Settings) -> dict[str, str]:
    """BROKER_IDJAG_ISSUERS: issuer -> JWKS URL."""
    if not settings.idjag_issuers.strip():
        return {}
    try:
        raw = json.loads(settings.idjag_issuers)
    except ValueError:
        raise ConfigError("BROKER_IDJAG_ISSUERS must be a JSON object {issuer: jwks_uri}") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.startswith(("https://",
                                                                                                         "http://"))
                                            for k, v in raw.items()):
        raise ConfigError("BROKER_IDJAG_ISSUERS must be a JSON object {issuer: jwks_uri}")
    return raw


class IdJagVerifier:
    """One per broker process: the trusted IdPs and their (cached) keys."""

    def __init__(self, settings: Settings) -> None:
        self.issuers = trusted_issuers(settings)
        self.timeout = settings.oidc_timeout_seconds
        self._clients: dict[str, jwt.PyJWKClient] = {}
        self._lock = threading.Lock()

    def _keys(self, issuer: str) -> jwt.PyJWKClient:
        with self._lock:
            client = self._clients.get(issuer)
            if client is None:
                client = jwt.PyJWKClient(self.issuers[issuer], cache_keys=True, lifespan=300,
                                         timeout=int(max(1, self.timeout)))
                self._clients[issuer] = client
            return client

    def verify(self, assertion: str, *, audience: str, client_id: str) -> dict[str, Any]:
        refuse = OAuthError  # every failure is invalid_grant (RFC 7523 section 3.1)
        if len(assertion) > MAX_ASSERTION or assertion.count(".") != 2:
            raise refuse("invalid_grant", "the assertion is not one compact JWT", code="invalid-assertion")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise refuse("invalid_grant", "the assertion cannot be read", code="invalid-assertion") from None
        if header.get("typ") != TYP:
            raise refuse("invalid_grant", f"the assertion's typ must be {TYP}", code="invalid-assertion-type")
        issuer = unverified.get("iss")
        if not isinstance(issuer, str) or issuer not in self.issuers:
            raise refuse("invalid_grant", "the assertion's issuer is not a trusted IdP", code="untrusted-issuer")
        try:
            key = self._keys(issuer).get_signing_key_from_jwt(assertion)
            claims: dict[str, Any] = jwt.decode(
                assertion, key.key,
                algorithms=ALGORITHMS,  # never "none", never HMAC
                audience=audience,  # this broker, and only it
                issuer=issuer,
                options={"require": ["iss", "sub", "aud", "exp", "iat", "jti", "client_id"], "verify_signature": True,
                         "verify_exp": True, "verify_aud": True, "verify_iss": True},
                leeway=30,
            )
        except jwt.InvalidAudienceError:
            raise refuse("invalid_grant", "the assertion is for another authorization server",
                         code="assertion-audience") from None
        except jwt.PyJWKClientError:
            raise refuse("invalid_grant", "the IdP's signing key cannot be found", code="invalid-assertion") from None
        except jwt.PyJWTError as exc:
            raise refuse("invalid_grant", f"the assertion is not valid: {exc.__class__.__name__}",
                         code="invalid-assertion") from None
        if claims.get("client_id") != client_id:
            raise refuse("invalid_grant", "the assertion was issued to another client", code="assertion-client")
        return claims


def exchange(broker: Broker, verifier: IdJagVerifier, client: OAuthClient, params: dict[str, list[str]]) -> dict[str, Any]:
    if not client.confidential:
        raise OAuthError("unauthorized_client", "the jwt-bearer grant is for confidential clients",
                         code="confidential-client-required")
    if not verifier.issuers:
        raise OAuthError("unsupported_grant_type", "this broker trusts no IdP for ID-JAGs",
                         code="unsupported-grant-type")
    assertion = one(params, "assertion", required=True)
    claims = verifier.verify(assertion, audience=issuer(broker), client_id=client.client_id)
    # Resource and scope: the assertion's; the request may repeat the resource and narrow the scope.
    granted_resource = claims.get("resource")
    asked_resources = [r for r in params.get("resource", []) if r]
    if isinstance(granted_resource, list) and len(granted_resource) == 1:
        granted_resource = granted_resource[0]
    if granted_resource is None and len(asked_resources) == 1:
        granted_resource = asked_resources[0]
    if not isinstance(granted_resource, str) or (asked_resources and asked_resources != [granted_resource]):
        raise OAuthError("invalid_target", "the resource must be the one the assertion names",
                         code="resource-mismatch")
    resource = resource_of(granted_resource)
    granted_scope = claims.get("scope")
    scope = one(params, "scope") or (granted_scope if isinstance(granted_scope, str) else None)
    if isinstance(granted_scope, str) and scope is not None and not set(scope.split()) <= set(granted_scope.split()):
        raise OAuthError("invalid_scope", "the scope asked for is wider than the assertion's", code="scope-widening")
    access, scope_granted = choose_access(broker.policies.current, resource, scope)
    principal = claims.get(broker.settings.idjag_principal_claim)
    if not isinstance(principal, str) or not principal:
        raise OAuthError("invalid_grant", f"the assertion has no {broker.settings.idjag_principal_claim} claim",
                         code="assertion-principal")
    try:
        human = canonical_human(principal)
    except BrokerError as exc:
        raise OAuthError("invalid_grant", f"the assertion's person: {exc.message}", code=exc.code) from None
    # Single use, checked last so that nobody spends replay-cache rows with a forged assertion.
    expires = datetime.fromtimestamp(int(claims["exp"]), UTC)
    if not DatabaseReplayCache(broker.engine).first_use(f"id-jag\x00{claims['iss']}\x00{claims['jti']}", expires):
        raise OAuthError("invalid_grant", "the assertion was already used", code="assertion-replayed")
    session, _ = sessions.create(broker, Caller(kind="orchestrator", name="oauth-id-jag"), sessions.SessionAsk(
        human=human, agent=client.agent, task_id=f"id-jag:{str(claims['jti'])[:100]}",
        scope=[{"resource": resource, "access": [access]}],
        ttl_seconds=min(broker.settings.mcp_session_ttl_seconds, broker.settings.session_max_ttl_seconds),
        labels={"oauth_client": client_label(client.client_id), "idp": str(claims["iss"])[:200]}))
    minted = tokens.mint_for_session(broker, session.id, resource, access, client.client_id)
    return tokens.answer(minted, scope_granted, None)
