"""Humans and orchestrators proven by a real OpenID provider (npm's oidc-provider), over real HTTP.

Every token here is either issued by the provider through a real grant (device flow, refresh,
client credentials), or forged on purpose to be refused; the broker under test is a real
uvicorn with the OIDC settings a deployment would set.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tests.support.brokers import TEST_POLICY, BrokerSecrets, LiveServer, build_broker, free_port
from tests.support.oidc import (
    AUDIENCE,
    CLI_CLIENT_ID,
    ORCHESTRATOR_CLIENT_ID,
    ORCHESTRATOR_NAME,
    OTHER_AUDIENCE,
    UNMAPPED_CLIENT_ID,
    OidcProvider,
    SigningKey,
)

# The policy's own membership (maintainers) beside the IdP's groups (payments-oncall).
OIDC_POLICY = TEST_POLICY + """\
groups:
  maintainers:
    members: [alice@example.com]
  security:
    grants:
      - {resource: "jwt://svc/*", access: [read]}
"""


class OidcBroker:
    def __init__(self, client: httpx.Client, server: LiveServer, secrets_: BrokerSecrets) -> None:
        self.client, self.server, self.secrets = client, server, secrets_

    def whoami(self, token: str) -> httpx.Response:
        return self.client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})


@contextlib.contextmanager
def start_broker(tmp_path: Path, database_url: str, provider: OidcProvider, **overrides: Any) -> Iterator[OidcBroker]:
    secrets_ = BrokerSecrets()
    settings = {k.removeprefix("BROKER_").lower(): v for k, v in provider.broker_env().items()}
    broker = build_broker(tmp_path, database_url, secrets_, OIDC_POLICY, **{**settings, **overrides})
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield OidcBroker(client, server, secrets_)


@pytest.fixture
def oidc_broker(tmp_path: Path, oidc_provider: OidcProvider) -> Iterator[OidcBroker]:
    """A broker on SQLite: identity does not depend on the database."""
    with start_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", oidc_provider) as broker:
        yield broker


def error_code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


# --- humans ---------------------------------------------------------------------------------------


def test_device_flow_login_makes_a_human_with_idp_and_policy_groups(oidc_provider: OidcProvider,
                                                                   oidc_broker: OidcBroker) -> None:
    tokens = oidc_provider.device_login("alice")
    r = oidc_broker.whoami(tokens["access_token"])
    assert r.status_code == 200, r.text
    me = r.json()
    # The principal is the lowercased email claim, not the provider's `sub` ("alice").
    assert (me["kind"], me["name"]) == ("human", "alice@example.com")
    assert me["idp_groups"] == ["payments-oncall"]
    # IdP groups join the policy's own membership; neither replaces the other.
    assert set(me["groups"]) == {"maintainers", "payments-oncall"}
    assert me["session_id"] is None


def test_groups_claim_is_configurable_and_absent_groups_are_none(tmp_path: Path, oidc_provider: OidcProvider) -> None:
    bob = oidc_provider.device_login("bob")["access_token"]
    dave = oidc_provider.device_login("nogroups")["access_token"]
    with start_broker(tmp_path, f"sqlite:///{tmp_path}/b.db", oidc_provider, oidc_groups_claim="roles") as broker:
        # Told to read `roles`, the broker ignores the `groups` claim entirely.
        assert broker.whoami(bob).json()["idp_groups"] == []
    with start_broker(tmp_path, f"sqlite:///{tmp_path}/c.db", oidc_provider) as broker:
        assert set(broker.whoami(bob).json()["idp_groups"]) == {"maintainers", "security"}
        me = broker.whoami(dave).json()
        assert (me["name"], me["idp_groups"], me["groups"]) == ("dave@example.com", [], [])


def test_idp_groups_count_in_the_humans_own_policy_decisions(oidc_provider: OidcProvider,
                                                             oidc_broker: OidcBroker) -> None:
    """`security` has no members in the policy; bob is in it by his IdP's groups claim alone."""
    def ask(token: str, human: str) -> httpx.Response:
        return oidc_broker.client.post("/v1/policy/explain", headers={"Authorization": f"Bearer {token}"}, json={
            "human": human, "agent": "claude-code", "scope": [{"resource": "jwt://svc/*", "access": ["read"]}],
            "resource": "jwt://svc/ledger", "access": "read"})

    def explain(token: str, human: str) -> dict[str, Any]:
        r = ask(token, human)
        assert r.status_code == 200, r.text
        return {layer["layer"]: layer["verdict"] for layer in r.json()["decision"]["layers"]}

    bob = oidc_provider.device_login("bob")["access_token"]
    dave = oidc_provider.device_login("nogroups")["access_token"]
    assert explain(bob, "bob@example.com")["human"] == "allow"
    assert explain(dave, "dave@example.com")["human"] == "deny"
    # Explaining for someone else is for admins (and never lends bob's groups).
    other = ask(bob, "dave@example.com")
    assert other.status_code == 403 and other.json()["error"]["code"] == "explain-other-human-forbidden"


