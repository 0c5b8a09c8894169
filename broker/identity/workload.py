"""Machine callers proven by their platform's own short-lived token: workload identity.

An orchestrator (or an agent runtime) presents a JWT its platform issued: a GitHub Actions or
GitLab or Buildkite OIDC token, a Kubernetes projected service-account token, a SPIFFE JWT-SVID.
The broker accepts it only when all of these hold, checked in this order:

1. its issuer is on the server's allowlist (`BROKER_TRUSTED_ISSUERS`), which lives outside the
   policy file: a policy that names another issuer widens nothing;
2. its `alg` is one the allowlist pins for that issuer (RS256 unless said otherwise), and the key
   its `kid` names is published for exactly that algorithm;
3. the key is in the issuer's JWKS (OIDC discovery, then `jwks_uri`) or, for SPIFFE, in the
   trust domain's bundle (`use: jwt-svid` keys only); an unknown `kid` re-reads the keys at
   most once per cooldown, so rotation is picked up without a restart and a storm of made-up
   kids costs the issuer one request per cooldown;
4. signature, `iss` (OIDC), `aud`, `exp`, `nbf`, `iat`, `sub`, with a clock skew of at most
   60 s, PyJWT doing the JOSE;
5. a trust rule of the policy (`policy/trust.py`) of the role asked for matches the verified
   claims; the first in file order wins.

Nothing is cached but keys. A token's verdict is computed on every request from the token and
the policy in force, so no decision made for one pipeline's token can be served to another's.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from jwt import PyJWK

from broker.errors import ConfigError, Forbidden, IdentityProviderUnavailable, Unauthenticated
from broker.identity import spiffe
from broker.identity.keys import jwt_options
from broker.identity.oidc import ASYMMETRIC_ALGORITHMS, JwksCache, is_loopback
from broker.policy.trust import CompiledTrust

log = logging.getLogger("broker.identity.workload")

# `typ` a workload token may carry: GitHub Actions and SPIRE write JWT, SPIFFE allows JOSE,
# Kubernetes writes none, an OAuth server's client-credentials access token is at+jwt (RFC 9068).
# Other JWTs of the same issuer (logout tokens, DPoP proofs, SETs) are never a workload's proof.
ACCEPTED_TYPES = frozenset({"jwt", "jose", "at+jwt", "application/at+jwt"})
DEFAULT_ALGORITHMS = ("RS256",)  # what GitHub Actions, GitLab, Buildkite and Kubernetes sign with
MAX_TOKEN = 8192
WORKLOAD_HEADER = "X-Workload-Token"  # the agent runtime's own token, beside its session token


class UntrustedIssuer(Unauthenticated, code="untrusted-issuer"):
    """The token's issuer (or SPIFFE trust domain) is not on the server allowlist."""


class AlgorithmNotAllowed(Unauthenticated, code="algorithm-not-allowed"):
    """The token's `alg` is not the one pinned for its issuer."""


class UnknownSigningKey(Unauthenticated, code="unknown-signing-key"):
    """The token's `kid` is not in the issuer's keys, even after re-reading them."""


class InvalidAudience(Unauthenticated, code="invalid-audience"):
    """The token was issued for another audience than any trust rule of its issuer accepts."""


class TokenLifetimeTooLong(Unauthenticated, code="token-lifetime-too-long"):
    """The token lives longer than the broker accepts of a workload token (a long-lived secret in disguise)."""


class NoMatchingTrustRule(Forbidden, code="no-matching-trust-rule"):
    """A genuine token that no trust rule of the policy lets in (subject or a claim outside it)."""


class WorkloadTokenRequired(Unauthenticated, code="workload-token-required"):
    """The session is bound to a workload and the request carries no workload token."""


class WorkloadMismatch(Forbidden, code="workload-mismatch"):
    """The workload token is genuine but names another workload than the session is bound to."""


def _shown(value: Any) -> str:
    """An unverified value, for a message: bounded and quoted, so it cannot forge log lines."""
    return repr(value[:200]) if isinstance(value, str) else "none"


@dataclass(frozen=True)
class TrustedIssuer:
    """One entry of the server allowlist."""

    issuer: str  # https URL (OIDC) or spiffe://<trust domain>
    algorithms: frozenset[str]
    bundle: str | None = None  # SPIFFE: a file path or a bundle endpoint URL

    @property
    def is_spiffe(self) -> bool:
        return self.issuer.startswith(spiffe.SCHEME)


