"""The workload verifier against real issuers on loopback HTTP (discovery + JWKS) and a SPIFFE
bundle file: what it accepts, the corpus of what it refuses, key rotation and the kid storm.

Refresh limits are proven by counting the requests each issuer served, with the verifier's clock
driven by the test, never by sleeping.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from broker.errors import BrokerError
from broker.identity.workload import TrustedIssuer, WorkloadVerifier, parse_trusted_issuers
from broker.policy.trust import CompiledTrust, TrustRule
from tests.support.workload_issuers import IssuerKey, LoopbackIssuer, SpiffeTrustDomain, new_key

AUD = "jit-broker"
COOLDOWN = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def github() -> Iterator[LoopbackIssuer]:
    issuer = LoopbackIssuer("github")
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def kubernetes() -> Iterator[LoopbackIssuer]:
    issuer = LoopbackIssuer("kubernetes")
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def stranger() -> Iterator[LoopbackIssuer]:
    """An issuer of the same shape that no allowlist names."""
    issuer = LoopbackIssuer("github")
    yield issuer
    issuer.close()


@pytest.fixture
def spiffe_domain(tmp_path: Path) -> SpiffeTrustDomain:
    return SpiffeTrustDomain("example.org", tmp_path)


def rules(github: LoopbackIssuer, kubernetes: LoopbackIssuer, stranger: LoopbackIssuer) -> CompiledTrust:
    return CompiledTrust([TrustRule.model_validate(r) for r in [
        {"name": "gha-prod", "role": "orchestrator", "orchestrator": "gha", "issuer": github.url, "audience": AUD,
         "subject": "repo:acme/app:environment:prod",
         "claim_pattern": {"repository": "acme/app",
                           "job_workflow_ref": "acme/app/.github/workflows/agent.yml@refs/heads/main"}},
        {"name": "k8s-runner", "role": "orchestrator", "orchestrator": "k8s", "issuer": kubernetes.url,
         "audience": AUD, "subject_pattern": "system:serviceaccount:agents:*",
         "claim_pattern": {"kubernetes.io.namespace": "agents", "kubernetes.io.serviceaccount.name": "runner"}},
        {"name": "spiffe-agents", "role": "agent", "issuer": "spiffe://example.org", "audience": AUD,
         "subject_pattern": "spiffe://example.org/ns/agents/sa/*"},
        # The policy names this issuer; the server allowlist does not: it must count for nothing.
        {"name": "stranger", "role": "orchestrator", "orchestrator": "x", "issuer": stranger.url, "audience": AUD,
         "subject_pattern": "re:.*"},
    ]])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(github: LoopbackIssuer, kubernetes: LoopbackIssuer, spiffe_domain: SpiffeTrustDomain,
             clock: Clock) -> WorkloadVerifier:
    allow = json.dumps([github.url, {"issuer": kubernetes.url, "algorithms": ["RS256"]},
                        {"issuer": "spiffe://example.org", "algorithms": ["ES256"],
                         "bundle": str(spiffe_domain.bundle_path)}])
    return WorkloadVerifier(parse_trusted_issuers(allow), refresh_cooldown_seconds=COOLDOWN, max_age_seconds=3600,
                            leeway_seconds=30, clock=clock)


@pytest.fixture
def trust(github: LoopbackIssuer, kubernetes: LoopbackIssuer, stranger: LoopbackIssuer) -> CompiledTrust:
    return rules(github, kubernetes, stranger)


def refused(verifier: WorkloadVerifier, token: str, trust: CompiledTrust, role: str = "orchestrator") -> BrokerError:
    with pytest.raises(BrokerError) as raised:
        verifier.verify(token, role=role, trust=trust)
    return raised.value


# --- accepted ------------------------------------------------------------------------------------


def test_github_actions_token_acts_as_the_rules_orchestrator(verifier: WorkloadVerifier, github: LoopbackIssuer,
                                                            trust: CompiledTrust) -> None:
    who = verifier.verify(github.github_token(audience=AUD), role="orchestrator", trust=trust)
    assert (who.issuer, who.subject, who.rule, who.rule_path, who.orchestrator) == \
        (github.url, "repo:acme/app:environment:prod", "gha-prod", "trust[0]", "gha")
    assert who.audit() == {"issuer": github.url, "subject": "repo:acme/app:environment:prod",
                           "trust_rule": "gha-prod", "matched_rule": "trust[0]", "role": "orchestrator"}


def test_kubernetes_projected_token_with_audience_list(verifier: WorkloadVerifier, kubernetes: LoopbackIssuer,
                                                       trust: CompiledTrust) -> None:
    token = kubernetes.kubernetes_token(audience=AUD, expiration_seconds=600)
    assert jwt.get_unverified_header(token).get("typ") is None  # as the API server writes them
    who = verifier.verify(token, role="orchestrator", trust=trust)
    assert (who.subject, who.rule, who.orchestrator) == ("system:serviceaccount:agents:runner", "k8s-runner", "k8s")


def test_spiffe_jwt_svid_against_the_bundle(verifier: WorkloadVerifier, spiffe_domain: SpiffeTrustDomain,
                                            trust: CompiledTrust) -> None:
    who = verifier.verify(spiffe_domain.svid("ns/agents/sa/claude", audience=AUD), role="agent", trust=trust)
    assert (who.issuer, who.subject, who.rule) == ("spiffe://example.org", "spiffe://example.org/ns/agents/sa/claude",
                                                   "spiffe-agents")


def test_expired_within_the_bounded_skew_is_accepted(verifier: WorkloadVerifier, github: LoopbackIssuer,
                                                     trust: CompiledTrust) -> None:
    claims = github.github_claims(audience=AUD)
    claims["exp"] = int(time.time()) - 10  # the issuer's clock a little ahead: inside the 30 s leeway
    assert verifier.verify(github.sign(claims), role="orchestrator", trust=trust).rule == "gha-prod"


# --- the refusal corpus --------------------------------------------------------------------------


def _hs256_with_public_key(github: LoopbackIssuer) -> str:
    pem = github.active.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "kid": github.active.kid, "typ": "JWT"}
    body = github.github_claims(audience=AUD)
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(body).encode())
    return signing_input + "." + b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())


def _unsigned(github: LoopbackIssuer) -> str:
    return jwt.encode(github.github_claims(audience=AUD), "", algorithm="none",
                      headers={"kid": github.active.kid})


Case = Callable[[LoopbackIssuer, LoopbackIssuer, LoopbackIssuer, SpiffeTrustDomain], tuple[str, str]]

# name -> (token maker, role): the expected code and a word the message must carry.
REFUSALS: dict[str, tuple[Case, str, str, str]] = {
    "unknown-issuer": (lambda g, k, s, d: (s.sign({**s.github_claims(audience=AUD),
                                                   "iss": "https://issuer.unknown.example"}), ""), "orchestrator",
                       "untrusted-issuer", "not a trusted workload issuer"),
    "wrong-audience": (lambda g, k, s, d: (g.github_token(audience="sts.amazonaws.com"), ""), "orchestrator",
                       "invalid-audience", "audience"),
    "audience-prefix-trick": (lambda g, k, s, d: (g.github_token(audience=AUD + "-evil"), ""), "orchestrator",
                              "invalid-audience", "audience"),
    "expired": (lambda g, k, s, d: (g.sign(g.github_claims(audience=AUD, ttl=-120)), ""), "orchestrator",
                "token-expired", "expired"),
    "k8s-expired": (lambda g, k, s, d: (k.kubernetes_token(audience=AUD, expiration_seconds=-61), ""),
                    "orchestrator", "token-expired", "expired"),
    "not-yet-valid": (lambda g, k, s, d: (g.sign({**g.github_claims(audience=AUD), "nbf": int(time.time()) + 600}),
                                          ""), "orchestrator", "invalid-token", "not yet valid"),
    "issued-in-the-future": (lambda g, k, s, d: (g.sign({**g.github_claims(audience=AUD),
                                                         "iat": int(time.time()) + 600}), ""),
                             "orchestrator", "invalid-token", "rejected"),
    "alg-hs256-with-public-key": (lambda g, k, s, d: (_hs256_with_public_key(g), ""), "orchestrator",
                                  "algorithm-not-allowed", "HS256"),
    "alg-none": (lambda g, k, s, d: (_unsigned(g), ""), "orchestrator", "algorithm-not-allowed", "none"),
    "alg-rs384-not-pinned": (lambda g, k, s, d: (g.sign(g.github_claims(audience=AUD), alg="RS384"), ""),
                             "orchestrator", "algorithm-not-allowed", "RS384"),
    "alg-ps256-not-pinned": (lambda g, k, s, d: (g.sign(g.github_claims(audience=AUD), alg="PS256"), ""),
                             "orchestrator", "algorithm-not-allowed", "PS256"),
    "unknown-kid": (lambda g, k, s, d: (g.sign(g.github_claims(audience=AUD), key=new_key(kid="nope")), ""),
                    "orchestrator", "unknown-signing-key", "not published"),
    "stranger-key-with-our-kid": (lambda g, k, s, d: (g.sign(g.github_claims(audience=AUD),
                                                             key=new_key(kid=g.active.kid)), ""),
                                  "orchestrator", "invalid-token", "Signature verification failed"),
    "repo-prefix-trick": (lambda g, k, s, d: (g.github_token(audience=AUD, repository="acme/app-evil"), ""),
                          "orchestrator", "no-matching-trust-rule", "repo:acme/app-evil"),
    "subject-right-claim-wrong": (lambda g, k, s, d: (g.sign({**g.github_claims(audience=AUD),
                                                              "repository": "acme/app-evil"}), ""),
                                  "orchestrator", "no-matching-trust-rule", "no trust rule"),
    "other-environment": (lambda g, k, s, d: (g.github_token(audience=AUD, environment="staging"), ""),
                          "orchestrator", "no-matching-trust-rule", "staging"),
    "no-environment-ref-subject": (lambda g, k, s, d: (g.github_token(audience=AUD, environment=None), ""),
                                   "orchestrator", "no-matching-trust-rule", "ref:refs/heads/main"),
    "other-workflow": (lambda g, k, s, d: (g.github_token(audience=AUD, workflow_file="evil.yml"), ""),
                       "orchestrator", "no-matching-trust-rule", "no trust rule"),
    "workflow-on-a-branch": (lambda g, k, s, d: (g.github_token(audience=AUD, ref="refs/heads/main-evil"), ""),
                             "orchestrator", "no-matching-trust-rule", "no trust rule"),
    "k8s-year-long-projection": (lambda g, k, s, d: (k.kubernetes_token(audience=AUD,
                                                                       expiration_seconds=365 * 86400), ""),
                                 "orchestrator", "token-lifetime-too-long", "accepted up to"),
    "k8s-legacy-secret-token": (lambda g, k, s, d: (k.sign({
        "iss": "kubernetes/serviceaccount", "kubernetes.io/serviceaccount/namespace": "agents",
        "kubernetes.io/serviceaccount/service-account.name": "runner",
        "sub": "system:serviceaccount:agents:runner"}), ""), "orchestrator", "untrusted-issuer", "kubernetes"),
    "k8s-legacy-shape-our-issuer": (lambda g, k, s, d: (k.sign({
        "iss": k.url, "aud": [AUD], "sub": "system:serviceaccount:agents:runner",
        "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "runner"}}}), ""),
        "orchestrator", "invalid-token", "exp"),
    "svid-month-long": (lambda g, k, s, d: (d.svid("ns/agents/sa/x", audience=AUD, ttl=30 * 86400), ""), "agent",
                        "token-lifetime-too-long", "accepted up to"),
    "k8s-other-namespace": (lambda g, k, s, d: (k.kubernetes_token(audience=AUD, namespace="agents-evil"), ""),
                            "orchestrator", "no-matching-trust-rule", "agents-evil"),
    "k8s-other-service-account-claim": (lambda g, k, s, d: (k.sign({**k.kubernetes_claims(
        audience=AUD, service_account="builder"), "sub": "system:serviceaccount:agents:runner"}), ""),
        "orchestrator", "no-matching-trust-rule", "no trust rule"),
    "k8s-sa-subject-with-extra-segment": (lambda g, k, s, d: (k.kubernetes_token(
        audience=AUD, service_account="runner:x"), ""), "orchestrator", "no-matching-trust-rule", "runner:x"),
    "k8s-namespace-claim-forged-beside": (lambda g, k, s, d: (k.sign({**k.kubernetes_claims(
        audience=AUD, namespace="default"), "sub": "system:serviceaccount:agents:runner"}), ""),
        "orchestrator", "no-matching-trust-rule", "no trust rule"),
    "orchestrator-token-as-agent": (lambda g, k, s, d: (g.github_token(audience=AUD), ""), "agent",
                                    "no-matching-trust-rule", "agent"),
    "svid-as-orchestrator": (lambda g, k, s, d: (d.svid("ns/agents/sa/x", audience=AUD), ""), "orchestrator",
                             "no-matching-trust-rule", "orchestrator"),
    "spiffe-other-trust-domain": (lambda g, k, s, d: (d.svid("x", audience=AUD,
                                                             spiffe_id="spiffe://evil.org/ns/agents/sa/x"), ""),
                                  "agent", "untrusted-issuer", "spiffe://evil.org"),
    "spiffe-domain-suffix-trick": (lambda g, k, s, d: (d.svid("x", audience=AUD,
                                                              spiffe_id="spiffe://example.org.evil.com/ns/agents/sa/x"),
                                                       ""), "agent", "untrusted-issuer", "example.org.evil.com"),
    "spiffe-dot-dot-path": (lambda g, k, s, d: (d.svid("x", audience=AUD,
                                                       spiffe_id="spiffe://example.org/ns/agents/sa/../../admin"), ""),
                            "agent", "invalid-token", "not a valid SPIFFE ID"),
    "spiffe-uppercase-domain": (lambda g, k, s, d: (d.svid("x", audience=AUD,
                                                           spiffe_id="spiffe://EXAMPLE.org/ns/agents/sa/x"), ""),
                                "agent", "invalid-token", "not a valid SPIFFE ID"),
    "spiffe-port": (lambda g, k, s, d: (d.svid("x", audience=AUD, spiffe_id="spiffe://example.org:443/ns/agents"),
                                        ""), "agent", "invalid-token", "not a valid SPIFFE ID"),
    "spiffe-key-of-another-domain": (lambda g, k, s, d: (d.svid("ns/agents/sa/x", audience=AUD,
                                                                key=new_key("ES256", kid=d.keys[-1].kid)), ""),
                                     "agent", "invalid-token", "Signature verification failed"),
    "spiffe-svid-without-exp": (lambda g, k, s, d: (jwt.encode(
        {"sub": "spiffe://example.org/ns/agents/sa/x", "aud": AUD}, d.keys[-1].private, algorithm="ES256",
        headers={"kid": d.keys[-1].kid}), ""), "agent", "invalid-token", "exp"),
    "spiffe-rs256-not-pinned": (lambda g, k, s, d: (jwt.encode(
        {"sub": "spiffe://example.org/ns/agents/sa/x", "aud": AUD, "exp": int(time.time()) + 60},
        new_key().private, algorithm="RS256", headers={"kid": d.keys[-1].kid}), ""), "agent",
        "algorithm-not-allowed", "RS256"),
    "crit-header": (lambda g, k, s, d: (g.sign(g.github_claims(audience=AUD), headers={"crit": ["exp"]}), ""),
                    "orchestrator", "invalid-token", "malformed"),
    "logout-token-type": (lambda g, k, s, d: (g.sign(g.github_claims(audience=AUD), headers={"typ": "logout+jwt"}),
                                              ""), "orchestrator", "invalid-token", "type"),
    "no-subject": (lambda g, k, s, d: (g.sign({k_: v for k_, v in g.github_claims(audience=AUD).items()
                                               if k_ != "sub"}), ""), "orchestrator", "invalid-token", "sub"),
    "no-kid": (lambda g, k, s, d: (jwt.encode(g.github_claims(audience=AUD), g.active.private, algorithm="RS256"),
                                   ""), "orchestrator", "invalid-token", "kid"),
    "garbage": (lambda g, k, s, d: ("e30.e30.e30", ""), "orchestrator", "untrusted-issuer", "none"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refusal_corpus(name: str, verifier: WorkloadVerifier, trust: CompiledTrust, github: LoopbackIssuer,
                        kubernetes: LoopbackIssuer, stranger: LoopbackIssuer, spiffe_domain: SpiffeTrustDomain) -> None:
    make, role, code, words = REFUSALS[name]
    token, _ = make(github, kubernetes, stranger, spiffe_domain)
    exc = refused(verifier, token, trust, role)
    assert exc.code == code, (exc.code, exc.message)
    assert exc.status in (401, 403)
    assert words in exc.message, exc.message


def test_an_issuer_the_policy_names_is_refused_when_the_server_does_not(
        verifier: WorkloadVerifier, stranger: LoopbackIssuer, trust: CompiledTrust) -> None:
    assert stranger.url in trust.issuers()
    exc = refused(verifier, stranger.github_token(audience=AUD), trust)
    assert exc.code == "untrusted-issuer" and "cannot widen" in exc.message
    assert stranger.requests.total() == 0  # not even its keys were read


# --- keys: rotation and the storm --------------------------------------------------------------


def test_rotation_is_picked_up_without_a_restart(verifier: WorkloadVerifier, trust: CompiledTrust,
                                                 github: LoopbackIssuer, clock: Clock) -> None:
    verifier.verify(github.github_token(audience=AUD), role="orchestrator", trust=trust)
    before = github.jwks_reads()
    old = github.active
    github.rotate()  # the old key is withdrawn at the same time
    clock.now += COOLDOWN  # rotations are rarer than the cooldown
    who = verifier.verify(github.github_token(audience=AUD), role="orchestrator", trust=trust)
    assert who.rule == "gha-prod" and github.jwks_reads() == before + 1
    # A token of the withdrawn key is refused now that the keys were re-read.
    assert refused(verifier, github.sign(github.github_claims(audience=AUD), key=old), trust).code == \
        "unknown-signing-key"


def test_an_unknown_kid_storm_reads_the_jwks_once_per_cooldown(verifier: WorkloadVerifier, trust: CompiledTrust,
                                                               github: LoopbackIssuer, clock: Clock) -> None:
    verifier.verify(github.github_token(audience=AUD), role="orchestrator", trust=trust)
    before_keys, before_discovery = github.jwks_reads(), github.requests["/.well-known/openid-configuration"]
    stranger_key = new_key()
    for i in range(300):
        forged = github.sign(github.github_claims(audience=AUD), key=IssuerKey(f"storm-{i}", stranger_key.private, "RS256"))
        assert refused(verifier, forged, trust).code == "unknown-signing-key"
        clock.now += 0.05  # 300 tokens over 15 s: inside one cooldown
    assert github.jwks_reads() == before_keys + 1  # the first unknown kid re-read once, then nothing
    assert github.requests["/.well-known/openid-configuration"] == before_discovery  # discovery is kept
    clock.now += COOLDOWN
    for i in range(50):
        refused(verifier, github.sign(github.github_claims(audience=AUD),
                                      key=IssuerKey(f"more-{i}", stranger_key.private, "RS256")), trust)
    assert github.jwks_reads() == before_keys + 2
    # Genuine tokens kept working all along.
    assert verifier.verify(github.github_token(audience=AUD), role="orchestrator", trust=trust).rule == "gha-prod"


def test_spiffe_bundle_rotation_and_storm(verifier: WorkloadVerifier, trust: CompiledTrust,
                                          spiffe_domain: SpiffeTrustDomain, clock: Clock,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.identity.spiffe as spiffe_module

    reads: list[Path] = []
    original = spiffe_module.read_bundle_file

    def counted(path: Path) -> Any:
        reads.append(path)
        return original(path)
    monkeypatch.setattr(spiffe_module, "read_bundle_file", counted)
    assert verifier.verify(spiffe_domain.svid("ns/agents/sa/a", audience=AUD), role="agent", trust=trust)
    assert len(reads) == 1
    spiffe_domain.rotate()
    clock.now += COOLDOWN
    assert verifier.verify(spiffe_domain.svid("ns/agents/sa/a", audience=AUD), role="agent", trust=trust)
    assert len(reads) == 2
    for i in range(100):
        forged = spiffe_domain.svid("ns/agents/sa/a", audience=AUD, key=new_key("ES256", kid=f"s-{i}"))
        assert refused(verifier, forged, trust, "agent").code == "unknown-signing-key"
    assert len(reads) == 2  # the rotation's re-read started the cooldown: the storm costs nothing
    clock.now += COOLDOWN
    for i in range(20):
        refused(verifier, spiffe_domain.svid("ns/agents/sa/a", audience=AUD, key=new_key("ES256", kid=f"t-{i}")),
                trust, "agent")
    assert len(reads) == 3


def test_spiffe_bundle_endpoint_rotation_and_storm(tmp_path: Path, trust: CompiledTrust, clock: Clock) -> None:
    domain = SpiffeTrustDomain("example.org", tmp_path)
    url = domain.serve()
    try:
        verifier = WorkloadVerifier(parse_trusted_issuers(json.dumps([
            {"issuer": "spiffe://example.org", "algorithms": ["ES256"], "bundle": url}])),
            refresh_cooldown_seconds=COOLDOWN, clock=clock)
        assert verifier.verify(domain.svid("ns/agents/sa/a", audience=AUD), role="agent", trust=trust).rule == \
            "spiffe-agents"
        assert domain.endpoint_reads == 1
        domain.rotate()
        clock.now += COOLDOWN
        assert verifier.verify(domain.svid("ns/agents/sa/a", audience=AUD), role="agent", trust=trust)
        assert domain.endpoint_reads == 2
        stranger = new_key("ES256")
        for i in range(100):
            forged = domain.svid("ns/agents/sa/a", audience=AUD, key=IssuerKey(f"e-{i}", stranger.private, "ES256"))
            assert refused(verifier, forged, trust, "agent").code == "unknown-signing-key"
        assert domain.endpoint_reads == 2
    finally:
        domain.close()


def test_the_x509_authorities_of_a_bundle_never_verify_a_token(verifier: WorkloadVerifier, trust: CompiledTrust,
                                                               spiffe_domain: SpiffeTrustDomain) -> None:
    key = new_key("ES256")
    bundle = json.loads(spiffe_domain.bundle_path.read_text())
    bundle["keys"].append({**key.public_jwk(use="x509-svid")})
    spiffe_domain.bundle_path.write_text(json.dumps(bundle))
    exc = refused(verifier, spiffe_domain.svid("ns/agents/sa/a", audience=AUD, key=key), trust, "agent")
    assert exc.code == "unknown-signing-key"


# --- no decision is cached ---------------------------------------------------------------------


def test_a_verdict_is_never_reused_for_another_token_or_another_policy(
        verifier: WorkloadVerifier, trust: CompiledTrust, github: LoopbackIssuer, kubernetes: LoopbackIssuer,
        stranger: LoopbackIssuer) -> None:
    good = github.github_token(audience=AUD)
    for _ in range(3):
        assert verifier.verify(good, role="orchestrator", trust=trust).rule == "gha-prod"
        # Another pipeline's token right after, same issuer, same key, same audience: its own verdict.
        exc = refused(verifier, github.github_token(audience=AUD, repository="acme/app-evil"), trust)
        assert exc.code == "no-matching-trust-rule"
    # The same token, once the policy narrows: refused at once, no cached "yes".
    narrower = CompiledTrust([TrustRule.model_validate(
        {"name": "gha-staging", "role": "orchestrator", "orchestrator": "gha", "issuer": github.url,
         "audience": AUD, "subject": "repo:acme/app:environment:staging"})])
    assert refused(verifier, good, narrower).code == "no-matching-trust-rule"


# --- the allowlist setting -----------------------------------------------------------------------


BAD_ALLOWLISTS = [
    "http://issuer.example.com",  # plain http off loopback
    "ftp://127.0.0.1",
    '[{"issuer": "spiffe://example.org"}]',  # no bundle
    '[{"issuer": "spiffe://Example.org", "bundle": "/x"}]',
    '[{"issuer": "spiffe://example.org/path", "bundle": "/x"}]',
    '[{"issuer": "https://a.example", "algorithms": ["HS256"]}]',
    '[{"issuer": "https://a.example", "algorithms": ["none"]}]',
    '[{"issuer": "https://a.example", "algorithms": []}]',
    '[{"issuer": "https://a.example", "bundle": "/x"}]',
    '[{"issuer": "https://a.example", "extra": 1}]',
    '[{"issuer": "spiffe://example.org", "bundle": "http://bundle.example.com"}]',
    "https://a.example,https://a.example",
    "[not json",
    "[1]",
]


@pytest.mark.parametrize("raw", BAD_ALLOWLISTS)
def test_malformed_allowlists_are_refused_at_start(raw: str) -> None:
    with pytest.raises(BrokerError) as raised:
        parse_trusted_issuers(raw)
    assert raised.value.code == "config-invalid"


def test_allowlist_forms() -> None:
    got = parse_trusted_issuers("https://token.actions.githubusercontent.com, https://gitlab.example.com")
    assert got["https://gitlab.example.com"] == TrustedIssuer("https://gitlab.example.com", frozenset({"RS256"}))
    got = parse_trusted_issuers(json.dumps([{"issuer": "spiffe://example.org", "bundle": "https://b.example/x",
                                             "algorithms": ["ES256", "RS256"]}]))
    assert got["spiffe://example.org"].algorithms == {"ES256", "RS256"}
    assert parse_trusted_issuers("  ") == {}


# --- the issuer's side failing: closed, never open -----------------------------------------


def _orchestrator_rule(issuer: str) -> CompiledTrust:
    return CompiledTrust([TrustRule.model_validate(
        {"name": "r", "role": "orchestrator", "orchestrator": "o", "issuer": issuer, "audience": AUD,
         "subject_pattern": "**"})])


def test_an_unreachable_issuer_fails_closed_with_503(github: LoopbackIssuer) -> None:
    from tests.support.ports import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    verifier = WorkloadVerifier(parse_trusted_issuers(dead), timeout_seconds=2)
    token = github.sign({**github.github_claims(audience=AUD), "iss": dead})
    exc = refused(verifier, token, _orchestrator_rule(dead))
    assert (exc.status, exc.code) == (503, "identity-provider-unavailable")


def test_a_discovery_document_naming_another_issuer_is_not_trusted() -> None:
    impostor = LoopbackIssuer("kubernetes", discovery_issuer="https://kubernetes.default.svc")
    try:
        verifier = WorkloadVerifier(parse_trusted_issuers(impostor.url))
        exc = refused(verifier, impostor.kubernetes_token(audience=AUD), _orchestrator_rule(impostor.url))
        assert (exc.status, exc.code) == (503, "identity-provider-unavailable")
        assert impostor.jwks_reads() == 0  # its keys were never read
    finally:
        impostor.close()
