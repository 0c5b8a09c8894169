"""dpop_proofs_seen: one-time DPoP proof ids (RFC 9449), kept until their window closes; leases.fingerprint index

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 09:40:00
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

import broker.db

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dpop_proofs_seen',
    sa.Column('jti_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('expires_at', broker.db.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('jti_hash')
    )
    with op.batch_alter_table('dpop_proofs_seen', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dpop_proofs_seen_expires_at'), ['expires_at'], unique=False)
    # RFC 7009 revocation looks a provider token up by its fingerprint.
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_leases_fingerprint'), ['fingerprint'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_leases_fingerprint'))
    with op.batch_alter_table('dpop_proofs_seen', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dpop_proofs_seen_expires_at'))
    op.drop_table('dpop_proofs_seen')