def _url_ok(url: str) -> bool:
    scheme = urlsplit(url).scheme
    return scheme == "https" or (scheme == "http" and is_loopback(url))


def parse_trusted_issuers(raw: str) -> dict[str, TrustedIssuer]:
    """`BROKER_TRUSTED_ISSUERS`: a comma-separated list of OIDC issuer URLs (RS256 pinned), or a
    JSON list whose items are such URLs or objects `{"issuer", "algorithms"?, "bundle"?}`
    (`bundle` is required for, and only for, `spiffe://<trust domain>`)."""
    what = "BROKER_TRUSTED_ISSUERS"
    text = raw.strip()
    if not text:
        return {}
    items: list[Any]
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise ConfigError(f"{what} starts with '[' but is not a JSON list") from None
    else:
        items = [e.strip() for e in text.split(",") if e.strip()]
    out: dict[str, TrustedIssuer] = {}
    for i, item in enumerate(items):
        entry = {"issuer": item} if isinstance(item, str) else item
        if not isinstance(entry, dict) or not set(entry) <= {"issuer", "algorithms", "bundle"} \
                or not isinstance(entry.get("issuer"), str):
            raise ConfigError(f'{what}[{i}] must be an issuer URL or {{"issuer", "algorithms"?, "bundle"?}}')
        issuer = entry["issuer"].strip()
        algorithms = entry.get("algorithms", list(DEFAULT_ALGORITHMS))
        if not isinstance(algorithms, list) or not algorithms or \
                not all(isinstance(a, str) and a in ASYMMETRIC_ALGORITHMS for a in algorithms):
            raise ConfigError(f"{what}[{i}]: algorithms must be a non-empty list of "
                              f"{', '.join(sorted(ASYMMETRIC_ALGORITHMS))}")
        bundle = entry.get("bundle")
        if issuer.startswith(spiffe.SCHEME):
            if not spiffe.is_trust_domain(issuer):
                raise ConfigError(f"{what}[{i}]: {issuer!r} is not spiffe://<trust domain> (lowercase, no path)")
            if not isinstance(bundle, str) or not bundle.strip():
                raise ConfigError(f"{what}[{i}]: a SPIFFE trust domain needs its bundle (a file path or URL)")
            if "://" in bundle and not _url_ok(bundle):
                raise ConfigError(f"{what}[{i}]: the bundle endpoint must be https (plain http only on loopback)")
        else:
            if not _url_ok(issuer) or len(issuer) > 512:
                raise ConfigError(f"{what}[{i}]: {issuer!r} must be an https:// issuer URL "
                                  "(plain http only on loopback, for tests) or spiffe://<trust domain>")
            if bundle is not None:
                raise ConfigError(f"{what}[{i}]: bundle is for SPIFFE trust domains; OIDC issuers publish a JWKS")
        if issuer in out:
            raise ConfigError(f"{what} names {issuer!r} twice")
        out[issuer] = TrustedIssuer(issuer, frozenset(algorithms), bundle.strip() if isinstance(bundle, str) else None)
    return out


@dataclass(frozen=True)
class WorkloadIdentity:
    """A verified workload and the trust rule that let it in."""

    issuer: str
    subject: str
    rule: str  # the rule's name
    rule_path: str  # "trust[i]"
    role: str
    orchestrator: str | None = None

    def audit(self) -> dict[str, str]:
        """What every audit record this caller causes carries."""
        return {"issuer": self.issuer, "subject": self.subject, "trust_rule": self.rule,
                "matched_rule": self.rule_path, "role": self.role}


Fetch = Callable[[str], Any]


