"""leases.live_checked_at: when the live permission re-check last looked at a lease

Revision ID: 0003_live_checks
Revises: 0002
Create Date: 2026-11-22 08:50:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa
import broker.db


revision = '0003_live_checks'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('leases', schema=None) as batch_op:
        # Also the re-check's claim: a replica sets it when it takes a lease, so no other replica
        # checks that lease again before the next interval.
        batch_op.add_column(sa.Column('live_checked_at', broker.db.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_column('live_checked_at')
