"""Every table, in one place so Alembic and the services see the same metadata.

Domain services live in their own packages (sessions/, leases/, approvals/, audit/); the
tables are here because they reference each other and migrations need them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from broker.db import UTCDateTime


def _ts(**kw: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kw)


class SessionRow(SQLModel, table=True):
    __tablename__ = "sessions"

    id: str = Field(primary_key=True, max_length=64)
    human: str = Field(max_length=320)
    agent: str = Field(max_length=128)
    task_id: str = Field(max_length=256, index=True)
    repository: str | None = Field(default=None, max_length=256)
    scope: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="active", max_length=16)  # active | ended
    created_by: str = Field(max_length=128)
    created_at: datetime = _ts()
    expires_at: datetime = _ts()
    ended_at: datetime | None = _ts(default=None)
    end_reason: str | None = Field(default=None, max_length=128)
    issued_count: int = 0  # capabilities ever minted here: the issued budget counts these
    # Live leases (minting, active, revoke_pending), as of the last fold: the exact count is this
    # plus the session's rows in session_live_deltas (written by triggers on leases, 0009).
    live_count: int = 0
    # Stall (0010, broker/sessions/liveness.py): the idle timeout fixed at provision (None: none),
    # and the moment past which a silent session is ended. Moved forward by requests with the
    # session token at most once per granularity per replica, and by heartbeats.
    idle_timeout_seconds: int | None = None
    idle_until: datetime | None = _ts(default=None)
    last_seen_at: datetime | None = _ts(default=None)
    # Deviation (0010, broker/sessions/deviation.py): set while the tripwire holds the session;
    # no new capability is issued until a human resumes it.
    suspended_at: datetime | None = _ts(default=None)
    suspend_reason: str | None = Field(default=None, max_length=128)

    __table_args__ = (Index("ix_sessions_status_expires", "status", "expires_at"),
                      Index("ix_sessions_status_idle", "status", "idle_until"))


class SessionLiveDelta(SQLModel, table=True):
    """+1 / -1 per lease entering or leaving the live statuses, inserted by database triggers
    on `leases` (migration 0009) whatever code path changes a lease. Insert-only for every writer
    but one: the request path, holding the session's row lock, folds a session's rows into
    `sessions.live_count`. So a live count costs what changed since the session's last request,
    not what it holds, and no path that ends leases locks a session row for it."""

    __tablename__ = "session_live_deltas"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(max_length=64, index=True)
    delta: int


@dataclass(frozen=True)
class SessionSnapshot:
    """A session as the request path reads it: under the row's lock, by Core SQL, tracked by no
    ORM session (building a SessionRow would cost more CPU than the SELECT that reads it). Read
    it; change the row with SQL. `row()`: the same values as a SessionRow outside any ORM
    session, for the code that takes one."""

    id: str
    human: str
    agent: str
    task_id: str
    repository: str | None
    scope: list[dict[str, Any]]
    labels: dict[str, str]
    status: str
    created_by: str
    created_at: datetime
    expires_at: datetime
    ended_at: datetime | None
    end_reason: str | None
    issued_count: int
    idle_timeout_seconds: int | None = None
    idle_until: datetime | None = None
    last_seen_at: datetime | None = None
    suspended_at: datetime | None = None
    suspend_reason: str | None = None

    def row(self) -> SessionRow:
        return SessionRow(**vars(self))


# What only reads a session takes either: the ORM row, or the request path's snapshot.
AnySession = SessionRow | SessionSnapshot


class SessionRefusal(SQLModel, table=True):
    """One refusal that counts toward a session's deviation tripwire (scope, tier, escalation),
    written in the refusal's transaction. Counted over the policy's window; pruned with it."""

    __tablename__ = "session_refusals"

    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(max_length=64)
    reason: str = Field(max_length=64)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    at: datetime = _ts()

    __table_args__ = (Index("ix_session_refusals_session_at", "session_id", "at"),)


class Lease(SQLModel, table=True):
    """One capability. `id` is the capability id (and the native token's jti)."""

    __tablename__ = "leases"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", index=True, max_length=64)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    tier: str = Field(max_length=32)
    provider: str = Field(max_length=32)
    # minting -> active -> revoked | expired ; minting -> failed ; active -> revoke_pending -> revoked | expired
    status: str = Field(default="minting", max_length=16)
    status_reason: str | None = Field(default=None, max_length=256)
    ttl_seconds: int
    purpose: str = Field(sa_column=Column(Text, nullable=False))
    tool: str | None = Field(default=None, max_length=128)
    parameters: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = _ts()
    expires_at: datetime = _ts()  # the lease's end: the sweeper revokes at this moment
    minted_at: datetime | None = _ts(default=None)
    backend_expires_at: datetime | None = _ts(default=None)
    ended_at: datetime | None = _ts(default=None)
    handle: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # non-secret
    sealed_secret: str | None = Field(default=None, sa_column=Column(Text))  # AES-GCM, AD = id
    fingerprint: str | None = Field(default=None, max_length=80, index=True)  # RFC 7009 finds provider tokens by it
    revoke_reason: str | None = Field(default=None, max_length=128)  # why it is being revoked
    revoke_attempts: int = 0
    next_attempt_at: datetime | None = _ts(default=None)
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = _ts(default=None)
    # When the live permission re-check last asked the human's live source about this lease
    # (None: not since mint). Setting it is also how a replica claims the lease for a check.
    live_checked_at: datetime | None = _ts(default=None)

    __table_args__ = (
        # The sweeper's only query: what is due, oldest first. Cost follows what expires.
        Index("ix_leases_status_expires", "status", "expires_at"),
        Index("ix_leases_session_status", "session_id", "status"),
        # Escalation: does the session hold a live lease of this tier? One index probe (0007).
        Index("ix_leases_session_tier_status", "session_id", "tier", "status"),
    )


@dataclass
class NewLease:
    """A lease as a request creates it, before its row exists: the columns it sets, in a plain
    dataclass (building the ORM object would cost more CPU than the INSERT that writes it). The
    columns it leaves out take their defaults. `leases/service.py` inserts it with Core SQL."""

    id: str
    session_id: str
    resource: str
    access: str
    tier: str
    provider: str
    status: str
    ttl_seconds: int
    purpose: str
    tool: str | None
    parameters: dict[str, Any] | None
    created_at: datetime
    expires_at: datetime
    status_reason: str | None = None
    minted_at: datetime | None = None
    backend_expires_at: datetime | None = None
    ended_at: datetime | None = None
    handle: dict[str, Any] | None = None
    sealed_secret: str | None = None
    fingerprint: str | None = None
    revoke_attempts: int = 0


class Approval(SQLModel, table=True):
    __tablename__ = "approvals"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", index=True, max_length=64)
    request_hash: str = Field(max_length=80)  # binds the approval to the exact request
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    tier: str = Field(max_length=32)
    ttl_seconds: int
    purpose: str = Field(sa_column=Column(Text, nullable=False))
    tool: str | None = Field(default=None, max_length=128)
    parameters: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    reason: str = Field(max_length=64)  # approval-required | escalation-requires-approval
    approvers: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending | approved | denied | expired | used
    created_at: datetime = _ts()
    expires_at: datetime = _ts()
    decided_by: str | None = Field(default=None, max_length=320)
    decided_at: datetime | None = _ts(default=None)
    # Added by 0003: what the approver is shown, and how the approval was used.
    human: str | None = Field(default=None, max_length=320)  # the session's delegating human
    binding_message: str | None = Field(default=None, sa_column=Column(Text))
    min_approvals: int = 1  # distinct approvers needed, from the tier at request time
    decision_reason: str | None = Field(default=None, sa_column=Column(Text))  # the deny's (or last approve's) reason
    used_at: datetime | None = _ts(default=None)
    capability_id: str | None = Field(default=None, max_length=64)  # the capability it was used for
    justification: str | None = Field(default=None, sa_column=Column(Text))  # break-glass: the agent's written reason (0010)

    __table_args__ = (Index("ix_approvals_status", "status", "expires_at"),)


class BreakGlassReview(SQLModel, table=True):
    """The post-review of one break-glass use (broker/breakglass/): opened at the mint, closed by
    a reviewer with a verdict; open past `due_at` it is overdue (metric, audit)."""

    __tablename__ = "breakglass_reviews"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(max_length=64, index=True)
    approval_id: str = Field(max_length=64)
    capability_id: str = Field(max_length=64)
    human: str = Field(max_length=320)
    agent: str = Field(max_length=128)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    justification: str = Field(sa_column=Column(Text, nullable=False))
    approved_by: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    reviewers: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="open", max_length=16)  # open | closed
    used_at: datetime = _ts()
    due_at: datetime = _ts()
    overdue_noted_at: datetime | None = _ts(default=None)  # when the audit was told it is overdue
    verdict: str | None = Field(default=None, max_length=32)  # appropriate | inappropriate
    note: str | None = Field(default=None, sa_column=Column(Text))
    closed_by: str | None = Field(default=None, max_length=320)
    closed_at: datetime | None = _ts(default=None)

    __table_args__ = (Index("ix_breakglass_reviews_status_due", "status", "due_at"),)


