"""X-Broker-Signature: parsing and verification, table-driven. No I/O."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from broker.identity.webhooks import (
    InvalidSignature,
    StaleSignature,
    parse_header,
    sign,
    verify,
)

NOW = 1_735_689_600
BODY = b'{"id":"evt_1","type":"session.ended","session_id":"ses_1"}'
SECRET = b"whsec-current"
OLD = b"whsec-previous"


def mac(secret: bytes, t: int = NOW, body: bytes = BODY) -> str:
    return hmac.new(secret, f"{t}.".encode() + body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize(
    ("header", "timestamp", "signatures"),
    [
        (f"t={NOW},v1=abc", NOW, ("abc",)),
        (f"v1=abc,t={NOW}", NOW, ("abc",)),  # order does not matter
        (f" t = {NOW} , v1 = ABC ", NOW, ("abc",)),  # spaces tolerated, hex lowercased
        (f"t={NOW},v1=aa,v1=bb", NOW, ("aa", "bb")),  # several v1 entries (rotation)
        (f"t={NOW},v0=old,v1=aa", NOW, ("aa",)),  # unknown schemes ignored
        (f"t={NOW},v1=aa,x=y", NOW, ("aa",)),
    ],
)
def test_parse_accepts(header: str, timestamp: int, signatures: tuple[str, ...]) -> None:
    parsed = parse_header(header)
    assert parsed.timestamp == timestamp and parsed.signatures == signatures


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "v1=abc",  # no timestamp
        f"t={NOW}",  # no signature
        f"t={NOW},v0=abc",  # only unknown schemes
        f"t={NOW},t={NOW},v1=abc",  # two timestamps
        "t=-5,v1=abc",  # signed
        "t=1.5,v1=abc",  # fraction
        "t=1e9,v1=abc",  # exponent
        "t=,v1=abc",
        "t=１２３,v1=abc",  # noqa: RUF001  # non-ASCII (fullwidth) digits, deliberately
        f"t={NOW},v1abc",  # no "="
        f"t={NOW},=abc",
        f"t={NOW}," + ",".join(["v1=aa"] * 17),  # too many signatures
        f"t={NOW},v1=" + "a" * 5000,  # too long
    ],
)
def test_parse_rejects(header: str | None) -> None:
    with pytest.raises(InvalidSignature) as err:
        parse_header(header)
    assert err.value.status == 401 and err.value.code == "invalid-signature"


@pytest.mark.parametrize(
    ("header", "secrets", "now", "error"),
    [
        (f"t={NOW},v1={mac(SECRET)}", [SECRET], NOW, None),
        (f"t={NOW},v1={mac(SECRET).upper()}", [SECRET], NOW, None),
        (f"t={NOW},v1={mac(OLD)}", [SECRET, OLD], NOW, None),  # any configured secret
        (f"t={NOW},v1=deadbeef,v1={mac(SECRET)}", [SECRET], NOW, None),  # any v1 entry
        (f"t={NOW},v1={mac(OLD)},v1={mac(SECRET)}", [SECRET], NOW, None),  # sender mid-rotation
        (f"t={NOW},v1={mac(SECRET)}", [SECRET], NOW + 300, None),  # edge of the window
        (f"t={NOW},v1={mac(SECRET)}", [SECRET], NOW - 300, None),  # sender clock ahead, within window
        (f"t={NOW},v1={mac(OLD)}", [SECRET], NOW, InvalidSignature),  # wrong secret
        (f"t={NOW},v1={mac(SECRET)[:-1]}", [SECRET], NOW, InvalidSignature),  # truncated
        (f"t={NOW},v1={mac(SECRET)[:-1]}g", [SECRET], NOW, InvalidSignature),  # not hex
        (f"t={NOW},v1={mac(SECRET)}é", [SECRET], NOW, InvalidSignature),  # not ASCII
        (f"t={NOW + 1},v1={mac(SECRET)}", [SECRET], NOW, InvalidSignature),  # timestamp is signed
        (f"t={NOW},v1={mac(SECRET)}", [], NOW, InvalidSignature),  # nothing configured
        (f"t={NOW},v1={mac(SECRET)}", [SECRET], NOW + 301, StaleSignature),  # too old
        (f"t={NOW},v1={mac(SECRET)}", [SECRET], NOW - 301, StaleSignature),  # too far ahead
        (f"t={NOW - 10_000},v1=0000", [SECRET], NOW, InvalidSignature),  # MAC checked before the clock
    ],
)
def test_verify(header: str, secrets: list[bytes], now: int, error: type[Exception] | None) -> None:
    if error is None:
        assert verify(BODY, header, secrets, tolerance_seconds=300, now=now) == NOW
        return
    with pytest.raises(error) as err:
        verify(BODY, header, secrets, tolerance_seconds=300, now=now)
    assert err.value.status == 401  # type: ignore[attr-defined]
    assert err.value.code == ("stale-signature" if error is StaleSignature else "invalid-signature")  # type: ignore[attr-defined]


def test_body_is_signed_byte_for_byte() -> None:
    header = sign(BODY, SECRET, NOW)
    assert verify(BODY, header, [SECRET], tolerance_seconds=300, now=NOW) == NOW
    reformatted = b'{"id": "evt_1", "type": "session.ended", "session_id": "ses_1"}'  # same JSON, other bytes
    with pytest.raises(InvalidSignature):
        verify(reformatted, header, [SECRET], tolerance_seconds=300, now=NOW)


def test_sign_matches_the_documented_recipe() -> None:
    assert sign(BODY, "whsec-current", NOW) == f"t={NOW},v1={mac(SECRET)}"
