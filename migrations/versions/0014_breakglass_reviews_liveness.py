"""sessions: idle timeout (stall) and suspension (deviation); session_refusals: the refusals the
deviation tripwire counts; breakglass_reviews: the post-review of each break-glass use

Plain ADD COLUMN of nullable columns: existing sessions have no idle timeout and are not
suspended, which is what they were before. The speed branch adds its own 0010; whoever merges
re-chains this one after it (only `down_revision` changes).

Revision ID: 0014
Revises: 0013
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import broker.db

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('sessions', sa.Column('idle_timeout_seconds', sa.Integer(), nullable=True))
    op.add_column('sessions', sa.Column('idle_until', broker.db.UTCDateTime(timezone=True), nullable=True))
    op.add_column('sessions', sa.Column('last_seen_at', broker.db.UTCDateTime(timezone=True), nullable=True))
    op.add_column('sessions', sa.Column('suspended_at', broker.db.UTCDateTime(timezone=True), nullable=True))
    op.add_column('sessions', sa.Column('suspend_reason', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=True))
    op.create_index('ix_sessions_status_idle', 'sessions', ['status', 'idle_until'], unique=False)
    op.create_table(
        'session_refusals',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('resource', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column('access', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('at', broker.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'))
    op.create_index('ix_session_refusals_session_at', 'session_refusals', ['session_id', 'at'], unique=False)
    op.add_column('approvals', sa.Column('justification', sa.Text(), nullable=True))
    op.create_table(
        'breakglass_reviews',
        sa.Column('id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('approval_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('capability_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('human', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=False),
        sa.Column('agent', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
        sa.Column('resource', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=False),
        sa.Column('access', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('justification', sa.Text(), nullable=False),
        sa.Column('approved_by', sa.JSON(), nullable=False),
        sa.Column('reviewers', sa.JSON(), nullable=False),
        sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column('used_at', broker.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column('due_at', broker.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column('overdue_noted_at', broker.db.UTCDateTime(timezone=True), nullable=True),
        sa.Column('verdict', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True),
        sa.Column('note', sa.Text(), nullable=True),
        sa.Column('closed_by', sqlmodel.sql.sqltypes.AutoString(length=320), nullable=True),
        sa.Column('closed_at', broker.db.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('id'))
    op.create_index('ix_breakglass_reviews_session_id', 'breakglass_reviews', ['session_id'], unique=False)
    op.create_index('ix_breakglass_reviews_status_due', 'breakglass_reviews', ['status', 'due_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_breakglass_reviews_status_due', table_name='breakglass_reviews')
    op.drop_index('ix_breakglass_reviews_session_id', table_name='breakglass_reviews')
    op.drop_table('breakglass_reviews')
    with op.batch_alter_table('approvals', schema=None) as batch_op:
        batch_op.drop_column('justification')
    op.drop_index('ix_session_refusals_session_at', table_name='session_refusals')
    op.drop_table('session_refusals')
    op.drop_index('ix_sessions_status_idle', table_name='sessions')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        for column in ('suspend_reason', 'suspended_at', 'last_seen_at', 'idle_until', 'idle_timeout_seconds'):
            batch_op.drop_column(column)
