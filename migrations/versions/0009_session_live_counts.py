"""sessions.live_count and session_live_deltas: a session's live-lease count without reading
its leases

Triggers on `leases` insert a +1 / -1 row into session_live_deltas whenever a lease enters or
leaves the live statuses (minting, active, revoke_pending), on any path: the request path, a
teardown, the sweeper, the reconciler, a mint that failed. They only insert, so no path that
ends leases locks a session row (two replicas ending leases of the same sessions in different
orders cannot deadlock on them). The request path, under the session's row lock, folds the
session's deltas into `sessions.live_count` (broker/leases/facts.py). Existing sessions start
from the count of their live leases.

Revision ID: 0009
Revises: 0008
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

_LIVE = "('minting', 'active', 'revoke_pending')"  # broker.leases.vocabulary.LIVE when this was written


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column('sessions', sa.Column('live_count', sa.Integer(), nullable=False, server_default='0'))
    op.create_table(
        'session_live_deltas',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('delta', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('id'))
    op.create_index(op.f('ix_session_live_deltas_session_id'), 'session_live_deltas', ['session_id'], unique=False)
    op.execute(f"UPDATE sessions SET live_count = (SELECT count(*) FROM leases l WHERE l.session_id = sessions.id "
               f"AND l.status IN {_LIVE})")
    if dialect == "postgresql":
        op.execute(f"""CREATE OR REPLACE FUNCTION leases_live_delta() RETURNS trigger AS $$
            DECLARE was boolean := false; now_live boolean := false;
            BEGIN
                IF TG_OP <> 'INSERT' THEN was := OLD.status IN {_LIVE}; END IF;
                IF TG_OP <> 'DELETE' THEN now_live := NEW.status IN {_LIVE}; END IF;
                IF was AND NOT now_live THEN
                    INSERT INTO session_live_deltas (session_id, delta) VALUES (OLD.session_id, -1);
                ELSIF now_live AND NOT was THEN
                    INSERT INTO session_live_deltas (session_id, delta) VALUES (NEW.session_id, 1);
                END IF;
                RETURN NULL;
            END $$ LANGUAGE plpgsql""")
        op.execute("CREATE TRIGGER leases_live_delta AFTER INSERT OR DELETE OR UPDATE OF status ON leases "
                   "FOR EACH ROW EXECUTE FUNCTION leases_live_delta()")
    elif dialect == "sqlite":
        op.execute(f"CREATE TRIGGER leases_live_insert AFTER INSERT ON leases WHEN NEW.status IN {_LIVE} "
                   "BEGIN INSERT INTO session_live_deltas (session_id, delta) VALUES (NEW.session_id, 1); END")
        op.execute(f"CREATE TRIGGER leases_live_leave AFTER UPDATE OF status ON leases "
                   f"WHEN OLD.status IN {_LIVE} AND NEW.status NOT IN {_LIVE} "
                   "BEGIN INSERT INTO session_live_deltas (session_id, delta) VALUES (OLD.session_id, -1); END")
        op.execute(f"CREATE TRIGGER leases_live_enter AFTER UPDATE OF status ON leases "
                   f"WHEN OLD.status NOT IN {_LIVE} AND NEW.status IN {_LIVE} "
                   "BEGIN INSERT INTO session_live_deltas (session_id, delta) VALUES (NEW.session_id, 1); END")
        op.execute(f"CREATE TRIGGER leases_live_delete AFTER DELETE ON leases WHEN OLD.status IN {_LIVE} "
                   "BEGIN INSERT INTO session_live_deltas (session_id, delta) VALUES (OLD.session_id, -1); END")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS leases_live_delta ON leases")
        op.execute("DROP FUNCTION IF EXISTS leases_live_delta()")
    elif dialect == "sqlite":
        for name in ("leases_live_insert", "leases_live_leave", "leases_live_enter", "leases_live_delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
    op.drop_index(op.f('ix_session_live_deltas_session_id'), table_name='session_live_deltas')
    op.drop_table('session_live_deltas')
    with op.batch_alter_table('sessions', schema=None) as batch_op:
        batch_op.drop_column('live_count')
