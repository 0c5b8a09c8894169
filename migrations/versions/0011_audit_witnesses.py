"""audit_cosignatures and audit_witness_state: witness cosignatures of audit checkpoints

`audit_cosignatures` keeps each verified cosignature/v1 line a configured witness (C2SP
tlog-witness) returned for a checkpoint; `audit_witness_state` what the broker knows of each
witness (its largest cosigned size, its last refusal).

Revision ID: 0011
Revises: 0010
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

from broker.db import UTCDateTime

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_cosignatures',
        sa.Column('tree_size', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('witness', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column('timestamp', sa.BigInteger(), nullable=False),
        sa.Column('line', sa.Text(), nullable=False),
        sa.Column('received_at', UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('tree_size', 'witness'))
    op.create_table('audit_witness_state',
        sa.Column('witness', sqlmodel.sql.sqltypes.AutoString(length=300), nullable=False),
        sa.Column('cosigned_size', sa.BigInteger(), nullable=False),
        sa.Column('refused_size', sa.BigInteger(), nullable=True),
        sa.Column('refused_reason', sqlmodel.sql.sqltypes.AutoString(length=512), nullable=True),
        sa.Column('updated_at', UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('witness'))


def downgrade() -> None:
    op.drop_table('audit_witness_state')
    op.drop_table('audit_cosignatures')