class ApprovalDecision(SQLModel, table=True):
    """One human's vote on one approval; the primary key makes N approvals N distinct people."""

    __tablename__ = "approval_decisions"

    approval_id: str = Field(primary_key=True, foreign_key="approvals.id", max_length=64)
    approver: str = Field(primary_key=True, max_length=320)  # lowercased email
    decision: str = Field(max_length=16)  # approve | deny
    reason: str | None = Field(default=None, sa_column=Column(Text))
    decided_at: datetime = _ts()


class JitGrant(SQLModel, table=True):
    """A human's pre-approval of (resource, access) for one session, good for `uses` capabilities."""

    __tablename__ = "grants"

    id: str = Field(primary_key=True, max_length=64)
    session_id: str = Field(foreign_key="sessions.id", max_length=64)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    tier: str = Field(max_length=32)
    granted_by: str = Field(max_length=320)
    uses: int
    uses_left: int
    status: str = Field(default="active", max_length=16)  # active | used_up | expired | revoked
    reason: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = _ts()
    expires_at: datetime = _ts()  # the pre-approval's end; nothing minted under it outlives it

    __table_args__ = (Index("ix_grants_session_match", "session_id", "resource", "access", "status"),)


class OutboxMessage(SQLModel, table=True):
    """A message to push, written in the transaction of the change it announces (broker/outbox.py).

    One row per (event, destination): each destination is retried on its own. `kind` says how
    it is sent: `approval` (HMAC-signed JSON notification; `body` is the exact JSON sent) or `set`
    (a Security Event Token; `body` is its claims, signed with the broker's key at send time).
    Signatures are made at send time so a retry is never stale.
    """

    __tablename__ = "outbox"

    id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(default="approval", max_length=16)  # approval | set (0008)
    event_id: str = Field(max_length=64)  # the same for every destination: receivers dedupe on it
    type: str = Field(max_length=64)
    receiver: str | None = Field(default=None, max_length=64)  # set: the configured receiver's name (0008)
    url: str = Field(sa_column=Column(Text, nullable=False))
    body: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="pending", max_length=16)  # pending | delivered | dead
    attempts: int = 0
    next_attempt_at: datetime = _ts()
    last_error: str | None = Field(default=None, max_length=512)
    created_at: datetime = _ts()
    delivered_at: datetime | None = _ts(default=None)
    claimed_by: str | None = Field(default=None, max_length=64)
    claimed_until: datetime | None = _ts(default=None)

    __table_args__ = (Index("ix_outbox_due", "status", "next_attempt_at"),)


