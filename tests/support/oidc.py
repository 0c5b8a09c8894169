"""A real OpenID provider for the tests: npm's `oidc-provider` on Node, on a free loopback port.

Fixtures (pytest plugin, loaded from tests/conftest.py):

- `oidc_provider` (session): the IdP every OIDC test talks to. Its accounts, clients and the
  broker's resource server are below; its RSA signing key is made here, so tests can also
  forge tokens with the trusted key (expired, not yet valid, wrong issuer) or a stranger's.
- `oidc_provider_factory` (session): starts another provider (a second issuer, e.g. with the
  same `kid` and another key); each is stopped at the end of the session.

`OidcProvider.approve_device(...)` plays the human: it opens the verification page, enters
the user code, confirms, signs in and consents through the provider's own HTML forms, over
HTTP with httpx, exactly as a browser would submit them.

Needs `npm ci --prefix tests/support/oidc_provider` (done by `make test`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.children import die_with_parent, terminate

PROVIDER_DIR = Path(__file__).parent / "oidc_provider"
AUDIENCE = "api://jit-broker"
OTHER_AUDIENCE = "api://other-service"
CLI_CLIENT_ID = "jit-broker-cli"
CLI_SCOPE = "openid email groups offline_access"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ORCHESTRATOR_CLIENT_ID = "orchestrator-ci"
ORCHESTRATOR_NAME = "ci-orchestrator"
UNMAPPED_CLIENT_ID = "reporting-job"

# Logins at the provider -> the claims its tokens carry. Emails in mixed case on purpose: the
# broker's principal is the canonical form (ASCII case folded) of the address.
ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": {"email": "Alice@Example.com", "groups": ["payments-oncall"]},
    "bob": {"email": "bob@example.com", "groups": ["maintainers", "security"]},
    "mallory": {"email": "alice@example.com", "email_verified": False, "groups": []},
    "nogroups": {"email": "dave@example.com"},
    # Principal confusion: kate, and other accounts of the same IdP whose addresses only look
    # like hers (or become hers under Unicode case mapping, NFKC or strip()). The IdP keeps
    # them apart; the broker must too.
    "kate": {"email": "KATE@Example.com", "groups": []},
    "kelvin-kate": {"email": "\u212aate@example.com", "groups": []},
    "fullwidth-kate": {"email": "\uff4bate@example.com", "groups": []},
    "cyrillic-kate": {"email": "k\u0430te@example.com", "groups": []},
    "nbsp-kate": {"email": "kate@example.com\u00a0", "groups": []},
    "zwsp-kate": {"email": "ka\u200bte@example.com", "groups": []},
    "bidi-kate": {"email": "\u202ekate@example.com", "groups": []},
    # A groups claim that is not a list of clean strings: the token is refused, not split.
    "string-groups": {"email": "erin@example.com", "groups": "maintainers"},
    "zwsp-groups": {"email": "erin@example.com", "groups": ["maintainers\u200b"]},
}


@dataclass
class SigningKey:
    """An RSA key with a kid: the provider's, or an attacker's."""

    kid: str = field(default_factory=lambda: "k-" + secrets.token_hex(6))
    private: rsa.RSAPrivateKey = field(default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def private_jwk(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private))
        # PyJWT marks a private JWK key_ops ["sign"], which the provider would publish with the
        # public half; strict clients (joserfc, under authlib) then refuse to verify with it.
        jwk.pop("key_ops", None)
        return {**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        return jwt.encode(claims, self.private, algorithm="RS256", headers={"kid": self.kid, "typ": "at+jwt", **headers})


class _Forms(HTMLParser):
    """The forms of a page: action, id and every named input with its value."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action") or "", "id": a.get("id"), "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""