@dataclass
class _IssuerKeys:
    trusted: TrustedIssuer
    jwks: JwksCache
    discovery: dict[str, Any] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class WorkloadVerifier:
    """Turns a workload token into a WorkloadIdentity, or refuses it with a precise code."""

    def __init__(self, issuers: Mapping[str, TrustedIssuer], *, leeway_seconds: int = 30,
                 max_lifetime_seconds: int = 48 * 3600,
                 refresh_cooldown_seconds: float = 30.0, max_age_seconds: float = 3600.0,
                 timeout_seconds: float = 5.0, fetch: Fetch | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= leeway_seconds <= 60:
            raise ConfigError("BROKER_WORKLOAD_LEEWAY_SECONDS must be between 0 and 60")
        self.leeway_seconds = leeway_seconds
        self.max_lifetime_seconds = max_lifetime_seconds
        self.timeout_seconds = timeout_seconds
        self._fetch = fetch or self._http_get
        self.issuers: dict[str, _IssuerKeys] = {}
        for name, trusted in issuers.items():
            self.issuers[name] = _IssuerKeys(trusted, JwksCache(
                self._keys_location(name), self._keys_reader(trusted),
                cooldown=refresh_cooldown_seconds, max_age=max_age_seconds, clock=clock))

    # --- where each issuer's keys come from -----------------------------------------------

    def _http_get(self, url: str) -> Any:
        try:
            # No redirects: metadata and keys come from where they are said to be.
            response = httpx.get(url, timeout=self.timeout_seconds, follow_redirects=False,
                                 headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise IdentityProviderUnavailable(f"cannot reach the workload issuer at {url}: "
                                              f"{exc.__class__.__name__}") from exc
        if response.status_code != 200:
            raise IdentityProviderUnavailable(f"the workload issuer answered {response.status_code} for {url}")
        try:
            return response.json()
        except ValueError as exc:
            raise IdentityProviderUnavailable(f"the workload issuer's {url} is not JSON") from exc

    def _keys_location(self, issuer: str) -> Callable[[], str]:
        def location() -> str:
            keys = self.issuers[issuer]
            if keys.trusted.is_spiffe:
                return str(keys.trusted.bundle)
            return str(self._discover(keys)["jwks_uri"])
        return location

    def _keys_reader(self, trusted: TrustedIssuer) -> Fetch:
        if not trusted.is_spiffe:
            return self._fetch

        def read(location: str) -> Any:
            raw = self._fetch(location) if "://" in location else spiffe.read_bundle_file(Path(location))
            return spiffe.jwt_authorities(raw)
        return read

    def _discover(self, keys: _IssuerKeys) -> dict[str, Any]:
        with keys.lock:
            if keys.discovery is None:
                issuer = keys.trusted.issuer
                doc = self._fetch(issuer.rstrip("/") + "/.well-known/openid-configuration")
                # OIDC Discovery 1.0 section 4.3: the document names the issuer it was fetched
                # for, exactly, or it speaks for someone else.
                if not isinstance(doc, dict) or doc.get("issuer") != issuer:
                    raise IdentityProviderUnavailable(f"the discovery document of {issuer} names another issuer")
                jwks_uri = doc.get("jwks_uri")
                if not isinstance(jwks_uri, str) or not _url_ok(jwks_uri):
                    raise IdentityProviderUnavailable(f"the discovery document of {issuer} has no https jwks_uri")
                keys.discovery = doc
            return keys.discovery

    # --- tokens ----------------------------------------------------------------------------

    @staticmethod
    def unverified(token: str) -> tuple[str | None, str | None]:
        """(issuer, subject) as the token claims them, before any check: to pick the verifier
        and to name a refused caller in the audit, never to decide anything."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return None, None
        iss, sub = claims.get("iss"), claims.get("sub")
        return (iss if isinstance(iss, str) else None), (sub if isinstance(sub, str) else None)

    @staticmethod
    def issuer_of(iss: str | None, sub: str | None) -> str | None:
        """The allowlist key of a token: its SPIFFE trust domain when `sub` is a SPIFFE ID (a
        JWT-SVID's `iss` is optional and not what the bundle is keyed by), else its `iss`."""
        if sub is not None and sub.startswith(spiffe.SCHEME):
            return spiffe.trust_domain_of(sub) or sub
        return iss

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """A workload token is short-lived by nature; one that lives for months is a standing
        secret (a legacy Kubernetes token, a misconfigured expirationSeconds) and is refused."""
        exp = claims["exp"]
        start = claims.get("iat")
        if not isinstance(start, int | float) or isinstance(start, bool):
            start = time.time()  # JWT-SVIDs need no iat: what is left of its life counts
        if exp - start > self.max_lifetime_seconds:
            raise TokenLifetimeTooLong(f"the token lives {int(exp - start)} s; workload tokens are accepted up to "
                                       f"{self.max_lifetime_seconds} s (BROKER_WORKLOAD_MAX_TOKEN_LIFETIME_SECONDS)")

    @staticmethod
    def _signing_key(keys: _IssuerKeys, header: dict[str, Any]) -> tuple[str, PyJWK]:
        """The pinned algorithm and published key the token's header names, or a refusal."""
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        # The server pins the algorithm; the token's header only says which of the pinned ones.
        if not isinstance(alg, str) or alg not in keys.trusted.algorithms:
            raise AlgorithmNotAllowed(f"algorithm {_shown(alg)} is not pinned for {keys.trusted.issuer} "
                                      f"(allowed: {', '.join(sorted(keys.trusted.algorithms))})")
        if not isinstance(kid, str) or not kid or len(kid) > 256:
            raise Unauthenticated("workload token names no signing key (kid)")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
            raise Unauthenticated("workload token type not accepted here")
        if "crit" in header:
            raise Unauthenticated("workload token has critical header extensions the broker does not understand")
        try:
            key = keys.jwks.key(kid)
        except IdentityProviderUnavailable:
            raise
        except Unauthenticated:
            raise UnknownSigningKey(f"key {_shown(kid)} is not published by {keys.trusted.issuer}") from None
        if key.algorithm_name != alg:
            raise AlgorithmNotAllowed("the token's algorithm is not the one its signing key is published for")
        return alg, key

    def verify(self, token: str, *, role: str, trust: CompiledTrust) -> WorkloadIdentity:
        if len(token) > MAX_TOKEN:
            raise Unauthenticated("workload token too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise Unauthenticated("malformed workload token") from exc
        iss, sub = self.unverified(token)
        issuer = self.issuer_of(iss, sub)
        if sub is not None and sub.startswith(spiffe.SCHEME) and spiffe.trust_domain_of(sub) is None:
            raise Unauthenticated(f"the token's subject {_shown(sub)} is not a valid SPIFFE ID")
        keys = self.issuers.get(issuer or "")
        if keys is None:
            named = issuer is not None and issuer in trust.issuers()
            raise UntrustedIssuer(
                f"issuer {_shown(issuer)} is named by the policy's trust rules but not by the server allowlist "
                "(BROKER_TRUSTED_ISSUERS); the policy cannot widen it" if named else
                f"issuer {_shown(issuer)} is not a trusted workload issuer")
        audiences = trust.audiences(keys.trusted.issuer, role)
        if not audiences:
            raise NoMatchingTrustRule(f"no trust rule lets {role} callers in from {keys.trusted.issuer}")
        alg, key = self._signing_key(keys, header)
        spiffe_token = keys.trusted.is_spiffe
        try:
            claims = jwt.decode(
                token, key.key,
                algorithms=[alg],
                audience=audiences,  # any audience some rule of this issuer accepts; the rule checks its own
                issuer=None if spiffe_token else keys.trusted.issuer,  # JWT-SVIDs: the bundle is the issuer
                leeway=self.leeway_seconds,  # two clocks; bounded at 60 s
                options=jwt_options(["exp", "sub", "aud"] if spiffe_token else ["iss", "aud", "exp", "iat", "sub"],
                                    audience=True),
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("workload token expired", code="token-expired") from exc
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
            if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim != "aud":
                raise Unauthenticated(f"workload token lacks {exc.claim}") from exc
            raise InvalidAudience(f"workload token is not for an audience the trust rules of "
                                  f"{keys.trusted.issuer} accept") from exc
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"workload token rejected: {exc}") from exc
        self._check_lifetime(claims)
        if spiffe_token and spiffe.trust_domain_of(str(claims.get("sub"))) != keys.trusted.issuer:
            raise UntrustedIssuer("the SVID's SPIFFE ID is of another trust domain than its bundle")
        match = trust.first(role, keys.trusted.issuer, claims)
        if match is None:
            raise NoMatchingTrustRule(f"no trust rule for {role} callers matches subject {_shown(claims.get('sub'))} "
                                      f"of {keys.trusted.issuer} and its claims")
        return WorkloadIdentity(keys.trusted.issuer, match.subject, match.rule.name, match.rule.rule, role,
                                match.rule.orchestrator)
