"""The Merkle tree (RFC 6962/9162 hashing, frontier, consistency proofs) and signed checkpoints."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.audit import checkpoint as checkpoints
from broker.audit.merkle import EMPTY_ROOT, Frontier, consistency_proof, leaf_hash, node_hash, root, verify_consistency


def _leaves(n: int, salt: str = "") -> list[bytes]:
    return [leaf_hash(hashlib.sha256(f"{salt}{i}".encode()).hexdigest()) for i in range(n)]


def test_hashes_are_rfc6962_domain_separated() -> None:
    record = "ab" * 32
    assert leaf_hash(record) == hashlib.sha256(b"\x00" + bytes.fromhex(record)).digest()
    a, b = _leaves(2)
    assert node_hash(a, b) == hashlib.sha256(b"\x01" + a + b).digest()
    assert root([]) == EMPTY_ROOT == hashlib.sha256(b"").digest()
    # Three leaves: the split is at 2, so MTH = H(1 || H(1 || l0 || l1) || l2).
    l0, l1, l2 = _leaves(3)
    assert root([l0, l1, l2]) == node_hash(node_hash(l0, l1), l2)


def test_frontier_matches_the_recursive_root_at_every_size() -> None:
    leaves = _leaves(130)
    frontier = Frontier()
    assert frontier.root() == EMPTY_ROOT
    for n, leaf in enumerate(leaves, start=1):
        frontier.append(leaf)
        assert frontier.size == n and len(frontier.hashes) == bin(n).count("1")
        assert frontier.root() == root(leaves[:n])
    # It can be stored and restored.
    again = Frontier(frontier.size, frontier.hashes)
    again.append(leaf_hash("cd" * 32))
    assert again.root() == root([*leaves, leaf_hash("cd" * 32)])
    with pytest.raises(ValueError):
        Frontier(5, frontier.hashes[:1])


def test_consistency_proofs_verify_for_every_pair_and_fail_for_a_rewritten_prefix() -> None:
    leaves = _leaves(33)
    for n in range(1, len(leaves) + 1):
        second = root(leaves[:n])
        for m in range(1, n + 1):
            first = root(leaves[:m])
            proof = consistency_proof(m, leaves[:n])
            assert verify_consistency(m, n, first, second, proof), (m, n)
            if m < n:
                # A tree whose first m leaves differ (one record rewritten) does not extend it.
                forged = root(_leaves(m, salt="x"))
                assert not verify_consistency(m, n, forged, second, proof), (m, n)
                if proof:
                    bent = [proof[0][::-1], *proof[1:]]
                    assert not verify_consistency(m, n, first, second, bent), (m, n)
    assert verify_consistency(0, 5, EMPTY_ROOT, root(leaves[:5]), [])
    assert not verify_consistency(6, 5, root(leaves[:6]), root(leaves[:5]), [])


def test_random_trees_agree_with_the_recursive_definition() -> None:
    rng = random.Random(6962)
    for _ in range(40):
        n = rng.randint(1, 600)
        m = rng.randint(1, n)
        leaves = _leaves(n, salt=str(n))
        frontier = Frontier()
        for leaf in leaves:
            frontier.append(leaf)
        assert frontier.root() == root(leaves)
        assert verify_consistency(m, n, root(leaves[:m]), frontier.root(), consistency_proof(m, leaves))


def test_checkpoint_is_a_c2sp_signed_note_that_verifies_and_detects_edits() -> None:
    key = Ed25519PrivateKey.generate()
    signed = checkpoints.sign("broker.example/audit", 42, b"\x07" * 32, "2026-11-22T10:00:00.000000Z",
                              name="1763800000-abcd", key=key)
    text, signature = signed.note.split("\n\n")
    encoded_root = base64.b64encode(b"\x07" * 32).decode()
    assert text == f"broker.example/audit\n42\n{encoded_root}\ntime 2026-11-22T10:00:00.000000Z"
    dash, name, blob = signature.strip().split(" ")
    raw = base64.b64decode(blob)
    assert dash == "\u2014" and name == "1763800000-abcd" and len(raw) == 4 + 64
    assert raw[:4] == checkpoints.key_id(name, key.public_key())
    keys = {name: key.public_key()}
    parsed = checkpoints.parse(signed.note, keys)
    assert (parsed.size, parsed.root_hash, parsed.origin) == (42, "07" * 32, "broker.example/audit")
    with pytest.raises(checkpoints.CheckpointError, match="does not verify"):
        checkpoints.parse(signed.note.replace("\n42\n", "\n43\n"), keys)
    with pytest.raises(checkpoints.CheckpointError, match="no signature by a key"):
        checkpoints.parse(signed.note, {"other": key.public_key()})
    with pytest.raises(checkpoints.CheckpointError, match="wrong key id"):
        checkpoints.parse(signed.note, {name: Ed25519PrivateKey.generate().public_key()})
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.parse("not a note", keys)
