"""The linker: folds committed audit records into the log-wide Merkle tree and signs checkpoints.

Runs beside the sweeper in every replica; one at a time does the work (PostgreSQL: a
transaction-scoped advisory lock, taken with try so the others skip the round; SQLite: the
write lock every writer takes at BEGIN). Each round is one transaction: leaves, the tree's
state and (when due) a checkpoint commit together, so a crash anywhere loses nothing: the next
round, in any replica or after a restart, starts from what was committed.

Commit order on PostgreSQL: a record's `seq` comes from a sequence, so a record with a lower
seq may commit after one with a higher. The linker only takes records whose writing transaction
(`txid`, from pg_current_xact_id) is older than the xmin of its snapshot: every such transaction
has finished, so nothing can still appear below that line, and the leaves are appended in seq
order within each round. Records of transactions still running wait for a later round; a record
is never placed before one already linked. The `watermark` (the last round's xmin, kept only when
the round drained everything eligible) bounds each round's scan to the records written since.
On SQLite writers are serialised, so seq order is commit order and the watermark is the last
linked seq.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.engine import Connection

from broker.audit import checkpoint as checkpoints
from broker.audit.context import AuditContext
from broker.audit.merkle import Frontier, leaf_hash
from broker.audit.sql import audit_sql, unlinked_count_up_to
from broker.db import transaction, utcnow
from broker.models import AuditCheckpoint, AuditTree
from broker.periodic import Periodic
from broker.times import rfc3339_precise

log = logging.getLogger("broker.audit.linker")

@dataclass
class LinkRound:
    linked: int = 0
    tree_size: int = 0
    checkpoint: checkpoints.Checkpoint | None = None
    skipped: bool = False  # another replica holds the linker lock
    drained: bool = True  # nothing eligible is left unlinked


def origin(broker: AuditContext) -> str:
    """The checkpoint's origin line: the broker's issuer without its scheme, and `/audit`."""
    return broker.settings.issuer.split("://", 1)[-1].rstrip("/") + "/audit"


def link_once(broker: AuditContext, *, batch: int | None = None, checkpoint: bool = False,
              checkpoint_every: float | None = None) -> LinkRound:
    """One round: link up to `batch` eligible records; sign a checkpoint when the tree grew and
    the last checkpoint is older than `checkpoint_every` seconds, or when `checkpoint` is set."""
    settings = broker.settings
    batch = batch or settings.audit_link_batch
    every = settings.audit_checkpoint_interval_seconds if checkpoint_every is None else checkpoint_every
    with transaction(broker.engine) as db:
        conn = db.connection()
        sql = audit_sql(conn)
        horizon = sql.link_horizon(conn)
        if not sql.try_link_lock(conn):
            return LinkRound(skipped=True, drained=False)
        tree = db.get(AuditTree, 1) or AuditTree(id=1, size=0, frontier=[], watermark=None)
        rows = sql.unlinked(conn, tree.watermark, horizon, batch)
        frontier = Frontier(tree.size, [bytes.fromhex(h) for h in tree.frontier])
        leaves = []
        for seq, record_hash in rows:
            leaves.append({"leaf_index": frontier.size, "seq": seq})
            frontier.append(leaf_hash(record_hash))
        if leaves:
            conn.execute(text("INSERT INTO audit_leaves (leaf_index, seq) VALUES (:leaf_index, :seq)"), leaves)
        drained = len(rows) < batch
        watermark = tree.watermark
        if drained:
            watermark = sql.drained_watermark(horizon, rows, tree.watermark)
        result = LinkRound(linked=len(leaves), tree_size=frontier.size, drained=drained)
        if leaves or watermark != tree.watermark or db.get(AuditTree, 1) is None:
            tree.size, tree.frontier, tree.watermark = frontier.size, [h.hex() for h in frontier.hashes], watermark
            db.add(tree)
        last = conn.execute(text("SELECT tree_size, timestamp FROM audit_checkpoints "
                                 "ORDER BY tree_size DESC LIMIT 1")).first()
        now = utcnow()
        grew = last is None or last[0] < frontier.size
        if grew and (checkpoint or last is None or now.timestamp() - _epoch(last[1]) >= every):
            key = broker.keyring.active
            stamp = rfc3339_precise(now)
            signed = checkpoints.sign(origin(broker), frontier.size, frontier.root(), stamp, name=key.kid,
                                      key=key.private)
            db.add(AuditCheckpoint(tree_size=signed.size, root_hash=signed.root_hash, timestamp=stamp,
                                   note=signed.note))
            result.checkpoint = signed
    if result.linked:
        log.debug("linked %d audit record(s); tree size %d", result.linked, result.tree_size)
    return result


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def link_all(broker: AuditContext, *, checkpoint: bool = True, wait: float = 0.0) -> LinkRound:
    """Link until nothing eligible is left, then sign a checkpoint. With `wait` (seconds; tests,
    tools), keep going until every record committed before the call is linked: on PostgreSQL a
    transaction still open anywhere on the server holds the watermark back until it ends."""
    deadline = time.monotonic() + wait
    with broker.engine.connect() as conn:
        top = int(conn.execute(text("SELECT coalesce(max(seq), 0) FROM audit_records")).scalar_one())
    total = 0
    while True:
        result = link_once(broker, checkpoint=checkpoint)
        total += result.linked
        if result.drained or result.skipped:
            if wait and time.monotonic() < deadline and _unlinked_up_to(broker, top):
                time.sleep(0.05)
                continue
            result.linked = total
            return result


def _unlinked_up_to(broker: AuditContext, top: int) -> int:
    with broker.engine.connect() as conn:
        return unlinked_count_up_to(conn, top)


def latest_checkpoint(broker: AuditContext) -> AuditCheckpoint | None:
    with transaction(broker.engine) as db:
        return db.get(AuditCheckpoint, _max_size(db.connection()))


def _max_size(conn: Connection) -> int:
    return int(conn.execute(text("SELECT coalesce(max(tree_size), -1) FROM audit_checkpoints")).scalar_one())


def linker(broker: AuditContext) -> Periodic:
    """The background loop, beside the sweeper: a round every `audit_link_interval_seconds`, and
    within a pass round after round while each found a full batch."""

    def link_pass() -> None:
        while True:
            result = link_once(broker)
            if result.drained or result.skipped:
                return

    return Periodic("broker-audit-linker", broker.settings.audit_link_interval_seconds, link_pass, log)
