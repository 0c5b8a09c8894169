"""Checking the audit log: every chain record by record and its tip, the Merkle tree the linker
built and every stored checkpoint (`verify`, the whole log); a few records where they sit in
their chains (`check_records`, a session's timeline); the leaf hashes a consistency proof is
made of. Reads only, in the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import text
from sqlmodel import Session, col, select

from broker.audit import checkpoint as checkpoints
from broker.audit.chain import (
    GENESIS,
    LEGACY_CHAIN,
    ChainWalker,
    StoredLink,
    VerifyResult,
    canonical_json,
    chain_hash,
)
from broker.audit.merkle import EMPTY_ROOT, Frontier, leaf_hash
from broker.models import AuditChain, AuditCheckpoint, AuditHead, AuditRecord, AuditTree


def iter_links(db: Session, *, batch: int = 1000) -> Iterator[StoredLink]:
    last = 0
    while True:
        rows = db.exec(select(AuditRecord).where(AuditRecord.seq > last).order_by(col(AuditRecord.seq)).limit(batch)).all()
        if not rows:
            return
        for r in rows:
            yield _link(r)
        last = rows[-1].seq


def _link(r: AuditRecord) -> StoredLink:
    return StoredLink(r.seq, r.event_id, r.timestamp, r.type, r.session_id, r.human_principal, r.outcome, r.record,
                      r.prev_hash, r.hash, r.chain_id, r.chain_pos)


def verify(db: Session, keys: Mapping[str, Ed25519PublicKey] | None = None) -> VerifyResult:  # noqa: C901  # one pass that stops at the first break of chains, tree or checkpoints; split, the stop conditions scatter
    """Every chain record by record, every chain's tip, the Merkle tree the linker built, and every
    stored checkpoint's root (and, given the broker's public keys, its signature). Stops at the
    first problem and names the record (seq, event id) or the checkpoint (its tree size)."""
    walker = ChainWalker()
    for link in iter_links(db):
        problem = walker.check(link)
        if problem:
            return VerifyResult(False, walker.checked, link.seq, link.event_id, problem)

    def bad(problem: str, seq: int | None = None, checkpoint: int | None = None) -> VerifyResult:
        event_id = None
        if seq is not None:
            row = db.get(AuditRecord, seq)
            event_id = row.event_id if row else None
        return VerifyResult(False, walker.checked, seq, event_id, problem, bad_checkpoint=checkpoint)

    # The tree: leaves 0..n-1, each naming a record that exists, folded as the linker did.
    frontier = Frontier()
    checkpoints = list(db.exec(select(AuditCheckpoint).order_by(col(AuditCheckpoint.tree_size))).all())
    pending = iter(checkpoints)
    checkpoint = next(pending, None)
    while checkpoint is not None and checkpoint.tree_size == 0:
        if checkpoint.root_hash != EMPTY_ROOT.hex():
            return bad("checkpoint of the empty tree has the wrong root", checkpoint=0)
        checkpoint = next(pending, None)
    for leaf_index, seq, record_hash in _leaves(db):
        if leaf_index != frontier.size:
            return bad(f"leaf {frontier.size} is missing (next leaf is {leaf_index})", seq)
        if record_hash is None:
            return bad(f"leaf {leaf_index} names record seq={seq}, which is missing", seq)
        frontier.append(leaf_hash(record_hash))
        while checkpoint is not None and checkpoint.tree_size == frontier.size:
            problem = _checkpoint_problem(checkpoint, frontier.root(), keys)
            if problem:
                return bad(problem, checkpoint=checkpoint.tree_size)
            checkpoint = next(pending, None)
    if checkpoint is not None:
        return bad(f"checkpoint of size {checkpoint.tree_size} is beyond the tree's {frontier.size} leaves: "
                   "linked records were removed", checkpoint=checkpoint.tree_size)
    tree = db.get(AuditTree, 1)
    if tree is not None and (tree.size != frontier.size or tree.frontier != [h.hex() for h in frontier.hashes]):
        return bad(f"the linker's state (size {tree.size}) does not match the {frontier.size} leaves stored")

    # Tips: each chain ends where its tip row says; a tail deleted from a chain shows here.
    for tip in db.exec(select(AuditChain).order_by(col(AuditChain.chain_id))).all():
        pos, head, last = walker.tips.pop(tip.chain_id, (0, GENESIS, 0))
        if (pos, head) != (tip.length, tip.head):
            what = ("records were added around the broker" if pos > tip.length else
                    "records were removed from its end")
            return bad(f"chain {tip.chain_id} ends at position {pos} but its tip says {tip.length} records: {what}",
                       last or None)
    legacy_head = db.get(AuditHead, 1)
    pos, head, last = walker.tips.pop(LEGACY_CHAIN, (0, GENESIS, 0))
    if legacy_head is not None and (pos, head) != (legacy_head.seq, legacy_head.hash):
        return bad("chain is shorter than its head: records were removed", last + 1)
    for chain, (_, _, last) in walker.tips.items():
        return bad(f"chain {chain} has no tip row: its records were inserted around the broker", last)
    unlinked = db.exec(text("SELECT count(*) FROM audit_records r WHERE NOT EXISTS "  # type: ignore[call-overload]
                            "(SELECT 1 FROM audit_leaves l WHERE l.seq = r.seq)")).one()[0]
    return VerifyResult(True, walker.checked, chains=len(db.exec(select(AuditChain.chain_id)).all()) + (1 if pos else 0),
                        tree_size=frontier.size, root_hash=frontier.root().hex(), unlinked=int(unlinked))


def _leaves(db: Session, batch: int = 5000) -> Iterator[tuple[int, int, str | None]]:
    last = -1
    while True:
        rows = db.connection().execute(_LEAVES, {"after": last, "n": batch}).all()
        if not rows:
            return
        for row in rows:
            yield int(row[0]), int(row[1]), row[2]
        last = rows[-1][0]


_LEAVES = text("SELECT l.leaf_index, l.seq, r.hash FROM audit_leaves l LEFT JOIN audit_records r ON r.seq = l.seq "
               "WHERE l.leaf_index > :after ORDER BY l.leaf_index LIMIT :n")


def _checkpoint_problem(cp: AuditCheckpoint, root_now: bytes, keys: Mapping[str, Ed25519PublicKey] | None) -> str | None:
    if cp.root_hash != root_now.hex():
        return f"checkpoint of size {cp.tree_size}: its root hash does not match the tree's first {cp.tree_size} leaves"
    if keys is not None:
        try:
            parsed = checkpoints.parse(cp.note, keys)
        except checkpoints.CheckpointError as exc:
            if "no signature by a key" in str(exc):
                return None  # signed by a key since retired: the root above still had to match
            return f"checkpoint of size {cp.tree_size}: {exc}"
        if (parsed.size, parsed.root_hash) != (cp.tree_size, cp.root_hash):
            return f"checkpoint of size {cp.tree_size}: the signed note does not say what its columns say"
    return None


def leaf_hashes(db: Session, size: int) -> list[bytes]:
    """The first `size` leaf hashes, for a consistency proof. Raises LookupError if the tree is
    smaller or a linked record is gone (`verify` names which)."""
    out: list[bytes] = []
    for leaf_index, seq, record_hash in _leaves(db):
        if len(out) == size:
            break
        if leaf_index != len(out) or record_hash is None:
            raise LookupError(f"leaf {len(out)} (record seq={seq}) is missing; run audit verify")
        out.append(leaf_hash(record_hash))
    if len(out) < size:
        raise LookupError(f"the tree has only {len(out)} leaves")
    return out


@dataclass(frozen=True)
class RecordCheck:
    """One record's place in its chain: its hash recomputes, it links to its neighbours."""

    seq: int
    ok: bool
    problem: str | None = None


