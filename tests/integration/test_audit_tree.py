"""The audit log since 0007: per-session chains, the linker's Merkle tree, signed checkpoints.

Tamper tests act as a database administrator would: the append-only triggers go first (dropped
on SQLite, disabled on PostgreSQL), then the rows are rewritten. Each kind of tampering must be
detected with the record (seq, event id) or the checkpoint (tree size) named.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from broker.audit import checkpoint as checkpoints
from broker.audit.chain import GENESIS, canonical_json, chain_hash
from broker.audit.events import AgentRef, AuditEvent, RequestRef
from broker.audit.linker import link_all, link_once
from broker.audit.service import append, append_many
from broker.audit.verification import verify
from broker.db import transaction
from tests.support.brokers import Api
from tests.support.processes import BROKER_CLI

_TABLES = ("audit_records", "audit_chains", "audit_leaves", "audit_checkpoints", "audit_tree")


def as_dba(api: Api, *statements: str, params: list[dict[str, Any]] | None = None) -> None:
    """Rewrite rows behind the broker's back, triggers out of the way first."""
    with api.broker.engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            for (name,) in conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).all():
                conn.execute(text(f"DROP TRIGGER {name}"))
        else:
            for table in _TABLES:
                conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
        for i, statement in enumerate(statements):
            conn.execute(text(statement), (params or [{}] * len(statements))[i])


def _keys(api: Api) -> dict[str, Any]:
    return {k.kid: k.public for k in api.broker.keyring.published()}


def _verify(api: Api) -> Any:
    with transaction(api.broker.engine) as db:
        return verify(db, _keys(api))


def _rows(api: Api, sql: str, **params: Any) -> list[Any]:
    with api.broker.engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


@pytest.fixture
def log(api: Api) -> dict[str, Any]:
    """Two sessions with three capabilities each, linked and checkpointed."""
    sessions = [api.new_session(task_id=f"t{i}") for i in range(2)]
    for n in range(3):
        for s in sessions:
            assert api.request(s, {"resource": f"jwt://svc/s{n}", "access": "read"}).status_code == 201
    linked = link_all(api.broker, wait=120)
    count = _rows(api, "SELECT count(*) FROM audit_records")[0][0]
    assert linked.tree_size == count and linked.checkpoint is not None
    chains = {s["session_id"]: _rows(api, "SELECT seq, chain_pos FROM audit_records WHERE chain_id = :c "
                                         "ORDER BY chain_pos", c=f"session:{s['session_id']}") for s in sessions}
    return {"sessions": sessions, "chains": chains, "count": count}


def test_sessions_have_their_own_chains_and_every_record_is_linked_once_in_order(api: Api, log: dict[str, Any]) -> None:
    for seqs in log["chains"].values():
        positions = [p for _, p in seqs]
        assert positions == list(range(1, len(positions) + 1)) and len(positions) >= 4  # created + 3 minted
        assert [s for s, _ in seqs] == sorted(s for s, _ in seqs)
    leaves = _rows(api, "SELECT leaf_index, seq FROM audit_leaves ORDER BY leaf_index")
    assert [i for i, _ in leaves] == list(range(log["count"]))
    assert [s for _, s in leaves] == sorted(s for _, s in leaves)  # all committed before linking: seq order
    result = _verify(api)
    assert result.ok and result.tree_size == log["count"] and result.unlinked == 0, result
    # The readers are as before: records in seq order, each with prev_hash and hash.
    sid = log["sessions"][0]["session_id"]
    page = api.client.get("/v1/audit", params={"session_id": sid}, headers=api.as_admin()).json()["records"]
    assert [r["chain_pos"] for r in page] == list(range(1, len(page) + 1))
    assert page[0]["prev_hash"] == GENESIS and page[1]["prev_hash"] == page[0]["hash"]


