"""Canonical JSON, the chain hash, and the verifier that names the first broken record.

    hash = sha256(prev_hash + canonical_json(record))

where `record` is every field of the event except `prev_hash` and `hash` themselves, and
canonical JSON is sorted keys, no insignificant white space, UTF-8. The first record's
`prev_hash` is 64 zeros.
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


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    first_bad_seq: int | None = None
    first_bad_event_id: str | None = None
    problem: str | None = None
    head_hash: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


def _column_mismatch(link: StoredLink, body: dict[str, Any]) -> str | None:
    """The indexed columns are copies of fields in `record`; an edit to either shows."""
    agent = body.get("agent") or {}
    expected = {
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


def verify_links(links: Iterable[StoredLink]) -> VerifyResult:
    """Walk in seq order; stop at the first record whose chain, hash or columns disagree."""
    prev = GENESIS
    expected_seq = 1
    checked = 0
    for link in links:
        def bad(problem: str) -> VerifyResult:
            return VerifyResult(False, checked, link.seq, link.event_id, problem)

        if link.seq != expected_seq:
            return bad(f"sequence gap: expected {expected_seq}, found {link.seq}")
        if link.prev_hash != prev:
            return bad("prev_hash does not match the previous record's hash")
        try:
            body = loads_stored(link.record)
        except ValueError:
            return bad("record is not valid JSON")
        if not isinstance(body, dict):
            return bad("record is not a JSON object")
        canonical = canonical_json(body)
        if canonical != link.record:
            return bad("record is not in canonical form")
        if chain_hash(link.prev_hash, canonical) != link.hash:
            return bad("hash does not match the record's content")
        mismatch = _column_mismatch(link, body)
        if mismatch:
            return bad(mismatch)
        prev = link.hash
        expected_seq += 1
        checked += 1
    return VerifyResult(True, checked, head_hash=prev)
