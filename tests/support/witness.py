"""A C2SP tlog-witness over loopback, written from the spec for the tests (not from the broker's code).

    POST /add-checkpoint
    old <size>\\n <proof lines, base64>\\n \\n <checkpoint: a signed note>

In the spec's order: the checkpoint's origin must be known (404), one of its signatures must
verify with a log key the witness trusts for that origin (403), the old size must not exceed
the checkpoint's (400), it must be the size the witness last cosigned for that origin (409, the
body that size and a newline, `Content-Type: text/x.tlog.size`), the RFC 6962 consistency proof
from the stored tree to the new one must verify (422), and at equal sizes the roots must match
(409). Then the new (size, root) is persisted (a JSON file, written before answering, the check
and the write under one lock) and the answer is a cosignature/v1 line: an Ed25519 signature
over `cosignature/v1\\ntime <t>\\n` and the checkpoint's text, prefixed by the 4-byte key id
SHA-256(name || 0x0A || 0x04 || key)[:4] and the big-endian u64 timestamp.

Its own Merkle and note code lives here on purpose: a witness that shared the broker's could not
catch the broker's mistakes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DASH = "\u2014"


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _key_id(name: str, type_byte: int, public_raw: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([type_byte]) + public_raw).digest()[:4]


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def consistent(m: int, n: int, old_root: bytes, new_root: bytes, proof: list[bytes]) -> bool:
    """RFC 9162 section 2.1.4.2, 0 < m < n."""
    if m == 1 << (m.bit_length() - 1):  # m a power of two: the old root is the first node
        proof = [old_root, *proof]
    if not proof:
        return False
    fn, sn = m - 1, n - 1
    while fn % 2 == 1:
        fn //= 2
        sn //= 2
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn % 2 == 1 or fn == sn:
            fr, sr = _node(c, fr), _node(c, sr)
            while fn % 2 == 0 and fn != 0:
                fn //= 2
                sn //= 2
        else:
            sr = _node(sr, c)
        fn //= 2
        sn //= 2
    return sn == 0 and fr == old_root and sr == new_root


class WitnessError(Exception):
    def __init__(self, status: int, message: str, body: str | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


class TestWitness:
    """One witness: a name, an Ed25519 cosigning key, the logs it trusts (origin -> log vkeys)."""

    __test__ = False  # not a pytest class

    def __init__(self, name: str, state_file: Path, logs: dict[str, list[str]] | None = None, *,
                 key: Ed25519PrivateKey | None = None) -> None:
        self.name = name
        self.key = key or Ed25519PrivateKey.generate()  # the same key and state file: the same witness, restarted
        raw = _raw(self.key.public_key())
        self.key_id = _key_id(name, 0x04, raw)
        encoded = base64.b64encode(b"\x04" + raw).decode()
        self.vkey = f"{name}+{self.key_id.hex()}+{encoded}"
        self.state_file = state_file
        self.logs: dict[str, list[tuple[str, bytes, Ed25519PublicKey]]] = {}
        for origin, vkeys in (logs or {}).items():
            for v in vkeys:
                self.trust(origin, v)
        self.answers: list[tuple[int, str]] = []  # (status, what), for the tests' asserts
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def trust(self, origin: str, log_vkey: str) -> None:
        name, hex_id, encoded = log_vkey.split("+", 2)
        material = base64.b64decode(encoded)
        assert material[0] == 0x01 and len(material) == 33, "a log key is an Ed25519 (0x01) vkey"
        assert _key_id(name, 0x01, material[1:]).hex() == hex_id
        self.logs.setdefault(origin, []).append((name, bytes.fromhex(hex_id),
                                                Ed25519PublicKey.from_public_bytes(material[1:])))

    # --- state ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save(self, state: dict[str, Any]) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    # --- the protocol -----------------------------------------------------------------------

    def add_checkpoint(self, body: bytes) -> str:
        old, proof, checkpoint = self._parse_request(body)
        note_text, sigs, origin, size, root = self._parse_checkpoint(checkpoint)
        keys = self.logs.get(origin)
        if keys is None:
            raise WitnessError(404, f"unknown origin {origin!r}")
        if not self._signed(note_text, sigs, keys):
            raise WitnessError(403, "no signature by a trusted log key")
        if old > size:
            raise WitnessError(400, "old size beyond the checkpoint size")
        with self._lock:  # check and persist atomically (tlog-witness's rollback race)
            state = self.state()
            mine = state.get(origin, {"size": 0, "root": None})
            if old != mine["size"]:
                raise WitnessError(409, "old size does not match", f"{mine['size']}\n")
            if old == 0:
                if proof:
                    raise WitnessError(422, "a proof from size 0 must be empty")
            elif old == size:
                if base64.b64decode(mine["root"]) != root:
                    raise WitnessError(409, "same size, another root", f"{mine['size']}\n")
                if proof:
                    raise WitnessError(422, "a proof between equal sizes must be empty")
            elif not consistent(old, size, base64.b64decode(mine["root"]), root, proof):
                raise WitnessError(422, "the consistency proof does not verify")
            state[origin] = {"size": size, "root": base64.b64encode(root).decode()}
            self._save(state)
        return self.cosign(note_text) + "\n"

    @staticmethod
    def _parse_request(body: bytes) -> tuple[int, list[bytes], str]:
        """The old size line and the proof lines before the empty line; the checkpoint after it."""
        try:
            text = body.decode()
        except UnicodeDecodeError as exc:
            raise WitnessError(400, "not UTF-8") from exc
        head, sep, checkpoint = text.partition("\n\n")
        if not sep:
            raise WitnessError(400, "no empty line before the checkpoint")
        lines = head.split("\n")
        if not lines[0].startswith("old ") or not lines[0][4:].isdigit() or \
                (lines[0][4] == "0" and len(lines[0]) > 5):
            raise WitnessError(400, "bad old size line")
        old = int(lines[0][4:])
        if len(lines) - 1 > 63:
            raise WitnessError(400, "too many proof lines")
        try:
            proof = [base64.b64decode(line, validate=True) for line in lines[1:]]
        except ValueError as exc:
            raise WitnessError(400, "a proof line is not base64") from exc
        if any(len(h) != 32 for h in proof):
            raise WitnessError(400, "a proof hash is not 32 bytes")
        return old, proof, checkpoint

    @staticmethod
    def _parse_checkpoint(checkpoint: str) -> tuple[str, str, str, int, bytes]:
        """A signed note: its text, its signature lines, and the origin, size and root it states."""
        note_text, sep, sigs = checkpoint.partition("\n\n")
        if not sep or not sigs.endswith("\n"):
            raise WitnessError(400, "the checkpoint is not a signed note")
        note_text += "\n"
        body_lines = note_text[:-1].split("\n")
        if len(body_lines) < 3:
            raise WitnessError(400, "the checkpoint has no origin, size and root")
        origin, size_text, root_text = body_lines[:3]
        if not size_text.isdigit() or (size_text[0] == "0" and size_text != "0"):
            raise WitnessError(400, "bad tree size")
        size = int(size_text)
        try:
            root = base64.b64decode(root_text, validate=True)
        except ValueError as exc:
            raise WitnessError(400, "bad root hash") from exc
        if len(root) != 32:
            raise WitnessError(400, "bad root hash")
        return note_text, sigs, origin, size, root

    def cosign(self, note_text: str, timestamp: int | None = None) -> str:
        t = int(time.time()) if timestamp is None else timestamp
        signature = self.key.sign(f"cosignature/v1\ntime {t}\n".encode() + note_text.encode())
        return f"{DASH} {self.name} {base64.b64encode(self.key_id + struct.pack('>Q', t) + signature).decode()}"

    @staticmethod
    def _signed(note_text: str, sigs: str, keys: list[tuple[str, bytes, Ed25519PublicKey]]) -> bool:
        for line in sigs[:-1].split("\n"):
            parts = line.split(" ")
            if len(parts) != 3 or parts[0] != DASH:
                raise WitnessError(400, "a signature line does not parse")
            try:
                raw = base64.b64decode(parts[2], validate=True)
            except ValueError as exc:
                raise WitnessError(400, "a signature does not decode") from exc
            for name, key_id, public in keys:
                if parts[1] == name and raw[:4] == key_id:
                    try:
                        public.verify(raw[4:], note_text.encode())
                        return True
                    except InvalidSignature:
                        continue
        return False

    # --- HTTP -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> TestWitness:
        witness = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(min(length, 1 << 20))
                if self.path != "/add-checkpoint":
                    self._answer(404, "text/plain", "not found\n")
                    return
                try:
                    out = witness.add_checkpoint(data)
                except WitnessError as exc:
                    witness.answers.append((exc.status, str(exc)))
                    media = "text/x.tlog.size" if exc.body is not None else "text/plain"
                    self._answer(exc.status, media, exc.body if exc.body is not None else f"{exc}\n")
                    return
                witness.answers.append((200, "cosigned"))
                self._answer(200, "text/plain; charset=utf-8", out)

            def _answer(self, status: int, media: str, text: str) -> None:
                payload = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", media)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
