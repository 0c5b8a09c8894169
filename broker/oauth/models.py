"""The OAuth endpoints' answers as models: what leaves the process (errors are RFC 6749's, see errors.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class TokenResponse(BaseModel):
    """RFC 6749 section 5.1; for a token exchange RFC 8693 section 2.2.1, with the granted RFC 9396
    authorization details."""

    access_token: str
    issued_token_type: str | None = Field(default=None, description="token exchange only")
    token_type: str
    expires_in: int
    scope: str | None = None
    refresh_token: str | None = Field(default=None, description="authorization_code and refresh_token grants; "
                                                                "rotated on every use")
    authorization_details: list[dict[str, Any]] | None = Field(default=None, description="token exchange only")
    broker_credential: dict[str, Any] | None = Field(
        default=None, description="the full credential where it is not one bearer string (AWS, Vault secrets) "
                                  "or needs an address (Vault, GitHub)")


class Revoked(BaseModel):
    """RFC 7009 section 2.2: an empty object, whether or not the token was known."""


class AuthorizationServerMetadata(BaseModel):
    """RFC 8414 section 2 (and RFC 8693/9396/9449's registered members)."""

    issuer: str
    token_endpoint: str
    revocation_endpoint: str
    introspection_endpoint: str
    jwks_uri: str
    grant_types_supported: list[str]
    response_types_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    revocation_endpoint_auth_methods_supported: list[str]
    introspection_endpoint_auth_methods_supported: list[str]
    authorization_details_types_supported: list[str]
    token_exchange_subject_token_types_supported: list[str]
    dpop_signing_alg_values_supported: list[str]
    authorization_endpoint: str | None = None
    code_challenge_methods_supported: list[str] | None = None
    authorization_response_iss_parameter_supported: bool | None = None  # RFC 9207
    client_id_metadata_document_supported: bool | None = None  # draft-ietf-oauth-client-id-metadata-document


class ProtectedResourceMetadata(BaseModel):
    """RFC 9728 section 2."""

    resource: str
    authorization_servers: list[str]
    jwks_uri: str
    bearer_methods_supported: list[str]
    resource_signing_alg_values_supported: list[str]
    dpop_signing_alg_values_supported: list[str]
