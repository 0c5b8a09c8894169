"""oauth_authorizations and oauth_refresh_tokens: the broker as the authorization server of MCP
servers (authorization code + PKCE, rotated refresh tokens)

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import broker.db

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

_S = sqlmodel.sql.sqltypes.AutoString


def upgrade() -> None:
    op.create_table('oauth_authorizations',
    sa.Column('id', _S(length=40), nullable=False),
    sa.Column('client_id', _S(length=2048), nullable=False),
    sa.Column('client_name', _S(length=256), nullable=True),
    sa.Column('agent', _S(length=128), nullable=False),
    sa.Column('redirect_uri', _S(length=2048), nullable=False),
    sa.Column('state', _S(length=1024), nullable=True),
    sa.Column('code_challenge', _S(length=128), nullable=False),
    sa.Column('resource', _S(length=512), nullable=False),
    sa.Column('access', _S(length=64), nullable=False),
    sa.Column('scope', _S(length=1024), nullable=False),
    sa.Column('status', _S(length=16), nullable=False),
    sa.Column('human', _S(length=320), nullable=True),
    sa.Column('session_id', _S(length=40), nullable=True),
    sa.Column('approval_id', _S(length=40), nullable=True),
    sa.Column('code_hash', _S(length=64), nullable=True),
    sa.Column('created_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('code_hash'),
    )
    with op.batch_alter_table('oauth_authorizations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_oauth_authorizations_status'), ['status'], unique=False)
        batch_op.create_index(batch_op.f('ix_oauth_authorizations_expires_at'), ['expires_at'], unique=False)
    op.create_table('oauth_refresh_tokens',
    sa.Column('token_hash', _S(length=64), nullable=False),
    sa.Column('family', _S(length=40), nullable=False),
    sa.Column('session_id', _S(length=40), nullable=False),
    sa.Column('client_id', _S(length=2048), nullable=False),
    sa.Column('resource', _S(length=512), nullable=False),
    sa.Column('access', _S(length=64), nullable=False),
    sa.Column('scope', _S(length=1024), nullable=False),
    sa.Column('status', _S(length=16), nullable=False),
    sa.Column('created_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('token_hash'),
    )
    with op.batch_alter_table('oauth_refresh_tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_oauth_refresh_tokens_family'), ['family'], unique=False)
        batch_op.create_index(batch_op.f('ix_oauth_refresh_tokens_session_id'), ['session_id'], unique=False)


def downgrade() -> None:
    op.drop_table('oauth_refresh_tokens')
    op.drop_table('oauth_authorizations')
