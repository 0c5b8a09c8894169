"""Appending audit records inside the caller's transaction, and reading them back.

Appending locks the single `audit_head` row, so the chain has one order even across replicas;
the record commits (or rolls back) together with the state change it describes. If the
append fails, the caller's transaction fails with it: fail closed.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from broker.audit.chain import GENESIS, StoredLink, VerifyResult, canonical_json, chain_hash, verify_links
from broker.audit.events import AuditEvent
from broker.db import utcnow
from broker.errors import AuditWriteFailed
from broker.models import AuditHead, AuditRecord
from broker.times import rfc3339_precise

log = logging.getLogger("broker.audit")


def append(db: Session, event: AuditEvent, *, now: datetime | None = None) -> None:
    append_many(db, [event], now=now)


def append_many(db: Session, events: list[AuditEvent], *, now: datetime | None = None) -> None:
    """Core SQL, and the caller's pending ORM changes flushed first: the head row is locked
    by the first statement here and held only until the caller commits. N records cost three
    statements, so a teardown of a thousand leases takes the head once."""
    if not events:
        return
    now = now or utcnow()
    try:
        db.flush()
        conn = db.connection()
        # UPDATE ... RETURNING takes the row lock and reads the tip in one round trip; the hash
        # is unchanged by it, so RETURNING yields the previous record's hash.
        last_seq, prev_hash = conn.execute(_ADVANCE, {"n": len(events)}).one()
        rows = []
        for offset, event in enumerate(events):
            body = _body(event, last_seq - len(events) + 1 + offset, now)
            canonical = canonical_json(body)
            digest = chain_hash(prev_hash, canonical)
            rows.append({
                "seq": body["seq"], "event_id": body["event_id"], "timestamp": body["timestamp"], "type": event.type,
                "session_id": event.agent.session_id, "human_principal": event.human_principal,
                "outcome": event.outcome, "record": canonical, "prev_hash": prev_hash, "hash": digest,
            })
            prev_hash = digest
        conn.execute(_RECORDS.insert(), rows)
        conn.execute(_SET_TIP, {"hash": prev_hash})
    except SQLAlchemyError as exc:
        log.error("audit append failed: %s", exc.__class__.__name__)
        raise AuditWriteFailed("the audit record could not be written; the request was not carried out") from exc
    log.debug("audit %d record(s) up to seq=%d", len(events), last_seq)


def _body(event: AuditEvent, seq: int, now: datetime) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "seq": seq, "timestamp": rfc3339_precise(now), **event.fields()}


_ADVANCE = text("UPDATE audit_head SET seq = seq + :n WHERE id = 1 RETURNING seq, hash")
_SET_TIP = text("UPDATE audit_head SET hash = :hash WHERE id = 1")
_RECORDS = AuditRecord.__table__  # type: ignore[attr-defined]  # SQLModel sets __table__ at class creation


def ensure_head(db: Session) -> None:
    if db.get(AuditHead, 1) is None:
        db.add(AuditHead(id=1, seq=0, hash=GENESIS))
        db.flush()


def lock_head(db: Session) -> None:
    """Take the chain's head row lock now (appending would take it anyway), to check-then-append."""
    db.exec(select(AuditHead).where(AuditHead.id == 1).with_for_update()).first()


def last_policy_loaded(db: Session) -> dict[str, Any] | None:
    """The `detail` of the newest `policy.loaded` record, or None if there is none."""
    row = db.exec(select(AuditRecord).where(AuditRecord.type == "policy.loaded")
                  .order_by(col(AuditRecord.seq).desc()).limit(1)).first()
    if row is None:
        return None
    detail = json.loads(row.record).get("detail") or {}
    return detail if isinstance(detail, dict) else None


def iter_links(db: Session, *, batch: int = 1000) -> Iterator[StoredLink]:
    last = 0
    while True:
        rows = db.exec(select(AuditRecord).where(AuditRecord.seq > last).order_by(col(AuditRecord.seq)).limit(batch)).all()
        if not rows:
            return
        for r in rows:
            yield StoredLink(
                r.seq, r.event_id, r.timestamp, r.type, r.session_id, r.human_principal, r.outcome, r.record,
                r.prev_hash, r.hash,
            )
        last = rows[-1].seq


def verify(db: Session) -> VerifyResult:
    result = verify_links(iter_links(db))
    if result.ok:
        head = db.get(AuditHead, 1)
        tip = head.hash if head else GENESIS
        if tip != result.head_hash:
            # Records deleted from the end: the head still remembers the real tip.
            return VerifyResult(False, result.checked, result.checked + 1, None,
                                "chain is shorter than its head: records were removed")
    return result


@dataclass(frozen=True)
class RecordCheck:
    """One record's place in the chain: its hash recomputes, it links to its neighbours."""

    seq: int
    ok: bool
    problem: str | None = None


def check_records(db: Session, records: list[AuditRecord]) -> list[RecordCheck]:
    """Check a few records (a session's) where they sit in the one chain: each record's hash
    recomputes from its prev_hash and canonical body, its prev_hash is the hash of the record
    before it (seq - 1), and the record after it (seq + 1) names its hash. Costs a lookup per
    neighbour, not a walk of the whole log (`verify` is that, for admins and `audit verify`)."""
    seqs = {r.seq for r in records}
    neighbours = ({r.seq - 1 for r in records} | {r.seq + 1 for r in records}) - seqs
    known = {r.seq: r for r in records}
    if neighbours:
        for row in db.exec(select(AuditRecord).where(col(AuditRecord.seq).in_(sorted(neighbours)))).all():
            known[row.seq] = row
    head = db.get(AuditHead, 1)
    out = []
    for r in sorted(records, key=lambda x: x.seq):
        problem = None
        try:
            body = json.loads(r.record)
        except ValueError:
            body = None
        if not isinstance(body, dict) or canonical_json(body) != r.record:
            problem = "the record is not canonical JSON"
        elif chain_hash(r.prev_hash, r.record) != r.hash:
            problem = "the hash does not match the record's content"
        elif body.get("seq") != r.seq or (body.get("agent") or {}).get("session_id") != r.session_id:
            problem = "the indexed columns do not match the hashed record"
        elif r.seq == 1 and r.prev_hash != GENESIS:
            problem = "the first record does not start the chain"
        elif r.seq > 1 and (r.seq - 1 not in known or known[r.seq - 1].hash != r.prev_hash):
            problem = f"prev_hash does not match record {r.seq - 1}"
        elif r.seq + 1 in known and known[r.seq + 1].prev_hash != r.hash:
            problem = f"record {r.seq + 1} does not name this record's hash"
        elif r.seq + 1 not in known and not (head is not None and head.seq == r.seq and head.hash == r.hash):
            problem = f"record {r.seq + 1} is missing, or the chain's head does not end at this record"
        out.append(RecordCheck(r.seq, problem is None, problem))
    return out


def query(
    db: Session, *, session_id: str | None = None, since_seq: int = 0, limit: int = 100, types: list[str] | None = None
) -> list[AuditRecord]:
    stmt = select(AuditRecord).where(AuditRecord.seq > since_seq)
    if session_id:
        stmt = stmt.where(AuditRecord.session_id == session_id)
    if types:
        stmt = stmt.where(col(AuditRecord.type).in_(types))
    return list(db.exec(stmt.order_by(col(AuditRecord.seq)).limit(limit)).all())


__all__ = ["AuditEvent", "append", "ensure_head", "verify", "query", "iter_links", "check_records", "RecordCheck"]
