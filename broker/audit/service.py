"""Appending audit records inside the caller's transaction, and reading them back.

Each session's records form their own hash chain, and records without a session go to one of a
few broker chains. Appending locks only the chain's tip row in `audit_chains` (for a session:
one more row beside the session row the decision already holds), so no two sessions wait for
each other: nothing on the request path is shared by the whole cluster. The record number `seq`
comes from a PostgreSQL sequence (never waits; gaps where a transaction rolled back) or, on
SQLite, whose writers are serialised anyway, from max(seq) + 1. The background linker
(`broker/audit/linker.py`) then folds committed records into the log-wide Merkle tree and signs
checkpoints of it. The record commits (or rolls back) together with the state change it
describes; if the append fails, the caller's transaction fails with it: fail closed.
Checking what was written is `broker/audit/verification.py`'s.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from broker.audit.chain import (
    GENESIS,
    canonical_json,
    chain_hash,
)
from broker.audit.events import AuditEvent
from broker.audit.sql import audit_sql
from broker.db import utcnow
from broker.errors import AuditWriteFailed
from broker.models import AuditHead, AuditRecord
from broker.times import rfc3339_precise

log = logging.getLogger("broker.audit")

BROKER_CHAINS = 8  # chains for records without a session (policy loads, webhooks, admin actions)


def chain_of(session_id: str | None, broker_chain: int) -> str:
    return f"session:{session_id}" if session_id else f"broker:{broker_chain}"


def append(db: Session, event: AuditEvent, *, now: datetime | None = None) -> None:
    append_many(db, [event], now=now)


def append_many(db: Session, events: list[AuditEvent], *, now: datetime | None = None) -> None:
    """Core SQL, and the caller's pending ORM changes flushed first. The tip rows of the chains
    written are locked (in chain order, so two appenders never deadlock on them) and held until
    the caller commits. One record in one chain costs two statements on PostgreSQL (take the tip;
    write the record and the new tip); a teardown of a thousand leases of one session takes its
    chain once."""
    if not events:
        return
    now = now or utcnow()
    broker_chain = secrets.randbelow(BROKER_CHAINS)
    chains = [chain_of(e.agent.session_id, broker_chain) for e in events]
    counts: dict[str, int] = {}
    for c in chains:
        counts[c] = counts.get(c, 0) + 1
    try:
        db.flush()
        conn = db.connection()
        sql = audit_sql(conn)
        tips, seqs, txid = sql.take_tips(conn, counts)
        records = []
        for event, c, seq in zip(events, chains, seqs, strict=True):
            before, prev_hash = tips[c]
            body = _body(event, seq, now)
            body["chain_id"], body["chain_pos"] = c, before + 1
            canonical = canonical_json(body)
            digest = chain_hash(prev_hash, canonical)
            records.append({
                "seq": seq, "event_id": body["event_id"], "timestamp": body["timestamp"], "type": event.type,
                "session_id": event.agent.session_id, "human_principal": event.human_principal,
                "outcome": event.outcome, "record": canonical, "prev_hash": prev_hash, "hash": digest,
                "chain_id": c, "chain_pos": before + 1, "txid": txid,
            })
            tips[c] = (before + 1, digest)
        sql.write(conn, records, {c: tip[1] for c, tip in tips.items()})
    except SQLAlchemyError as exc:
        log.error("audit append failed: %s", exc.__class__.__name__)
        raise AuditWriteFailed("the audit record could not be written; the request was not carried out") from exc
    log.debug("audit %d record(s) up to seq=%d", len(events), seqs[-1])


@dataclass(frozen=True)
class RecordTemplate:
    """One record whose chain position and seq only the database will know: its canonical JSON
    in three pieces, `pieces[0] + str(chain_pos) + pieces[1] + str(seq) + pieces[2]`, and the
    columns copied out of it. The store joins and hashes it where it takes the chain's tip
    (`chain_hash`, byte for byte: migration 0013 on PostgreSQL)."""

    chain_id: str
    pieces: tuple[str, str, str]
    event_id: str
    timestamp: str
    type: str
    session_id: str | None
    human_principal: str | None
    outcome: str

    def record(self, chain_pos: int, seq: int) -> str:
        return f"{self.pieces[0]}{chain_pos}{self.pieces[1]}{seq}{self.pieces[2]}"


def record_template(event: AuditEvent, *, now: datetime | None = None) -> RecordTemplate:
    """`event` as a session chain's next record will hold it, but for its position and seq."""
    assert event.agent.session_id, "a template is for a session's chain"  # noqa: S101  # callers pass session events only
    chain = chain_of(event.agent.session_id, 0)
    marker = uuid.uuid4().hex  # stands in for the two numbers; never inside a record otherwise
    body = _body(event, 0, now or utcnow())
    body["seq"], body["chain_id"], body["chain_pos"] = f"seq-{marker}", chain, f"pos-{marker}"
    canonical = canonical_json(body)
    head, rest = canonical.split(f'"pos-{marker}"')
    middle, tail = rest.split(f'"seq-{marker}"')
    return RecordTemplate(chain, (head, middle, tail), body["event_id"], body["timestamp"], event.type,
                          event.agent.session_id, event.human_principal, event.outcome)


