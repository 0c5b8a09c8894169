"""RFC 9449 DPoP for native tokens, over real HTTP on SQLite and PostgreSQL: a proof at the token
endpoint binds the token to the client's key (`cnf.jkt`, also in introspection); a token bound
to one key is refused with another; a proof is accepted once; a resource marked `dpop: required`
never gets a bare bearer token."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from sqlmodel import Session, select

from broker.db import utcnow
from broker.models import Lease
from broker.oauth import dpop
from broker.oauth.errors import OAuthError
from tests.support.brokers import TEST_POLICY, Api, BrokerSecrets, LiveServer, build_broker, free_port

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
POLICY = TEST_POLICY.replace('''  - match: "jwt://svc/*"''', '''  - match: "jwt://vault-of-gold"
    provider: native
    access:
      read: {tier: read, dpop: required}
  - match: "jwt://svc/*"''').replace(
    '''      - {resource: "jwt://svc/*", access: [read]}''',
    '''      - {resource: "jwt://svc/*", access: [read]}
      - {resource: "jwt://vault-of-gold", access: [read]}''')


class Key:
    """A client's DPoP key pair and the proofs it signs."""

    def __init__(self, kind: str = "ec") -> None:
        if kind == "ec":
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            self.alg = "ES256"
            self.jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.alg = "EdDSA"
            self.jwk = jwt.algorithms.OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)

    def proof(self, method: str, url: str, *, access_token: str | None = None, iat: float | None = None,
              jwk: dict[str, Any] | None = None, typ: str = "dpop+jwt", **claims: Any) -> str:
        body = {"jti": secrets.token_urlsafe(16), "htm": method, "htu": url, "iat": int(iat or time.time()), **claims}
        if access_token is not None:
            body["ath"] = dpop.access_token_hash(access_token)
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"typ": typ, "jwk": jwk or self.jwk})


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[Api]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, POLICY, issuer=url, public_url=url)
    with LiveServer(broker, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def _exchange(api: Api, session: dict[str, Any], resource: str, proof: str | None) -> httpx.Response:
    return api.client.post("/v1/oauth/token", headers={"DPoP": proof} if proof else {}, data={
        "grant_type": GRANT, "subject_token": session["session_token"], "subject_token_type": JWT_TYPE,
        "resource": resource, "scope": "read"})


def _leases(api: Api) -> int:
    with Session(api.broker.engine) as db:
        return len(db.exec(select(Lease).where(Lease.status == "active")).all())


class ResourceServer:
    """payments-api checking a DPoP-bound token: introspection for liveness and cnf, the proof for possession."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.seen: set[str] = set()

    def first_use(self, jti: str, _: datetime) -> bool:
        if jti in self.seen:
            return False
        self.seen.add(jti)
        return True

    def accepts(self, token: str, proof: str, url: str) -> bool:
        info = self.api.client.post("/v1/introspect", data={"token": token}).json()
        if not info["active"]:
            return False
        try:
            jkt = dpop.check_proof(proof, method="GET", url=url, access_token=token, first_use=self.first_use)
        except OAuthError:
            return False
        return "cnf" in info and info["cnf"]["jkt"] == jkt


def test_a_bound_token_works_only_with_its_own_key(served: Api) -> None:
    api = served
    token_url = f"{api.base_url}/v1/oauth/token"
    alice_key, other_key = Key("ec"), Key("okp")
    session = api.new_session()
    r = _exchange(api, session, "jwt://payments-api", alice_key.proof("POST", token_url))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "DPoP"
    token = body["access_token"]
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["cnf"] == {"jkt": dpop.thumbprint(alice_key.jwk)}
    info = api.client.post("/v1/introspect", data={"token": token}).json()
    assert info["token_type"] == "DPoP" and info["cnf"] == claims["cnf"]

    server, url = ResourceServer(api), "https://payments.example/ledger?page=2"
    assert not server.accepts(token, other_key.proof("GET", url, access_token=token), url)
    # The other key cannot borrow this key's public half either: the signature would not verify.
    assert not server.accepts(token, other_key.proof("GET", url, access_token=token, jwk=alice_key.jwk), url)
    good = alice_key.proof("GET", url, access_token=token)
    assert server.accepts(token, good, url)
    assert not server.accepts(token, good, url)  # replayed
    assert not server.accepts(token, alice_key.proof("POST", url, access_token=token), url)  # wrong method
    assert not server.accepts(token, alice_key.proof("GET", url, access_token="another-token"), url)  # wrong ath


def test_the_token_endpoint_refuses_a_replayed_proof(served: Api) -> None:
    api = served
    token_url = f"{api.base_url}/v1/oauth/token"
    key, session = Key(), api.new_session()
    proof = key.proof("POST", token_url)
    assert _exchange(api, session, "jwt://payments-api", proof).status_code == 200
    replay = _exchange(api, session, "jwt://payments-api", proof)
    assert replay.status_code == 400
    assert (replay.json()["error"], replay.json()["code"]) == ("invalid_dpop_proof", "dpop-proof-replayed")
    assert _leases(api) == 1


def test_malformed_proofs_are_refused_and_mint_nothing(served: Api) -> None:
    api = served
    token_url = f"{api.base_url}/v1/oauth/token"
    key, session = Key(), api.new_session()
    private_jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.private, as_dict=True)
    bad = {
        "wrong method": key.proof("GET", token_url),
        "wrong url": key.proof("POST", f"{api.base_url}/v1/capabilities"),
        "stale": key.proof("POST", token_url, iat=time.time() - 600),
        "from the future": key.proof("POST", token_url, iat=time.time() + 600),
        "wrong typ": key.proof("POST", token_url, typ="JWT"),
        "private key in header": key.proof("POST", token_url, jwk=private_jwk),
        "signed by another key": Key().proof("POST", token_url, jwk=key.jwk),
        "not a jwt": "not-a-proof",
    }
    for name, proof in bad.items():
        r = _exchange(api, session, "jwt://payments-api", proof)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"] == "invalid_dpop_proof", name
    unsigned = jwt.encode({"jti": "x", "htm": "POST", "htu": token_url, "iat": int(time.time())}, None,
                          algorithm="none", headers={"typ": "dpop+jwt", "jwk": key.jwk})
    assert _exchange(api, session, "jwt://payments-api", unsigned).json()["error"] == "invalid_dpop_proof"
    assert _leases(api) == 0
    # The query string is not part of htu's comparison (RFC 9449 section 4.3).
    assert _exchange(api, session, "jwt://payments-api", key.proof("POST", token_url + "?x=1")).status_code == 200


def test_a_required_resource_gets_no_bearer_token(served: Api) -> None:
    api = served
    session = api.new_session()
    r = _exchange(api, session, "jwt://vault-of-gold", None)
    assert r.status_code == 400
    assert (r.json()["error"], r.json()["code"]) == ("invalid_dpop_proof", "dpop-required")
    plain = api.request(session, {"resource": "jwt://vault-of-gold", "access": "read"})
    assert plain.status_code == 403 and plain.json()["error"]["code"] == "dpop-required"
    assert _leases(api) == 0
    bound = _exchange(api, session, "jwt://vault-of-gold", Key().proof("POST", f"{api.base_url}/v1/oauth/token"))
    assert bound.status_code == 200 and bound.json()["token_type"] == "DPoP"
    # An optional resource without a proof: a plain Bearer token, as before.
    assert _exchange(api, session, "jwt://payments-api", None).json()["token_type"] == "Bearer"


def test_replay_window_rows_expire(served: Api) -> None:
    cache = dpop.DatabaseReplayCache(served.broker.engine)
    later = utcnow() + timedelta(seconds=60)
    assert cache.first_use("jti-1", later) and not cache.first_use("jti-1", later)
    # Past its window a jti is forgotten (the proof's iat is refused by then anyway).
    past = utcnow() - timedelta(seconds=1)
    assert cache.first_use("jti-2", past) and cache.first_use("jti-2", later) and not cache.first_use("jti-2", later)
