"""Canonical JSON, the chain hash, and the verifier that names the first broken record.

    hash = sha256(prev_hash + canonical_json(record))

where `record` is every field of the event except `prev_hash` and `hash` themselves, and
canonical JSON is sorted keys, no insignificant white space, UTF-8. Every chain's first record
has `prev_hash` 64 zeros. Since migration 0007 each session has its own chain (`chain_id`,
`chain_pos` in the record); records written before it form the one legacy chain, ordered by seq.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from broker.jsonbounds import dumps_stored, loads_stored

GENESIS = "0" * 64


def canonical_json(record: dict[str, Any]) -> str:
    # dumps_stored: a record written before the door bounded depth must still verify.
    return dumps_stored(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def chain_hash(prev_hash: str, canonical: str) -> str:
    return hashlib.sha256((prev_hash + canonical).encode()).hexdigest()


@dataclass(frozen=True)
class StoredLink:
    seq: int
    event_id: str
    timestamp: str
    type: str
    session_id: str | None
    human_principal: str | None
    outcome: str
    record: str
    prev_hash: str
    hash: str
    chain_id: str | None = None
    chain_pos: int | None = None


LEGACY_CHAIN = "legacy"


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    first_bad_event_id: str | None = None
    problem: str | None = None
    head_hash: str | None = None  # the legacy check (`verify_links`): the last record's hash
    chains: int | None = None
    tree_size: int | None = None
    root_hash: str | None = None
    unlinked: int | None = None  # committed records the linker has not folded in yet
    bad_checkpoint: int | None = None  # the tree size of a checkpoint the log does not match

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _column_mismatch(link: StoredLink, body: dict[str, Any]) -> str | None:
    """The indexed columns are copies of fields in `record`; an edit to either shows."""
    agent = body.get("agent") or {}
    expected = {
        "chain_id": body.get("chain_id"),
        "chain_pos": body.get("chain_pos"),
        "seq": body.get("seq"),
        "event_id": body.get("event_id"),
        "timestamp": body.get("timestamp"),
        "type": body.get("type"),
        "session_id": agent.get("session_id"),
        "human_principal": body.get("human_principal"),
        "outcome": body.get("outcome"),
    }
    for column, value in expected.items():
        if getattr(link, column) != value:
            return f"column {column} does not match the hashed record"
    return None


class ChainWalker:
    """Checks records given in seq order, each against the previous record of its own chain."""

    def __init__(self) -> None:
        self.tips: dict[str, tuple[int, str, int]] = {}  # chain -> (position, hash, seq)
        self.checked = 0

    def check(self, link: StoredLink) -> str | None:
        chain = link.chain_id or LEGACY_CHAIN
        last_pos, prev, _ = self.tips.get(chain, (0, GENESIS, 0))
        pos = link.chain_pos if link.chain_id else link.seq
        if pos != last_pos + 1:
            if link.chain_id is None:
                return f"sequence gap: expected {last_pos + 1}, found {pos}"
            return f"chain {chain}: position gap: expected {last_pos + 1}, found {pos}"
        if link.prev_hash != prev:
            return "prev_hash does not match the previous record's hash" + ("" if link.chain_id is None else
                                                                            f" in chain {chain}")
        try:
            body = loads_stored(link.record)
        except ValueError:
            return "record is not valid JSON"
        if not isinstance(body, dict):
            return "record is not a JSON object"
        canonical = canonical_json(body)
        if canonical != link.record:
            return "record is not in canonical form"
        if chain_hash(link.prev_hash, canonical) != link.hash:
            return "hash does not match the record's content"
        mismatch = _column_mismatch(link, body)
        if mismatch:
            return mismatch
        self.tips[chain] = (pos, link.hash, link.seq)
        self.checked += 1
        return None


def verify_links(links: Iterable[StoredLink]) -> VerifyResult:
    """Walk in seq order; stop at the first record whose chain, hash or columns disagree."""
    walker = ChainWalker()
    last = GENESIS
    for link in links:
        problem = walker.check(link)
        if problem:
            return VerifyResult(False, walker.checked, link.seq, link.event_id, problem)
        last = link.hash
    return VerifyResult(True, walker.checked, head_hash=last, chains=len(walker.tips))
