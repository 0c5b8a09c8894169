"""The chain: canonical JSON, hashing, and a verifier that names the first broken record."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from broker.audit.chain import GENESIS, StoredLink, canonical_json, chain_hash, verify_links


def _chain(n: int) -> list[StoredLink]:
    links, prev = [], GENESIS
    for seq in range(1, n + 1):
        body = {"event_id": f"e{seq}", "seq": seq, "timestamp": f"2026-01-01T00:00:{seq:02d}.000000Z",
                "type": "capability.minted", "human_principal": "alice@example.com",
                "agent": {"id": "claude-code", "session_id": "ses_1", "task_id": "t"},
                "request": {"resource": "jwt://x"}, "policy_decision": None, "jit_grant": None, "outcome": "minted"}
        record = canonical_json(body)
        digest = chain_hash(prev, record)
        links.append(StoredLink(seq, f"e{seq}", body["timestamp"], body["type"], "ses_1", "alice@example.com",
                                "minted", record, prev, digest))
        prev = digest
    return links


def test_canonical_json_is_sorted_and_compact() -> None:
    assert canonical_json({"b": 1, "a": {"d": [1, 2], "c": "é"}}) == '{"a":{"c":"é","d":[1,2]},"b":1}'


def test_hash_is_sha256_of_prev_plus_record() -> None:
    import hashlib

    assert chain_hash("ab", "{}") == hashlib.sha256(b"ab{}").hexdigest()


def test_intact_chain_verifies() -> None:
    links = _chain(5)
    result = verify_links(links)
    assert result.ok and result.checked == 5 and result.head_hash == links[-1].hash


def _edit_record(link: StoredLink) -> StoredLink:
    body = json.loads(link.record)
    body["outcome"] = "denied"
    return replace(link, record=canonical_json(body))


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (lambda ls: ls.__setitem__(2, _edit_record(ls[2])), "hash does not match"),
        (lambda ls: ls.__setitem__(2, replace(ls[2], outcome="denied")), "column outcome"),
        (lambda ls: ls.__setitem__(2, replace(ls[2], session_id="ses_other")), "column session_id"),
        (lambda ls: ls.__setitem__(2, replace(ls[2], record=ls[2].record.replace(":", ": ", 1))), "canonical"),
        (lambda ls: ls.__setitem__(2, replace(ls[2], prev_hash="f" * 64)), "prev_hash"),
        (lambda ls: ls.pop(2), "sequence gap"),
        (lambda ls: ls.__setitem__(2, replace(ls[2], record="not json")), "not valid JSON"),
    ],
    ids=["edited-record", "edited-column", "edited-session", "non-canonical", "relinked", "deleted", "garbage"],
)
def test_tampering_names_the_first_bad_record(tamper, problem: str) -> None:  # type: ignore[no-untyped-def]
    links = _chain(5)
    tamper(links)
    result = verify_links(links)
    assert not result.ok
    assert result.first_bad_seq == 3 or (problem == "sequence gap" and result.first_bad_seq == 4)
    assert problem in (result.problem or "")
    assert result.checked == 2
