"""Signed checkpoints of the audit tree, in the C2SP signed-note / tlog-checkpoint format.

    <origin>\\n<tree size>\\n<base64 root hash>\\ntime <UTC timestamp>\\n
    \\n
    \\u2014 <key name> <base64(key id (4 bytes) || Ed25519 signature)>\\n

The key name is the signing key's `kid` (so a verifier finds the public key in the broker's
JWKS); the key id is SHA-256(name || 0x0A || 0x01 || public key)[:4], as C2SP specifies for
Ed25519. The signature covers the note text: every line above the blank line, with its newline.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.audit import note as notes

_DASH = "\u2014"


class CheckpointError(ValueError):
    """A checkpoint that does not parse or whose signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root_hash: str  # hex
    timestamp: str
    key_name: str
    note: str  # the whole signed note, as published

    def to_dict(self) -> dict[str, object]:
        return {"origin": self.origin, "tree_size": self.size, "root_hash": self.root_hash,
                "timestamp": self.timestamp, "key_name": self.key_name, "note": self.note}


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(name: str, public: Ed25519PublicKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n\x01" + _raw(public)).digest()[:4]


def vkey(name: str, public: Ed25519PublicKey) -> str:
    """The C2SP verifier key of a checkpoint signing key: what a witness trusts the log by."""
    return notes.vkey(name, notes.ED25519, public)


def body(origin: str, size: int, root_hash: bytes, timestamp: str) -> str:
    return f"{origin}\n{size}\n{base64.b64encode(root_hash).decode()}\ntime {timestamp}\n"


def sign(origin: str, size: int, root_hash: bytes, timestamp: str, *, name: str,
         key: Ed25519PrivateKey) -> Checkpoint:
    text = body(origin, size, root_hash, timestamp)
    signature = key_id(name, key.public_key()) + key.sign(text.encode())
    note = f"{text}\n{_DASH} {name} {base64.b64encode(signature).decode()}\n"
    return Checkpoint(origin, size, root_hash.hex(), timestamp, name, note)


def parse(note: str, keys: Mapping[str, Ed25519PublicKey]) -> Checkpoint:
    """Parse a signed note and verify its signature with the key its signature line names.
    Raises CheckpointError, naming what is wrong."""
    text, sep, signatures = note.partition("\n\n")
    if not sep or not text:
        raise CheckpointError("not a signed note: no blank line before the signatures")
    text += "\n"
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError("a checkpoint needs an origin, a tree size and a root hash")
    origin, size_text, root_text = lines[:3]
    timestamp = next((line[5:] for line in lines[3:] if line.startswith("time ")), "")
    try:
        size = int(size_text)
        if size < 0 or str(size) != size_text:
            raise ValueError
        root_hash = base64.b64decode(root_text, validate=True)
        if len(root_hash) != 32:
            raise ValueError
    except ValueError as exc:
        raise CheckpointError("the tree size or root hash does not parse") from exc
    verified = None
    for line in signatures.splitlines():
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != _DASH:
            raise CheckpointError("a signature line does not parse")
        name = parts[1]
        public = keys.get(name)
        if public is None:
            continue
        try:
            raw = base64.b64decode(parts[2], validate=True)
        except ValueError as exc:
            raise CheckpointError("a signature does not parse") from exc
        if raw[:4] != key_id(name, public):
            raise CheckpointError(f"the signature by {name} has the wrong key id")
        try:
            public.verify(raw[4:], text.encode())
        except InvalidSignature as exc:
            raise CheckpointError(f"the signature by {name} does not verify") from exc
        verified = name
        break
    if verified is None:
        raise CheckpointError("no signature by a key the broker publishes")
    return Checkpoint(origin, size, root_hash.hex(), timestamp, verified, note)


def public_keys_from_jwks(jwks: Mapping[str, object]) -> dict[str, Ed25519PublicKey]:
    keys = {}
    listed = jwks.get("keys")
    for jwk in listed if isinstance(listed, list) else []:
        if isinstance(jwk, dict) and jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            x = str(jwk.get("x", ""))
            raw = base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))
            keys[str(jwk.get("kid"))] = Ed25519PublicKey.from_public_bytes(raw)
    return keys
