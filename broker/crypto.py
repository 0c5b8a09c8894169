"""Sealing secrets at rest (AES-256-GCM) and the one-way fingerprints the audit shows."""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import ConfigError, InternalError

_PREFIX = "v1:"


def decode_key(raw: str) -> bytes:
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except ValueError as exc:
        raise ConfigError("BROKER_ENCRYPTION_KEY must be base64") from exc
    if len(key) != 32:
        raise ConfigError("BROKER_ENCRYPTION_KEY must decode to exactly 32 bytes (AES-256)")
    return key


def write_secret(path: Path, content: str | bytes, *, overwrite: bool = False) -> None:
    """Write a file only its owner can read, 0600 from its creation: there is never a moment
    in which the secret sits in a file with the umask's permissions.

    `overwrite=False` refuses an existing file (FileExistsError); `overwrite=True` writes a new
    file beside it and renames it over the old one, so readers see the old or the new, whole."""
    data = content.encode() if isinstance(content, str) else content
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if overwrite else path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the mode given to os.open is narrowed by the umask, never widened; be exact
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise
    os.close(fd)
    if overwrite:
        os.replace(target, path)


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class Sealer:
    """AES-256-GCM with a fresh 96-bit nonce per message; the associated data binds a
    ciphertext to its row (the capability id), so it cannot be replayed onto another."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, associated: str) -> str:
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, plaintext.encode(), associated.encode())
        return _PREFIX + base64.b64encode(nonce + ct).decode()

    def unseal(self, sealed: str, associated: str) -> str:
        if not sealed.startswith(_PREFIX):
            raise InternalError("sealed value has an unknown format")
        blob = base64.b64decode(sealed[len(_PREFIX) :])
        try:
            return self._aead.decrypt(blob[:12], blob[12:], associated.encode()).decode()
        except InvalidTag as exc:
            # Wrong key or a ciphertext moved between rows: never fall back to anything.
            raise InternalError("sealed value failed authentication") from exc
