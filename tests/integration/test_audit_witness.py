"""Witness-cosigned audit checkpoints: the broker submits each new checkpoint to C2SP tlog-witnesses
(tests/support/witness.py, written from the spec) with its consistency proof, verifies and stores
their cosignatures and serves them in the note; a witness that has seen checkpoint N refuses a
rewritten history, and the broker says so loudly (metric, error log, audit record)."""

from __future__ import annotations

import base64
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from broker.audit import checkpoint as checkpoints
from broker.audit import note as notes
from broker.audit import verification
from broker.audit import witness as cosigning
from broker.audit.linker import link_all, origin
from broker.audit.merkle import consistency_proof
from broker.db import transaction
from broker.metrics import REGISTRY
from tests.integration.test_audit_tree import _rewrite_history, as_dba
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.ports import free_port
from tests.support.processes import BROKER_CLI
from tests.support.witness import TestWitness, WitnessError


@dataclass
class Witnessed:
    api: Api
    witnesses: list[TestWitness]

    def vkeys(self) -> list[str]:
        return [w.vkey for w in self.witnesses]

    def grow(self, n: int = 1) -> None:
        session = self.api.new_session(task_id=f"grow-{n}")
        for i in range(n):
            assert self.api.request(session, {"resource": f"jwt://svc/g{i}", "access": "read"}).status_code == 201
        link_all(self.api.broker, wait=120)

    def submit(self) -> dict[str, cosigning.Submission]:
        return {s.witness: s for s in cosigning.submit_newest(self.api.broker)}


def _label(w: TestWitness) -> str:
    return "+".join(w.vkey.split("+", 2)[:2])


def _broker_vkey(api: Api) -> str:
    key = api.broker.keyring.active
    return checkpoints.vkey(key.kid, key.public)


@pytest.fixture
def witnessed(database_url: str, tmp_path: Path) -> Iterator[Witnessed]:
    """A broker with two witnesses, both trusting its checkpoint key for its origin."""
    ws = [TestWitness(f"witness.example/w{i}", tmp_path / f"w{i}.json") for i in (1, 2)]
    for w in ws:
        w.__enter__()
    setting = "[" + ",".join(f'{{"url": "{w.url}", "vkey": "{w.vkey}"}}' for w in ws) + "]"
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, audit_witnesses=setting)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        for w in ws:
            w.trust(origin(broker), _broker_vkey(api))
        yield Witnessed(api, ws)
    for w in ws:
        w.__exit__()


def _refusals(witness: str, reason: str) -> float:
    return REGISTRY.get_sample_value("broker_audit_witness_refusals_total",
                                     {"witness": witness, "reason": reason}) or 0.0


def _witness_records(api: Api) -> list[dict[str, Any]]:
    r = api.client.get("/v1/audit", params={"type": "audit.witness-refused", "limit": 100}, headers=api.as_admin())
    assert r.status_code == 200
    return list(r.json()["records"])


def test_each_checkpoint_is_cosigned_with_a_proof_the_witness_checks_and_served_in_the_note(
        witnessed: Witnessed) -> None:
    api, ws = witnessed.api, witnessed.witnesses
    sizes = []
    for grow_by in (1, 2, 1, 5, 3):  # old sizes that are and are not powers of two
        witnessed.grow(grow_by)
        outcomes = witnessed.submit()
        assert {o.outcome for o in outcomes.values()} == {"cosigned"}, outcomes
        body = api.client.get("/v1/audit/checkpoint", headers=api.as_admin()).json()
        sizes.append(body["tree_size"])
        # What the witnesses hold is exactly the broker's tree head, and they persisted it.
        for w in ws:
            held = w.state()[origin(api.broker)]
            assert held["size"] == body["tree_size"]
            assert bytes.fromhex(body["root_hash"]) == base64.b64decode(held["root"])
        _text, signatures = notes.split(body["note"])
        assert [s.name for s in signatures] == [body["key_name"], *sorted(w.name for w in ws)]
        assert sorted(c["witness"] for c in body["cosignatures"]) == sorted(_label(w) for w in ws)
        verifiers = [notes.parse_vkey(w.vkey) for w in ws]
        assert notes.check_quorum(body["note"], verifiers, 2).ok
        assert body["verifier_key"] == _broker_vkey(api)
        # The old parser (clients of before) still reads the cosigned note.
        keys = {k.kid: k.public for k in api.broker.keyring.published()}
        assert checkpoints.parse(body["note"], keys).size == body["tree_size"]
        assert all(s["cosigned_size"] == body["tree_size"] and s["refused_size"] is None for s in body["witnesses"])
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    # Nothing new: no second submission.
    assert {o.outcome for o in witnessed.submit().values()} == {"already"}
    assert all(status == 200 for w in ws for status, _ in w.answers)


