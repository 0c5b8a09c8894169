"""C2SP signed notes, verifier keys and cosignature/v1, checked against the spec's own definitions
(key id = SHA-256(name || 0x0A || type || key)[:4]; the cosigned message), and against corpora
of hostile notes, signature lines and verifier keys."""

from __future__ import annotations

import base64
import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.audit import checkpoint as checkpoints
from broker.audit import note as notes
from broker.config import Settings
from broker.errors import ConfigError

TEXT = "example.com/audit\n5\n" + base64.b64encode(bytes(range(32))).decode() + "\ntime 2026-12-07T09:00:00.000000Z\n"


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_key_ids_and_vkeys_are_the_specs() -> None:
    key = Ed25519PrivateKey.generate()
    name = "witness.example/w1"
    expected = hashlib.sha256(name.encode() + b"\x0a\x04" + _raw(key)).digest()[:4]
    assert notes.key_id(name, notes.COSIGNATURE_V1, key.public_key()) == expected
    vkey = notes.vkey(name, notes.COSIGNATURE_V1, key.public_key())
    material = base64.b64encode(b"\x04" + _raw(key)).decode()
    assert vkey == f"{name}+{expected.hex()}+{material}"
    parsed = notes.parse_vkey(vkey)
    assert (parsed.name, parsed.type, parsed.key_id) == (name, 0x04, expected)
    # The broker's own checkpoint key: type 0x01, the key id the checkpoint signature carries.
    log_vkey = checkpoints.vkey("kid-1", key.public_key())
    signed = checkpoints.sign("example.com/audit", 1, bytes(32), "t", name="kid-1", key=key)
    sig = notes.split(signed.note)[1][0]
    assert notes.parse_vkey(log_vkey).key_id == sig.key_id
    notes.verify_signature(notes.split(signed.note)[0], sig, notes.parse_vkey(log_vkey))


def test_a_cosignature_is_timestamped_ed25519_over_the_header_time_and_note_text() -> None:
    key = Ed25519PrivateKey.generate()
    line = notes.cosign(TEXT, "w.example/1", key, 1_700_000_000)
    sig = notes.parse_signature(line)
    assert sig.key_id == hashlib.sha256(b"w.example/1\n\x04" + _raw(key)).digest()[:4]
    (stamp,) = struct.unpack(">Q", sig.signature[:8])
    assert stamp == 1_700_000_000
    key.public_key().verify(sig.signature[8:], b"cosignature/v1\ntime 1700000000\n" + TEXT.encode())
    verifier = notes.parse_vkey(notes.vkey("w.example/1", notes.COSIGNATURE_V1, key.public_key()))
    assert notes.verify_cosignature(TEXT, sig, verifier) == 1_700_000_000
    with pytest.raises(notes.NoteError, match="does not verify"):
        notes.verify_cosignature(TEXT.replace("5", "6", 1), sig, verifier)
    # A plain note signature (0x01) by the same key and name is not a cosignature, nor the reverse.
    with pytest.raises(notes.NoteError):
        notes.verify_cosignature(TEXT, sig, notes.Verifier("w.example/1", notes.ED25519, key.public_key()))


HOSTILE_VKEYS = [
    "", "+", "++", "a+b+c", "name+00000000+", "name+zzzzzzzz+AAAA", "na me+00000000+" + "A" * 44,
    "name\u2028x+00000000+" + "A" * 44, "\u202ename+00000000+" + "A" * 44, "name+0000000+" + "A" * 44,
    "name+00000000+" + base64.b64encode(b"\x04" + bytes(31)).decode(),
    "name+00000000+" + base64.b64encode(b"\x09" + bytes(32)).decode(),
    "name+00000000+" + base64.b64encode(b"\x04" + bytes(32)).decode(),  # wrong key id for this key
    "name+00000000+" + base64.b64encode(b"\x04" + bytes(32)).decode() + "=",
    "\x00+00000000+" + "A" * 44, "name+" + "0" * 1000 + "+AAAA", "'; DROP TABLE x;--+00+AA", "$(id)+00+AA",
]