def test_refreshed_access_token_is_accepted(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    tokens = oidc_provider.device_login("bob")
    assert tokens.get("refresh_token"), "offline_access must bring a refresh token"
    r = httpx.post(oidc_provider.issuer + "/token", data={"grant_type": "refresh_token", "client_id": CLI_CLIENT_ID,
                                                          "refresh_token": tokens["refresh_token"]}, timeout=10)
    assert r.status_code == 200, r.text
    refreshed = r.json()["access_token"]
    assert refreshed != tokens["access_token"]
    assert oidc_broker.whoami(refreshed).json()["name"] == "bob@example.com"


def test_id_token_is_not_a_login_when_its_audience_is_not_the_broker(oidc_provider: OidcProvider,
                                                                     oidc_broker: OidcBroker) -> None:
    tokens = oidc_provider.device_login("alice")
    # The ID token's audience is the CLI client, not the broker: one audience, no exceptions.
    r = oidc_broker.whoami(tokens["id_token"])
    assert r.status_code == 401 and error_code(r) == "invalid-token"


def test_id_token_is_a_login_where_the_audience_is_the_client(tmp_path: Path, oidc_provider: OidcProvider) -> None:
    """Google-style: no custom API audience, the broker accepts ID tokens for the CLI's client id."""
    tokens = oidc_provider.device_login("alice")
    with start_broker(tmp_path, f"sqlite:///{tmp_path}/b.db", oidc_provider, oidc_audience=CLI_CLIENT_ID) as broker:
        me = broker.whoami(tokens["id_token"]).json()
        assert (me["kind"], me["name"], me["idp_groups"]) == ("human", "alice@example.com", ["payments-oncall"])
        # ...and then the API access token (audience api://jit-broker) is the one refused.
        assert broker.whoami(tokens["access_token"]).status_code == 401


def test_unverified_email_is_refused(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    # "mallory" set her email to alice's address and the IdP did not verify it.
    tokens = oidc_provider.device_login("mallory")
    assert jwt.decode(tokens["access_token"], options={"verify_signature": False})["email"] == "alice@example.com"
    r = oidc_broker.whoami(tokens["access_token"])
    assert r.status_code == 401 and "verified" in r.json()["error"]["message"]


def test_human_token_cannot_provision_sessions(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    token = oidc_provider.device_login("alice")["access_token"]
    r = oidc_broker.client.post("/v1/sessions", headers={"Authorization": f"Bearer {token}"}, json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
        "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]})
    assert r.status_code == 403, r.text


# --- orchestrators ----------------------------------------------------------------------------------


def test_client_credentials_orchestrator_provisions_a_session_the_agent_uses(
    tmp_path: Path, database_url: str, oidc_provider: OidcProvider
) -> None:
    with start_broker(tmp_path, database_url, oidc_provider) as broker:
        token = oidc_provider.client_credentials(ORCHESTRATOR_CLIENT_ID)
        me = broker.whoami(token).json()
        assert (me["kind"], me["name"]) == ("orchestrator", ORCHESTRATOR_NAME)
        auth = {"Authorization": f"Bearer {token}"}
        r = broker.client.post("/v1/sessions", headers=auth, json={
            "human": "alice@example.com", "agent": "claude-code", "task_id": "oidc-1", "ttl_seconds": 600,
            "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]})
        assert r.status_code == 201, r.text
        session = r.json()
        # The orchestrator that provisioned it may read it; the agent's session token still works
        # beside OIDC (it is the broker's own JWT, routed to the broker's own keys).
        assert broker.client.get(f"/v1/sessions/{session['session_id']}", headers=auth).status_code == 200
        agent = {"Authorization": f"Bearer {session['session_token']}"}
        assert broker.whoami(session["session_token"]).json()["session_id"] == session["session_id"]
        r = broker.client.post("/v1/capabilities", headers=agent,
                               json={"resource": "jwt://payments-api", "access": "read", "purpose": "oidc test"})
        assert r.status_code == 201, r.text


def test_signed_in_people_see_their_own_sessions_only(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    """The delegating human (by her IdP token, whose email differs in case from the session's)
    reads and ends her own session; another signed-in person cannot even learn it exists, and a
    second orchestrator client is not the one that provisioned it."""
    orchestrator = {"Authorization": f"Bearer {oidc_provider.client_credentials(ORCHESTRATOR_CLIENT_ID)}"}
    r = oidc_broker.client.post("/v1/sessions", headers=orchestrator, json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "own-1", "ttl_seconds": 600,
        "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    alice = {"Authorization": f"Bearer {oidc_provider.device_login('alice')['access_token']}"}
    bob = {"Authorization": f"Bearer {oidc_provider.device_login('bob')['access_token']}"}
    other_orchestrator = {"Authorization": f"Bearer {oidc_broker.secrets.orchestrator_key}"}  # "orch", by API key
    assert oidc_broker.client.get(f"/v1/sessions/{sid}", headers=alice).status_code == 200
    assert [x["session_id"] for x in oidc_broker.client.get("/v1/sessions", headers=alice).json()] == [sid]
    for stranger in (bob, other_orchestrator):
        assert oidc_broker.client.get(f"/v1/sessions/{sid}", headers=stranger).status_code == 404
        assert oidc_broker.client.post(f"/v1/sessions/{sid}/end", headers=stranger).status_code == 404
        assert sid not in json.dumps(oidc_broker.client.get("/v1/sessions", headers=stranger).json())
    assert oidc_broker.client.post(f"/v1/sessions/{sid}/end", headers=alice).status_code == 200


def test_client_not_mapped_to_an_orchestrator_is_nobody(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    token = oidc_provider.client_credentials(UNMAPPED_CLIENT_ID)
    r = oidc_broker.whoami(token)
    assert r.status_code == 401 and "email" in r.json()["error"]["message"]


# --- JWT attacks: each refused with 401, for human and orchestrator tokens alike -------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


SHAPES = {
    "human": {"sub": "alice", "email": "alice@example.com", "client_id": CLI_CLIENT_ID},
    "orchestrator": {"sub": ORCHESTRATOR_CLIENT_ID, "email": None, "groups": None, "client_id": ORCHESTRATOR_CLIENT_ID},
}


def _claims(provider: OidcProvider, shape: str, **override: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": provider.issuer, "aud": AUDIENCE, "iat": now, "exp": now + 300, "jti": "j-" + str(now),
            **SHAPES[shape], **override}
    return {k: v for k, v in base.items() if v is not None}


def attack_alg_none(p: OidcProvider, shape: str) -> str:
    return _unsigned({"alg": "none", "typ": "at+jwt", "kid": p.key.kid}, _claims(p, shape)) + "."


def attack_hs256_with_public_key(p: OidcProvider, shape: str) -> str:
    # The classic confusion: HMAC "signed" with the RSA public key as the secret.
    pem = p.key.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = _unsigned({"alg": "HS256", "typ": "at+jwt", "kid": p.key.kid}, _claims(p, shape))
    return signing_input + "." + _b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())


def attack_wrong_aud(p: OidcProvider, shape: str) -> str:
    if shape == "orchestrator":  # a real token from the real IdP, for another API
        return p.client_credentials(ORCHESTRATOR_CLIENT_ID, resource=OTHER_AUDIENCE)
    return p.key.sign(_claims(p, shape, aud=OTHER_AUDIENCE))


def attack_audience_list_without_broker(p: OidcProvider, shape: str) -> str:
    return p.key.sign(_claims(p, shape, aud=[OTHER_AUDIENCE, "account"]))


def attack_wrong_iss(p: OidcProvider, shape: str) -> str:
    return p.key.sign(_claims(p, shape, iss="https://evil.example"))


def attack_expired(p: OidcProvider, shape: str) -> str:
    now = int(time.time())
    return p.key.sign(_claims(p, shape, iat=now - 3600, exp=now - 600))  # well past the 60 s leeway cap


def attack_not_yet_valid(p: OidcProvider, shape: str) -> str:
    return p.key.sign(_claims(p, shape, nbf=int(time.time()) + 3600))


def attack_issued_in_the_future(p: OidcProvider, shape: str) -> str:
    now = int(time.time())
    return p.key.sign(_claims(p, shape, iat=now + 3600, exp=now + 7200))


def attack_no_exp(p: OidcProvider, shape: str) -> str:
    return p.key.sign(_claims(p, shape, exp=None))


def attack_tampered_payload(p: OidcProvider, shape: str) -> str:
    header, _, signature = p.key.sign(_claims(p, shape)).split(".")
    raised = _claims(p, shape, email="root@example.com", groups=["admins"])
    return header + "." + _b64(json.dumps(raised).encode()) + "." + signature


def attack_not_an_access_token(p: OidcProvider, shape: str) -> str:
    # A back-channel logout token from the same issuer is signed by the same key.
    return p.key.sign(_claims(p, shape), typ="logout+jwt")


def attack_other_algorithm_than_the_key_publishes(p: OidcProvider, shape: str) -> str:
    # A valid PS256 signature by the provider's own key: but the JWKS pins that kid to RS256.
    return jwt.encode(_claims(p, shape), p.key.private, algorithm="PS256", headers={"kid": p.key.kid, "typ": "at+jwt"})


def attack_stranger_key_same_kid(p: OidcProvider, shape: str) -> str:
    return SigningKey(kid=p.key.kid).sign(_claims(p, shape))


ATTACKS: dict[str, Callable[[OidcProvider, str], str]] = {
    "alg-none": attack_alg_none,
    "hs256-with-public-key": attack_hs256_with_public_key,
    "wrong-aud": attack_wrong_aud,
    "aud-list-without-broker": attack_audience_list_without_broker,
    "wrong-iss": attack_wrong_iss,
    "expired": attack_expired,
    "not-yet-valid": attack_not_yet_valid,
    "iat-in-future": attack_issued_in_the_future,
    "no-exp": attack_no_exp,
    "tampered-payload": attack_tampered_payload,
    "logout-token": attack_not_an_access_token,
    "stranger-key-same-kid": attack_stranger_key_same_kid,
    "algorithm-not-pinned-for-kid": attack_other_algorithm_than_the_key_publishes,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_jwt_attacks_are_refused(shape: str, oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    # The genuine article passes first, so every refusal below is the attack's doing.
    genuine = oidc_provider.key.sign(_claims(oidc_provider, shape))
    assert oidc_broker.whoami(genuine).status_code == 200
    outcomes = {}
    for name, attack in ATTACKS.items():
        r = oidc_broker.whoami(attack(oidc_provider, shape))
        outcomes[name] = (r.status_code, error_code(r))
    assert outcomes == {name: (401, "token-expired" if name == "expired" else "invalid-token") for name in ATTACKS}


def test_leeway_tolerates_skew_but_is_bounded(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    now = int(time.time())
    slightly = oidc_provider.key.sign(_claims(oidc_provider, "human", iat=now - 600, exp=now - 10))
    assert oidc_broker.whoami(slightly).status_code == 200  # 10 s past exp, inside the 30 s leeway
    beyond = oidc_provider.key.sign(_claims(oidc_provider, "human", iat=now - 600, exp=now - 90))
    assert oidc_broker.whoami(beyond).status_code == 401


def test_unknown_kid_costs_one_jwks_refresh_then_refusal(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    genuine = oidc_provider.device_login("alice")["access_token"]
    assert oidc_broker.whoami(genuine).status_code == 200  # the broker has read the JWKS once
    before = oidc_provider.stats()["jwks"]
    stranger = SigningKey()  # a kid the provider never published
    r = oidc_broker.whoami(stranger.sign(_claims(oidc_provider, "human")))
    assert r.status_code == 401 and "does not publish" in r.json()["error"]["message"]
    assert oidc_provider.stats()["jwks"] == before + 1, "an unknown kid re-reads the JWKS once"
    # More made-up kids within the cooldown: refused from the cache, the IdP is not asked again.
    for _ in range(3):
        assert oidc_broker.whoami(SigningKey().sign(_claims(oidc_provider, "orchestrator"))).status_code == 401
    assert oidc_provider.stats()["jwks"] == before + 1
    assert oidc_broker.whoami(genuine).status_code == 200


def test_token_from_another_issuer_with_the_same_kid_is_refused(
    oidc_provider: OidcProvider, oidc_provider_factory: Callable[..., OidcProvider], oidc_broker: OidcBroker
) -> None:
    impostor = oidc_provider_factory(key=SigningKey(kid=oidc_provider.key.kid))
    assert impostor.key.kid == oidc_provider.key.kid and impostor.issuer != oidc_provider.issuer
    # Real tokens, really issued by the other provider, for the same audience and client ids.
    human = impostor.device_login("alice")["access_token"]
    orchestrator = impostor.client_credentials(ORCHESTRATOR_CLIENT_ID)
    assert jwt.get_unverified_header(human)["kid"] == oidc_provider.key.kid
    for token in (human, orchestrator):
        r = oidc_broker.whoami(token)
        assert r.status_code == 401 and error_code(r) == "invalid-token"
    # The same, claiming our issuer: the signature does not verify under our key of that kid.
    forged = impostor.forge(iss=oidc_provider.issuer)
    assert oidc_broker.whoami(forged).status_code == 401


def test_person_token_through_an_orchestrator_client_is_not_an_orchestrator(
    oidc_provider: OidcProvider, oidc_broker: OidcBroker
) -> None:
    token = oidc_provider.key.sign(_claims(oidc_provider, "human", client_id=ORCHESTRATOR_CLIENT_ID))
    r = oidc_broker.whoami(token)
    assert r.status_code == 401 and "client credentials" in r.json()["error"]["message"]


def test_unreachable_identity_provider_fails_closed(tmp_path: Path, oidc_provider: OidcProvider) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with start_broker(tmp_path, f"sqlite:///{tmp_path}/b.db", oidc_provider, oidc_issuer=dead) as broker:
        r = broker.whoami(oidc_provider.forge(iss=dead))
        assert r.status_code == 503 and error_code(r) == "identity-provider-unavailable"
        # The broker's own tokens and API keys do not depend on the IdP.
        r = broker.client.get("/v1/whoami", headers={"Authorization": f"Bearer {broker.secrets.orchestrator_key}"})
        assert r.status_code == 200 and r.json()["kind"] == "orchestrator"


def test_login_config_is_published(oidc_provider: OidcProvider, oidc_broker: OidcBroker) -> None:
    r = oidc_broker.client.get("/v1/login")
    assert r.status_code == 200
    assert r.json() == {"issuer": oidc_provider.issuer, "client_id": CLI_CLIENT_ID,
                        "scope": "openid email groups offline_access", "audience": AUDIENCE, "resource": None}