def append_template(db: Session, template: RecordTemplate) -> None:
    """`append` for a template (the SQLite store; PostgreSQL does this in migration 0013's
    function): take the chain's tip, write the record and the new tip."""
    conn = db.connection()
    sql = audit_sql(conn)
    tips, [seq], txid = sql.take_tips(conn, {template.chain_id: 1})
    before, prev_hash = tips[template.chain_id]
    record = template.record(before + 1, seq)
    digest = chain_hash(prev_hash, record)
    sql.write(conn, [{
        "seq": seq, "event_id": template.event_id, "timestamp": template.timestamp, "type": template.type,
        "session_id": template.session_id, "human_principal": template.human_principal, "outcome": template.outcome,
        "record": record, "prev_hash": prev_hash, "hash": digest, "chain_id": template.chain_id,
        "chain_pos": before + 1, "txid": txid,
    }], {template.chain_id: digest})


def _body(event: AuditEvent, seq: int, now: datetime) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "seq": seq, "timestamp": rfc3339_precise(now), **event.fields()}


def ensure_head(db: Session) -> None:
    if db.get(AuditHead, 1) is None:
        db.add(AuditHead(id=1, seq=0, hash=GENESIS))
        db.flush()


def lock_head(db: Session) -> None:
    """Take the `audit_head` row lock, to check-then-append a `policy.loaded` record (replicas
    starting together: one of them records the change). Appending no longer takes it (each
    chain has its own tip row), so only policy loads wait on it, not the request path."""
    db.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()


def last_policy_loaded(db: Session) -> dict[str, Any] | None:
    """The `detail` of the newest `policy.loaded` record, or None if there is none."""
    row = db.exec(select(AuditRecord).where(AuditRecord.type == "policy.loaded")
                  .order_by(col(AuditRecord.seq).desc()).limit(1)).first()
    if row is None:
        return None
    detail = json.loads(row.record).get("detail") or {}
    return detail if isinstance(detail, dict) else None


def query(
    db: Session, *, session_id: str | None = None, since_seq: int = 0, limit: int = 100, types: list[str] | None = None,
    newest: bool = False,
) -> list[AuditRecord]:
    """Records after `since_seq` in seq order: the first `limit` of them, or with `newest` the last."""
    stmt = select(AuditRecord).where(AuditRecord.seq > since_seq)
    if session_id:
        stmt = stmt.where(AuditRecord.session_id == session_id)
    if types:
        stmt = stmt.where(col(AuditRecord.type).in_(types))
    if newest:
        return list(reversed(db.exec(stmt.order_by(col(AuditRecord.seq).desc()).limit(limit)).all()))
    return list(db.exec(stmt.order_by(col(AuditRecord.seq)).limit(limit)).all())


__all__ = ["AuditEvent", "append", "append_many", "ensure_head", "query"]
