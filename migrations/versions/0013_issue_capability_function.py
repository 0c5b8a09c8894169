"""broker_issue_capability() and friends: a capability's writes in one round trip each on PostgreSQL

`broker_issue_capability` does what a native capability's transaction did in six statements:
lock the session's row, refuse a key already used, fold the session's live deltas (0009) and
check the budgets and the escalation chain against the locked row, insert the lease (its
issued counter goes up with it) and its idempotent outcome, append the audit record to the
session's chain and move the chain's tip. The broker decided before calling it, against the
session's unchanging facts; whatever the locked row says that could change that decision makes
the function write nothing and answer why (the broker then takes the full path, which records
the refusal). A remote backend's capability takes two: `broker_reserve_capability` (the same
checks; the lease `minting` and its key `in_progress`, committed before the backend is called)
and `broker_activate_capability` (the lease active if it is still `minting`, the key's outcome,
the audit record). `broker/store/postgres.py` calls them; `broker/store/sqlite.py` does the same
in Python.

The audit record's canonical JSON comes from the broker in three pieces around its chain
position and its seq, which only the database knows; the function joins them and hashes
`prev_hash || record` with SHA-256, byte for byte what `broker/audit/chain.py` computes and
`audit verify` checks.

Revision ID: 0013
Revises: 0012
"""
from __future__ import annotations

from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

_LIVE = "('minting', 'active', 'revoke_pending')"  # broker.leases.vocabulary.LIVE when this was written
_GENESIS = "0" * 64