class IdempotencyRecord(SQLModel, table=True):
    __tablename__ = "idempotency_keys"

    session_id: str = Field(primary_key=True, max_length=64)
    key: str = Field(primary_key=True, max_length=255)
    request_hash: str = Field(max_length=80)
    state: str = Field(default="in_progress", max_length=16)  # in_progress | done
    response_status: int | None = None
    sealed_response: str | None = Field(default=None, sa_column=Column(Text))  # may hold a credential
    created_at: datetime = _ts()
    expires_at: datetime = _ts(index=True)


class AuditRecord(SQLModel, table=True):
    """One link of the hash chain. `record` is the canonical JSON that was hashed."""

    __tablename__ = "audit_records"

    seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    event_id: str = Field(max_length=64)
    timestamp: str = Field(max_length=40)
    type: str = Field(max_length=64, index=True)
    session_id: str | None = Field(default=None, max_length=64, index=True)
    human_principal: str | None = Field(default=None, max_length=320)
    outcome: str = Field(max_length=64)
    record: str = Field(sa_column=Column(Text, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64)
    # The chain this record extends (`session:<id>`, or one of the broker's own chains) and its
    # place in it; both are also in `record`. NULL on records written before chains (0007):
    # those form the one legacy chain, in seq order, whose tip is `audit_head`.
    chain_id: str | None = Field(default=None, max_length=80)
    chain_pos: int | None = None
    # PostgreSQL: the writing transaction's id (pg_current_xact_id), which tells the linker when
    # every transaction that could still add a record below a watermark has finished.
    txid: int | None = Field(default=None, sa_type=BigInteger, index=True)

    __table_args__ = (
        UniqueConstraint("event_id", name="uq_audit_event_id"),
        Index("uq_audit_chain_pos", "chain_id", "chain_pos", unique=True),
    )


class AuditHead(SQLModel, table=True):
    """A single row: the chain's tip. Appending locks it, which orders the chain."""

    __tablename__ = "audit_head"

    id: int = Field(default=1, primary_key=True)
    seq: int = 0
    hash: str = Field(default="0" * 64, max_length=64)


class AuditChain(SQLModel, table=True):
    """The tip of one chain (a session's, or one of the broker's own). Appending locks only
    this row, so sessions never wait for each other."""

    __tablename__ = "audit_chains"

    chain_id: str = Field(primary_key=True, max_length=80)
    length: int = 0
    head: str = Field(default="0" * 64, max_length=64)


class AuditLeaf(SQLModel, table=True):
    """A record's place (leaf index, from 0) in the log-wide Merkle tree, set by the linker."""

    __tablename__ = "audit_leaves"

    leaf_index: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    seq: int = Field(unique=True)


class AuditTree(SQLModel, table=True):
    """A single row, written by the linker only (never on the request path): the tree's size,
    the roots of its perfect subtrees (the frontier) and how far linking has got."""

    __tablename__ = "audit_tree"

    id: int = Field(default=1, primary_key=True)
    size: int = 0
    frontier: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    watermark: int | None = Field(default=None, sa_type=BigInteger)


class AuditCheckpoint(SQLModel, table=True):
    """A signed checkpoint (C2SP signed note) of the tree: size, root, time, Ed25519 signature."""

    __tablename__ = "audit_checkpoints"

    tree_size: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    root_hash: str = Field(max_length=64)
    timestamp: str = Field(max_length=40)
    note: str = Field(sa_column=Column(Text, nullable=False))


class AuditCosignature(SQLModel, table=True):
    """A witness's verified cosignature/v1 line on one checkpoint (C2SP tlog-cosignature)."""

    __tablename__ = "audit_cosignatures"

    tree_size: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    witness: str = Field(primary_key=True, max_length=300)  # <name>+<hex key id>
    timestamp: int = Field(sa_type=BigInteger)  # the witness's, from the cosignature
    line: str = Field(sa_column=Column(Text, nullable=False))  # the signature line, without its newline
    received_at: datetime = _ts()


class AuditWitnessState(SQLModel, table=True):
    """What the broker knows of one configured witness: the largest tree size it cosigned, and
    the last checkpoint it refused (and why), so a refusal is reported once, not every round."""

    __tablename__ = "audit_witness_state"

    witness: str = Field(primary_key=True, max_length=300)
    cosigned_size: int = Field(default=0, sa_type=BigInteger)
    refused_size: int | None = Field(default=None, sa_type=BigInteger)
    refused_reason: str | None = Field(default=None, max_length=512)
    updated_at: datetime = _ts()


class SsfStream(SQLModel, table=True):
    """An OpenID SSF 1.0 stream a receiver created: where and how its SETs go (broker/ssf/)."""

    __tablename__ = "ssf_streams"

    id: str = Field(primary_key=True, max_length=64)
    receiver: str = Field(max_length=63, index=True)  # the authenticated receiver that owns it
    audience: str = Field(max_length=255)
    description: str | None = Field(default=None, max_length=255)
    delivery_method: str = Field(max_length=64)  # urn:ietf:rfc:8935 (push) | urn:ietf:rfc:8936 (poll)
    endpoint_url: str | None = Field(default=None, max_length=2048)  # push only: the receiver's
    authorization_header: str | None = Field(default=None, sa_column=Column(Text, nullable=True))  # sealed
    events_requested: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    events_delivered: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="enabled", max_length=16)  # enabled | paused | disabled
    status_reason: str | None = Field(default=None, max_length=256)
    verified_at: datetime | None = _ts(default=None)  # the last verification request: min_verification_interval
    created_at: datetime = _ts()
    updated_at: datetime = _ts()


