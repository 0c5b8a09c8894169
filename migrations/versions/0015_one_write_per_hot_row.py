"""broker_reserve_capability() and broker_append_audit(): one write per hot row

0013's functions wrote the two rows every capability of a session touches twice each: the
session's row (the folded live count, then the issued count) and its audit chain's tip (an
upsert bumping the length, then the new head). Each write of a row leaves a dead version of it
behind until a vacuum, and these are the hottest rows in the database: a session's every request
locks and updates the same one. Here each is written once per capability:

- the session row is locked, its live deltas (0009) are folded in memory, and one `UPDATE` sets
  the live count and the issued count together (a refusal after the fold still writes the folded
  count, as before, so no delta is lost);
- the chain's tip is locked with `SELECT ... FOR UPDATE` and moved by one `UPDATE` (length and
  head together); a chain's first record still takes 0013's upsert, which two first appends
  racing for a new chain need.

And the escalation check runs only when the lease's tier is in an escalation chain: 0013's
`cardinality(p_escalation) > 0 AND EXISTS (...)` is `NULL AND ...` without one, which PostgreSQL
must still evaluate, so every capability read the leases table from end to end (a cost that grew
with every lease ever issued: `bench/suite.py`'s rate fell round by round).

The checks, their order, the answers and the record's bytes are 0013's
(`broker/store/base.py:refusal_of` keeps the same order for the SQLite store).

Revision ID: 0015
Revises: 0014
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

_LIVE = "('minting', 'active', 'revoke_pending')"  # broker.leases.vocabulary.LIVE when this was written
_GENESIS = "0" * 64

_RESERVE = f"""
CREATE OR REPLACE FUNCTION broker_reserve_capability(
    p_session text, p_max_issued integer, p_max_active integer, p_escalation text[], p_lease jsonb, p_key jsonb
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    s_status text; s_issued integer; s_live integer; s_suspended timestamptz; s_idle timestamptz;
    d_sum integer; d_rows integer;
BEGIN
    SELECT status, issued_count, live_count, suspended_at, idle_until
        INTO s_status, s_issued, s_live, s_suspended, s_idle
        FROM sessions WHERE id = p_session FOR UPDATE;
    IF NOT FOUND THEN RETURN 'no-session'; END IF;
    IF s_status <> 'active' OR s_suspended IS NOT NULL OR (s_idle IS NOT NULL AND s_idle <= now()) THEN
        RETURN 'session-ended';
    END IF;
    IF p_key IS NOT NULL AND EXISTS (SELECT 1 FROM idempotency_keys
                                     WHERE session_id = p_session AND key = p_key->>'key') THEN
        RETURN 'key-exists';
    END IF;
    IF p_max_issued IS NOT NULL AND s_issued >= p_max_issued THEN RETURN 'budget-exceeded'; END IF;
    -- Fold the session's live deltas into its count (as broker/leases/facts.py does), in memory:
    -- the row is written once below, or here on a refusal if there was anything to fold.
    WITH d AS (DELETE FROM session_live_deltas WHERE session_id = p_session RETURNING delta)
    SELECT coalesce(sum(delta), 0), count(*) INTO d_sum, d_rows FROM d;
    s_live := s_live + d_sum;
    IF p_max_active IS NOT NULL AND s_live >= p_max_active THEN
        IF d_rows > 0 THEN UPDATE sessions SET live_count = s_live WHERE id = p_session; END IF;
        RETURN 'budget-exceeded';
    END IF;
    -- Only when the lease's tier is in an escalation chain. (0013 wrote `cardinality(p_escalation)
    -- > 0 AND EXISTS (...)`: with no chain that is NULL AND ..., which SQL must still evaluate,
    -- so every capability scanned the leases table.)
    IF coalesce(cardinality(p_escalation), 0) > 0 THEN
        IF EXISTS (SELECT 1 FROM leases WHERE session_id = p_session AND tier = ANY(p_escalation)
                   AND status IN {_LIVE}) THEN
            IF d_rows > 0 THEN UPDATE sessions SET live_count = s_live WHERE id = p_session; END IF;
            RETURN 'escalation';
        END IF;
    END IF;
    INSERT INTO leases SELECT * FROM jsonb_populate_record(NULL::leases, p_lease);
    UPDATE sessions SET live_count = s_live, issued_count = s_issued + 1 WHERE id = p_session;
    IF p_key IS NOT NULL THEN
        INSERT INTO idempotency_keys SELECT * FROM jsonb_populate_record(NULL::idempotency_keys, p_key);
    END IF;
    RETURN 'reserved';
END $$
"""

_APPEND = f"""
CREATE OR REPLACE FUNCTION broker_append_audit(
    p_chain text, p_session text,
    p_a text, p_b text, p_c text,  -- the record's canonical JSON around chain_pos and seq
    p_event_id text, p_timestamp text, p_type text, p_human text, p_outcome text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    pos bigint; prev text; seq bigint; rec text; digest text;
BEGIN
    SELECT length + 1, head INTO pos, prev FROM audit_chains WHERE chain_id = p_chain FOR UPDATE;
    IF NOT FOUND THEN  -- the chain's first record: an upsert, for two first appends racing
        INSERT INTO audit_chains (chain_id, length, head) VALUES (p_chain, 1, '{_GENESIS}')
            ON CONFLICT (chain_id) DO UPDATE SET length = audit_chains.length + 1
            RETURNING length, head INTO pos, prev;
    END IF;
    seq := nextval('audit_seq');
    rec := p_a || pos::text || p_b || seq::text || p_c;
    digest := encode(sha256(convert_to(prev || rec, 'UTF8')), 'hex');
    INSERT INTO audit_records (seq, event_id, timestamp, type, session_id, human_principal, outcome, record,
                               prev_hash, hash, chain_id, chain_pos, txid)
        VALUES (seq, p_event_id, p_timestamp, p_type, p_session, p_human, p_outcome, rec,
                prev, digest, p_chain, pos, pg_current_xact_id()::text::bigint);
    UPDATE audit_chains SET length = pos, head = digest WHERE chain_id = p_chain;
END $$
"""


def _revision_0013() -> ModuleType:
    path = Path(__file__).with_name("0013_issue_capability_function.py")
    spec = importlib.util.spec_from_file_location("broker_migration_0013", path)
    assert spec is not None and spec.loader is not None  # noqa: S101  # the file sits beside this one
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_RESERVE)
        op.execute(_APPEND)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function in _revision_0013()._FUNCTIONS:  # 0013's own definitions, as they were
            op.execute(function)
