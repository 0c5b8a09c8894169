"""Who signed in where: the console's browser sessions and MCP clients' OAuth authorizations
and refresh tokens.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from broker.models.columns import ts


class BrowserSession(SQLModel, table=True):
    """A browser signed in to the console (or on its way to sign in). The cookie holds only a
    random id; this row is keyed by its SHA-256, so a copy of the table opens no browser."""

    __tablename__ = "browser_sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    principal: str | None = Field(default=None, max_length=320)  # lowercased email once signed in
    groups: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # the IdP's, at sign-in
    via: str | None = Field(default=None, max_length=16)  # oidc | local-token
    csrf_token: str = Field(max_length=64)  # the synchronizer token every form of this browser carries
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))  # OAuth state, flash
    created_at: datetime = ts()
    last_seen_at: datetime = ts()
    expires_at: datetime = ts(index=True)


class OAuthAuthorization(SQLModel, table=True):
    """One authorization request of an MCP client (authorization code + PKCE), from the redirect
    to the code's single redemption: pending -> approved (a code exists) -> redeemed, or denied.
    The code is kept as its SHA-256 only."""

    __tablename__ = "oauth_authorizations"

    id: str = Field(primary_key=True, max_length=40)  # "az_" + 32 hex, in the consent URL
    client_id: str = Field(max_length=2048)
    client_name: str | None = Field(default=None, max_length=256)
    agent: str = Field(max_length=128)
    redirect_uri: str = Field(max_length=2048)
    state: str | None = Field(default=None, max_length=1024)
    code_challenge: str = Field(max_length=128)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    scope: str = Field(max_length=1024)  # the scope asked for, as asked
    status: str = Field(max_length=16, index=True)
    human: str | None = Field(default=None, max_length=320)
    session_id: str | None = Field(default=None, max_length=40)
    approval_id: str | None = Field(default=None, max_length=40)
    code_hash: str | None = Field(default=None, max_length=64, unique=True)
    created_at: datetime = ts()
    expires_at: datetime = ts(index=True)


class OAuthRefreshToken(SQLModel, table=True):
    """A refresh token (SHA-256 only), bound to its session, client, resource and access.
    Rotated on each use: the old one becomes `rotated`, and presenting a rotated one again
    revokes the whole family (RFC 9700 section 4.14.2)."""

    __tablename__ = "oauth_refresh_tokens"

    token_hash: str = Field(primary_key=True, max_length=64)
    family: str = Field(max_length=40, index=True)
    session_id: str = Field(max_length=40, index=True)
    client_id: str = Field(max_length=2048)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    scope: str = Field(max_length=1024)
    status: str = Field(max_length=16)  # active | rotated | revoked
    created_at: datetime = ts()
    expires_at: datetime = ts()
