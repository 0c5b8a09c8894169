"""Enterprise-managed authorization: a test IdP (generated keys, its JWKS served on loopback) signs
Identity Assertion JWT Authorization Grants; a confidential client trades them at the token
endpoint (RFC 7523 jwt-bearer) for an MCP token. Every bad assertion is invalid_grant, nothing
minted. On SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import select

from broker.db import transaction
from broker.models import Lease, SessionRow
from tests.integration.test_mcp_authorization import ALICE, mcp_policy
from tests.integration.test_mcp_authorization_refusals import MCP, OTHER, Documents
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.ports import free_port

CLIENT = "enterprise-client"
GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class Idp:
    """Signs ID-JAGs with an EC P-256 key made for this test; publishes the public half as a JWKS."""

    def __init__(self, docs: Documents, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.kid = name + "-" + secrets.token_hex(4)
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        self.jwks_url = docs.serve(f"/{name}/jwks.json", {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "ES256"}]})
        self.issuer = f"https://{name}.idp.example.com"

    def sign(self, claims: dict[str, Any], *, typ: str = "oauth-id-jag+jwt", key: Any = None) -> str:
        return jwt.encode(claims, key or self.key, algorithm="ES256", headers={"typ": typ, "kid": self.kid})


@dataclass
class World:
    api: Api
    idp: Idp
    rogue: Idp
    secret: str

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {"iss": self.idp.issuer, "sub": "00u-alice", "email": ALICE, "aud": self.api.broker.settings.issuer,
                  "client_id": CLIENT, "jti": secrets.token_hex(16), "iat": now, "exp": now + 300,
                  "resource": MCP, "scope": "tools:read"}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, assertion: str, *, secret: str | None = None, **extra: str) -> httpx.Response:
        auth = base64.b64encode(f"{CLIENT}:{secret or self.secret}".encode()).decode()
        return self.api.client.post("/v1/oauth/token", data={"grant_type": GRANT, "assertion": assertion, **extra},
                                    headers={"Authorization": f"Basic {auth}"})


@pytest.fixture
def world(database_url: str, tmp_path: Path) -> Iterator[World]:
    import threading

    docs = Documents()
    threading.Thread(target=docs.serve_forever, daemon=True).start()
    idp, rogue = Idp(docs, "corp"), Idp(docs, "rogue")
    secret = "jbcs_" + secrets.token_urlsafe(24)
    clients = {CLIENT: {"redirect_uris": ["https://client.example.com/cb"],
                        "client_secret_sha256": hashlib.sha256(secret.encode()).hexdigest()},
               "public-client": {"redirect_uris": ["https://client.example.com/cb"]}}
    port = free_port()
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, mcp_policy(MCP, OTHER), issuer=f"http://127.0.0.1:{port}",
                          oauth_clients=json.dumps(clients), idjag_issuers=json.dumps({idp.issuer: idp.jwks_url}))
    try:
        with LiveServer(broker, port=port) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
            yield World(Api(server.base_url, secrets_, broker, client), idp, rogue, secret)
    finally:
        docs.shutdown()


def _nothing_minted(world: World) -> None:
    with transaction(world.api.broker.engine) as db:
        assert db.exec(select(Lease)).all() == []
        # A session opened for an assertion whose token was then refused does not linger.
        assert [s.id for s in db.exec(select(SessionRow).where(SessionRow.status == "active")).all()] == []


def test_an_id_jag_from_the_trusted_idp_is_traded_for_an_mcp_token_once(world: World) -> None:
    metadata = world.api.client.get("/.well-known/oauth-authorization-server").json()
    assert GRANT in metadata["grant_types_supported"]
    assertion = world.idp.sign(world.claims())
    r = world.token(assertion, resource=MCP)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "tools:read" and "refresh_token" not in body
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["aud"] == MCP and claims["sub"] == ALICE and claims["act"] == {"sub": "mcp-client"}
    # The intersection still holds: the session is that person's, scoped to that server and access.
    session = world.api.client.get(f"/v1/sessions/{claims['sid']}", headers=world.api.as_admin()).json()
    assert session["human"] == ALICE and session["scope"] == [{"resource": MCP, "access": ["tools"]}]
    replay = world.token(assertion)
    assert replay.status_code == 400 and replay.json()["code"] == "assertion-replayed"


BAD: list[tuple[str, Callable[[World], str], str]] = [
    ("another aud", lambda w: w.idp.sign(w.claims(aud="https://other-as.example.com")), "assertion-audience"),
    ("aud list without us", lambda w: w.idp.sign(w.claims(aud=["https://a.example.com"])), "assertion-audience"),
    ("unknown issuer", lambda w: w.rogue.sign(w.claims(iss=w.rogue.issuer)), "untrusted-issuer"),
    ("trusted iss, rogue key", lambda w: w.rogue.sign(w.claims()), "invalid-assertion"),
    ("typ JWT", lambda w: w.idp.sign(w.claims(), typ="JWT"), "invalid-assertion-type"),
    ("typ id_token", lambda w: w.idp.sign(w.claims(), typ="id_token+jwt"), "invalid-assertion-type"),
    ("typ with bidi", lambda w: w.idp.sign(w.claims(), typ="oauth-id-jag+jwt\u202e"), "invalid-assertion-type"),
    ("other client", lambda w: w.idp.sign(w.claims(client_id="public-client")), "assertion-client"),
    ("no client_id", lambda w: w.idp.sign(w.claims(client_id=None)), "invalid-assertion"),
    ("no jti", lambda w: w.idp.sign(w.claims(jti=None)), "invalid-assertion"),
    ("expired", lambda w: w.idp.sign(w.claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 4000)),
     "invalid-assertion"),
    ("alg none", lambda w: jwt.encode(w.claims(), None, algorithm="none", headers={"typ": "oauth-id-jag+jwt"}),
     "invalid-assertion"),
    ("hmac with the jwk", lambda w: jwt.encode(w.claims(), "a-guessed-hmac-secret-of-32-bytes!!", algorithm="HS256",
                                               headers={"typ": "oauth-id-jag+jwt", "kid": w.idp.kid}),
     "invalid-assertion"),
    ("not a jwt", lambda w: "not.a.jwt", "invalid-assertion"),
    ("garbage", lambda w: "'; drop table leases; --", "invalid-assertion"),
    ("large", lambda w: "a." + "b" * 12000 + ".c", "invalid-assertion"),
    ("over the form bound", lambda w: "a." + "b" * 20000 + ".c", "invalid-parameter"),
    ("unknown person", lambda w: w.idp.sign(w.claims(email="mallory@example.com")), "human-lacks-permission"),
    ("no email", lambda w: w.idp.sign(w.claims(email=None)), "assertion-principal"),
    ("unknown resource", lambda w: w.idp.sign(w.claims(resource="https://unknown.example.com/mcp")),
     "unknown-resource"),
    ("wider scope", lambda w: w.idp.sign(w.claims(scope="tools:write")), "unknown-scope"),
]


@pytest.mark.parametrize(("name", "make", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_assertions_are_refused_and_mint_nothing(world: World, name: str, make: Callable[[World], str],
                                                     code: str) -> None:
    r = world.token(make(world))
    assert r.status_code in (400, 403), r.text
    assert r.json()["code"] == code, r.text
    assert r.json()["error"] in ("invalid_grant", "invalid_target", "invalid_scope", "access_denied", "invalid_request")
    _nothing_minted(world)


def test_the_grant_needs_the_confidential_clients_secret_and_the_assertions_resource(world: World) -> None:
    assertion = world.idp.sign(world.claims())
    wrong = world.token(assertion, secret="guess")
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    assert wrong.headers["www-authenticate"].startswith("Basic")
    public = world.api.client.post("/v1/oauth/token", data={"grant_type": GRANT, "assertion": assertion,
                                                            "client_id": "public-client"})
    assert public.status_code == 400 and public.json()["error"] == "unauthorized_client"
    other = world.token(assertion, resource=OTHER)
    assert other.status_code == 400 and other.json()["code"] == "resource-mismatch"
    wider = world.token(assertion, scope="tools:read tools:admin")
    assert wider.status_code == 400 and wider.json()["code"] == "scope-widening"
    _nothing_minted(world)
    # None of those spent the assertion: it still works, once.
    assert world.token(assertion).status_code == 200
