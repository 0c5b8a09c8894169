"""Witness cosigning of the audit checkpoints (C2SP tlog-witness, tlog-cosignature).

Each round (a loop beside the linker) takes the newest signed checkpoint to every configured
witness (`BROKER_AUDIT_WITNESSES`) that has not cosigned it yet:

    POST <witness>/add-checkpoint
    old <size the witness last cosigned for us>\\n
    <consistency proof from that size, one base64 hash a line>\\n
    \\n
    <the checkpoint, a signed note>

- 200: the body is cosignature lines; the ones by the witness's key are verified
  (cosignature/v1 over the checkpoint's text) and stored (`audit_cosignatures`). A body with
  no valid cosignature by its key is a refusal (`bad-cosignature`).
- 409 with `text/x.tlog.size`: the witness has cosigned another size. The broker sends again
  once, with a proof from that size. A second 409, or a witness size beyond this checkpoint's,
  is a refusal (`conflict`): the witness holds a tree this log does not extend.
- 422: the witness found the consistency proof wrong: what it cosigned before is not a prefix
  of this checkpoint's tree, that is, history was rewritten (`not-consistent`).
- 403: the witness does not trust the broker's checkpoint key (`untrusted-key`); 404: it does
  not know the origin (`unknown-origin`); 400: it found the request malformed (`bad-request`).
- Anything else (timeouts, 5xx) is tried again next round, logged at warning.

A refusal is loud: `broker_audit_witness_refusals_total{witness, reason}`, an error log line and
an `audit.witness-refused` record, once per (witness, checkpoint): the witness's state row keeps
the refused size, and the next checkpoint is tried afresh. One replica submits at a time (a
PostgreSQL advisory lock, tried, like the linker's), so two replicas never race a witness into
a 409 that would look like a conflict.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass

import httpx
from sqlalchemy import text
from sqlmodel import col, select

from broker.audit import note as notes
from broker.audit import service as audit
from broker.audit.context import AuditContext
from broker.audit.events import AuditEvent, RequestRef
from broker.audit.linker import latest_checkpoint
from broker.audit.merkle import consistency_proof
from broker.audit.note import AuditWitness
from broker.audit.sql import audit_sql
from broker.audit.verification import leaf_hashes
from broker.db import transaction, utcnow
from broker.metrics import WITNESS_REFUSALS, WITNESS_SUBMISSIONS
from broker.models import AuditCheckpoint, AuditCosignature, AuditWitnessState
from broker.periodic import Periodic

log = logging.getLogger("broker.audit.witness")

SIZE_MEDIA_TYPE = "text/x.tlog.size"
_LOCK_KEY = 0x6A69_7477_6974  # "jitwit": one replica submits at a time
MAX_PROOF_LINES = 63  # tlog-witness: a client never sends more
MAX_RESPONSE_LINES = 64  # cosignature lines read from one answer; the rest is ignored
REFUSAL_STATUS = {400: "bad-request", 403: "untrusted-key", 404: "unknown-origin", 422: "not-consistent"}
_EXPLAIN = {
    "bad-request": "the witness found the request malformed",
    "untrusted-key": "the witness does not trust the broker's checkpoint key (configure it with the broker's vkey)",
    "unknown-origin": "the witness does not know this log's origin",
    "not-consistent": ("the witness rejected the consistency proof: the tree it cosigned before is not a prefix "
                       "of this checkpoint's tree; the audit history was rewritten"),
}


@dataclass(frozen=True)
class Submission:
    """What one witness made of one checkpoint."""

    witness: str
    tree_size: int
    outcome: str  # cosigned | already | refused | failed | skipped
    reason: str | None = None  # a refusal's kebab-case reason
    problem: str | None = None
    witness_size: int | None = None


def body(old: int, proof: list[bytes], checkpoint_note: str) -> bytes:
    lines = [f"old {old}"] + [base64.b64encode(h).decode() for h in proof]
    return ("\n".join(lines) + "\n\n" + checkpoint_note).encode()


def submit_newest(broker: AuditContext, client: httpx.Client | None = None) -> list[Submission]:
    """One round: the newest checkpoint to every configured witness that has not cosigned it."""
    witnesses = broker.settings.audit_witness_list()
    if not witnesses:
        return []
    with audit_sql(broker.engine).one_replica(broker.engine, _LOCK_KEY) as ours:
        if not ours:
            return []
        cp = latest_checkpoint(broker)
        if cp is None:
            return []
        own = client is None
        client = client or httpx.Client(timeout=broker.settings.audit_witness_timeout_seconds,
                                        follow_redirects=False)
        try:
            return [submit(broker, w, cp, client) for w in witnesses]
        finally:
            if own:
                client.close()


def submit(broker: AuditContext, witness: AuditWitness, cp: AuditCheckpoint, client: httpx.Client) -> Submission:
    label = witness.label
    with transaction(broker.engine) as db:
        state = db.get(AuditWitnessState, label)
        done = db.get(AuditCosignature, (cp.tree_size, label))
    verifier = notes.parse_vkey(witness.vkey, types=(notes.COSIGNATURE_V1,))
    if done is not None and _valid(cp.note, done.line, verifier):
        return Submission(label, cp.tree_size, "already")
    if state is not None and state.refused_size == cp.tree_size:
        return Submission(label, cp.tree_size, "skipped", problem="refused before: " + (state.refused_reason or ""))
    old = state.cosigned_size if state is not None else 0
    if old > cp.tree_size:
        return _refused(broker, witness, cp, "conflict", f"the witness cosigned a tree of size {old}, larger than the "
                        f"newest checkpoint ({cp.tree_size}): the log was truncated", witness_size=old)
    for attempt in range(2):
        try:
            proof = _proof(broker, old, cp.tree_size)
        except LookupError as exc:
            log.error("cannot build a consistency proof from %d to %d for witness %s: %s", old, cp.tree_size, label, exc)
            WITNESS_SUBMISSIONS.labels(witness=label, outcome="failed").inc()
            return Submission(label, cp.tree_size, "failed", problem=str(exc))
        try:
            response = client.post(witness.url + "/add-checkpoint", content=body(old, proof, cp.note),
                                   headers={"Content-Type": "text/plain; charset=utf-8"})
        except httpx.HTTPError as exc:
            log.warning("witness %s unreachable: %s", label, exc.__class__.__name__)
            WITNESS_SUBMISSIONS.labels(witness=label, outcome="failed").inc()
            return Submission(label, cp.tree_size, "failed", problem=exc.__class__.__name__)
        status = response.status_code
        if status == 200:
            return _cosigned(broker, witness, verifier, cp, response.text)
        if status == 409:
            size = _size(response)
            if size is None:
                return _refused(broker, witness, cp, "conflict", "409 without a tree size", status=409)
            if attempt == 0 and size != old and size <= cp.tree_size:
                old = size  # tlog-witness: send again with a proof from the size the witness has
                continue
            why = (f"the witness cosigned a tree of size {size}, larger than this checkpoint: the log was truncated"
                   if size > cp.tree_size else
                   f"the witness cosigned a different tree of size {size}: the audit history was rewritten")
            return _refused(broker, witness, cp, "conflict", why, status=409, witness_size=size)
        if status in REFUSAL_STATUS:
            reason = REFUSAL_STATUS[status]
            return _refused(broker, witness, cp, reason, _EXPLAIN[reason], status=status, witness_size=old)
        log.warning("witness %s answered HTTP %d; trying again next round", label, status)
        WITNESS_SUBMISSIONS.labels(witness=label, outcome="failed").inc()
        return Submission(label, cp.tree_size, "failed", problem=f"HTTP {status}")
    raise AssertionError("unreachable: the second 409 returns")  # pragma: no cover


def _proof(broker: AuditContext, old: int, size: int) -> list[bytes]:
    if old == 0 or old == size:
        return []
    with transaction(broker.engine) as db:
        leaves = leaf_hashes(db, size)
    proof = consistency_proof(old, leaves)
    if len(proof) > MAX_PROOF_LINES:
        raise LookupError(f"a proof of {len(proof)} hashes is longer than tlog-witness allows")
    return proof


def _size(response: httpx.Response) -> int | None:
    if response.headers.get("content-type", "").split(";")[0].strip() != SIZE_MEDIA_TYPE:
        return None
    line = response.text[:32]
    if not line.endswith("\n") or not line[:-1].isdigit() or (line[0] == "0" and len(line) > 2):
        return None
    return int(line[:-1])


def _cosigned(broker: AuditContext, witness: AuditWitness, verifier: notes.Verifier, cp: AuditCheckpoint,
              answer: str) -> Submission:
    label = witness.label
    note_text, _ = notes.split(cp.note)
    found: tuple[int, str] | None = None
    problem = "no cosignature by its key in the answer"
    for line in answer.split("\n")[:MAX_RESPONSE_LINES]:
        if not line:
            continue
        try:
            sig = notes.parse_signature(line)
        except notes.NoteError:
            continue  # tlog-witness: lines that are not ours are ignored
        if not verifier.matches(sig):
            continue
        try:
            found = (notes.verify_cosignature(note_text, sig, verifier), line)
            break
        except notes.NoteError as exc:
            problem = str(exc)
    if found is None:
        return _refused(broker, witness, cp, "bad-cosignature", problem, status=200)
    now = utcnow()
    with transaction(broker.engine) as db:
        row = db.get(AuditCosignature, (cp.tree_size, label))
        if row is None:  # (one for another tree of this size, left by a rewrite, is replaced)
            row = AuditCosignature(tree_size=cp.tree_size, witness=label, timestamp=0, line="", received_at=now)
        row.timestamp, row.line, row.received_at = found[0], found[1], now
        db.add(row)
        state = db.get(AuditWitnessState, label) or AuditWitnessState(witness=label, updated_at=now)
        state.cosigned_size, state.refused_size, state.refused_reason = cp.tree_size, None, None
        state.updated_at = now
        db.add(state)
    WITNESS_SUBMISSIONS.labels(witness=label, outcome="cosigned").inc()
    log.info("witness %s cosigned the checkpoint of size %d", label, cp.tree_size)
    return Submission(label, cp.tree_size, "cosigned")


def _refused(broker: AuditContext, witness: AuditWitness, cp: AuditCheckpoint, reason: str, problem: str, *,
             status: int | None = None, witness_size: int | None = None) -> Submission:
    label = witness.label
    now = utcnow()
    with transaction(broker.engine) as db:
        state = db.get(AuditWitnessState, label) or AuditWitnessState(witness=label, updated_at=now)
        state.refused_size, state.refused_reason, state.updated_at = cp.tree_size, f"{reason}: {problem}"[:512], now
        db.add(state)
        audit.append(db, AuditEvent(
            type="audit.witness-refused", outcome="refused", actor="broker:witness",
            request=RequestRef(operation="audit.witness", reason=reason),
            detail={"witness": label, "url": witness.url, "tree_size": cp.tree_size, "root_hash": cp.root_hash,
                    "http_status": status, "witness_size": witness_size, "problem": problem}))
    WITNESS_SUBMISSIONS.labels(witness=label, outcome="refused").inc()
    WITNESS_REFUSALS.labels(witness=label, reason=reason).inc()
    log.error("AUDIT WITNESS %s REFUSED the checkpoint of size %d (%s): %s", label, cp.tree_size, reason, problem)
    return Submission(label, cp.tree_size, "refused", reason, problem, witness_size)


def _valid(checkpoint_note: str, line: str, verifier: notes.Verifier) -> bool:
    try:
        note_text, _ = notes.split(checkpoint_note)
        notes.verify_cosignature(note_text, notes.parse_signature(line), verifier)
    except notes.NoteError:
        return False
    return True


def cosignatures(broker: AuditContext, cp: AuditCheckpoint) -> list[AuditCosignature]:
    """The stored cosignatures of one checkpoint that verify on it, by witnesses configured now
    (a row left for another tree of the same size, or by a witness since removed, is not served)."""
    verifiers = {w.label: notes.parse_vkey(w.vkey) for w in broker.settings.audit_witness_list()}
    with transaction(broker.engine) as db:
        rows = db.connection().execute(
            text("SELECT witness, timestamp, line, received_at FROM audit_cosignatures WHERE tree_size = :n "
                 "ORDER BY witness"), {"n": cp.tree_size}).all()
    return [AuditCosignature(tree_size=cp.tree_size, witness=r[0], timestamp=int(r[1]), line=r[2], received_at=r[3])
            for r in rows if r[0] in verifiers and _valid(cp.note, r[2], verifiers[r[0]])]


def cosigned_note(broker: AuditContext, cp: AuditCheckpoint) -> tuple[str, list[AuditCosignature]]:
    """The checkpoint with its witnesses' cosignature lines after the broker's signature."""
    rows = cosignatures(broker, cp)
    return cp.note + "".join(r.line + "\n" for r in rows), rows


def states(broker: AuditContext) -> list[AuditWitnessState]:
    with transaction(broker.engine) as db:
        return list(db.exec(select(AuditWitnessState).order_by(col(AuditWitnessState.witness))).all())


def witness_loop(broker: AuditContext) -> Periodic:
    """The background loop, beside the linker: a round every `audit_witness_interval_seconds`."""
    return Periodic("broker-audit-witness", broker.settings.audit_witness_interval_seconds,
                    lambda: submit_newest(broker), log)