def page_forms(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


class OidcProvider:
    """One `node provider.js` process and what a test needs to talk to it."""

    def __init__(self, workdir: Path, *, key: SigningKey | None = None, access_token_ttl: int = 600) -> None:
        self.workdir = workdir
        self.key = key or SigningKey()
        self.orchestrator_secret = "orch-" + secrets.token_urlsafe(24)
        self.unmapped_secret = "rep-" + secrets.token_urlsafe(24)
        self.registration_token = "reg-" + secrets.token_urlsafe(24)
        self.access_token_ttl = access_token_ttl
        self.proc: subprocess.Popen[bytes] | None = None
        self.issuer = ""
        self.log_path = workdir / "oidc-provider.log"

    # --- process --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        no_browser = {"response_types": [], "redirect_uris": []}
        return {
            "port": 0,
            "jwks": {"keys": [self.key.private_jwk()]},
            "resources": {
                AUDIENCE: {"audience": AUDIENCE, "scope": "broker", "ttl": self.access_token_ttl},
                OTHER_AUDIENCE: {"audience": OTHER_AUDIENCE, "scope": "other", "ttl": self.access_token_ttl},
            },
            "accounts": ACCOUNTS,
            "registration_token": self.registration_token,
            "clients": [
                {"client_id": CLI_CLIENT_ID, "token_endpoint_auth_method": "none",
                 "grant_types": [DEVICE_GRANT, "refresh_token"], **no_browser},
                {"client_id": ORCHESTRATOR_CLIENT_ID, "client_secret": self.orchestrator_secret,
                 "grant_types": ["client_credentials"], **no_browser},
                {"client_id": UNMAPPED_CLIENT_ID, "client_secret": self.unmapped_secret,
                 "grant_types": ["client_credentials"], **no_browser},
            ],
        }

    def start(self, timeout: float = 30.0) -> OidcProvider:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is missing: the OIDC tests run npm's oidc-provider on Node.js")
        if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
            pytest.fail("oidc-provider is not installed: run `npm ci --prefix tests/support/oidc_provider` (make test does)")
        config_path = self.workdir / "oidc-provider.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds a private key
        with os.fdopen(fd, "w") as fh:
            json.dump(self.config(), fh)
        logf = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps writing after start()
        self.proc = subprocess.Popen([node, str(PROVIDER_DIR / "provider.js"), str(config_path)], cwd=PROVIDER_DIR,
                                     stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent(signal.SIGTERM))
        logf.close()
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not line or not line[0].strip():
            self.stop()
            raise RuntimeError(f"oidc-provider did not start within {timeout}s:\n{self.log_tail()}")
        self.issuer = json.loads(line[0])["issuer"]
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        terminate(proc, grace=5)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    # --- what tests ask of it ---------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """How often the JWKS (and the token endpoint) were requested since start."""
        return httpx.get(self.issuer + "/__stats", timeout=10).json()  # type: ignore[no-any-return]

    def client_credentials(self, client_id: str = ORCHESTRATOR_CLIENT_ID, secret: str | None = None, *,
                           resource: str = AUDIENCE) -> str:
        secret = secret or (self.orchestrator_secret if client_id == ORCHESTRATOR_CLIENT_ID else self.unmapped_secret)
        r = httpx.post(self.issuer + "/token", data={"grant_type": "client_credentials", "resource": resource},
                       auth=(client_id, secret), timeout=10)
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    def register_web_client(self, redirect_uri: str) -> tuple[str, str]:
        """A confidential web client for the broker's console (authorization code, PKCE required
        by the provider), registered by RFC 7591 once the broker's redirect URI is known.
        Returns (client_id, client_secret)."""
        r = httpx.post(self.issuer + "/reg", headers={"Authorization": f"Bearer {self.registration_token}"}, timeout=10,
                       json={"client_name": "jit-broker console", "redirect_uris": [redirect_uri],
                             "grant_types": ["authorization_code"], "response_types": ["code"],
                             "token_endpoint_auth_method": "client_secret_basic", "application_type": "web"})
        assert r.status_code == 201, r.text
        body = r.json()
        return str(body["client_id"]), str(body["client_secret"])

    def start_device_authorization(self, scope: str = CLI_SCOPE) -> dict[str, Any]:
        r = httpx.post(self.issuer + "/device/auth", data={"client_id": CLI_CLIENT_ID, "scope": scope}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def approve_device(self, verification_uri: str, user_code: str, login: str, password: str = "any-password") -> str:
        """The person at the browser: enter the code, confirm, sign in, consent. Returns the last page."""
        with httpx.Client(follow_redirects=True, timeout=10) as browser:
            page = browser.get(verification_uri)
            page = self._submit(browser, page, "op.deviceInputForm", user_code=user_code)
            page = self._submit(browser, page, "op.deviceConfirmForm", confirm="yes")
            page = self._submit(browser, page, None, login=login, password=password)  # sign-in page
            page = self._submit(browser, page, None)  # consent page
            assert "Sign-in Success" in page.text, page.text[-2000:]
            return page.text

    @staticmethod
    def _submit(browser: httpx.Client, page: httpx.Response, form_id: str | None, **values: str) -> httpx.Response:
        assert page.status_code == 200, f"{page.url}: {page.status_code} {page.text[-1000:]}"
        forms = [f for f in page_forms(page.text) if form_id is None or f["id"] == form_id]
        assert forms, f"no form {form_id or ''} on {page.url}:\n{page.text[-2000:]}"
        form = forms[0]
        return browser.post(page.url.join(form["action"]), data={**form["fields"], **values})

    def device_login(self, login: str, scope: str = CLI_SCOPE) -> dict[str, Any]:
        """A whole device-flow sign-in for `login`, as the CLI and the person would do it together."""
        grant = self.start_device_authorization(scope)
        self.approve_device(grant["verification_uri"], grant["user_code"], login)
        r = httpx.post(self.issuer + "/token", data={"grant_type": DEVICE_GRANT, "device_code": grant["device_code"],
                                                     "client_id": CLI_CLIENT_ID}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def forge(self, key: SigningKey | None = None, **claims: Any) -> str:
        """A token signed with the provider's own key (or `key`): the claims a real one would carry, overridden."""
        now = int(time.time())
        base = {"iss": self.issuer, "aud": AUDIENCE, "sub": "alice", "email": "alice@example.com",
                "groups": ["payments-oncall"], "iat": now, "exp": now + 300, "client_id": CLI_CLIENT_ID,
                "jti": secrets.token_hex(8)}
        base.update(claims)
        return (key or self.key).sign({k: v for k, v in base.items() if v is not None})

    def broker_env(self, **extra: str) -> dict[str, str]:
        """BROKER_* settings pointing a broker at this provider."""
        return {
            "BROKER_OIDC_ISSUER": self.issuer,
            "BROKER_OIDC_AUDIENCE": AUDIENCE,
            "BROKER_OIDC_ORCHESTRATOR_CLIENTS": f"{ORCHESTRATOR_CLIENT_ID}={ORCHESTRATOR_NAME}",
            "BROKER_OIDC_CLI_CLIENT_ID": CLI_CLIENT_ID,
            **extra,
        }


def cli_login(provider: OidcProvider, env: dict[str, str], login: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `broker-cli login` as a subprocess; when it shows the URL and code, approve them at the
    provider as `login` (the person at the browser). Returns the finished process."""
    from tests.support.processes import BROKER_CLI

    proc = subprocess.Popen([BROKER_CLI, "login", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=die_with_parent(signal.SIGTERM))
    try:
        assert proc.stdout is not None and proc.stderr is not None
        shown = []
        for line in proc.stdout:
            shown.append(line)
            found = re.search(r"open (\S+) and enter the code (\S+)", line)
            if found:
                provider.approve_device(found.group(1), found.group(2), login)
                break
        else:
            raise AssertionError("broker-cli login showed no code:\n" + "".join(shown) + proc.stderr.read())
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(shown) + out, err)
    finally:
        terminate(proc)


@pytest.fixture(scope="session")
def oidc_provider_factory() -> Iterator[Callable[..., OidcProvider]]:
    started: list[OidcProvider] = []
    with tempfile.TemporaryDirectory(prefix="oidc-") as tmp:

        def start(**kw: Any) -> OidcProvider:
            workdir = Path(tmp) / str(len(started))
            workdir.mkdir()
            provider = OidcProvider(workdir, **kw)
            started.append(provider)
            return provider.start()

        try:
            yield start
        finally:
            for provider in started:
                provider.stop()


@pytest.fixture(scope="session")
def oidc_provider(oidc_provider_factory: Callable[..., OidcProvider]) -> OidcProvider:
    return oidc_provider_factory()
