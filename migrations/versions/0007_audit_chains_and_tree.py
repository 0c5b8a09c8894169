"""audit: per-session hash chains (no shared row on the request path) and a Merkle tree;
an index for the escalation check (does the session hold a live lease of a tier?)

Records gain `chain_id`/`chain_pos` (their own chain; NULL on older records, which stay the one
legacy chain ending at `audit_head`) and `txid` (PostgreSQL's transaction id, for the linker's
watermark). New tables: `audit_chains` (each chain's tip), `audit_leaves` (a record's leaf index
in the log-wide tree, set by the background linker), `audit_tree` (the linker's state) and
`audit_checkpoints` (signed checkpoints). Leaves and checkpoints are append-only, as records are.
`audit_records` is altered with plain ADD COLUMN (no batch copy), so migration 0002's triggers
stay in place.

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_APPEND_ONLY = ("audit_leaves", "audit_checkpoints")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column('audit_records', sa.Column('chain_id', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True))
    op.add_column('audit_records', sa.Column('chain_pos', sa.Integer(), nullable=True))
    op.add_column('audit_records', sa.Column('txid', sa.BigInteger(), nullable=True))
    op.create_index('ix_audit_records_txid', 'audit_records', ['txid'], unique=False)
    # A unique index, not a table constraint: SQLite cannot add a constraint without a batch copy.
    op.create_index('uq_audit_chain_pos', 'audit_records', ['chain_id', 'chain_pos'], unique=True)
    op.create_index('ix_leases_session_tier_status', 'leases', ['session_id', 'tier', 'status'], unique=False)
    op.create_table('audit_chains',
        sa.Column('chain_id', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
        sa.Column('length', sa.Integer(), nullable=False),
        sa.Column('head', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.PrimaryKeyConstraint('chain_id'))
    op.create_table('audit_leaves',
        sa.Column('leaf_index', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('seq', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('leaf_index'),
        sa.UniqueConstraint('seq'))
    op.create_table('audit_tree',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('size', sa.Integer(), nullable=False),
        sa.Column('frontier', sa.JSON(), nullable=False),
        sa.Column('watermark', sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint('id'))
    op.create_table('audit_checkpoints',
        sa.Column('tree_size', sa.Integer(), autoincrement=False, nullable=False),
        sa.Column('root_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column('timestamp', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
        sa.Column('note', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('tree_size'))
    if dialect == "postgresql":
        # Record numbers without a shared row: a sequence never waits for another transaction.
        op.execute("CREATE SEQUENCE audit_seq")
        op.execute("SELECT setval('audit_seq', GREATEST((SELECT coalesce(max(seq), 0) FROM audit_records), 1),"
                   " (SELECT count(*) > 0 FROM audit_records))")
        # A chain's tip only moves forward (hiding a truncated chain by rewinding it is refused).
        op.execute("""CREATE OR REPLACE FUNCTION audit_chains_forward_only() RETURNS trigger AS $$
            BEGIN
                IF NEW.length < OLD.length OR NEW.chain_id <> OLD.chain_id THEN
                    RAISE EXCEPTION 'audit_chains only moves forward' USING ERRCODE = 'insufficient_privilege';
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql""")
        op.execute("CREATE TRIGGER audit_chains_forward_only BEFORE UPDATE ON audit_chains "
                   "FOR EACH ROW EXECUTE FUNCTION audit_chains_forward_only()")
        op.execute("CREATE TRIGGER audit_chains_no_delete BEFORE DELETE ON audit_chains "
                   "FOR EACH ROW EXECUTE FUNCTION audit_records_append_only()")
        for table in _APPEND_ONLY:
            for op_name in ("UPDATE", "DELETE"):
                op.execute(f"CREATE TRIGGER {table}_no_{op_name.lower()} BEFORE {op_name} ON {table} "
                           "FOR EACH ROW EXECUTE FUNCTION audit_records_append_only()")
            op.execute(f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                       "FOR EACH STATEMENT EXECUTE FUNCTION audit_records_append_only()")
    elif dialect == "sqlite":
        op.execute("CREATE TRIGGER audit_chains_forward_only BEFORE UPDATE ON audit_chains "
                   "WHEN NEW.length < OLD.length OR NEW.chain_id <> OLD.chain_id "
                   "BEGIN SELECT RAISE(ABORT, 'audit_chains only moves forward'); END")
        op.execute("CREATE TRIGGER audit_chains_no_delete BEFORE DELETE ON audit_chains "
                   "BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: DELETE refused'); END")
        for table in _APPEND_ONLY:
            for op_name in ("UPDATE", "DELETE"):
                op.execute(f"CREATE TRIGGER {table}_no_{op_name.lower()} BEFORE {op_name} ON {table} "
                           f"BEGIN SELECT RAISE(ABORT, 'audit_records is append-only: {op_name} refused'); END")


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for trigger in ("audit_chains_forward_only", "audit_chains_no_delete"):
        op.execute(f"DROP TRIGGER IF EXISTS {trigger}" + (" ON audit_chains" if dialect == "postgresql" else ""))
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS audit_chains_forward_only()")
    for table in _APPEND_ONLY:
        for op_name in ("update", "delete", "truncate"):
            if dialect == "postgresql":
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op_name} ON {table}")
            elif op_name != "truncate":
                op.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op_name}")
    if dialect == "postgresql":
        op.execute("DROP SEQUENCE IF EXISTS audit_seq")
    op.drop_table('audit_checkpoints')
    op.drop_table('audit_tree')
    op.drop_table('audit_leaves')
    op.drop_table('audit_chains')
    op.drop_index('uq_audit_chain_pos', table_name='audit_records')
    op.drop_index('ix_leases_session_tier_status', table_name='leases')
    op.drop_index('ix_audit_records_txid', table_name='audit_records')
    op.drop_column('audit_records', 'txid')
    op.drop_column('audit_records', 'chain_pos')
    op.drop_column('audit_records', 'chain_id')
