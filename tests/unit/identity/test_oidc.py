"""The OIDC verifier's pure parts: configuration checks, claim paths, and the JWKS cache's pace.

The verifier against a real provider is in tests/integration/test_oidc_identity.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from broker.config import Settings
from broker.errors import ConfigError, IdentityProviderUnavailable, Unauthenticated
from broker.identity.oidc import JwksCache, OidcConfig, OidcVerifier, claim_at, parse_orchestrator_clients

ISSUER = "https://idp.example.com/oauth2/default"
AUDIENCE = "api://jit-broker"


def rsa_jwk(kid: str, **extra: Any) -> tuple[rsa.RSAPrivateKey, dict[str, Any]]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig", **extra}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeIdP:
    """Answers discovery and JWKS from memory and counts what it was asked."""

    def __init__(self, keys: list[dict[str, Any]], issuer: str = ISSUER) -> None:
        self.keys, self.issuer = keys, issuer
        self.jwks_reads = 0
        self.down = False

    def __call__(self, url: str) -> Any:
        if self.down:
            raise IdentityProviderUnavailable("down")
        if url.endswith("/.well-known/openid-configuration"):
            return {"issuer": self.issuer, "jwks_uri": ISSUER + "/v1/keys"}
        self.jwks_reads += 1
        return {"keys": list(self.keys)}


def cache(idp: FakeIdP, clock: FakeClock, cooldown: float = 30, max_age: float = 3600) -> JwksCache:
    return JwksCache(lambda: ISSUER + "/v1/keys", idp, cooldown=cooldown, max_age=max_age, clock=clock)


def test_unknown_kid_rereads_once_per_cooldown() -> None:
    _, known = rsa_jwk("known")
    idp, clock = FakeIdP([known]), FakeClock()
    jwks = cache(idp, clock)
    assert jwks.key("known").key_id == "known" and idp.jwks_reads == 1
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            jwks.key("forged")
    assert idp.jwks_reads == 2, "one re-read for the first unknown kid, none for the rest within the cooldown"
    clock.now += 31
    _, rotated = rsa_jwk("rotated")
    idp.keys.append(rotated)  # the IdP rotated: the next unknown kid is found after the cooldown
    assert jwks.key("rotated").key_id == "rotated" and idp.jwks_reads == 3


def test_keys_are_reread_after_max_age_and_kept_when_the_idp_is_down() -> None:
    _, k1 = rsa_jwk("k1")
    idp, clock = FakeIdP([k1]), FakeClock()
    jwks = cache(idp, clock, max_age=600)
    jwks.key("k1")
    clock.now += 601
    idp.down = True
    assert jwks.key("k1").key_id == "k1"  # stale but known keys beat refusing everyone
    idp.down = False
    jwks.key("k1")
    assert idp.jwks_reads == 1, "no retry within the cooldown after a failed read"
    clock.now += 31
    jwks.key("k1")
    assert idp.jwks_reads == 2


def test_no_keys_at_all_is_unavailable_not_unauthenticated() -> None:
    idp, clock = FakeIdP([]), FakeClock()
    idp.down = True
    with pytest.raises(IdentityProviderUnavailable):
        cache(idp, clock).key("any")


def test_symmetric_and_encryption_keys_are_never_verification_keys() -> None:
    _, good = rsa_jwk("good")
    _, enc = rsa_jwk("enc", use="enc")
    hmac_key = {"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0", "kid": "hmac", "alg": "HS256"}
    idp, clock = FakeIdP([good, enc, hmac_key]), FakeClock()
    jwks = cache(idp, clock)
    assert jwks.key("good").algorithm_name == "RS256"
    for kid in ("enc", "hmac"):
        with pytest.raises(Unauthenticated):
            jwks.key(kid)


def test_algorithm_is_pinned_by_the_jwks_not_the_token() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "ec1"}  # no "alg": by curve
    verifier = OidcVerifier(OidcConfig(ISSUER, AUDIENCE), fetch=FakeIdP([jwk]))
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "u1", "email": "Ann@Example.com", "iat": now, "exp": now + 60}
    good = jwt.encode(claims, ec_key, algorithm="ES256", headers={"kid": "ec1"})
    assert verifier.verify(good).name == "ann@example.com"
    rsa_key, rsa_pub = rsa_jwk("rsa1")  # no "alg" either: RSA keys are pinned to RS256
    verifier = OidcVerifier(OidcConfig(ISSUER, AUDIENCE), fetch=FakeIdP([rsa_pub]))
    assert verifier.verify(jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "rsa1"})).kind == "human"
    other = jwt.encode(claims, rsa_key, algorithm="PS256", headers={"kid": "rsa1"})  # a valid signature, other alg
    with pytest.raises(Unauthenticated, match="does not match"):
        verifier.verify(other)


def test_discovery_must_name_the_configured_issuer() -> None:
    _, k = rsa_jwk("k")
    verifier = OidcVerifier(OidcConfig(ISSUER, AUDIENCE), fetch=FakeIdP([k], issuer="https://evil.example"))
    with pytest.raises(IdentityProviderUnavailable, match="names issuer"):
        verifier.jwks.key("k")


@pytest.mark.parametrize(("raw", "expected"), [
    ("", {}),
    ("ci-client=ci, 0oa1b2=nightly", {"ci-client": "ci", "0oa1b2": "nightly"}),
])
def test_orchestrator_clients_parse(raw: str, expected: dict[str, str]) -> None:
    assert parse_orchestrator_clients(raw) == expected


@pytest.mark.parametrize("raw", ["no-equals", "=name", "client=", "a=x,a=y"])
def test_orchestrator_clients_refuse_bad_entries(raw: str) -> None:
    with pytest.raises(ConfigError):
        parse_orchestrator_clients(raw)


@pytest.mark.parametrize(("issuer", "audience", "leeway", "ok"), [
    ("https://login.microsoftonline.com/tenant/v2.0", "api://broker", 30, True),
    ("http://127.0.0.1:5556", "api://broker", 0, True),  # loopback: tests
    ("http://idp.example.com", "api://broker", 30, False),  # plain http off loopback
    ("https://idp.example.com", "", 30, False),  # no audience
    ("https://idp.example.com", "api://broker", 61, False),  # leeway above the cap
])
def test_config_checks(issuer: str, audience: str, leeway: int, ok: bool) -> None:
    if ok:
        OidcConfig(issuer, audience, leeway_seconds=leeway)
    else:
        with pytest.raises(ConfigError):
            OidcConfig(issuer, audience, leeway_seconds=leeway)


def test_settings_build_the_verifier_config() -> None:
    s = Settings(oidc_issuer=ISSUER, oidc_audience=AUDIENCE, oidc_orchestrator_clients="ci=ci-orch",
                 oidc_groups_claim="realm_access.roles")
    config = s.oidc_config()
    assert config is not None and config.orchestrator_clients == {"ci": "ci-orch"}
    assert Settings().oidc_config() is None
    with pytest.raises(ConfigError):
        Settings(oidc_issuer="http://127.0.0.1:8080", issuer="http://127.0.0.1:8080", oidc_audience="a").oidc_config()
    with pytest.raises(ValueError):
        Settings(oidc_leeway_seconds=120)


def test_claim_paths() -> None:
    claims = {"groups": ["a"], "realm_access": {"roles": ["r1", "r2"]}, "https://example.com/groups": ["x"]}
    assert claim_at(claims, "groups") == ["a"]
    assert claim_at(claims, "realm_access.roles") == ["r1", "r2"]
    assert claim_at(claims, "https://example.com/groups") == ["x"]  # a name with dots is a name first
    assert claim_at(claims, "realm_access.missing") is None


@pytest.mark.parametrize(("value", "expected"), [
    (None, frozenset()),
    ([], frozenset()),
    (["a", "b"], frozenset({"a", "b"})),
    (["/acme/maintainers", "Entwickler-\u00c4", "0f9e-guid"], frozenset({"/acme/maintainers", "Entwickler-\u00c4", "0f9e-guid"})),
])
def test_groups_claim_shapes(value: Any, expected: frozenset[str]) -> None:
    verifier = OidcVerifier(OidcConfig(ISSUER, AUDIENCE), fetch=FakeIdP([]))
    assert verifier.groups({"groups": value} if value is not None else {}) == expected


# docs/identity.md: the groups claim is a list of strings. Anything else refuses the token
# (fail closed): never split, trimmed, or silently ignored.
UNREADABLE_GROUPS = [
    "solo", "maintainers security", "", {"a": 1}, 1, True, 1.5,
    [1, 2], ["a", None], ["a", ["b"]], ["a", {"b": 1}], ["a", True], ["g"] * 1001,
    [""], [" "], ["a", " "], [" maintainers"], ["maintainers "], ["main tainers"],
    ["maintainers\u00a0"], ["\u3000maintainers"], ["main\u200btainers"], ["maintainers\u200d"],
    ["\u202emaintainers"], ["maintainers\u2066"], ["\ufeffmaintainers"], ["maint\x00ainers"],
    ["maintainers\n"], ["maintainers\t"], ["maint\u2028ainers"], ["\ue000"], ["g" * 257],
]


@pytest.mark.parametrize("value", UNREADABLE_GROUPS)
def test_unreadable_groups_claim_fails_closed(value: Any) -> None:
    verifier = OidcVerifier(OidcConfig(ISSUER, AUDIENCE), fetch=FakeIdP([]))
    with pytest.raises(Unauthenticated) as refused:
        verifier.groups({"groups": value})
    assert refused.value.code == "invalid-groups-claim"
    assert refused.value.status == 401