def check_records(db: Session, records: list[AuditRecord]) -> list[RecordCheck]:  # noqa: C901  # the record-by-record checks a reader compares side by side
    """Check a few records (a session's) where they sit in their chain: each record's hash
    recomputes from its prev_hash and canonical body, its prev_hash is the hash of the record
    before it in the chain, and the record after it names its hash (or the chain's tip is this
    record). Costs a lookup per neighbour, not a walk of the whole log (`verify` is that)."""
    def place(r: AuditRecord) -> tuple[str, int]:
        return (r.chain_id, r.chain_pos or 0) if r.chain_id else (LEGACY_CHAIN, r.seq)

    known = {place(r): r for r in records}
    wanted = ({(c, p - 1) for c, p in known} | {(c, p + 1) for c, p in known}) - set(known)
    by_chain: dict[str, list[int]] = {}
    for c, p in wanted:
        by_chain.setdefault(c, []).append(p)
    for c, positions in by_chain.items():
        stmt = (select(AuditRecord).where(col(AuditRecord.seq).in_(positions), col(AuditRecord.chain_id).is_(None))
                if c == LEGACY_CHAIN else
                select(AuditRecord).where(AuditRecord.chain_id == c, col(AuditRecord.chain_pos).in_(positions)))
        for row in db.exec(stmt).all():
            known[place(row)] = row
    tips: dict[str, tuple[int, str]] = {}
    for c in {c for c, _ in known}:
        if c == LEGACY_CHAIN:
            head = db.get(AuditHead, 1)
            tips[c] = (head.seq, head.hash) if head else (0, GENESIS)
        else:
            tip = db.get(AuditChain, c)
            tips[c] = (tip.length, tip.head) if tip else (0, GENESIS)
    out = []
    for r in sorted(records, key=lambda x: x.seq):
        c, pos = place(r)
        before, after = known.get((c, pos - 1)), known.get((c, pos + 1))
        problem = None
        try:
            body = json.loads(r.record)
        except ValueError:
            body = None
        if not isinstance(body, dict) or canonical_json(body) != r.record:
            problem = "the record is not canonical JSON"
        elif chain_hash(r.prev_hash, r.record) != r.hash:
            problem = "the hash does not match the record's content"
        elif (body.get("seq"), (body.get("agent") or {}).get("session_id"), body.get("chain_id"), body.get("chain_pos")) \
                != (r.seq, r.session_id, r.chain_id, r.chain_pos):
            problem = "the indexed columns do not match the hashed record"
        elif pos == 1 and r.prev_hash != GENESIS:
            problem = "the first record does not start the chain"
        elif pos > 1 and (before is None or before.hash != r.prev_hash):
            problem = f"prev_hash does not match record {before.seq if before else pos - 1}"
        elif after is not None and after.prev_hash != r.hash:
            problem = f"record {after.seq} does not name this record's hash"
        elif after is None and tips[c] != (pos, r.hash):
            problem = "the next record is missing, or the chain's tip does not end at this record"
        out.append(RecordCheck(r.seq, problem is None, problem))
    return out