class SsfSubject(SQLModel, table=True):
    """A subject a receiver added to its stream: only events about added subjects go to it."""

    __tablename__ = "ssf_subjects"
    __table_args__ = (UniqueConstraint("stream_id", "subject_key"),)

    id: int | None = Field(default=None, primary_key=True)
    stream_id: str = Field(max_length=64, index=True)
    subject_key: str = Field(max_length=1100)  # canonical JSON of the subject
    added_at: datetime = _ts()


class SsfEvent(SQLModel, table=True):
    """A SET waiting for its stream: a poll stream's until acknowledged (RFC 8936), a paused
    push stream's until it is enabled again. The claims; signed when handed out."""

    __tablename__ = "ssf_events"

    jti: str = Field(primary_key=True, max_length=64)
    stream_id: str = Field(max_length=64, index=True)
    body: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = _ts(index=True)


class WebhookDelivery(SQLModel, table=True):
    """Event ids already processed: a replayed delivery is refused, a duplicate is a no-op."""

    __tablename__ = "webhook_deliveries"

    event_id: str = Field(primary_key=True, max_length=128)
    received_at: datetime = _ts(index=True)


class BrowserSession(SQLModel, table=True):
    """A browser signed in to the console (or on its way to sign in). The cookie holds only a
    random id; this row is keyed by its SHA-256, so a copy of the table opens no browser."""

    __tablename__ = "browser_sessions"

    id_hash: str = Field(primary_key=True, max_length=64)
    principal: str | None = Field(default=None, max_length=320)  # lowercased email once signed in
    groups: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))  # the IdP's, at sign-in
    via: str | None = Field(default=None, max_length=16)  # oidc | local-token
    csrf_token: str = Field(max_length=64)  # the synchronizer token every form of this browser carries
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))  # OAuth state, flash
    created_at: datetime = _ts()
    last_seen_at: datetime = _ts()
    expires_at: datetime = _ts(index=True)