def test_checkpoint_endpoint_serves_a_signed_note_and_proofs_verify(api: Api, log: dict[str, Any]) -> None:
    r = api.client.get("/v1/audit/checkpoint", headers=api.as_admin())
    assert r.status_code == 200, r.text
    body = r.json()
    parsed = checkpoints.parse(body["note"], _keys(api))
    assert parsed.size == body["tree_size"] == log["count"] and parsed.root_hash == body["root_hash"]
    assert body["key_name"] == api.broker.keyring.active.kid
    session = log["sessions"][0]
    assert api.client.get("/v1/audit/checkpoint", headers={
        "Authorization": f"Bearer {session['session_token']}"}).status_code == 403
    assert api.request(session, {"resource": "jwt://svc/s9", "access": "read"}).status_code == 201
    bigger = link_all(api.broker, wait=120).checkpoint
    assert bigger is not None and bigger.size == log["count"] + 1
    proof = api.client.get("/v1/audit/consistency", params={"first": parsed.size, "second": bigger.size},
                           headers=api.as_admin())
    assert proof.status_code == 200
    from broker.audit.merkle import verify_consistency
    assert verify_consistency(parsed.size, bigger.size, bytes.fromhex(parsed.root_hash),
                              bytes.fromhex(bigger.root_hash), [bytes.fromhex(h) for h in proof.json()["proof"]])
    too_far = api.client.get("/v1/audit/consistency", params={"first": 1, "second": bigger.size + 5},
                             headers=api.as_admin())
    assert too_far.status_code == 404 and too_far.json()["error"]["code"] == "tree-size-not-found"
    backwards = api.client.get("/v1/audit/consistency", params={"first": 3, "second": 2}, headers=api.as_admin())
    assert backwards.status_code == 400 and backwards.json()["error"]["code"] == "invalid-tree-size"


def _minted(api: Api, session_id: str) -> list[int]:
    return [r[0] for r in _rows(api, "SELECT seq FROM audit_records WHERE session_id = :s AND type = 'capability.minted' "
                                     "ORDER BY seq", s=session_id)]


def test_edited_record_is_named(api: Api, log: dict[str, Any]) -> None:
    seq = _minted(api, log["sessions"][0]["session_id"])[1]
    as_dba(api, "UPDATE audit_records SET record = replace(record, '\"outcome\":\"minted\"', '\"outcome\":\"denied\"') "
                f"WHERE seq = {seq}")
    result = _verify(api)
    assert not result.ok and result.first_bad_seq == seq and "hash does not match" in result.problem


def test_deleted_record_is_named(api: Api, log: dict[str, Any]) -> None:
    sid = log["sessions"][0]["session_id"]
    seq = _minted(api, sid)[0]
    after = next(s for s, _ in log["chains"][sid] if s > seq)
    as_dba(api, f"DELETE FROM audit_records WHERE seq = {seq}")
    result = _verify(api)
    # The session's next record no longer follows its predecessor.
    assert not result.ok and result.first_bad_seq == after and "position gap" in result.problem


def test_deleted_tail_of_a_chain_is_named(api: Api, log: dict[str, Any]) -> None:
    sid = log["sessions"][1]["session_id"]
    last = log["chains"][sid][-1][0]
    as_dba(api, f"DELETE FROM audit_records WHERE seq = {last}")
    result = _verify(api)
    assert not result.ok and result.first_bad_seq == last and "missing" in result.problem


def test_deleted_unlinked_tail_is_named_by_the_chain_tip(api: Api, log: dict[str, Any]) -> None:
    session = log["sessions"][1]
    assert api.request(session, {"resource": "jwt://svc/s8", "access": "read"}).status_code == 201
    last = _minted(api, session["session_id"])[-1]
    as_dba(api, f"DELETE FROM audit_records WHERE seq = {last}")
    result = _verify(api)
    assert not result.ok and f"chain session:{session['session_id']}" in result.problem
    assert "records were removed from its end" in result.problem
    assert result.first_bad_seq == log["chains"][session["session_id"]][-1][0]  # where the chain now ends


def _forge(prev: dict[str, Any], **changes: Any) -> dict[str, Any]:
    import json

    body = json.loads(prev["record"])
    body.update(changes)
    canonical = canonical_json(body)
    return {"seq": body["seq"], "event_id": body["event_id"], "timestamp": body["timestamp"], "type": body["type"],
            "session_id": (body.get("agent") or {}).get("session_id"), "human_principal": body.get("human_principal"),
            "outcome": body["outcome"], "record": canonical, "prev_hash": prev["hash"],
            "hash": chain_hash(prev["hash"], canonical), "chain_id": body["chain_id"], "chain_pos": body["chain_pos"]}


