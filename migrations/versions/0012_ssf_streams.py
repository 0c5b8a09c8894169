"""ssf_streams, ssf_subjects, ssf_events: OpenID SSF 1.0 streams receivers manage themselves

Revision ID: 0012
Revises: 0011
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

from broker.db import UTCDateTime

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ssf_streams',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('receiver', sqlmodel.sql.sqltypes.AutoString(length=63), nullable=False),
        sa.Column('audience', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
        sa.Column('description', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True),
        sa.Column('delivery_method', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('endpoint_url', sqlmodel.sql.sqltypes.AutoString(length=2048), nullable=True),
        sa.Column('authorization_header', sa.Text(), nullable=True),
        sa.Column('events_requested', sa.JSON(), nullable=False),
        sa.Column('events_delivered', sa.JSON(), nullable=False),
        sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('status_reason', sqlmodel.sql.sqltypes.AutoString(length=256), nullable=True),
        sa.Column('verified_at', UTCDateTime(timezone=True), nullable=True),
        sa.Column('created_at', UTCDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'))
    op.create_index(op.f('ix_ssf_streams_receiver'), 'ssf_streams', ['receiver'], unique=False)
    op.create_table('ssf_subjects',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('stream_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('subject_key', sqlmodel.sql.sqltypes.AutoString(length=1100), nullable=False),
        sa.Column('added_at', UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('stream_id', 'subject_key'))
    op.create_index(op.f('ix_ssf_subjects_stream_id'), 'ssf_subjects', ['stream_id'], unique=False)
    op.create_table('ssf_events',
        sa.Column('jti', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('stream_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('created_at', UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('jti'))
    op.create_index(op.f('ix_ssf_events_stream_id'), 'ssf_events', ['stream_id'], unique=False)
    op.create_index(op.f('ix_ssf_events_created_at'), 'ssf_events', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_table('ssf_events')
    op.drop_table('ssf_subjects')
    op.drop_table('ssf_streams')