class DpopProofSeen(SQLModel, table=True):
    """RFC 9449 replay protection: each DPoP proof's `jti` (hashed) is accepted once, until its window closes."""

    __tablename__ = "dpop_proofs_seen"

    jti_hash: str = Field(primary_key=True, max_length=64)
    expires_at: datetime = _ts(index=True)


class OAuthAuthorization(SQLModel, table=True):
    """One authorization request of an MCP client (authorization code + PKCE), from the redirect
    to the code's single redemption: pending -> approved (a code exists) -> redeemed, or denied.
    The code is kept as its SHA-256 only."""

    __tablename__ = "oauth_authorizations"

    id: str = Field(primary_key=True, max_length=40)  # "az_" + 32 hex, in the consent URL
    client_id: str = Field(max_length=2048)
    client_name: str | None = Field(default=None, max_length=256)
    agent: str = Field(max_length=128)
    redirect_uri: str = Field(max_length=2048)
    state: str | None = Field(default=None, max_length=1024)
    code_challenge: str = Field(max_length=128)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    scope: str = Field(max_length=1024)  # the scope asked for, as asked
    status: str = Field(max_length=16, index=True)
    human: str | None = Field(default=None, max_length=320)
    session_id: str | None = Field(default=None, max_length=40)
    approval_id: str | None = Field(default=None, max_length=40)
    code_hash: str | None = Field(default=None, max_length=64, unique=True)
    created_at: datetime = _ts()
    expires_at: datetime = _ts(index=True)


class OAuthRefreshToken(SQLModel, table=True):
    """A refresh token (SHA-256 only), bound to its session, client, resource and access.
    Rotated on each use: the old one becomes `rotated`, and presenting a rotated one again
    revokes the whole family (RFC 9700 section 4.14.2)."""

    __tablename__ = "oauth_refresh_tokens"

    token_hash: str = Field(primary_key=True, max_length=64)
    family: str = Field(max_length=40, index=True)
    session_id: str = Field(max_length=40, index=True)
    client_id: str = Field(max_length=2048)
    resource: str = Field(max_length=512)
    access: str = Field(max_length=64)
    scope: str = Field(max_length=1024)
    status: str = Field(max_length=16)  # active | rotated | revoked
    created_at: datetime = _ts()
    expires_at: datetime = _ts()