_INSERT = ("INSERT INTO audit_records (seq, event_id, timestamp, type, session_id, human_principal, outcome, record, "
           "prev_hash, hash, chain_id, chain_pos) VALUES (:seq, :event_id, :timestamp, :type, :session_id, "
           ":human_principal, :outcome, :record, :prev_hash, :hash, :chain_id, :chain_pos)")


def _record(api: Api, seq: int) -> dict[str, Any]:
    row = _rows(api, "SELECT record, hash, chain_pos FROM audit_records WHERE seq = :s", s=seq)[0]
    return {"record": row[0], "hash": row[1], "chain_pos": row[2]}


def test_inserted_record_is_named(api: Api, log: dict[str, Any]) -> None:
    sid = log["sessions"][0]["session_id"]
    last_seq, last_pos = log["chains"][sid][-1]
    top = _rows(api, "SELECT max(seq) FROM audit_records")[0][0]
    # A well-formed record, hashed onto the chain's tip: only the tip row (and the tree) disagree.
    forged = _forge(_record(api, last_seq), seq=top + 1, event_id="forged-1", chain_pos=last_pos + 1,
                    outcome="minted")
    as_dba(api, _INSERT, params=[forged])
    result = _verify(api)
    assert not result.ok and result.first_bad_seq == top + 1 and "records were added" in result.problem
    assert f"session:{sid} ends at position {last_pos + 1}" in result.problem
    # A forged chain of its own has no tip row.
    as_dba(api, "DELETE FROM audit_records WHERE seq = :s", params=[{"s": top + 1}])
    lone = _forge({**_record(api, last_seq), "hash": GENESIS}, seq=top + 2, event_id="forged-2",
                  chain_id="session:ses_forged", chain_pos=1, agent={"id": "x", "session_id": "ses_forged",
                                                                     "task_id": "t"})
    as_dba(api, _INSERT, params=[lone])
    result = _verify(api)
    assert not result.ok and result.first_bad_seq == top + 2 and "has no tip row" in result.problem


def test_reordered_records_are_named(api: Api, log: dict[str, Any]) -> None:
    sid = log["sessions"][0]["session_id"]
    (a, _), (b, _) = log["chains"][sid][1], log["chains"][sid][2]
    cols = ("event_id", "timestamp", "type", "outcome", "record", "prev_hash", "hash", "chain_pos")
    ra = _rows(api, f"SELECT {', '.join(cols)} FROM audit_records WHERE seq = {a}")[0]
    rb = _rows(api, f"SELECT {', '.join(cols)} FROM audit_records WHERE seq = {b}")[0]
    assign = ", ".join(f"{c} = :{c}" for c in cols)
    as_dba(api, f"UPDATE audit_records SET event_id = 'swap', chain_pos = -1 WHERE seq = {a}",
           f"UPDATE audit_records SET {assign} WHERE seq = {b}", f"UPDATE audit_records SET {assign} WHERE seq = {a}",
           params=[{}, dict(zip(cols, ra, strict=True)), dict(zip(cols, rb, strict=True))])
    result = _verify(api)
    assert not result.ok and result.first_bad_seq == a


def test_truncated_log_is_named(api: Api, log: dict[str, Any]) -> None:
    keep = log["count"] - 3
    top = _rows(api, "SELECT seq FROM audit_leaves WHERE leaf_index = :i", i=keep)[0][0]
    as_dba(api, f"DELETE FROM audit_records WHERE seq >= {top}")
    result = _verify(api)
    assert not result.ok and result.first_bad_seq == top and f"leaf {keep} names record seq={top}" in result.problem
    # Leaves and the linker's state cut back too: the stored checkpoint is beyond the tree.
    as_dba(api, f"DELETE FROM audit_leaves WHERE leaf_index >= {keep}")
    result = _verify(api)
    assert not result.ok and result.bad_checkpoint == log["count"] and "beyond the tree" in result.problem


