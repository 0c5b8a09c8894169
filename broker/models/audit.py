"""The audit log's tables: the hash-chained records, the chain heads, the Merkle tree's leaves
and nodes, signed checkpoints, witnesses' cosignatures and what each witness has seen.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from broker.models.columns import ts


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
    received_at: datetime = ts()


class AuditWitnessState(SQLModel, table=True):
    """What the broker knows of one configured witness: the largest tree size it cosigned, and
    the last checkpoint it refused (and why), so a refusal is reported once, not every round."""

    __tablename__ = "audit_witness_state"

    witness: str = Field(primary_key=True, max_length=300)
    cosigned_size: int = Field(default=0, sa_type=BigInteger)
    refused_size: int | None = Field(default=None, sa_type=BigInteger)
    refused_reason: str | None = Field(default=None, max_length=512)
    updated_at: datetime = ts()
