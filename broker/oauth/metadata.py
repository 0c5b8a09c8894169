"""RFC 8414 authorization server metadata and RFC 9728 protected resource metadata."""

from __future__ import annotations

from typing import Any

from broker.errors import BrokerError, Forbidden
from broker.oauth import dpop
from broker.oauth.exchange import DETAILS_TYPE, GRANT_TYPE, SUBJECT_TOKEN_TYPES
from broker.runtime import Broker

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
AS_METADATA_PATH = "/.well-known/oauth-authorization-server"
RESOURCE_METADATA_PATH = "/.well-known/oauth-protected-resource"


def base_url(broker: Broker) -> str:
    return broker.settings.public_base_url()


def issuer(broker: Broker) -> str:
    # RFC 8414 section 3.3: the document's issuer must be the issuer its tokens carry.
    return broker.settings.issuer.rstrip("/")


def authorization_server(broker: Broker) -> dict[str, Any]:
    base = base_url(broker)
    grants = [GRANT_TYPE, "authorization_code", "refresh_token"]
    if broker.settings.idjag_issuers.strip():
        grants.append(JWT_BEARER)  # enterprise-managed authorization (ID-JAG), where an IdP is trusted
    return {
        "issuer": issuer(broker),
        "token_endpoint": f"{base}/v1/oauth/token",
        "revocation_endpoint": f"{base}/v1/oauth/revoke",
        "introspection_endpoint": f"{base}/v1/introspect",
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "authorization_endpoint": f"{base}/v1/oauth/authorize",
        "grant_types_supported": grants,
        "response_types_supported": ["code"],
        # PKCE is required, and plain is not accepted (MCP authorization; OAuth 2.1).
        "code_challenge_methods_supported": ["S256"],
        "authorization_response_iss_parameter_supported": True,
        "client_id_metadata_document_supported": True,
        # none: public clients (PKCE) and token exchange; the secrets: pre-registered confidential clients.
        "token_endpoint_auth_methods_supported": ["none", "client_secret_basic", "client_secret_post"],
        # Revocation (RFC 8414 section 2; an absent member would mean client_secret_basic): `none`,
        # holding the token is the right to revoke it (an optional Bearer caller aside); a confidential
        # client revoking what was issued to it proves its secret in the form.
        "revocation_endpoint_auth_methods_supported": ["none", "client_secret_post"],
        "introspection_endpoint_auth_methods_supported": ["none"],
        "authorization_details_types_supported": [DETAILS_TYPE],
        "token_exchange_subject_token_types_supported": list(SUBJECT_TOKEN_TYPES),
        "dpop_signing_alg_values_supported": list(dpop.ALGORITHMS),
    }


def protected_resource(broker: Broker) -> dict[str, Any]:
    base = base_url(broker)
    return {
        "resource": base,
        "authorization_servers": [issuer(broker)],
        "jwks_uri": f"{base}/.well-known/jwks.json",
        "bearer_methods_supported": ["header"],
        "resource_signing_alg_values_supported": ["EdDSA"],
        "dpop_signing_alg_values_supported": list(dpop.ALGORITHMS),
    }


def www_authenticate(broker: Broker, *, error: str | None = None, description: str | None = None,
                     scope: str | None = None) -> str:
    """RFC 6750 section 3 with RFC 9728 section 5.1's resource_metadata."""
    parts = ['realm="jit-broker"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append('error_description="' + description.replace('"', "'").replace("\\", "/")[:200] + '"')
    if scope:
        parts.append(f'scope="{scope}"')
    parts.append(f'resource_metadata="{base_url(broker)}{RESOURCE_METADATA_PATH}"')
    return "Bearer " + ", ".join(parts)


def challenge(broker: Broker | None, exc: BrokerError) -> dict[str, str]:
    """The WWW-Authenticate header of a refusal: every 401, and a 403 where the token lacks the privilege."""
    if exc.status == 401:
        if broker is None:
            return {"WWW-Authenticate": "Bearer"}
        error = None if exc.code == "missing-credentials" else "invalid_token"  # RFC 6750 section 3.1
        return {"WWW-Authenticate": www_authenticate(broker, error=error)}
    if exc.status == 403 and isinstance(exc, Forbidden) and broker is not None:
        return {"WWW-Authenticate": www_authenticate(broker, error="insufficient_scope")}
    return {}