def test_a_witness_that_lost_track_answers_409_and_the_broker_resends_from_its_size(witnessed: Witnessed) -> None:
    api, ws = witnessed.api, witnessed.witnesses
    witnessed.grow(3)
    witnessed.submit()
    witnessed.grow(2)
    as_dba(api, "DELETE FROM audit_witness_state")  # the broker forgot what the witnesses hold
    outcomes = witnessed.submit()
    assert {o.outcome for o in outcomes.values()} == {"cosigned"}, outcomes
    for w in ws:
        assert [s for s, _ in w.answers][-2:] == [409, 200]


def test_rewritten_history_is_refused_by_the_witness_and_reported_loudly(
        witnessed: Witnessed, caplog: pytest.LogCaptureFixture) -> None:
    api, ws = witnessed.api, witnessed.witnesses
    witnessed.grow(4)
    assert {o.outcome for o in witnessed.submit().values()} == {"cosigned"}
    seen = {_label(w): w.state()[origin(api.broker)] for w in ws}
    with api.broker.engine.connect() as conn:
        seq = conn.execute(text("SELECT min(seq) FROM audit_records WHERE type = 'capability.minted'")).scalar_one()
    before = {label: _refusals(label, "conflict") for label in seen}

    # 1. Same size, another root: the witness holds this size with the true root.
    _rewrite_history(api, seq)
    link_all(api.broker, wait=120)
    with caplog.at_level(logging.ERROR, logger="broker.audit.witness"):
        outcomes = witnessed.submit()
    for label, o in outcomes.items():
        assert o.outcome == "refused" and o.reason == "conflict" and "rewritten" in (o.problem or ""), o
        assert _refusals(label, "conflict") == before[label] + 1
    assert sum("AUDIT WITNESS" in r.getMessage() and "REFUSED" in r.getMessage() for r in caplog.records) == 2
    records = _witness_records(api)
    assert sorted(r["detail"]["witness"] for r in records) == sorted(seen)
    assert {r["request"]["reason"] for r in records} == {"conflict"} and {r["outcome"] for r in records} == {"refused"}
    # Reported once, not every round.
    assert {o.outcome for o in witnessed.submit().values()} == {"skipped"}
    assert len(_witness_records(api)) == 2

    # 2. The rewritten log grows: the proof from what the witness cosigned does not verify (422).
    witnessed.grow(1)
    outcomes = witnessed.submit()
    for label, o in outcomes.items():
        assert o.outcome == "refused" and o.reason == "not-consistent", o
        assert _refusals(label, "not-consistent") >= 1
    assert {r["request"]["reason"] for r in _witness_records(api)} == {"conflict", "not-consistent"}
    # The witnesses never moved off the true history.
    for w in ws:
        assert w.state()[origin(api.broker)] == seen[_label(w)]
        assert [s for s, _ in w.answers][-1] == 422
    body = api.client.get("/v1/audit/checkpoint", headers=api.as_admin()).json()
    assert body["cosignatures"] == []  # nothing cosigned the rewritten log
    assert all(s["refused_reason"].startswith("not-consistent") for s in body["witnesses"])


@pytest.mark.parametrize("case", ["untrusted-key", "unknown-origin"])
def test_a_witness_that_does_not_know_the_log_refuses_with_403_or_404(
        database_url: str, tmp_path: Path, case: str) -> None:
    with TestWitness("witness.example/strict", tmp_path / "w.json") as w:
        broker = build_broker(tmp_path, database_url, BrokerSecrets(),
                              audit_witnesses=f'[{{"url": "{w.url}", "vkey": "{w.vkey}"}}]')
        with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
            api = Api(server.base_url, BrokerSecrets(), broker, client)
            if case == "untrusted-key":  # the origin is known, under another log's key
                from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
                w.trust(origin(broker), checkpoints.vkey(api.broker.keyring.active.kid,
                                                         Ed25519PrivateKey.generate().public_key()))
            else:
                w.trust("another.example/log", _broker_vkey(api))
            link_all(broker, wait=120)
            (o,) = cosigning.submit_newest(broker)
            assert o.outcome == "refused" and o.reason == case, o
            assert w.answers[-1][0] == (403 if case == "untrusted-key" else 404)
            assert _refusals(o.witness, case) >= 1


def test_a_cosignature_that_does_not_verify_is_not_stored(witnessed: Witnessed) -> None:
    api, ws = witnessed.api, witnessed.witnesses
    impostor = TestWitness(ws[0].name, ws[0].state_file)  # same name, another key
    ws[0].cosign = impostor.cosign  # type: ignore[method-assign]
    witnessed.grow(2)
    outcomes = witnessed.submit()
    assert outcomes[_label(ws[0])].outcome == "refused" and outcomes[_label(ws[0])].reason == "bad-cosignature"
    assert outcomes[_label(ws[1])].outcome == "cosigned"
    body = api.client.get("/v1/audit/checkpoint", headers=api.as_admin()).json()
    assert [c["witness"] for c in body["cosignatures"]] == [_label(ws[1])]


