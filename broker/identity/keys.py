"""The broker's Ed25519 signing keys: generate, rotate, sign, verify, publish as JWKS.

Keys live as PKCS#8 PEM files named `<created unix>-<hex>.pem` in one directory, readable by
the owner alone. The newest key signs. An older key stays published (and accepted) until
every token it could have signed has expired: `retire_after` seconds after its successor
appeared, where `retire_after` is the longest token lifetime the broker issues.
"""

from __future__ import annotations

import base64
import functools
import itertools
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.types import Options

from broker.crypto import write_secret
from broker.errors import ConfigError, Unauthenticated
from broker.identity.claims import MALFORMED_VALUE_ERRORS, time_claim_problem

ALGORITHM = "EdDSA"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    created: int
    private: Ed25519PrivateKey

    @property
    def public(self) -> Ed25519PublicKey:
        return self.private.public_key()

    def jwk(self) -> dict[str, str]:
        raw = self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "use": "sig", "alg": ALGORITHM}


def _write_private(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret(path, pem)


def rotate(directory: Path) -> str:
    """Add a new newest key; returns its kid. Old keys stay until retired."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    created = int(time.time())
    kid = f"{created}-{secrets.token_hex(4)}"
    _write_private(directory / f"{kid}.pem", Ed25519PrivateKey.generate())
    return kid



def jwt_options(require: list[str], *, audience: bool) -> Options:
    """pyjwt's decode options, every one spelled out (defaults too): a claim in `require` must be
    present; signature, expiry, not-before, issued-at and issuer are always checked; the
    audience where the caller names one."""
    return {
        "require": require,
        "verify_signature": True,
        "verify_exp": True,
        "verify_nbf": True,
        "verify_iat": True,
        "verify_iss": True,
        "verify_aud": audience,
    }

class KeyRing:
    def __init__(self, keys: list[SigningKey], retire_after: int) -> None:
        if not keys:
            raise ConfigError("no signing key found; run `broker-cli keys rotate --dir DIR`")
        self._keys = sorted(keys, key=lambda k: (k.created, k.kid))
        self._by_kid = {k.kid: k for k in self._keys}
        self.retire_after = retire_after
        self._verified = functools.lru_cache(maxsize=16_384)(self._verify_for_cache)

    @classmethod
    def load(cls, directory: Path, *, retire_after: int, create: bool = False) -> KeyRing:
        if create and not any(directory.glob("*.pem")):
            rotate(directory)
        if not directory.is_dir():
            raise ConfigError(f"signing key directory {directory} does not exist (BROKER_SIGNING_KEY_DIR)")
        keys = []
        for path in directory.glob("*.pem"):
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode & 0o077:
                raise ConfigError(f"signing key {path} is readable by others (mode {mode:o}); chmod 600 it")
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise ConfigError(f"signing key {path} is not an Ed25519 key")
            kid = path.stem
            try:
                created = int(kid.split("-", 1)[0])
            except ValueError as exc:
                raise ConfigError(f"signing key file name {path.name} must be <unix time>-<hex>.pem") from exc
            keys.append(SigningKey(kid=kid, created=created, private=loaded))
        return cls(keys, retire_after)

    @property
    def active(self) -> SigningKey:
        return self._keys[-1]

    def published(self, now: float | None = None) -> list[SigningKey]:
        """The active key and every older key that may still have live tokens."""
        now = time.time() if now is None else now
        out = []
        for older, successor in itertools.pairwise(self._keys):
            if successor.created + self.retire_after > now:
                out.append(older)
        out.append(self.active)
        return out

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [k.jwk() for k in self.published()]}

    def sign(self, claims: dict[str, Any], *, typ: str = "JWT") -> str:
        key = self.active
        return jwt.encode(claims, key.private, algorithm=ALGORITHM, headers={"kid": key.kid, "typ": typ})

    def verify_cached(self, token: str, *, audience: str, issuer: str, token_use: str) -> dict[str, Any]:
        """`verify`, remembering tokens that passed (agents present one token for many calls).
        Expiry is checked on every hit; a failure is never cached."""
        claims = self._verified(token, audience, issuer, token_use)
        if claims["exp"] <= time.time():
            raise Unauthenticated("token expired", code="token-expired")
        return dict(claims)

    def _verify_for_cache(self, token: str, audience: str, issuer: str, token_use: str) -> dict[str, Any]:
        return self.verify(token, audience=audience, issuer=issuer, token_use=token_use)

    def verify(self, token: str, *, audience: str | None, issuer: str, token_use: str) -> dict[str, Any]:
        """Decode a token this broker signed; every check spelled out, nothing left to defaults."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("malformed token") from exc
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("token algorithm not accepted")
        published = {k.kid: k for k in self.published()}
        key = published.get(str(header.get("kid")))
        if key is None:
            raise Unauthenticated("token signed by an unknown or retired key")
        try:
            claims = jwt.decode(
                token,
                key.public,
                algorithms=[ALGORITHM],  # never let the token pick its own algorithm
                audience=audience,
                issuer=issuer,
                leeway=0,  # the broker signs and checks with one clock
                options=jwt_options(["iss", "exp", "iat", "jti", "token_use"], audience=audience is not None),
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", code="token-expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"token rejected: {exc}") from exc
        except MALFORMED_VALUE_ERRORS as exc:  # a time claim PyJWT could not even compare
            raise Unauthenticated("token rejected: a time claim is not a number", code="invalid-token-claims") from exc
        problem = time_claim_problem(claims)
        if problem is not None:
            raise Unauthenticated(f"token rejected: {problem}", code="invalid-token-claims")
        # A capability token must never pass as a session token, or the reverse.
        if claims.get("token_use") != token_use:
            raise Unauthenticated("token is not a " + token_use + " token")
        return claims
