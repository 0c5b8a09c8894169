"""RFC 9449 DPoP proofs: checked at the token endpoint, and by any resource server that wants to.

A proof is a JWT the client signs with its own key, whose public half rides in the header
(`jwk`). Checked: `typ: dpop+jwt`, an asymmetric `alg`, a public-only `jwk`, the signature
by that key, `htm` and `htu` (the request's method and URL, no query or fragment), `iat`
within the window, `ath` where an access token accompanies it, and `jti` once only (stored,
hashed, until the window closes). The answer is the key's RFC 7638 thumbprint (`jkt`), which
a bound token carries as `cnf.jkt`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError

from broker.db import transaction, utcnow
from broker.identity.claims import MALFORMED_VALUE_ERRORS, time_claim_problem
from broker.models import DpopProofSeen
from broker.oauth.errors import OAuthError

ALGORITHMS = ("EdDSA", "ES256", "ES384", "PS256", "RS256")
WINDOW = timedelta(seconds=60)  # how far `iat` may lie in the past (and, less, in the future)
FUTURE = timedelta(seconds=5)
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _refuse(message: str, code: str = "invalid-dpop-proof") -> OAuthError:
    return OAuthError("invalid_dpop_proof", message, code=code)


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise _refuse("the proof's jwk is not a usable EC, RSA or OKP public key")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def access_token_hash(token: str) -> str:
    return _b64(hashlib.sha256(token.encode()).digest())


def normalise_url(url: str) -> str:
    """RFC 9449 section 4.3: compared without query and fragment; scheme and host case-insensitive."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", "", ""))


class DatabaseReplayCache:
    """One-time `jti`s in the broker's database, so every replica sees every proof."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def first_use(self, jti: str, expires_at: datetime) -> bool:
        key = hashlib.sha256(jti.encode()).hexdigest()
        now = utcnow()
        try:
            with transaction(self.engine) as db:
                db.exec(delete(DpopProofSeen).where(DpopProofSeen.expires_at < now))  # type: ignore[arg-type]
                db.add(DpopProofSeen(jti_hash=key, expires_at=expires_at))
        except IntegrityError:
            return False
        return True


def check_proof(proof: str, *, method: str, url: str, first_use: Callable[[str, datetime], bool],
                access_token: str | None = None, now: datetime | None = None) -> str:
    """The proof's key thumbprint (jkt), or OAuthError(invalid_dpop_proof)."""
    now = now or utcnow()
    if not proof or len(proof) > 8192 or proof.count(".") != 2:
        raise _refuse("the DPoP header is not one compact JWT")
    try:
        header = jwt.get_unverified_header(proof)
    except jwt.PyJWTError:
        raise _refuse("the DPoP proof's header cannot be read") from None
    if header.get("typ") != "dpop+jwt":
        raise _refuse("the DPoP proof's typ must be dpop+jwt")
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise _refuse("the DPoP proof's alg must be one of " + ", ".join(ALGORITHMS))
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise _refuse("the DPoP proof carries no jwk")
    if PRIVATE_MEMBERS & set(jwk):
        raise _refuse("the DPoP proof's jwk holds private key material")
    jkt = thumbprint(jwk)
    try:
        key = jwt.PyJWK(jwk, algorithm=str(alg)).key
        # The time claims are checked below, by shape first: PyJWT's own checks would meet
        # `iat: 1e400` or `nbf: []` with a Python error, not a refusal.
        claims = jwt.decode(proof, key, algorithms=[str(alg)],
                            options={"require": ["jti", "htm", "htu", "iat"], "verify_signature": True,
                                     "verify_aud": False, "verify_iat": False, "verify_exp": False,
                                     "verify_nbf": False, "verify_iss": False})
    except (jwt.PyJWTError, *MALFORMED_VALUE_ERRORS):
        raise _refuse("the DPoP proof's signature does not verify with its jwk") from None
    problem = time_claim_problem(claims)
    if problem is not None:
        raise _refuse(f"the DPoP proof's {problem.removeprefix('the ')}", code="invalid-dpop-proof-claims")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not 1 <= len(jti) <= 256:
        raise _refuse("the DPoP proof's jti must be a string of 1 to 256 characters")
    if claims.get("htm") != method:
        raise _refuse(f"the DPoP proof is for {str(claims.get('htm'))[:16]}, not {method}")
    htu = claims.get("htu")
    if not isinstance(htu, str) or normalise_url(htu) != normalise_url(url):
        raise _refuse("the DPoP proof's htu is not this endpoint's URL")
    iat = claims["iat"]  # a NumericDate between 1970 and 9999 (time_claim_problem)
    issued = datetime.fromtimestamp(iat, now.tzinfo)
    if issued < now - WINDOW or issued > now + FUTURE:
        raise _refuse("the DPoP proof's iat is outside the accepted window", code="dpop-proof-stale")
    if access_token is not None and claims.get("ath") != access_token_hash(access_token):
        raise _refuse("the DPoP proof's ath does not match the access token")
    if not first_use(jti, issued + WINDOW + FUTURE):
        raise _refuse("this DPoP proof was already used", code="dpop-proof-replayed")
    return jkt