@pytest.mark.parametrize("vkey", HOSTILE_VKEYS)
def test_hostile_verifier_keys_are_refused(vkey: str) -> None:
    with pytest.raises(notes.NoteError):
        notes.parse_vkey(vkey)


def _note(*lines: str) -> str:
    return TEXT + "\n" + "".join(line + "\n" for line in lines)


HOSTILE_NOTES = [
    "", "\n", TEXT, TEXT + "\n", TEXT + "\n\n", _note("x"), _note("\u2014"), _note("\u2014 name"),
    _note("\u2014 name !!!notbase64"), _note("\u2014 name AAAA"), _note("- name " + "A" * 96),
    _note("\u2014  name " + "A" * 96), _note("\u2014 na\u00a0me " + "A" * 96), TEXT + "\n\u2014 name " + "A" * 96,
    _note("\u2014 name " + "A" * 96, ""), _note("\u2014 name " + "A" * 96 + " extra"),
    _note("\u2014 " + "n" * 300 + " " + "A" * 96), _note("\u2014 name\t" + "A" * 96),
]


@pytest.mark.parametrize("text", HOSTILE_NOTES)
def test_hostile_notes_do_not_count_as_witnessed(text: str) -> None:
    key = Ed25519PrivateKey.generate()
    verifier = notes.parse_vkey(notes.vkey("name", notes.COSIGNATURE_V1, key.public_key()))
    try:
        result = notes.check_quorum(text, [verifier], 1)
    except notes.NoteError:
        return
    assert not result.ok and result.valid == []


def test_quorum_counts_distinct_valid_witnesses_and_names_the_rest() -> None:
    keys = [Ed25519PrivateKey.generate() for _ in range(4)]
    verifiers = [notes.parse_vkey(notes.vkey(f"w{i}", notes.COSIGNATURE_V1, k.public_key())) for i, k in enumerate(keys)]
    lines = [notes.cosign(TEXT, f"w{i}", k, 1_700_000_000 + i) for i, k in enumerate(keys[:3])]
    prefix, _, encoded = lines[2].rpartition(" ")
    payload = bytearray(base64.b64decode(encoded))
    payload[-1] ^= 1  # the last byte of the Ed25519 signature
    bad = f"{prefix} {base64.b64encode(bytes(payload)).decode()}"
    note = _note(lines[0], lines[1], bad)
    result = notes.check_quorum(note, verifiers, 2)
    assert result.ok and result.valid == [f"w0+{verifiers[0].key_id.hex()}", f"w1+{verifiers[1].key_id.hex()}"]
    assert "does not verify" in result.problems[f"w2+{verifiers[2].key_id.hex()}"]
    assert result.problems[f"w3+{verifiers[3].key_id.hex()}"] == "no cosignature"
    assert not notes.check_quorum(note, verifiers, 3).ok
    assert "2 valid cosignature(s) by the given witnesses, 3 required" in notes.check_quorum(note, verifiers, 3).reason()
    for impossible in (0, 5):
        with pytest.raises(notes.NoteError):
            notes.check_quorum(note, verifiers, impossible)
    with pytest.raises(notes.NoteError, match="twice"):
        notes.check_quorum(note, [verifiers[0], verifiers[0]], 1)


@pytest.mark.parametrize("value", [
    "x", "{}", '{"url": "http://w", "vkey": "a+b+c"}', '[{"url": "http://w"}]', '[{"url": "ftp://w", "vkey": "V"}]',
    '[{"url": "http://w", "vkey": "V", "extra": 1}]', '[{"url": "http://w", "vkey": "LOG"}]', '[1]',
    '[{"url": "http://w", "vkey": "V"}, {"url": "http://x", "vkey": "V"}]',
])
def test_bad_witness_settings_are_refused_at_start(value: str) -> None:
    key = Ed25519PrivateKey.generate()
    value = value.replace("LOG", checkpoints.vkey("log", key.public_key())).replace(
        '"V"', '"' + notes.vkey("w", notes.COSIGNATURE_V1, key.public_key()) + '"')
    with pytest.raises(ConfigError, match="BROKER_AUDIT_WITNESSES"):
        Settings(audit_witnesses=value).audit_witness_list()
