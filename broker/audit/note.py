"""C2SP signed notes (signed-note), their verifier keys, and Ed25519 cosignatures (tlog-cosignature).

A note is its text (lines, each ending in a newline), a blank line, and signature lines:

    \\u2014 <key name> <base64(4-byte key id || signature)>\\n

The key id is SHA-256(name || 0x0A || type || public key)[:4], where `type` is the signature
type: 0x01 for a plain Ed25519 note signature (the broker's own checkpoint signature), 0x04 for
an Ed25519 `cosignature/v1` (a witness's). A verifier key (vkey) is
`<name>+<hex key id>+<base64(type || public key)>`.

A `cosignature/v1` signature is `u64 timestamp (big-endian) || Ed25519 signature` over

    cosignature/v1\\n
    time <timestamp>\\n
    <the note text, every line up to the blank line>

Verifiers ignore signature lines whose name and key id match none of their keys: a note may
carry signatures by anyone, and only the ones a policy names count.
"""

from __future__ import annotations

import base64
import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DASH = "\u2014"
ED25519 = 0x01
COSIGNATURE_V1 = 0x04
_TYPES = {ED25519: "Ed25519", COSIGNATURE_V1: "cosignature/v1"}
# signed-note: a key name is non-empty and has no Unicode spaces and no plus sign.
_NAME = re.compile(r"^[^\s+]{1,255}$")
MAX_TIMESTAMP = 2**63 - 1


class NoteError(ValueError):
    """A note, signature line or verifier key that does not parse."""


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    signature: bytes  # after the key id
    line: str  # as it appeared, without its newline


@dataclass(frozen=True)
class Verifier:
    """One trusted key: its name, signature type, public key (and so its key id)."""

    name: str
    type: int
    public: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.type, self.public)

    @property
    def vkey(self) -> str:
        return vkey(self.name, self.type, self.public)

    def matches(self, sig: Signature) -> bool:
        return sig.name == self.name and sig.key_id == self.key_id


def raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, type_: int, public: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([type_]) + raw(public)).digest()[:4]


def vkey(name: str, type_: int, public: Ed25519PublicKey) -> str:
    return f"{name}+{key_id(name, type_, public).hex()}+{base64.b64encode(bytes([type_]) + raw(public)).decode()}"


def parse_vkey(text: str, *, types: tuple[int, ...] = (ED25519, COSIGNATURE_V1)) -> Verifier:
    """A verifier key; its hex key id must be the one its name and key compute to."""
    parts = text.strip().split("+", 2)  # the base64 key may itself hold plus signs
    if len(parts) != 3:
        raise NoteError("a verifier key is <name>+<hex key id>+<base64 key>")
    name, hex_id, encoded = parts
    if not _NAME.match(name):
        raise NoteError("a verifier key's name is empty or has spaces or a plus sign")
    try:
        material = base64.b64decode(encoded, validate=True)
        claimed = bytes.fromhex(hex_id)
    except ValueError as exc:
        raise NoteError("a verifier key's key id or key does not decode") from exc
    if len(material) != 33 or material[0] not in types:
        wanted = " or ".join(_TYPES[t] for t in types)
        raise NoteError(f"a verifier key here must be an {wanted} key (type byte and 32 bytes)")
    verifier = Verifier(name, material[0], Ed25519PublicKey.from_public_bytes(material[1:]))
    if len(claimed) != 4 or claimed != verifier.key_id:
        raise NoteError(f"the verifier key for {name} names key id {hex_id}, but its key computes another")
    return verifier


def split(note: str) -> tuple[str, list[Signature]]:
    """The note's text (with its final newline) and its signature lines, parsed but not verified."""
    text, sep, block = note.partition("\n\n")
    if not sep or not text:
        raise NoteError("not a signed note: no blank line before the signatures")
    if not block.endswith("\n"):
        raise NoteError("not a signed note: the last signature line does not end in a newline")
    signatures = [parse_signature(line) for line in block[:-1].split("\n")]
    if not signatures:
        raise NoteError("not a signed note: no signature lines")
    return text + "\n", signatures


