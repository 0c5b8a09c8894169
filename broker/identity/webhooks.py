"""Orchestrator webhook signatures: `X-Broker-Signature: t=<unix>,v1=<hex>`.

    v1 = hex(HMAC-SHA256(secret, "<t>.<raw body>"))

The same scheme as Stripe's, for the same reasons: the timestamp is inside the MAC, so a
captured delivery cannot be re-dated, and a bounded clock window (plus the event-id ledger,
see `broker/sessions/events.py`) makes a replay useless. Several secrets may be configured
at once and a header may carry several `v1=` entries, so a secret is rotated without a
window in which deliveries fail: add the new secret to the broker, switch the sender, drop
the old one. Every comparison is constant time; the secrets never appear in errors or logs.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass

from broker.errors import Unauthenticated

HEADER = "X-Broker-Signature"
SCHEME = "v1"
MAX_HEADER_LENGTH = 4096  # bounds the work an unauthenticated caller can ask for
MAX_SIGNATURES = 16
_HEX = frozenset("0123456789abcdef")


class InvalidSignature(Unauthenticated):
    code = "invalid-signature"


class StaleSignature(Unauthenticated):
    code = "stale-signature"


@dataclass(frozen=True)
class SignatureHeader:
    timestamp: int
    signatures: tuple[str, ...]  # the v1 entries, lowercase hex


def parse_header(header: str | None) -> SignatureHeader:
    """Parse `t=<unix>,v1=<hex>[,v1=<hex>...]`. Unknown schemes (`v0=`...) are ignored."""
    if not header:
        raise InvalidSignature(f"missing {HEADER} header")
    if len(header) > MAX_HEADER_LENGTH:
        raise InvalidSignature(f"{HEADER} header is too long")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InvalidSignature(f"{HEADER} must look like t=<unix seconds>,v1=<hex>")
        if key == "t":
            # Digits only: no sign, no fraction, no exponent, one t= per header.
            if timestamp is not None or not value.isascii() or not value.isdigit() or len(value) > 12:
                raise InvalidSignature(f"{HEADER} needs exactly one t=<unix seconds>")
            timestamp = int(value)
        elif key == SCHEME:
            signatures.append(value.lower())
    if timestamp is None:
        raise InvalidSignature(f"{HEADER} has no t=<unix seconds>")
    if not signatures:
        raise InvalidSignature(f"{HEADER} has no {SCHEME}= signature")
    if len(signatures) > MAX_SIGNATURES:
        raise InvalidSignature(f"{HEADER} carries more than {MAX_SIGNATURES} signatures")
    return SignatureHeader(timestamp, tuple(signatures))


def expected_signature(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(body: bytes, secret: str | bytes, timestamp: int | None = None) -> str:
    """The header value an orchestrator sends (used by tests and documented as the recipe)."""
    key = secret.encode() if isinstance(secret, str) else secret
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},{SCHEME}={expected_signature(key, t, body)}"


def verify(body: bytes, header: str | None, secrets: Sequence[bytes], *, tolerance_seconds: int,
           now: float | None = None) -> int:
    """Check the signature, then the clock window. Returns the signed timestamp.

    The MAC is checked before the timestamp, so a caller without a secret learns nothing
    about the window. Every (secret, signature) pair is compared, match or not, so the time
    taken does not say which secret or which entry matched.
    """
    if not secrets:
        raise InvalidSignature("no webhook secret is configured (BROKER_WEBHOOK_SECRETS)")
    parsed = parse_header(header)
    matched = False
    for secret in secrets:
        expected = expected_signature(secret, parsed.timestamp, body)
        for candidate in parsed.signatures:
            well_formed = len(candidate) == len(expected) and set(candidate) <= _HEX
            # compare_digest on ASCII strings of equal length is constant time; malformed
            # entries are compared against themselves to keep the work the same.
            same = hmac.compare_digest(candidate if well_formed else expected, expected)
            matched |= well_formed and same
    if not matched:
        raise InvalidSignature("the webhook signature does not match")
    current = time.time() if now is None else now
    if abs(current - parsed.timestamp) > tolerance_seconds:
        raise StaleSignature(
            f"the signature timestamp is more than {tolerance_seconds}s from the broker's clock; "
            "re-sign the delivery with the current time"
        )
    return parsed.timestamp
