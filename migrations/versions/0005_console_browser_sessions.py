"""browser_sessions: the console's server-side sign-ins (the cookie holds only a random id)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 09:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import broker.db

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('browser_sessions',
    sa.Column('id_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('principal', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True),
    sa.Column('groups', sa.JSON(), nullable=False),
    sa.Column('via', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('csrf_token', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.Column('created_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id_hash')
    )
    with op.batch_alter_table('browser_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_browser_sessions_expires_at'), ['expires_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('browser_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_browser_sessions_expires_at'))
    op.drop_table('browser_sessions')
