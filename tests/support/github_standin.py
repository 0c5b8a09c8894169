"""A strict local GitHub (App JWTs, installations, installation tokens) and its `github_standin` fixture.

GitHub cannot be reached from the test machines, so this fake follows GitHub's documented REST
contract (API version 2022-11-28) for the endpoints the github provider and its tests use, and
is strict where GitHub is: App JWTs must be RS256-signed by the App's key, carry `iss` (the App
id or client id), `iat` not in the future (60 s skew) and `exp` no more than 10 minutes after
`iat` and not passed; installation tokens are narrowed to exactly what was asked and refused
(422) when asked for more than the installation holds; a revoked token is dead (401).

    GET    /app                                        App JWT
    GET    /repos/{owner}/{repo}/installation          App JWT; 404 if the App is not installed
    POST   /app/installations/{id}/access_tokens       App JWT; body repositories / repository_ids / permissions
    DELETE /installation/token                         the installation token itself; 204, then dead
    GET    /repos/{owner}/{repo}                       installation token; metadata (implicit)
    GET    /repos/{owner}/{repo}/contents/{path}       installation token; contents >= read
    PUT    /repos/{owner}/{repo}/contents/{path}       installation token; contents >= write
    GET    /repos/{owner}/{repo}/collaborators/{username}/permission
                                                       installation token (metadata, implicit); GitHub's
                                                       "Get repository permissions for a user"

`authorize_git(token, owner, repo, push=...)` answers for git over smart HTTP the way GitHub does
(tests/support/git_server.py asks it before running `git http-backend`).

Every route is served at the root (github.com) and under /api/v3 (GitHub Enterprise Server).
The App's RSA key pair is generated when the fixture starts, never committed; the private key
PEM is written mode 0600 to a temporary directory. Tests inspect `request_log` and can inject
misbehaviour (`broaden_next_token`, `fail_next`, `outage`) to exercise the provider's fail-closed paths.
Collaborators (`set_collaborator`, `remove_collaborator`) can change while a test runs, and
`calls("GET /repos/{owner}/{repo}/collaborators/{username}/permission")` counts what arrived at
one endpoint (route template as GitHub documents it, any answer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import socket
import string
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

API_VERSIONS = {"2022-11-28"}  # what this stand-in (like GitHub) answers to; others get 400
LEVELS = {"read": 1, "write": 2, "admin": 3}
# Repository and organization permissions GitHub Apps can hold (a subset is enough here; an
# unknown name is a 422 as on GitHub).
KNOWN_PERMISSIONS = {
    "actions", "administration", "checks", "contents", "deployments", "environments", "issues",
    "metadata", "packages", "pages", "pull_requests", "repository_hooks", "secrets", "security_events",
    "statuses", "workflows", "members", "organization_administration",
}
TOKEN_ALPHABET = string.ascii_letters + string.digits
JWT_SKEW_SECONDS = 60  # iat may be this far in the future (clock drift)
JWT_MAX_SECONDS = 600  # GitHub: exp no more than 10 minutes ahead
DOCS = "https://docs.github.com/rest"
# GitHub's repository roles and the legacy base `permission` each reads as (maintain -> write,
# triage -> read), from "Get repository permissions for a user".
ROLE_BASE = {"admin": "admin", "maintain": "write", "write": "write", "triage": "read", "read": "read"}
ROLE_RANK = ["read", "triage", "write", "maintain", "admin"]


@dataclass
class Installation:
    id: int
    account: str
    repositories: dict[str, int]  # name -> repository id
    permissions: dict[str, str]
    suspended: bool = False


@dataclass
class IssuedToken:
    token: str
    installation_id: int
    repositories: list[str]  # names inside the installation's account
    permissions: dict[str, str]
    expires_at: datetime
    revoked: bool = False

    def live(self) -> bool:
        return not self.revoked and self.expires_at > datetime.now(UTC)


@dataclass
class Logged:
    method: str
    path: str
    status: int
    headers: dict[str, str]  # lower-cased names; Authorization replaced by its kind and sha256
    auth: str | None  # "jwt", "token" or None
    bearer_sha256: str | None
    jwt_header: dict[str, Any] | None
    jwt_claims: dict[str, Any] | None  # as sent, unverified: what the client put in
    raw_jwt: str | None
    body: Any


class GitHubError(Exception):
    def __init__(self, status: int, message: str, doc: str = DOCS, **extra: Any) -> None:
        self.status, self.message, self.doc, self.extra = status, message, doc, extra


def _error_response(status: int, message: str, doc: str = DOCS, **extra: Any) -> JSONResponse:
    return JSONResponse({"message": message, "documentation_url": doc, "status": str(status), **extra}, status)


@dataclass
class GitHubStandIn:
    """State and configuration of the fake; `url` is set once it serves."""

    app_id: str
    client_id: str
    private_key_path: Path
    private_key_pem: bytes
    public_key: rsa.RSAPublicKey
    slug: str = "jit-broker-test"
    url: str = ""
    installations: dict[int, Installation] = field(default_factory=dict)
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    files: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    request_log: list[Logged] = field(default_factory=list)
    # Fault injection: the next token gets these permissions / repository names instead of the
    # narrowed ones (a GitHub that hands out more than asked); cleared after one use.
    broaden_next_token: dict[str, Any] | None = None
    # GitHub users that exist, and each repository's collaborators: (owner, repo) lowercased ->
    # login -> role (admin, maintain, write, triage, read, or a custom role named in custom_roles).
    users: set[str] = field(default_factory=set)
    collaborators: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    custom_roles: dict[str, str] = field(default_factory=dict)  # custom role -> the base role it extends
    endpoint_calls: Counter[str] = field(default_factory=Counter)  # "METHOD /route/{template}" -> requests
    # Fault injection: (method, path prefix, status) answered instead of the real thing, once each.
    _failures: list[tuple[str, str, int]] = field(default_factory=list)
    # Fault injection: (method, path prefix, status) answered on every request until cleared.
    _outages: list[tuple[str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- test helpers --------------------------------------------------------------------------

    def reset(self) -> None:
        """Known installations, no tokens, an empty log: each test starts from the same GitHub."""
        with self._lock:
            self.installations = {
                1001: Installation(
                    1001, "acme", {"widgets": 5001, "gadgets": 5002, "docs": 5003},
                    {"contents": "write", "metadata": "read", "pull_requests": "write", "issues": "read"},
                ),
                1002: Installation(1002, "globex", {"ledger": 6001}, {"contents": "read", "metadata": "read"}),
                1003: Installation(1003, "frozen", {"ice": 7001}, {"contents": "read"}, suspended=True),
            }
            self.tokens.clear()
            self.request_log.clear()
            self.broaden_next_token = None
            self._failures.clear()
            self._outages.clear()
            self.endpoint_calls.clear()
            self.users = {"alice-gh", "bob-gh", "carol-gh", "dave-gh"}
            self.collaborators = {}
            self.custom_roles = {}
            self.files = {
                (inst.account, name, "README.md"): f"# {inst.account}/{name}\n".encode()
                for inst in self.installations.values()
                for name in inst.repositories
            }

    def fail_next(self, method: str, path_prefix: str, status: int) -> None:
        with self._lock:
            self._failures.append((method.upper(), path_prefix, status))

    def outage(self, method: str, path_prefix: str, status: int = 503) -> None:
        """Every matching request answers `status` until `end_outage()`: a GitHub that is down."""
        with self._lock:
            self._outages.append((method.upper(), path_prefix, status))

    def end_outage(self) -> None:
        with self._lock:
            self._outages.clear()

    def set_collaborator(self, owner: str, repo: str, login: str, role: str) -> None:
        with self._lock:
            self.users.add(login)
            self.collaborators.setdefault((owner.lower(), repo.lower()), {})[login] = role

    def remove_collaborator(self, owner: str, repo: str, login: str) -> None:
        with self._lock:
            self.collaborators.get((owner.lower(), repo.lower()), {}).pop(login, None)

    def calls(self, endpoint: str) -> int:
        """Requests that reached one endpoint, e.g. "GET /repos/{owner}/{repo}/collaborators/{username}/permission"."""
        with self._lock:
            return self.endpoint_calls[endpoint]

    def permission_json(self, owner: str, repo: str, username: str) -> dict[str, Any]:
        """GitHub's answer shape: `permission` (legacy base role), `role_name`, and the user with
        its `permissions` booleans. A user who is no collaborator reads as `none`."""
        login = next((u for u in self.users if u.lower() == username.lower()), None)
        if login is None:
            raise GitHubError(404, "Not Found", f"{DOCS}/collaborators/collaborators#get-repository-permissions-for-a-user")
        role = next((r for u, r in self.collaborators.get((owner.lower(), repo.lower()), {}).items()
                     if u.lower() == username.lower()), None)
        base = ROLE_BASE.get(role or "", self.custom_roles.get(role or "", "none"))
        # The booleans follow the role really held (a maintainer has maintain, not only push).
        rank = ROLE_RANK.index(role) if role in ROLE_RANK else (ROLE_RANK.index(base) if base in ROLE_RANK else -1)
        flags = {"pull": rank >= 0, "triage": rank >= 1, "push": rank >= 2, "maintain": rank >= 3, "admin": rank >= 4}
        return {
            "permission": base,
            "role_name": role or "none",
            "user": {
                "login": login, "id": 90000 + sum(map(ord, login)), "node_id": f"U_{login}", "type": "User",
                "site_admin": False, "url": f"{self.url}/users/{login}", "permissions": flags,
                "role_name": role or "none",
            },
        }

    def requests(self, method: str | None = None, path_contains: str = "") -> list[Logged]:
        return [r for r in list(self.request_log) if (method is None or r.method == method) and path_contains in r.path]

    def app_jwt(self, **overrides: Any) -> str:
        """A JWT as GitHub documents it, claims overridable, for tests of the stand-in itself."""
        now = int(time.time())
        claims = {"iat": now - 60, "exp": now + 540, "iss": self.app_id, **overrides}
        return jwt.encode({k: v for k, v in claims.items() if v is not None}, self.private_key_pem, algorithm="RS256")

    # --- authentication ------------------------------------------------------------------------

    def verify_app_jwt(self, token: str) -> dict[str, Any]:
        """Verify like GitHub: RS256 with the App's public key, iss, iat, exp; else GitHubError 401."""
        undecodable = GitHubError(401, "A JSON web token could not be decoded")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise undecodable from None
        if header.get("alg") != "RS256":  # HS256 with the public key as secret, "none", ...
            raise undecodable
        try:
            claims = jwt.decode(
                token,
                self.public_key,
                algorithms=["RS256"],  # only RS256; the header was checked too
                options={
                    "verify_signature": True,
                    "require": ["iat", "exp", "iss"],
                    # times are checked below, with GitHub's own messages and skew
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.MissingRequiredClaimError as exc:
            raise GitHubError(401, f"Missing '{exc.claim}' claim") from None
        except jwt.PyJWTError:
            raise undecodable from None
        iat, exp, now = claims["iat"], claims["exp"], time.time()
        if not isinstance(iat, int) or isinstance(iat, bool) or iat > now + JWT_SKEW_SECONDS:
            raise GitHubError(
                401, "'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued"
            )
        if not isinstance(exp, int) or isinstance(exp, bool) or exp <= now:
            raise GitHubError(
                401,
                "'Expiration time' claim ('exp') must be a numeric value representing the future time "
                "at which the assertion expires",
            )
        if exp - iat > JWT_MAX_SECONDS or exp > now + JWT_MAX_SECONDS + JWT_SKEW_SECONDS:
            raise GitHubError(401, "'Expiration time' claim ('exp') is too far in the future")
        if str(claims["iss"]) not in (self.app_id, self.client_id):
            raise GitHubError(401, "A JSON web token could not be decoded")  # no App has this key and id
        return claims

    def installation_token(self, authorization: str | None) -> IssuedToken:
        scheme, _, value = (authorization or "").partition(" ")
        issued = self.tokens.get(value.strip()) if scheme.lower() in ("bearer", "token") else None
        if issued is None or not issued.live():
            raise GitHubError(401, "Bad credentials")
        return issued

    def app_from(self, authorization: str | None) -> dict[str, Any]:
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise GitHubError(
                401, "A JSON web token could not be decoded"
                if authorization else "You must authenticate with a JSON Web Token (JWT) to access this endpoint."
            )
        return self.verify_app_jwt(value.strip())

    # --- lookups -------------------------------------------------------------------------------

    def find_repo(self, owner: str, repo: str) -> tuple[Installation, str] | None:
        for inst in self.installations.values():
            if inst.account.lower() == owner.lower():
                for name in inst.repositories:
                    if name.lower() == repo.lower():
                        return inst, name
        return None

    def repo_json(self, inst: Installation, name: str) -> dict[str, Any]:
        return {
            "id": inst.repositories[name],
            "node_id": f"R_{inst.repositories[name]}",
            "name": name,
            "full_name": f"{inst.account}/{name}",
            "private": True,
            "owner": {"login": inst.account, "id": inst.id * 10, "type": "Organization"},
            "url": f"{self.url}/repos/{inst.account}/{name}",
            "default_branch": "main",
        }

    def installation_json(self, inst: Installation) -> dict[str, Any]:
        return {
            "id": inst.id,
            "account": {"login": inst.account, "id": inst.id * 10, "type": "Organization"},
            "repository_selection": "selected",
            "access_tokens_url": f"{self.url}/app/installations/{inst.id}/access_tokens",
            "repositories_url": f"{self.url}/installation/repositories",
            "app_id": int(self.app_id),
            "app_slug": self.slug,
            "target_id": inst.id * 10,
            "target_type": "Organization",
            "permissions": dict(inst.permissions),
            "events": [],
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "single_file_name": None,
            "suspended_by": None,
            "suspended_at": "2024-06-01T00:00:00Z" if inst.suspended else None,
        }

    # --- token endpoint, the one with rules ----------------------------------------------------

    def create_token(self, installation_id: int, body: Any) -> dict[str, Any]:
        inst = self.installations.get(installation_id)
        if inst is None:
            raise GitHubError(404, "Not Found", f"{DOCS}/apps/apps#create-an-installation-access-token-for-an-app")
        if inst.suspended:
            raise GitHubError(403, "This installation has been suspended")
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise GitHubError(400, "Problems parsing JSON")
        unknown = set(body) - {"repositories", "repository_ids", "permissions"}
        if unknown:
            raise GitHubError(422, f"Invalid request.\n\n{sorted(unknown)[0]} is not a permitted key.")
        names = self._token_repositories(inst, body)
        narrowed_repos = "repositories" in body or "repository_ids" in body
        permissions = self._token_permissions(inst, body)

        broaden, self.broaden_next_token = self.broaden_next_token, None
        if broaden is not None:  # fault injection: a GitHub that grants more than asked
            permissions = dict(broaden.get("permissions", permissions))
            names = list(broaden.get("repositories", names))

        issued = IssuedToken(
            token="ghs_" + "".join(secrets.choice(TOKEN_ALPHABET) for _ in range(36)),
            installation_id=inst.id,
            repositories=names,
            permissions=permissions,
            expires_at=datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1),
        )
        self.tokens[issued.token] = issued
        answer: dict[str, Any] = {
            "token": issued.token,
            "expires_at": issued.expires_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "permissions": dict(permissions),
            "repository_selection": "selected",  # every installation here is on selected repositories
        }
        if narrowed_repos or broaden is not None:  # GitHub lists repositories when they were narrowed
            answer["repositories"] = [self.repo_json(inst, n) for n in names if n in inst.repositories]
        return answer

    @staticmethod
    def _token_repositories(inst: Installation, body: dict[str, Any]) -> list[str]:
        """The repositories a token request narrows to (all the installation's when it names none)."""
        invalid_repos = GitHubError(
            422,
            "There is at least one repository that does not exist or is not accessible to the parent installation.",
            f"{DOCS}/apps/apps#create-an-installation-access-token-for-an-app",
        )
        names: list[str] = []
        if "repositories" in body:
            if not isinstance(body["repositories"], list) or not all(isinstance(r, str) for r in body["repositories"]):
                raise GitHubError(422, "Invalid request.\n\nFor 'properties/repositories', is not an array of strings.")
            for requested in body["repositories"]:  # names only: "acme/widgets" is no repository name
                match = next((n for n in inst.repositories if n.lower() == requested.lower()), None)
                if match is None:
                    raise invalid_repos
                names.append(match)
        if "repository_ids" in body:
            by_id = {rid: n for n, rid in inst.repositories.items()}
            ids = body["repository_ids"]
            if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
                raise GitHubError(422, "Invalid request.\n\nFor 'properties/repository_ids', is not an array of integers.")
            for rid in ids:
                if rid not in by_id:
                    raise invalid_repos
                names.append(by_id[rid])
        if len(names) > 500:
            raise GitHubError(422, "Invalid request.\n\nToo many repositories (at most 500).")
        if "repositories" in body or "repository_ids" in body:
            return list(dict.fromkeys(names))
        return list(inst.repositories)

    @staticmethod
    def _token_permissions(inst: Installation, body: dict[str, Any]) -> dict[str, str]:
        """The permissions a token request asks for, each held by the installation (all of them when it asks none)."""
        if "permissions" in body:
            asked = body["permissions"]
            if not isinstance(asked, dict):
                raise GitHubError(422, "Invalid request.\n\nFor 'properties/permissions', is not an object.")
            for perm, level in asked.items():
                if perm not in KNOWN_PERMISSIONS or level not in LEVELS:
                    raise GitHubError(422, f"Invalid request.\n\n{perm!r}: {level!r} is not a valid permission.")
                held = inst.permissions.get(perm)
                if held is None or LEVELS[held] < LEVELS[level]:
                    raise GitHubError(
                        422, "The permissions requested are not granted to this installation.",
                        f"{DOCS}/apps/apps#create-an-installation-access-token-for-an-app",
                    )
            return dict(asked)
        return dict(inst.permissions)  # GitHub: no permissions asked, all granted

    def repo_for_token(self, authorization: str | None, owner: str, repo: str, need: str | None) -> tuple[Installation, str]:
        """GitHub's answers to an installation token on a repository: 401, then 404, then 403."""
        issued = self.installation_token(authorization)
        found = self.find_repo(owner, repo)
        if found is None or found[0].id != issued.installation_id or found[1] not in issued.repositories:
            raise GitHubError(404, "Not Found", f"{DOCS}/repos/repos#get-a-repository")
        perms = dict(issued.permissions)
        if perms:  # GitHub grants metadata: read to every token with repository access
            perms.setdefault("metadata", "read")
        if need is not None:
            perm, level = need.split(":")
            if LEVELS.get(perms.get(perm, ""), 0) < LEVELS[level]:
                raise GitHubError(403, "Resource not accessible by integration")
        return found

    def authorize_git(self, token: str, owner: str, repo: str, *, push: bool) -> int:
        """What GitHub answers git over smart HTTP with this token: 200, or 401/403/404.

        Fetching needs `contents: read` on the repository, pushing `contents: write`; the
        same rules (and order) as the REST routes above, for the local git server of the tests.
        """
        try:
            self.repo_for_token(f"token {token}", owner, repo, "contents:write" if push else "contents:read")
        except GitHubError as exc:
            return exc.status
        return 200


# --- the ASGI app ------------------------------------------------------------------------------


def build_app(standin: GitHubStandIn) -> _Gate:  # noqa: C901  # sums the small route handlers it defines
    router = APIRouter()

    @router.get("/app")
    async def get_app(request: Request) -> JSONResponse:
        standin.app_from(request.headers.get("authorization"))
        return JSONResponse({
            "id": int(standin.app_id), "slug": standin.slug, "client_id": standin.client_id,
            "name": "jit-broker test App", "owner": {"login": "acme", "type": "Organization"},
            "permissions": {"contents": "write", "metadata": "read"}, "events": [],
        })

    @router.get("/repos/{owner}/{repo}/installation")
    async def repo_installation(owner: str, repo: str, request: Request) -> JSONResponse:
        standin.app_from(request.headers.get("authorization"))
        found = standin.find_repo(owner, repo)
        if found is None:
            raise GitHubError(404, "Not Found", f"{DOCS}/apps/apps#get-a-repository-installation-for-the-authenticated-app")
        return JSONResponse(standin.installation_json(found[0]))

    @router.post("/app/installations/{installation_id}/access_tokens")
    async def access_tokens(installation_id: str, request: Request) -> JSONResponse:
        standin.app_from(request.headers.get("authorization"))
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise GitHubError(400, "Problems parsing JSON") from None
        if not installation_id.isdigit():
            raise GitHubError(404, "Not Found")
        with standin._lock:
            return JSONResponse(standin.create_token(int(installation_id), body), 201)

    @router.delete("/installation/token")
    async def revoke_token(request: Request) -> Response:
        issued = standin.installation_token(request.headers.get("authorization"))
        with standin._lock:
            issued.revoked = True
        return Response(status_code=204)

    @router.get("/repos/{owner}/{repo}/collaborators/{username}/permission")
    async def collaborator_permission(owner: str, repo: str, username: str, request: Request) -> JSONResponse:
        # GitHub: works with installation tokens holding `metadata: read` on the repository.
        inst, name = standin.repo_for_token(request.headers.get("authorization"), owner, repo, "metadata:read")
        with standin._lock:
            return JSONResponse(standin.permission_json(inst.account, name, username))

    @router.get("/repos/{owner}/{repo}")
    async def get_repo(owner: str, repo: str, request: Request) -> JSONResponse:
        inst, name = standin.repo_for_token(request.headers.get("authorization"), owner, repo, "metadata:read")
        return JSONResponse(standin.repo_json(inst, name))

    @router.get("/repos/{owner}/{repo}/contents/{path:path}")
    async def get_contents(owner: str, repo: str, path: str, request: Request) -> JSONResponse:
        inst, name = standin.repo_for_token(request.headers.get("authorization"), owner, repo, "contents:read")
        data = standin.files.get((inst.account, name, path))
        if data is None:
            raise GitHubError(404, "Not Found", f"{DOCS}/repos/contents#get-repository-content")
        return JSONResponse(_content_json(inst.account, name, path, data))

    @router.put("/repos/{owner}/{repo}/contents/{path:path}")
    async def put_contents(owner: str, repo: str, path: str, request: Request) -> JSONResponse:
        inst, name = standin.repo_for_token(request.headers.get("authorization"), owner, repo, "contents:write")
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise GitHubError(400, "Problems parsing JSON") from None
        for required in ("message", "content"):
            if not isinstance(body, dict) or not isinstance(body.get(required), str):
                raise GitHubError(422, f'Invalid request.\n\n"{required}" wasn\'t supplied.')
        key = (inst.account, name, path)
        existing = standin.files.get(key)
        if existing is not None and body.get("sha") != _blob_sha(existing):
            raise GitHubError(422, 'Invalid request.\n\n"sha" wasn\'t supplied.' if "sha" not in body else "sha does not match")
        try:
            data = base64.b64decode(body["content"], validate=True)
        except ValueError:
            raise GitHubError(422, "content is not valid Base64") from None
        standin.files[key] = data
        return JSONResponse(
            {"content": _content_json(inst.account, name, path, data), "commit": {"message": body["message"]}},
            200 if existing is not None else 201,
        )

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.include_router(router)
    app.include_router(router, prefix="/api/v3")  # GitHub Enterprise Server's base path

    @app.exception_handler(GitHubError)
    async def github_error(request: Request, exc: GitHubError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.doc, **exc.extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, "Not Found" if exc.status_code == 404 else str(exc.detail))

    return _Gate(app, standin)


class _Gate:
    """ASGI wrapper: GitHub's header rules, injected failures, and the request log."""

    def __init__(self, app: FastAPI, standin: GitHubStandIn) -> None:
        self.app, self.standin = app, standin

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        chunks: list[bytes] = []

        async def recv() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            return message

        async def snd(message: dict[str, Any]) -> None:
            # Logged before the response leaves, so a test that has its answer sees the entry.
            if message["type"] == "http.response.start":
                self._log(method, path, message["status"], headers, b"".join(chunks))
            await send(message)

        self._count(scope, method)
        early = self._refuse(method, path, headers)
        if early is not None:
            await early(scope, recv, snd)
        else:
            await self.app(scope, recv, snd)

    def _refuse(self, method: str, path: str, headers: dict[str, str]) -> JSONResponse | None:
        if not headers.get("user-agent"):
            return _error_response(
                403, "Request forbidden by administrative rules. Please make sure your request has a User-Agent header"
            )
        version = headers.get("x-github-api-version")
        if version is not None and version not in API_VERSIONS:
            return _error_response(400, f"API version {version} is not supported.")
        with self.standin._lock:
            for i, (m, prefix, status) in enumerate(self.standin._failures):
                if m == method and path.removeprefix("/api/v3").startswith(prefix):
                    del self.standin._failures[i]
                    return _error_response(status, "Server Error" if status >= 500 else "Injected failure")
            for m, prefix, status in self.standin._outages:
                if m == method and path.removeprefix("/api/v3").startswith(prefix):
                    return _error_response(status, "Server Error" if status >= 500 else "Injected failure")
        return None

    def _count(self, scope: dict[str, Any], method: str) -> None:
        path = scope["path"].removeprefix("/api/v3")
        for m, template, pattern in _ENDPOINTS:
            if m == method and pattern.fullmatch(path):
                with self.standin._lock:
                    self.standin.endpoint_calls[f"{method} {template}"] += 1
                return

    def _log(self, method: str, path: str, status: int, headers: dict[str, str], raw: bytes) -> None:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        credential = credential.strip()
        jwt_header = jwt_claims = raw_jwt = None
        auth = None
        if credential.count(".") == 2:
            auth, raw_jwt = "jwt", credential
            try:
                jwt_header = jwt.get_unverified_header(credential)
                jwt_claims = jwt.decode(credential, options={"verify_signature": False})
            except jwt.PyJWTError:
                pass
        elif credential:
            auth = "token"
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = raw.decode("latin-1")
        logged_headers = {k: v for k, v in headers.items() if k != "authorization"}
        if credential:
            logged_headers["authorization"] = f"{scheme} <{auth}>"
        self.standin.request_log.append(Logged(
            method=method, path=path, status=status, headers=logged_headers, auth=auth,
            bearer_sha256=hashlib.sha256(credential.encode()).hexdigest() if credential else None,
            jwt_header=jwt_header, jwt_claims=jwt_claims, raw_jwt=raw_jwt, body=body,
        ))


# The routes above as GitHub documents them, for `calls()`; a path segment is [^/]+, a file path .+.
_ENDPOINTS = [
    (method, template, re.compile(re.sub(r"\\{(\w+)\\}", lambda m: ".+" if m.group(1) == "path" else "[^/]+",
                                         re.escape(template))))
    for method, template in (
        ("GET", "/app"),
        ("GET", "/repos/{owner}/{repo}/installation"),
        ("POST", "/app/installations/{installation_id}/access_tokens"),
        ("DELETE", "/installation/token"),
        ("GET", "/repos/{owner}/{repo}/collaborators/{username}/permission"),
        ("GET", "/repos/{owner}/{repo}"),
        ("GET", "/repos/{owner}/{repo}/contents/{path}"),
        ("PUT", "/repos/{owner}/{repo}/contents/{path}"),
    )
]


def _blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()  # git's object id


def _content_json(owner: str, repo: str, path: str, data: bytes) -> dict[str, Any]:
    return {
        "type": "file", "encoding": "base64", "size": len(data), "name": path.rsplit("/", 1)[-1],
        "path": path, "sha": _blob_sha(data), "content": base64.b64encode(data).decode(),
        "url": f"/repos/{owner}/{repo}/contents/{path}",
    }


# --- serving -----------------------------------------------------------------------------------


def generate_app_key(directory: Path) -> tuple[Path, bytes, rsa.RSAPublicKey]:
    """A fresh App key pair; the private PEM lands in `directory` with mode 0600."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    path = directory / "github-app.private-key.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path, pem, key.public_key()


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # a background thread must leave signals alone
        pass


def serve(standin: GitHubStandIn) -> Iterator[GitHubStandIn]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the kernel picks a free port; the socket is handed over, no race
    server = _Server(uvicorn.Config(build_app(standin), log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="github-standin", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the GitHub stand-in did not start")
        time.sleep(0.01)
    standin.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield standin
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="session")
def github_standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHubStandIn]:
    """The stand-in, serving on 127.0.0.1 for the whole session; call `reset()` per test."""
    key_path, pem, public_key = generate_app_key(tmp_path_factory.mktemp("github-app"))
    standin = GitHubStandIn(
        app_id="424242", client_id="Iv23liTestClientId", private_key_path=key_path,
        private_key_pem=pem, public_key=public_key,
    )
    standin.reset()
    yield from serve(standin)
