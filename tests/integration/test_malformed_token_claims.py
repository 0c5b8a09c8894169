"""Time claims of the wrong type or size on every token path answer 400/401 with a kebab-case
code, never a 500 and never a dropped connection; and nothing is minted on their account.

Paths: OIDC human tokens and orchestrator client-credential tokens (signed with the real
provider's key), the broker's session tokens (signed with its own key, as a leaked key or a
bug would), token exchange subject tokens, DPoP proofs, native token introspection and
revocation. Each claim (exp, nbf, iat) gets every value of the corpus, written as raw JSON so
`1e400`, `NaN` and `Infinity` reach the broker exactly as an attacker would send them.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, select

from broker.models import Lease
from tests.integration.test_oidc_identity import _claims
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker, free_port
from tests.support.oidc import OidcProvider

KEBAB = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
TIME_CLAIMS = ("exp", "nbf", "iat")
# JSON text of each value, as it goes on the wire.
BAD_NUMBERS = [
    '"123"', '"9999999999"', '"1e400"', '"abc"', '""', "true", "false", "null", "[]", "[1]", "{}", '{"n": 1}',
    "1e20", "-1e20", "1e400", "-1e400", "NaN", "Infinity", "-Infinity", "-1", "1.7976931348623157e308",
    "18446744073709551616", "253402300800",
]
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
CORPUS = [(claim, raw) for claim in TIME_CLAIMS for raw in BAD_NUMBERS]


def raw_jwt(claims: dict[str, Any], claim: str, raw: str, key: Any, alg: str, headers: dict[str, Any]) -> str:
    """`claims` with `claim` set to the JSON text `raw`, signed by `key`."""
    rest = json.dumps({k: v for k, v in claims.items() if k != claim})
    body = rest[:-1] + (", " if len(rest) > 2 else "") + f'"{claim}": {raw}' + "}"
    json.loads(body)  # the payload is JSON as Python reads it (NaN and Infinity included)
    return jwt.api_jws.PyJWS().encode(body.encode(), key, algorithm=alg, headers=headers)


def assert_refused(r: httpx.Response, statuses: tuple[int, ...], label: str) -> str:
    assert r.status_code in statuses, (label, r.status_code, r.text)
    body = r.json()
    code = body["code"] if "code" in body else body["error"]["code"]
    assert KEBAB.match(code), (label, code)
    return str(code)


@pytest.fixture
def served(database_url: str, tmp_path: Path, oidc_provider: OidcProvider) -> Iterator[Api]:
    """A broker with OIDC, its issuer and public URL the address it is served at (DPoP's htu)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secrets_ = BrokerSecrets()
    oidc = {k.removeprefix("BROKER_").lower(): v for k, v in oidc_provider.broker_env().items()}
    broker = build_broker(tmp_path, database_url, secrets_, issuer=url, public_url=url, **oidc)
    with LiveServer(broker, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def _leases(api: Api) -> int:
    with Session(api.broker.engine) as db:
        return len(db.exec(select(Lease)).all())


def _broker_token(api: Api, claims: dict[str, Any], claim: str, raw: str, typ: str = "JWT") -> str:
    key = api.broker.keyring.active
    return raw_jwt(claims, claim, raw, key.private, "EdDSA", {"kid": key.kid, "typ": typ})


def _session_claims(api: Api, session: dict[str, Any]) -> dict[str, Any]:
    genuine = jwt.decode(session["session_token"], options={"verify_signature": False})
    return {**genuine, "jti": "stk_" + secrets.token_hex(12)}


@pytest.mark.parametrize("shape", ["human", "orchestrator"])
def test_oidc_tokens_with_malformed_time_claims_are_401(served: Api, oidc_provider: OidcProvider, shape: str) -> None:
    genuine = oidc_provider.key.sign(_claims(oidc_provider, shape))
    assert served.client.get("/v1/whoami", headers={"Authorization": f"Bearer {genuine}"}).status_code == 200
    key = oidc_provider.key
    for claim, raw in CORPUS:
        token = raw_jwt(_claims(oidc_provider, shape), claim, raw, key.private, "RS256", {"kid": key.kid, "typ": "at+jwt"})
        r = served.client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert_refused(r, (401,), f"{shape} {claim}={raw}")


def test_session_tokens_with_malformed_time_claims_are_401_and_mint_nothing(served: Api) -> None:
    session = served.new_session()
    base = _session_claims(served, session)
    for claim, raw in CORPUS:
        token = _broker_token(served, base, claim, raw)
        who = served.client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        ask = served.client.post("/v1/capabilities", headers={"Authorization": f"Bearer {token}"},
                                 json={"resource": "jwt://payments-api", "access": "read", "purpose": "corpus"})
        for r in (who, ask):
            assert_refused(r, (401,), f"session {claim}={raw}")
    assert _leases(served) == 0
    # The genuine token still works: the refusals were the claims' doing.
    assert served.request(session, {"resource": "jwt://payments-api", "access": "read"}).status_code == 201


def test_token_exchange_subject_tokens_with_malformed_time_claims_are_invalid_grant(served: Api) -> None:
    session = served.new_session()
    base = _session_claims(served, session)
    for claim, raw in CORPUS:
        r = served.client.post("/v1/oauth/token", data={
            "grant_type": GRANT, "subject_token": _broker_token(served, base, claim, raw),
            "subject_token_type": JWT_TYPE, "resource": "jwt://payments-api", "scope": "read"})
        assert_refused(r, (400,), f"subject {claim}={raw}")
        assert r.json()["error"] == "invalid_grant"
    assert _leases(served) == 0


def test_dpop_proofs_with_malformed_time_claims_are_invalid_dpop_proof(served: Api) -> None:
    session = served.new_session()
    token_url = f"{served.base_url}/v1/oauth/token"
    private = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    codes = set()
    for claim, raw in CORPUS:
        proof_claims = {"jti": secrets.token_urlsafe(16), "htm": "POST", "htu": token_url, "iat": int(time.time())}
        proof = raw_jwt(proof_claims, claim, raw, private, "ES256", {"typ": "dpop+jwt", "jwk": jwk})
        r = served.client.post("/v1/oauth/token", headers={"DPoP": proof}, data={
            "grant_type": GRANT, "subject_token": session["session_token"], "subject_token_type": JWT_TYPE,
            "resource": "jwt://payments-api", "scope": "read"})
        codes.add(assert_refused(r, (400,), f"dpop {claim}={raw}"))
        assert r.json()["error"] == "invalid_dpop_proof"
    assert "invalid-dpop-proof-claims" in codes
    assert _leases(served) == 0


def test_native_tokens_with_malformed_time_claims_are_inactive_and_revocation_is_calm(served: Api) -> None:
    """RFC 7662 and RFC 7009 answer a token they cannot use with `active: false` and 200: that is
    their refusal. What matters is that it is that answer, not a 500."""
    session = served.new_session()
    minted = served.request(session, {"resource": "jwt://payments-api", "access": "read"})
    assert minted.status_code == 201
    genuine = minted.json()["credential"]["token"]
    base = jwt.decode(genuine, options={"verify_signature": False})
    for claim, raw in CORPUS:
        token = _broker_token(served, base, claim, raw, typ="at+jwt")
        r = served.client.post("/v1/introspect", data={"token": token})
        assert (r.status_code, r.json()) == (200, {"active": False}), (claim, raw, r.text)
        r = served.client.post("/v1/oauth/revoke", data={"token": token}, headers=served.as_admin())
        assert r.status_code == 200, (claim, raw, r.text)
    # The forged tokens carried the genuine jti, yet nothing was revoked on their account.
    assert served.client.post("/v1/introspect", data={"token": genuine}).json()["active"] is True