def _cli(api: Api, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BROKER_URL": api.base_url, "BROKER_TOKEN": api.secrets.admin_token}
    return subprocess.run([BROKER_CLI, "audit", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)


def test_audit_verify_with_a_witness_policy(witnessed: Witnessed, tmp_path: Path) -> None:
    api, ws = witnessed.api, witnessed.witnesses
    witnessed.grow(3)
    assert {o.outcome for o in witnessed.submit().values()} == {"cosigned"}
    saved = _cli(api, tmp_path, "checkpoint")
    assert saved.returncode == 0, saved.stderr
    good = tmp_path / "cosigned.txt"
    good.write_text(saved.stdout)
    v1, v2 = witnessed.vkeys()
    third = TestWitness("witness.example/w3", tmp_path / "w3.json")

    ok = _cli(api, tmp_path, "verify", "--checkpoint", str(good), "--witness", v1, "--witness", v2)
    assert ok.returncode == 0 and "2 valid cosignature(s) by the given witnesses, 2 required" in ok.stdout, ok.stdout
    two_of_three = _cli(api, tmp_path, "verify", "--checkpoint", str(good), "--witness", v1, "--witness", v2,
                        "--witness", third.vkey, "--witnesses-required", "2")
    assert two_of_three.returncode == 0, two_of_three.stdout + two_of_three.stderr

    text_, sigs = notes.split(saved.stdout)
    broker_line, w_lines = sigs[0].line, {s.name: s.line for s in sigs[1:]}
    flipped = w_lines[ws[1].name][:-6] + ("A" if w_lines[ws[1].name][-6] != "A" else "B") + w_lines[ws[1].name][-5:]
    forged_time = notes.parse_signature(w_lines[ws[1].name])
    # A cosignature by w2's name, made by another key (its key id then is not w2's).
    impostor = TestWitness(ws[1].name, tmp_path / "imp.json").cosign(text_)
    # w2's real key over another tree: a valid signature, for the wrong checkpoint.
    other_tree = ws[1].cosign(text_.replace("\n", "\nX", 1))
    cases = {
        "no cosignature": f"{text_}\n{broker_line}\n{w_lines[ws[0].name]}\n",
        "does not verify": f"{text_}\n{broker_line}\n{w_lines[ws[0].name]}\n{flipped}\n",
        "impostor": f"{text_}\n{broker_line}\n{w_lines[ws[0].name]}\n{impostor}\n",
        "other tree": f"{text_}\n{broker_line}\n{w_lines[ws[0].name]}\n{other_tree}\n",
        "duplicated": f"{text_}\n{broker_line}\n{w_lines[ws[0].name]}\n{w_lines[ws[0].name]}\n",
    }
    assert len(forged_time.signature) == 72
    for name, note in cases.items():
        path = tmp_path / f"bad-{name.replace(' ', '-')}.txt"
        path.write_text(note)
        bad = _cli(api, tmp_path, "verify", "--checkpoint", str(path), "--witness", v1, "--witness", v2)
        assert bad.returncode == 1, (name, bad.stdout, bad.stderr)
        assert "IS NOT WITNESSED: 1 valid cosignature(s) by the given witnesses, 2 required" in bad.stdout, name
        assert _label(ws[1]) in bad.stdout, (name, bad.stdout)
        expected = "does not verify" if name in ("does not verify", "other tree") else "no cosignature"
        assert expected in bad.stdout, (name, bad.stdout)
        # One of the two is enough when the policy says so.
        one = _cli(api, tmp_path, "verify", "--checkpoint", str(path), "--witness", v1, "--witness", v2,
                   "--witnesses-required", "1")
        assert one.returncode == 0, (name, one.stdout, one.stderr)

    unwitnessed = tmp_path / "unwitnessed.txt"
    unwitnessed.write_text(f"{text_}\n{broker_line}\n")
    none = _cli(api, tmp_path, "verify", "--checkpoint", str(unwitnessed), "--witness", v1, "--witnesses-required", "1")
    assert none.returncode == 1 and "0 valid cosignature(s)" in none.stdout

    # A policy that cannot be met or keys that do not parse: usage errors, before anything is read.
    for args in (["--witness", v1, "--witnesses-required", "2"], ["--witness", v1, "--witness", v1],
                 ["--witness", "not-a-vkey"], ["--witness", v1.replace("+", "+0", 1)],
                 ["--witnesses-required", "1"], ["--witness", _broker_vkey(api)]):
        usage = _cli(api, tmp_path, "verify", "--checkpoint", str(good), *args)
        assert usage.returncode == 2, (args, usage.stdout, usage.stderr)
    assert _cli(api, tmp_path, "verify", "--witness", v1).returncode == 2


def test_the_background_loop_cosigns_and_an_unreachable_witness_is_only_retried(
        database_url: str, tmp_path: Path) -> None:
    down = TestWitness("witness.example/down", tmp_path / "down.json")  # never started: nothing listens
    down_url = f"http://127.0.0.1:{free_port()}"
    with TestWitness("witness.example/up", tmp_path / "up.json") as up:
        setting = (f'[{{"url": "{up.url}", "vkey": "{up.vkey}"}}, '
                   f'{{"url": "{down_url}", "vkey": "{down.vkey}"}}]')
        secrets_ = BrokerSecrets()
        broker = build_broker(tmp_path, database_url, secrets_, audit_witnesses=setting,
                              audit_witness_interval_seconds=0.2, audit_checkpoint_interval_seconds=0,
                              audit_witness_timeout_seconds=2)
        up.trust(origin(broker), checkpoints.vkey(broker.keyring.active.kid, broker.keyring.active.public))
        with LiveServer(broker, sweeper=True) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
            api = Api(server.base_url, secrets_, broker, client)
            session = api.new_session()
            assert api.request(session, {"resource": "jwt://svc/a", "access": "read"}).status_code == 201
            deadline, body = time.monotonic() + 30, {}
            while time.monotonic() < deadline:
                body = client.get("/v1/audit/checkpoint", headers=api.as_admin()).json()
                if body.get("cosignatures"):
                    break
                time.sleep(0.2)
            assert [c["witness"] for c in body["cosignatures"]] == [_label(up)], body
            assert notes.check_quorum(body["note"], [notes.parse_vkey(up.vkey)], 1).ok
            failed = REGISTRY.get_sample_value("broker_audit_witness_submissions_total",
                                               {"witness": _label(down), "outcome": "failed"}) or 0.0
            assert failed >= 1
            assert _refusals(_label(down), "conflict") == _refusals(_label(down), "not-consistent") == 0
            assert _witness_records(api) == []  # an outage is not a refusal: nothing audited


def test_the_test_witness_keeps_to_the_spec(witnessed: Witnessed) -> None:
    """The reference the broker is tested against: restarted it remembers, and it refuses what the
    spec says it must (so the cosignatures above are not a witness that signs anything)."""
    api, w = witnessed.api, witnessed.witnesses[0]
    witnessed.grow(3)
    assert {o.outcome for o in witnessed.submit().values()} == {"cosigned"}
    small = witnesses_checkpoint(api)
    witnessed.grow(5)
    big = witnesses_checkpoint(api)
    restarted = TestWitness(w.name, w.state_file, key=w.key)
    restarted.trust(origin(api.broker), _broker_vkey(api))
    with transaction(api.broker.engine) as db:
        leaves = verification.leaf_hashes(db, big["tree_size"])
    proof = consistency_proof(small["tree_size"], leaves)
    flipped = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    other_origin = big["note"].replace(origin(api.broker), "another.example/log", 1)
    cases = [
        (cosigning.body(0, [], big["note"]), 409),  # restarted, it still holds the small tree
        (cosigning.body(small["tree_size"], flipped, big["note"]), 422),
        (cosigning.body(small["tree_size"], proof[:-1], big["note"]), 422),
        (cosigning.body(big["tree_size"] + 1, [], big["note"]), 400),
        (cosigning.body(small["tree_size"], proof, other_origin), 404),
        (cosigning.body(small["tree_size"], proof, big["note"].replace("\n\n", "\nextra\n\n", 1)), 403),
        (b"old 01\n\n" + big["note"].encode(), 400),
        (b"\xff\xfe", 400),
        (b"old 0\n" + big["note"].encode(), 400),
    ]
    for request, status in cases:
        with pytest.raises(WitnessError) as caught:
            restarted.add_checkpoint(request)
        assert caught.value.status == status, (request[:40], caught.value)
    assert restarted.state()[origin(api.broker)]["size"] == small["tree_size"]  # nothing refused moved it
    line = restarted.add_checkpoint(cosigning.body(small["tree_size"], proof, big["note"]))
    text_, _ = notes.split(big["note"])
    assert notes.verify_cosignature(text_, notes.parse_signature(line.rstrip("\n")),
                                    notes.parse_vkey(w.vkey)) > 0


def witnesses_checkpoint(api: Api) -> dict[str, Any]:
    link_all(api.broker, wait=120)
    body = api.client.get("/v1/audit/checkpoint", headers=api.as_admin()).json()
    # The broker's own note, without cosignatures: what it submits.
    keep = notes.split(body["note"])[1][0].line
    body["note"] = notes.split(body["note"])[0] + "\n" + keep + "\n"
    return dict(body)
