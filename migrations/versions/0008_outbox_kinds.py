"""outbox: a delivery `kind` per message (approval notifications, Security Event Tokens) and
the configured `receiver` a Security Event Token goes to

Existing rows are approval notifications (the only kind before 0008). Plain ADD COLUMN, no
batch copy: the table may hold undelivered messages while the broker upgrades.

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('outbox', sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False,
                                      server_default='approval'))
    op.add_column('outbox', sa.Column('receiver', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_column('receiver')
        batch_op.drop_column('kind')
