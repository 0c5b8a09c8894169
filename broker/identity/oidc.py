"""Humans and orchestrators proven by the configured OpenID provider: verified OIDC tokens.

A human presents an access token (or ID token) the IdP issued for the broker's one audience;
an orchestrator may present a client-credentials access token from the same issuer, its client
id mapped to an orchestrator name by configuration. Every check is spelled out below:

- the issuer's discovery document names the JWKS, and must name this issuer exactly;
- keys come from that JWKS only, cached, re-fetched when a token names an unknown `kid`
  (at most once per cooldown, so unknown kids cannot make the broker hammer the IdP);
- the algorithm is pinned per key by what the JWKS publishes (its `alg`, else its key type):
  never `none`, never an HMAC algorithm, never what the token's header asks for;
- `iss`, the one configured `aud`, `exp`, `nbf`, `iat` and `sub` are checked with a leeway of
  at most 60 s; signature checks are PyJWT's, no JOSE is written here.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from jwt import PyJWK, PyJWKSet

from broker.errors import ConfigError, IdentityProviderUnavailable, Unauthenticated
from broker.identity.callers import Caller
from broker.identity.claims import MALFORMED_VALUE_ERRORS, time_claim_problem
from broker.identity.keys import jwt_options
from broker.principals import canonical_human, group_problem, principal_problem

log = logging.getLogger("broker.identity")

# Signature algorithms a JWKS key may pin. HS* is absent on purpose: an HMAC "key" taken from
# a public JWKS would let anyone sign, and `none` is no signature at all.
ASYMMETRIC_ALGORITHMS = frozenset({
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
})
# `typ` values of tokens meant to be presented to an API (RFC 9068 access tokens, ID tokens).
# Anything else (logout tokens, DPoP proofs, SETs) is a different kind of JWT from the same
# issuer and must not pass as a login.
ACCEPTED_TYPES = frozenset({"jwt", "at+jwt", "application/at+jwt"})
# Where IdPs put the OAuth client a token was issued to: RFC 9068 `client_id`, OIDC `azp`
# (Keycloak, Entra v2, Google), Okta's `cid`, Entra v1's `appid`. The first one present counts.
CLIENT_ID_CLAIMS = ("client_id", "azp", "cid", "appid")
MAX_GROUPS = 1000


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    principal_claim: str = "email"
    groups_claim: str = "groups"
    orchestrator_clients: Mapping[str, str] = field(default_factory=dict)  # client id -> orchestrator name
    leeway_seconds: int = 30
    jwks_refresh_cooldown_seconds: float = 30.0
    jwks_max_age_seconds: float = 3600.0
    timeout_seconds: float = 5.0

    def __post_init__(self) -> None:
        scheme = urlsplit(self.issuer).scheme
        if scheme != "https" and not (scheme == "http" and is_loopback(self.issuer)):
            raise ConfigError("BROKER_OIDC_ISSUER must be an https:// URL (plain http only on loopback, for tests)")
        if not self.audience:
            raise ConfigError("BROKER_OIDC_AUDIENCE is required with BROKER_OIDC_ISSUER: the one `aud` tokens must carry")
        if not 0 <= self.leeway_seconds <= 60:
            raise ConfigError("BROKER_OIDC_LEEWAY_SECONDS must be between 0 and 60")


def parse_orchestrator_clients(raw: str) -> dict[str, str]:
    """`client_id=name,client_id=name` -> {client_id: name}."""
    out: dict[str, str] = {}
    for entry in filter(None, (e.strip() for e in raw.split(","))):
        client_id, sep, name = (part.strip() for part in entry.partition("="))
        if not sep or not client_id or not name:
            raise ConfigError("BROKER_OIDC_ORCHESTRATOR_CLIENTS entries must look like client_id=orchestrator-name")
        if client_id in out:
            raise ConfigError(f"BROKER_OIDC_ORCHESTRATOR_CLIENTS names client {client_id!r} twice")
        out[client_id] = name
    return out


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """A claim by name, or by dotted path into nested objects (Keycloak's `realm_access.roles`).
    A claim whose own name contains dots is found first."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


Fetch = Callable[[str], Any]


class JwksCache:
    """The issuer's signing keys by `kid`, with a bounded refresh rate.

    Keys are re-read when they are older than `max_age`, and when a token names a `kid` not
    in the set (the IdP rotated), but an unknown kid triggers at most one re-read per
    `cooldown`: a flood of tokens with made-up kids costs the IdP one request per cooldown,
    not one per token. A failed read is not retried within the cooldown either.

    PyJWT parses the keys (`PyJWKSet`); its `PyJWKClient` cache is not used because it
    re-fetches on every unknown kid, with no cooldown.
    """

    def __init__(self, jwks_uri: Callable[[], str], fetch: Fetch, *, cooldown: float, max_age: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._jwks_uri = jwks_uri
        self._fetch = fetch
        self.cooldown = cooldown
        self.max_age = max_age
        self._clock = clock
        self._keys: dict[str, PyJWK] = {}
        self._loaded_at: float | None = None  # last successful read
        self._failed_at: float | None = None  # last failed read
        self._unknown_kid_at: float | None = None  # last re-read an unknown kid caused
        self._lock = threading.Lock()

    def _due(self, since: float | None, now: float, interval: float) -> bool:
        return since is None or now - since >= interval

    def key(self, kid: str) -> PyJWK:
        with self._lock:
            now = self._clock()
            may_try = self._due(self._failed_at, now, self.cooldown)
            if may_try and self._due(self._loaded_at, now, self.max_age):
                self._refresh(now)
            elif may_try and kid not in self._keys and self._due(self._unknown_kid_at, now, self.cooldown):
                log.info("OIDC token names unknown kid %r; re-reading the issuer's JWKS", kid[:64])
                self._unknown_kid_at = now
                self._refresh(now)
            if not self._keys:
                raise IdentityProviderUnavailable("the identity provider's signing keys could not be read yet")
            key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("token signed by a key the identity provider does not publish")
        return key

    def _refresh(self, now: float) -> None:
        try:
            keys = self._load()
        except IdentityProviderUnavailable:
            self._failed_at = now
            if not self._keys:
                raise
            log.warning("could not re-read the OIDC JWKS; keeping the %d keys already known", len(self._keys))
            return
        self._keys, self._loaded_at, self._failed_at = keys, now, None

    def _load(self) -> dict[str, PyJWK]:
        data = self._fetch(self._jwks_uri())
        try:
            jwk_set = PyJWKSet.from_dict(data if isinstance(data, dict) else {})
        except jwt.PyJWTError as exc:
            raise IdentityProviderUnavailable(f"the identity provider's JWKS has no usable key: {exc}") from exc
        keys: dict[str, PyJWK] = {}
        for key in jwk_set:
            # Only signature keys with an id and an asymmetric algorithm; an encryption key or
            # an HMAC secret published by mistake is never a verification key.
            if not key.key_id or key.public_key_use not in (None, "sig"):
                continue
            if key.algorithm_name not in ASYMMETRIC_ALGORITHMS:
                log.warning("ignoring JWKS key %r: algorithm %s is not an asymmetric signature", key.key_id,
                            key.algorithm_name)
                continue
            keys[key.key_id] = key
        if not keys:
            raise IdentityProviderUnavailable("the identity provider's JWKS has no asymmetric signing key with a kid")
        return keys


class OidcVerifier:
    """Turns a bearer JWT from the configured issuer into a Caller, or refuses it (401)."""

    def __init__(self, config: OidcConfig, *, fetch: Fetch | None = None) -> None:
        self.config = config
        self._fetch = fetch or self._http_get
        self._discovery: dict[str, Any] | None = None
        self._discovery_lock = threading.Lock()
        self.jwks = JwksCache(self._jwks_uri, self._fetch, cooldown=config.jwks_refresh_cooldown_seconds,
                              max_age=config.jwks_max_age_seconds)

    # --- the issuer's published metadata -------------------------------------------------

    def _http_get(self, url: str) -> Any:
        try:
            # No redirects: the discovery document and the JWKS come from where they are said to be.
            response = httpx.get(url, timeout=self.config.timeout_seconds, follow_redirects=False,
                                 headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise IdentityProviderUnavailable(f"cannot reach the identity provider at {url}: {exc.__class__.__name__}") from exc
        if response.status_code != 200:
            raise IdentityProviderUnavailable(f"the identity provider answered {response.status_code} for {url}")
        try:
            return response.json()
        except ValueError as exc:
            raise IdentityProviderUnavailable(f"the identity provider's {url} is not JSON") from exc

    def discovery(self) -> dict[str, Any]:
        with self._discovery_lock:
            if self._discovery is None:
                url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
                doc = self._fetch(url)
                if not isinstance(doc, dict):
                    raise IdentityProviderUnavailable("the identity provider's discovery document is not an object")
                # OpenID Connect Discovery 1.0 section 4.3: the document must name the issuer
                # it was fetched for, exactly; otherwise it speaks for someone else.
                if doc.get("issuer") != self.config.issuer:
                    raise IdentityProviderUnavailable(
                        f"discovery document names issuer {doc.get('issuer')!r}, not BROKER_OIDC_ISSUER {self.config.issuer!r}"
                    )
                jwks_uri = doc.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                    raise IdentityProviderUnavailable("the identity provider's discovery document has no jwks_uri")
                if not jwks_uri.startswith("https://") and not is_loopback(jwks_uri):
                    raise IdentityProviderUnavailable("the identity provider's jwks_uri is not https")
                self._discovery = doc
            return self._discovery

    def _jwks_uri(self) -> str:
        return str(self.discovery()["jwks_uri"])

    # --- tokens --------------------------------------------------------------------------

    def claims(self, token: str) -> dict[str, Any]:
        """Verify signature and registered claims; the claims, or Unauthenticated."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("malformed token") from exc
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise Unauthenticated("token algorithm not accepted")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise Unauthenticated("token names no signing key (kid)")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
            raise Unauthenticated("token type not accepted here")
        if "crit" in header:
            raise Unauthenticated("token has critical header extensions the broker does not understand")
        key = self.jwks.key(kid)
        # The key decides the algorithm, not the token: a token naming another algorithm than
        # the one its kid is published for (HS256 "signed" with the public key) ends here.
        if alg != key.algorithm_name:
            raise Unauthenticated("token algorithm does not match its signing key")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=self.config.audience,  # one audience: tokens for other APIs are not logins here
                issuer=self.config.issuer,
                leeway=self.config.leeway_seconds,  # two clocks (IdP, broker); bounded at 60 s
                options=jwt_options(["iss", "aud", "exp", "iat", "sub"], audience=True),
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token expired", code="token-expired") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"token rejected: {exc}") from exc
        except MALFORMED_VALUE_ERRORS as exc:  # a time claim PyJWT could not even compare
            raise Unauthenticated("token rejected: a time claim is not a number", code="invalid-token-claims") from exc
        problem = time_claim_problem(claims)
        if problem is not None:
            raise Unauthenticated(f"token rejected: {problem}", code="invalid-token-claims")
        return claims

    def verify(self, token: str) -> Caller:
        claims = self.claims(token)
        client_id = next((claims[c] for c in CLIENT_ID_CLAIMS if isinstance(claims.get(c), str)), None)
        principal = claims.get(self.config.principal_claim)
        if client_id is not None and client_id in self.config.orchestrator_clients:
            # A client-credentials token has no person behind it: its subject is the client
            # itself (RFC 9068 section 2.2), or at least it names no human. A person's token
            # that merely came through an orchestrator's client id is not an orchestrator.
            if principal is not None and claims.get("sub") != client_id:
                raise Unauthenticated("token from an orchestrator client carries a person; orchestrators use client credentials")
            return Caller(kind="orchestrator", name=self.config.orchestrator_clients[client_id])
        if principal is None or principal == "":
            raise Unauthenticated(f"token has no {self.config.principal_claim!r} claim to name the person")
        # Refused, never trimmed or mapped: a claim that is not already a principal in the
        # canonical form's alphabet could be another account dressed as this one.
        problem = principal_problem(principal)
        if problem is not None:
            raise Unauthenticated(f"token's {self.config.principal_claim!r} claim is not a principal: {problem}",
                                  code="invalid-principal")
        name = canonical_human(principal)
        # An address the IdP says it has not verified could be anyone's: the classic account
        # takeover through a self-asserted email.
        if self.config.principal_claim == "email" and claims.get("email_verified") is False:
            raise Unauthenticated("the identity provider has not verified this email address")
        return Caller(kind="human", name=name, groups=self.groups(claims))

    def groups(self, claims: Mapping[str, Any]) -> frozenset[str]:
        value = claim_at(claims, self.config.groups_claim)
        if value is None:
            return frozenset()
        # Fail closed: a groups claim that is not a list of group names (a bare string, a list
        # holding anything else, a name with whitespace or invisible characters) refuses the
        # token; it is never split, trimmed or silently ignored.
        if not isinstance(value, list) or len(value) > MAX_GROUPS:
            raise Unauthenticated(f"token's {self.config.groups_claim!r} claim is not a list of group names",
                                  code="invalid-groups-claim")
        for group in value:
            problem = group_problem(group)
            if problem is not None:
                raise Unauthenticated(f"token's {self.config.groups_claim!r} claim: {problem}",
                                      code="invalid-groups-claim")
        return frozenset(value)


def unverified_issuer(token: str) -> str | None:
    """The `iss` a JWT claims, unverified: only to pick which verifier checks it for real."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, *MALFORMED_VALUE_ERRORS):
        return None
    iss = claims.get("iss")
    return iss if isinstance(iss, str) else None