def parse_signature(line: str) -> Signature:
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != DASH or not _NAME.match(parts[1]):
        raise NoteError("a signature line does not parse")
    try:
        decoded = base64.b64decode(parts[2], validate=True)
    except ValueError as exc:
        raise NoteError("a signature does not decode") from exc
    if len(decoded) < 5:
        raise NoteError("a signature is too short")
    return Signature(parts[1], decoded[:4], decoded[4:], line)


def cosigned_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def cosign(text: str, name: str, key: Ed25519PrivateKey, timestamp: int) -> str:
    """A witness's `cosignature/v1` signature line (without its newline) over a note's text."""
    signature = key.sign(cosigned_message(text, timestamp))
    payload = key_id(name, COSIGNATURE_V1, key.public_key()) + struct.pack(">Q", timestamp) + signature
    return f"{DASH} {name} {base64.b64encode(payload).decode()}"


def verify_cosignature(text: str, sig: Signature, verifier: Verifier) -> int:
    """The cosignature's timestamp, if `sig` is `verifier`'s valid cosignature/v1 over `text`."""
    if verifier.type != COSIGNATURE_V1 or not verifier.matches(sig):
        raise NoteError(f"the signature by {sig.name} is not by this cosigner's key")
    if len(sig.signature) != 8 + 64:
        raise NoteError(f"the cosignature by {sig.name} is not a timestamped Ed25519 signature")
    (timestamp,) = struct.unpack(">Q", sig.signature[:8])
    if timestamp > MAX_TIMESTAMP:
        raise NoteError(f"the cosignature by {sig.name} has an impossible timestamp")
    try:
        verifier.public.verify(sig.signature[8:], cosigned_message(text, timestamp))
    except InvalidSignature as exc:
        raise NoteError(f"the cosignature by {sig.name} does not verify") from exc
    return int(timestamp)


def verify_signature(text: str, sig: Signature, verifier: Verifier) -> None:
    """A plain Ed25519 note signature (type 0x01) over `text`."""
    if verifier.type != ED25519 or not verifier.matches(sig):
        raise NoteError(f"the signature by {sig.name} is not by this key")
    try:
        verifier.public.verify(sig.signature, text.encode())
    except InvalidSignature as exc:
        raise NoteError(f"the signature by {sig.name} does not verify") from exc


@dataclass(frozen=True)
class QuorumResult:
    ok: bool
    valid: list[str]  # the witnesses whose cosignature verified
    problems: dict[str, str]  # witness name -> why it does not count
    required: int

    def reason(self) -> str:
        why = "; ".join(f"{name}: {problem}" for name, problem in sorted(self.problems.items()))
        return (f"{len(self.valid)} valid cosignature(s) by the given witnesses, {self.required} required"
                + (f" ({why})" if why else ""))


def check_quorum(note: str, witnesses: list[Verifier], required: int) -> QuorumResult:
    """Does `note` carry valid cosignatures by at least `required` distinct `witnesses`?"""
    if required < 1 or required > len(witnesses):
        raise NoteError(f"cannot require {required} of {len(witnesses)} witness keys")
    if len({(w.name, w.key_id) for w in witnesses}) != len(witnesses):
        raise NoteError("the same witness key is given twice")
    text, signatures = split(note)
    valid: list[str] = []
    problems: dict[str, str] = {}
    for witness in witnesses:
        mine = [s for s in signatures if witness.matches(s)]
        label = f"{witness.name}+{witness.key_id.hex()}"
        if not mine:
            problems[label] = "no cosignature"
            continue
        try:
            for sig in mine:
                verify_cosignature(text, sig, witness)
        except NoteError as exc:
            problems[label] = str(exc).removeprefix(f"the cosignature by {witness.name} ")
            continue
        valid.append(label)
    return QuorumResult(len(valid) >= required, valid, problems, required)


@dataclass(frozen=True)
class AuditWitness:
    """A C2SP tlog-witness the broker submits its checkpoints to (docs/audit.md)."""

    url: str  # the submission prefix: the broker POSTs <url>/add-checkpoint
    vkey: str  # its cosignature/v1 verifier key, <name>+<hex key id>+<base64 key>

    @property
    def label(self) -> str:
        """<name>+<hex key id>: names the witness in tables, metrics, logs and the audit."""
        return "+".join(self.vkey.split("+", 2)[:2])