_FUNCTIONS = [f"""
CREATE OR REPLACE FUNCTION broker_reserve_capability(
    p_session text,            -- the session the lease is for
    p_max_issued integer,      -- the policy's budgets (NULL: none)
    p_max_active integer,
    p_escalation text[],       -- escalation tiers whose live lease would need approval (NULL: none)
    p_lease jsonb,             -- the lease row (leases' columns; the others take NULL)
    p_key jsonb                -- the idempotency key's row, or NULL
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    s_status text; s_issued integer; s_live integer; s_suspended timestamptz; s_idle timestamptz;
BEGIN
    SELECT status, issued_count, suspended_at, idle_until INTO s_status, s_issued, s_suspended, s_idle
        FROM sessions WHERE id = p_session FOR UPDATE;
    IF NOT FOUND THEN RETURN 'no-session'; END IF;
    -- Ended, suspended by the deviation tripwire, or silent past its idle timeout (0014): the
    -- full path decides, names the reason and counts it.
    IF s_status <> 'active' OR s_suspended IS NOT NULL OR (s_idle IS NOT NULL AND s_idle <= now()) THEN
        RETURN 'session-ended';
    END IF;
    IF p_key IS NOT NULL AND EXISTS (SELECT 1 FROM idempotency_keys
                                     WHERE session_id = p_session AND key = p_key->>'key') THEN
        RETURN 'key-exists';
    END IF;
    IF p_max_issued IS NOT NULL AND s_issued >= p_max_issued THEN RETURN 'budget-exceeded'; END IF;
    -- Fold the session's live deltas into its count (as broker/leases/facts.py does).
    WITH d AS (DELETE FROM session_live_deltas WHERE session_id = p_session RETURNING delta)
    UPDATE sessions SET live_count = live_count + (SELECT coalesce(sum(delta), 0) FROM d)
        WHERE id = p_session RETURNING live_count INTO s_live;
    IF p_max_active IS NOT NULL AND s_live >= p_max_active THEN RETURN 'budget-exceeded'; END IF;
    IF cardinality(p_escalation) > 0 AND EXISTS (
            SELECT 1 FROM leases WHERE session_id = p_session AND tier = ANY(p_escalation)
            AND status IN {_LIVE}) THEN
        RETURN 'escalation';
    END IF;
    INSERT INTO leases SELECT * FROM jsonb_populate_record(NULL::leases, p_lease);
    UPDATE sessions SET issued_count = issued_count + 1 WHERE id = p_session;
    IF p_key IS NOT NULL THEN
        INSERT INTO idempotency_keys SELECT * FROM jsonb_populate_record(NULL::idempotency_keys, p_key);
    END IF;
    RETURN 'reserved';
END $$
""", f"""
CREATE OR REPLACE FUNCTION broker_append_audit(
    p_chain text, p_session text,
    p_a text, p_b text, p_c text,  -- the record's canonical JSON around chain_pos and seq
    p_event_id text, p_timestamp text, p_type text, p_human text, p_outcome text
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    pos bigint; prev text; seq bigint; rec text; digest text;
BEGIN
    INSERT INTO audit_chains (chain_id, length, head) VALUES (p_chain, 1, '{_GENESIS}')
        ON CONFLICT (chain_id) DO UPDATE SET length = audit_chains.length + 1
        RETURNING length, head INTO pos, prev;
    seq := nextval('audit_seq');
    rec := p_a || pos::text || p_b || seq::text || p_c;
    digest := encode(sha256(convert_to(prev || rec, 'UTF8')), 'hex');
    INSERT INTO audit_records (seq, event_id, timestamp, type, session_id, human_principal, outcome, record,
                               prev_hash, hash, chain_id, chain_pos, txid)
        VALUES (seq, p_event_id, p_timestamp, p_type, p_session, p_human, p_outcome, rec,
                prev, digest, p_chain, pos, pg_current_xact_id()::text::bigint);
    UPDATE audit_chains SET head = digest WHERE chain_id = p_chain;
END $$
""", """
CREATE OR REPLACE FUNCTION broker_issue_capability(
    p_session text, p_max_issued integer, p_max_active integer, p_escalation text[], p_lease jsonb, p_key jsonb,
    p_chain text, p_a text, p_b text, p_c text, p_event_id text, p_timestamp text, p_type text, p_human text,
    p_outcome text
) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    reserved text;
BEGIN
    reserved := broker_reserve_capability(p_session, p_max_issued, p_max_active, p_escalation, p_lease, p_key);
    IF reserved <> 'reserved' THEN RETURN reserved; END IF;
    PERFORM broker_append_audit(p_chain, p_session, p_a, p_b, p_c, p_event_id, p_timestamp, p_type, p_human,
                                p_outcome);
    RETURN 'issued';
END $$
""", """
CREATE OR REPLACE FUNCTION broker_activate_capability(
    p_lease text, p_minted_at timestamptz, p_backend_expires_at timestamptz, p_handle jsonb, p_fingerprint text,
    p_sealed_secret text,
    p_session text, p_key text, p_key_status integer, p_key_sealed text,  -- the held key's outcome (NULL: none)
    p_chain text, p_a text, p_b text, p_c text, p_event_id text, p_timestamp text, p_type text, p_human text,
    p_outcome text
) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    UPDATE leases SET status = 'active', minted_at = p_minted_at, backend_expires_at = p_backend_expires_at,
                      handle = p_handle::json, fingerprint = p_fingerprint, sealed_secret = p_sealed_secret
        WHERE id = p_lease AND status = 'minting';
    IF NOT FOUND THEN RETURN 'not-minting'; END IF;  -- torn down while it was minted
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_keys SET state = 'done', response_status = p_key_status, sealed_response = p_key_sealed
            WHERE session_id = p_session AND key = p_key;
    END IF;
    PERFORM broker_append_audit(p_chain, p_session, p_a, p_b, p_c, p_event_id, p_timestamp, p_type, p_human,
                                p_outcome);
    RETURN 'activated';
END $$
"""]
_SIGNATURES = [
    "broker_activate_capability(text, timestamptz, timestamptz, jsonb, text, text, text, text, integer, text, text, "
    "text, text, text, text, text, text, text, text)",
    "broker_issue_capability(text, integer, integer, text[], jsonb, jsonb, text, text, text, text, text, text, text, "
    "text, text)",
    "broker_append_audit(text, text, text, text, text, text, text, text, text, text)",
    "broker_reserve_capability(text, integer, integer, text[], jsonb, jsonb)",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for function in _FUNCTIONS:
            op.execute(function)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in _SIGNATURES:
            op.execute(f"DROP FUNCTION IF EXISTS {signature}")
