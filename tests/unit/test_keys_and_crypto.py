"""Signing keys (rotation, retirement, file modes) and AES-GCM sealing."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from broker import crypto
from broker.errors import ConfigError, InternalError, Unauthenticated
from broker.identity.keys import KeyRing, rotate


def _claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    return {"iss": "https://broker", "aud": "jit-broker", "iat": now, "exp": now + 60, "jti": "j", "token_use": "session",
            **extra}


def test_generated_key_is_owner_only(tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path / "keys", retire_after=60, create=True)
    (pem,) = list((tmp_path / "keys").glob("*.pem"))
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert ring.active.kid == pem.stem


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    rotate(tmp_path)
    (pem,) = list(tmp_path.glob("*.pem"))
    os.chmod(pem, 0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        KeyRing.load(tmp_path, retire_after=60)


def test_rotation_keeps_old_key_published_until_its_tokens_expire(tmp_path: Path) -> None:
    rotate(tmp_path)
    old = KeyRing.load(tmp_path, retire_after=3600)
    token = old.sign(_claims())
    time.sleep(1.1)  # kids order by creation second
    rotate(tmp_path)
    ring = KeyRing.load(tmp_path, retire_after=3600)
    assert ring.active.kid != old.active.kid
    assert {k["kid"] for k in ring.jwks()["keys"]} == {old.active.kid, ring.active.kid}
    assert ring.verify(token, audience="jit-broker", issuer="https://broker", token_use="session")["jti"] == "j"
    # Past the retirement window the old key is gone from JWKS and no longer accepted.
    later = ring.active.created + 3601
    assert [k.kid for k in ring.published(now=later)] == [ring.active.kid]


def test_verify_refuses_wrong_use_audience_and_algorithm(tmp_path: Path) -> None:
    ring = KeyRing.load(tmp_path, retire_after=60, create=True)
    with pytest.raises(Unauthenticated):
        ring.verify(ring.sign(_claims(token_use="capability")), audience="jit-broker", issuer="https://broker",
                    token_use="session")
    with pytest.raises(Unauthenticated):
        ring.verify(ring.sign(_claims(aud="other")), audience="jit-broker", issuer="https://broker", token_use="session")
    import jwt

    hs = jwt.encode(_claims(), "s" * 32, algorithm="HS256", headers={"kid": ring.active.kid})
    with pytest.raises(Unauthenticated, match="algorithm"):
        ring.verify(hs, audience="jit-broker", issuer="https://broker", token_use="session")
    expired = ring.sign(_claims(exp=int(time.time()) - 1))
    with pytest.raises(Unauthenticated) as info:
        ring.verify(expired, audience="jit-broker", issuer="https://broker", token_use="session")
    assert info.value.code == "token-expired"


def test_sealing_binds_ciphertext_to_its_row() -> None:
    sealer = crypto.Sealer(crypto.decode_key(crypto.new_key()))
    sealed = sealer.seal("ghs_secret", "cap_1")
    assert "ghs_secret" not in sealed and sealer.unseal(sealed, "cap_1") == "ghs_secret"
    assert sealer.seal("ghs_secret", "cap_1") != sealed  # fresh nonce every time
    with pytest.raises(InternalError):
        sealer.unseal(sealed, "cap_2")  # moved to another row
    other = crypto.Sealer(crypto.decode_key(crypto.new_key()))
    with pytest.raises(InternalError):
        other.unseal(sealed, "cap_1")


@pytest.mark.parametrize("raw", ["not base64!", "c2hvcnQ="])
def test_bad_encryption_keys_are_refused(raw: str) -> None:
    with pytest.raises(ConfigError):
        crypto.decode_key(raw)