def _rewrite_history(api: Api, seq: int) -> None:
    """The thorough administrator: edit one record, rehash its chain to the tip, and throw the
    tree away so the broker re-links (and re-signs) the rewritten log. Only an older checkpoint,
    kept off the box, can tell."""
    import json

    row = _rows(api, "SELECT chain_id FROM audit_records WHERE seq = :s", s=seq)[0]
    chain = _rows(api, "SELECT seq, record, prev_hash FROM audit_records WHERE chain_id = :c ORDER BY chain_pos",
                  c=row[0])
    statements, params, prev = [], [], None
    for s, record, prev_hash in chain:
        body = json.loads(record)
        if s == seq:
            body["outcome"] = "denied"
        if prev is None and s < seq:
            continue
        record = canonical_json(body)
        prev = prev_hash if prev is None else prev
        digest = chain_hash(prev, record)
        statements.append("UPDATE audit_records SET record = :r, prev_hash = :p, hash = :h, outcome = :o WHERE seq = :s")
        params.append({"r": record, "p": prev, "h": digest, "o": body["outcome"], "s": s})
        prev = digest
    statements += ["UPDATE audit_chains SET head = :h WHERE chain_id = :c", "DELETE FROM audit_leaves",
                   "DELETE FROM audit_checkpoints", "DELETE FROM audit_tree"]
    params += [{"h": prev, "c": row[0]}, {}, {}, {}]
    as_dba(api, *statements, params=params)


def test_rewritten_history_passes_the_walk_but_not_a_checkpoint_kept_off_the_box(
        api: Api, log: dict[str, Any], tmp_path: Path) -> None:
    env = {**os.environ, "BROKER_URL": api.base_url, "BROKER_TOKEN": api.secrets.admin_token}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([BROKER_CLI, "audit", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=60)

    saved = cli("checkpoint")
    assert saved.returncode == 0 and saved.stdout.startswith(checkpoints.body(
        "", 0, b"", "").split("\n")[0]), saved.stderr
    path = tmp_path / "checkpoint.txt"
    path.write_text(saved.stdout)
    size = checkpoints.parse(saved.stdout, _keys(api)).size
    # The log grows; the saved checkpoint is extended.
    assert api.request(log["sessions"][0], {"resource": "jwt://svc/s7", "access": "read"}).status_code == 201
    link_all(api.broker, wait=120)
    ok = cli("verify", "--checkpoint", str(path))
    assert ok.returncode == 0 and f"consistency proof to size {size + 1}" in ok.stdout, ok.stdout + ok.stderr

    _rewrite_history(api, _minted(api, log["sessions"][0]["session_id"])[0])
    link_all(api.broker, wait=120)
    walk = cli("verify")
    assert walk.returncode == 0, walk.stdout + walk.stderr  # consistent with itself, and freshly signed
    caught = cli("verify", "--checkpoint", str(path))
    assert caught.returncode == 1
    assert f"DOES NOT EXTEND checkpoint size={size} root=" in caught.stdout and "rewritten" in caught.stdout, caught.stdout

    # Truncated below the saved checkpoint (records, chains' tips and the tree all cut back).
    as_dba(api, "DELETE FROM audit_leaves", "DELETE FROM audit_checkpoints", "DELETE FROM audit_tree",
           "DELETE FROM audit_records", "DELETE FROM audit_chains")
    with transaction(api.broker.engine) as db:
        append(db, AuditEvent(type="policy.loaded", outcome="loaded", actor="broker",
                              request=RequestRef(operation="policy.load")))
    link_all(api.broker, wait=120)
    cut = cli("verify", "--checkpoint", str(path))
    assert cut.returncode == 1 and f"size={size}" in cut.stdout and "truncated" in cut.stdout, cut.stdout


def test_concurrent_appends_to_many_sessions_link_once_in_commit_order(api: Api) -> None:
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(15):
                with transaction(api.broker.engine) as db:
                    append_many(db, [AuditEvent(type="test.event", outcome="ok", actor="agent:a",
                                                agent=AgentRef("a", f"ses_{n}", "t"),
                                                request=RequestRef(operation="request", parameters={"i": i}))
                                     for _ in range(1 + i % 3)])
                link_once(api.broker, batch=7)  # linking interleaved with writing
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    link_all(api.broker, wait=120)
    count = _rows(api, "SELECT count(*) FROM audit_records")[0][0]
    leaves = _rows(api, "SELECT leaf_index, seq FROM audit_leaves ORDER BY leaf_index")
    assert len(leaves) == count and len({s for _, s in leaves}) == count
    assert [i for i, _ in leaves] == list(range(count))
    result = _verify(api)
    assert result.ok and result.tree_size == count and result.unlinked == 0, result
