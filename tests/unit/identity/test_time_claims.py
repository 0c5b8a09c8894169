"""NumericDate claims by shape: every verifier refuses a malformed exp/nbf/iat with its own
error type and a kebab-case code (the resource-server side of DPoP included), never a Python
error that would become a 500."""

from __future__ import annotations

import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import Unauthenticated
from broker.identity.claims import MAX_NUMERIC_DATE, time_claim_problem
from broker.identity.keys import KeyRing, rotate
from broker.oauth import dpop
from broker.oauth.errors import OAuthError

BAD: list[Any] = ["123", "1e400", "", True, False, None, [], [1], {}, {"n": 1}, 1e20, -1e20, math.inf, -math.inf,
                  math.nan, -1, 1.7976931348623157e308, 2**64, MAX_NUMERIC_DATE + 1]
GOOD: list[Any] = [0, 1, 1_700_000_000, 1_700_000_000.5, MAX_NUMERIC_DATE]
URL = "https://broker.example/v1/oauth/token"


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", BAD, ids=repr)
def test_malformed_time_claims_have_a_problem(claim: str, value: Any) -> None:
    assert time_claim_problem({claim: value}) is not None


@pytest.mark.parametrize("value", GOOD)
def test_numeric_dates_have_none(value: Any) -> None:
    assert time_claim_problem({"exp": value, "nbf": value, "iat": value}) is None
    assert time_claim_problem({}) is None  # absent is for `require` to judge


def _raw(claims: dict[str, Any], claim: str, value: Any) -> bytes:
    # allow_nan: the wire form an attacker's lax encoder would send (NaN, Infinity).
    return json.dumps({**claims, claim: value}, allow_nan=True).encode()


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_broker_tokens_with_malformed_time_claims_are_unauthenticated(tmp_path: Path, claim: str) -> None:
    rotate(tmp_path)
    ring = KeyRing.load(tmp_path, retire_after=3600)
    now = int(time.time())
    claims = {"iss": "https://broker", "aud": "broker", "sub": "a", "sid": "ses_1", "jti": "j", "iat": now,
              "nbf": now, "exp": now + 60, "token_use": "session"}
    for value in BAD:
        token = jwt.api_jws.PyJWS().encode(_raw(claims, claim, value), ring.active.private, algorithm="EdDSA",
                                            headers={"kid": ring.active.kid})
        with pytest.raises(Unauthenticated) as refused:
            ring.verify_cached(token, audience="broker", issuer="https://broker", token_use="session")
        assert refused.value.status == 401 and refused.value.code in ("invalid-token", "invalid-token-claims",
                                                                      "token-expired"), (claim, value)


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
def test_dpop_proofs_with_malformed_time_claims_are_invalid(claim: str) -> None:
    """As a resource server checks a proof with `dpop.check_proof`, not only the token endpoint."""
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    for value in BAD:
        claims = {"jti": secrets.token_hex(8), "htm": "POST", "htu": URL, "iat": int(time.time())}
        proof = jwt.api_jws.PyJWS().encode(_raw(claims, claim, value), private, algorithm="ES256",
                                            headers={"typ": "dpop+jwt", "jwk": jwk})
        with pytest.raises(OAuthError) as refused:
            dpop.check_proof(proof, method="POST", url=URL, first_use=lambda *_: True)
        assert refused.value.error == "invalid_dpop_proof" and refused.value.status == 400, (claim, value)
