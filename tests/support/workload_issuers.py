"""Workload issuers for the tests: a GitHub-Actions-style and a Kubernetes-style OIDC issuer on
loopback HTTP (discovery + JWKS), and a SPIFFE trust domain whose JWT bundle is a file.

Keys are generated at run time; nothing here is committed. The shapes follow the issuers' own
documentation:

- GitHub Actions ("About security hardening with OpenID Connect", token claims): header
  `{"typ": "JWT", "alg": "RS256", "x5t": ..., "kid": ...}`; claims `jti, sub, aud, ref, sha,
  repository, repository_owner, repository_owner_id, repository_id, repository_visibility,
  run_id, run_number, run_attempt, runner_environment, actor, actor_id, workflow, head_ref,
  base_ref, event_name, ref_type, environment, job_workflow_ref, iss, nbf, exp, iat`, with `sub`
  `repo:<owner>/<repo>:environment:<name>` when the job names an environment, else
  `repo:<owner>/<repo>:ref:<ref>`. Discovery at `/.well-known/openid-configuration`, keys at
  `/.well-known/jwks`.
- Kubernetes (service account token volume projection, ServiceAccountIssuerDiscovery):
  header `{"alg": "RS256", "kid": ...}` (no `typ`); claims `aud` (a list), `exp` (from the
  projection's `expirationSeconds`), `iat`, `nbf`, `iss`, `jti`, `sub`
  `system:serviceaccount:<namespace>:<name>` and the private `kubernetes.io` object with
  `namespace`, `pod {name, uid}`, `serviceaccount {name, uid}`, `node {name, uid}`. Discovery
  at `/.well-known/openid-configuration`, keys at `/openid/v1/jwks`.
- SPIFFE (JWT-SVID spec, Trust Domain and Bundle spec): a JWK Set whose JWT authorities carry
  `use: "jwt-svid"` (X.509 authorities `use: "x509-svid"` sit beside them), with
  `spiffe_sequence` and `spiffe_refresh_hint`; SVIDs have `sub` = the SPIFFE ID, `aud`, `exp`,
  `iat`, header `typ: JWT`.

Every HTTP request an issuer serves is counted by path, so tests prove the broker's refresh
limits by counting, never by timing.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

GITHUB_JWKS_PATH = "/.well-known/jwks"
KUBERNETES_JWKS_PATH = "/openid/v1/jwks"


@dataclass
class IssuerKey:
    kid: str
    private: Any
    alg: str

    def public_jwk(self, use: str = "sig") -> dict[str, Any]:
        if self.alg.startswith("ES"):
            jwk = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        else:
            jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "use": use, "alg": self.alg}


def new_key(alg: str = "RS256", kid: str | None = None) -> IssuerKey:
    private: Any = ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else \
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return IssuerKey(kid or secrets.token_hex(8), private, alg)


@dataclass
class LoopbackIssuer:
    """An OIDC issuer on 127.0.0.1: discovery and JWKS, served by a thread; `kind` picks the shape."""

    kind: str  # "github" | "kubernetes"
    keys: list[IssuerKey] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    discovery_issuer: str | None = None  # set to publish a discovery document naming another issuer

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [new_key()]
        self._lock = threading.Lock()
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with issuer._lock:
                    issuer.requests[self.path] += 1
                body = issuer._answer(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                data = json.dumps(body if body is not None else {"error": "not found"}).encode()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def jwks_path(self) -> str:
        return GITHUB_JWKS_PATH if self.kind == "github" else KUBERNETES_JWKS_PATH

    def _answer(self, path: str) -> dict[str, Any] | None:
        if path == "/.well-known/openid-configuration":
            doc: dict[str, Any] = {
                "issuer": self.discovery_issuer or self.url,
                "jwks_uri": self.url + self.jwks_path,
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            }
            if self.kind == "github":
                doc["claims_supported"] = ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref", "repository",
                                           "repository_id", "repository_owner", "repository_owner_id", "run_id",
                                           "run_number", "run_attempt", "actor", "actor_id", "workflow",
                                           "head_ref", "base_ref", "event_name", "ref_type", "environment",
                                           "job_workflow_ref", "repository_visibility", "runner_environment"]
            return doc
        if path == self.jwks_path:
            with self._lock:
                return {"keys": [k.public_jwk() for k in self.keys]}
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- keys --------------------------------------------------------------------------------

    @property
    def active(self) -> IssuerKey:
        return self.keys[-1]

    def rotate(self, *, keep_old: bool = False) -> IssuerKey:
        """A new signing key, published; the old one stays published only with keep_old."""
        key = new_key(self.active.alg)
        with self._lock:
            self.keys = [*self.keys, key] if keep_old else [key]
        return key

    def jwks_reads(self) -> int:
        return self.requests[self.jwks_path]

    # --- tokens --------------------------------------------------------------------------------

    def sign(self, claims: dict[str, Any], *, key: IssuerKey | None = None, headers: dict[str, Any] | None = None,
             alg: str | None = None) -> str:
        key = key or self.active
        # PyJWT drops a `typ` of None: Kubernetes writes no typ.
        base = {"kid": key.kid, "typ": "JWT" if self.kind == "github" else None}
        return jwt.encode(claims, key.private, algorithm=alg or key.alg, headers={**base, **(headers or {})})

    def github_claims(self, *, audience: str, repository: str = "acme/app", environment: str | None = "prod",
                      ref: str = "refs/heads/main", workflow_file: str = "agent.yml", ttl: int = 300,
                      **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        owner = repository.split("/", 1)[0]
        sub = f"repo:{repository}:environment:{environment}" if environment else f"repo:{repository}:ref:{ref}"
        claims: dict[str, Any] = {
            "jti": str(uuid.uuid4()), "sub": sub, "aud": audience, "ref": ref, "sha": secrets.token_hex(20),
            "repository": repository, "repository_owner": owner, "repository_owner_id": "1001",
            "repository_id": "2002", "repository_visibility": "private", "run_id": "3003", "run_number": "7",
            "run_attempt": "1", "runner_environment": "github-hosted", "actor": "octocat", "actor_id": "4004",
            "workflow": "agent", "head_ref": "", "base_ref": "", "event_name": "workflow_dispatch",
            "ref_type": "branch", "job_workflow_ref": f"{repository}/.github/workflows/{workflow_file}@{ref}",
            "iss": self.url, "nbf": now - 5, "iat": now - 5, "exp": now + ttl,
        }
        if environment:
            claims["environment"] = environment
        claims.update(extra)
        return claims

    def github_token(self, **kwargs: Any) -> str:
        return self.sign(self.github_claims(**kwargs))

    def kubernetes_claims(self, *, audience: str, namespace: str = "agents", service_account: str = "runner",
                          expiration_seconds: int = 600, **extra: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "aud": [audience], "exp": now + expiration_seconds, "iat": now, "nbf": now, "iss": self.url,
            "jti": str(uuid.uuid4()), "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": "node-1", "uid": str(uuid.uuid4())},
                "pod": {"name": f"{service_account}-7d9f8", "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            },
        }
        claims.update(extra)
        return claims

    def kubernetes_token(self, **kwargs: Any) -> str:
        return self.sign(self.kubernetes_claims(**kwargs))


@dataclass
class SpiffeTrustDomain:
    """A SPIFFE trust domain whose JWT bundle is a file the broker reads (as a SPIRE agent keeps it)."""

    name: str  # "example.org"
    directory: Path
    keys: list[IssuerKey] = field(default_factory=list)
    sequence: int = 0

    def __post_init__(self) -> None:
        if not self.keys:
            self.keys = [new_key("ES256")]
        self.bundle_path = self.directory / f"{self.name}.bundle.json"
        self.write_bundle()

    @property
    def trust_domain(self) -> str:
        return f"spiffe://{self.name}"

    def write_bundle(self) -> None:
        self.sequence += 1
        x509 = {"kty": "EC", "crv": "P-256", "use": "x509-svid", "x5c": ["MIIB..."],
                **{k: v for k, v in json.loads(ECAlgorithm.to_jwk(new_key("ES256").private.public_key())).items()
                   if k in ("x", "y")}}
        bundle = {"keys": [k.public_jwk(use="jwt-svid") for k in self.keys] + [x509],
                  "spiffe_sequence": self.sequence, "spiffe_refresh_hint": 300}
        tmp = self.bundle_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(bundle))
        tmp.replace(self.bundle_path)

    def rotate(self) -> IssuerKey:
        key = new_key(self.keys[-1].alg)
        self.keys = [key]
        self.write_bundle()
        return key

    def serve(self) -> str:
        """Serve the bundle at a SPIFFE bundle endpoint on loopback (the file's current content,
        as `https_web` profile endpoints serve it, here over plain http); returns its URL.
        `endpoint_reads` counts the requests."""
        domain = self
        self.endpoint_reads = 0

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                domain.endpoint_reads += 1
                data = domain.bundle_path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._endpoint = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._endpoint.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._endpoint.server_address[1]}/bundle"

    def close(self) -> None:
        endpoint = getattr(self, "_endpoint", None)
        if endpoint is not None:
            endpoint.shutdown()
            endpoint.server_close()

    def svid(self, path: str, *, audience: str, ttl: int = 300, key: IssuerKey | None = None,
             spiffe_id: str | None = None, **extra: Any) -> str:
        now = int(time.time())
        key = key or self.keys[-1]
        claims = {"sub": spiffe_id or f"{self.trust_domain}/{path.lstrip('/')}", "aud": [audience],
                  "exp": now + ttl, "iat": now, **extra}
        return jwt.encode(claims, key.private, algorithm=key.alg, headers={"kid": key.kid, "typ": "JWT"})
