"""The github provider: installation access tokens of a GitHub App, narrowed to one repository.

Mint (GitHub's documented flow):

1. sign an App JWT (RS256 with the App's private key; `iat` 60 s in the past, `exp` 9 min
   ahead so `exp - iat` is exactly GitHub's 10 minute maximum; `iss` the App id), reused until
   a minute before it expires;
2. find the installation that covers the repository (`GET /repos/{owner}/{repo}/installation`,
   remembered per repository for a minute, so an uninstall or reinstall is noticed quickly);
3. `POST /app/installations/{id}/access_tokens` with `repositories: [<repo>]` and exactly the
   `permissions` of the policy's access entry. The entry must name them: without them GitHub
   would hand out everything the installation holds, so a missing entry is a policy error;
4. check what came back: a token broader than asked (another permission, a higher level,
   another repository) is revoked at once and the mint fails closed.

Revoke: `DELETE /installation/token`, authenticated with the token itself. GitHub offers no
other way to revoke an installation token (no accessor, no revoke-by-id), so the lease service
seals the token with AES-256-GCM (`Minted.revocation_secret`) and hands it back unsealed in
`RevokeTarget.revocation_secret`. 204 is revoked; 401 means GitHub no longer knows the token
(revoked before, or past its hour), which is the state we want, so revoking is idempotent.

Limits, stated once:

* A GitHub installation token always lives one hour; GitHub has no shorter TTL. The lease's own
  `expires_at` (the policy's clamped ttl) is enforced by the broker's sweeper, which revokes
  the token then; `Minted.expires_at` is GitHub's hour, the defence-in-depth bound.
* No `find_by_capability`: GitHub cannot list or label installation tokens, so a token cannot
  be found again by capability id. Crash recovery relies on the sealed token stored on the
  lease. If the broker dies after GitHub answered and before the lease stored the sealed token,
  that token was never shown to anyone (the agent receives it only after the lease is written)
  and dies by itself within the hour; the `minting` lease found at start records it.
* GitHub grants `metadata: read` to every token with repository access; it is the only
  permission accepted in a response without having been asked for.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from broker.errors import InvalidRequest, ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.grammar import ResourceGrammar
from broker.policy.resources import resource_problem as grammar_problem
from broker.providers.base import (
    Grant,
    Minted,
    Provider,
    ProviderContext,
    ProviderHealth,
    Revoked,
    RevokeTarget,
    TtlBounds,
    fingerprint,
)
from broker.providers.github.grammar import GRAMMAR
from broker.providers.github.settings import GitHubSettings
from broker.times import rfc3339

log = logging.getLogger(__name__)

API_VERSION = "2022-11-28"
# GitHub's installation tokens live one hour, fixed; a lease may end earlier (sweeper revokes).
TOKEN_LIFETIME_SECONDS = 3600
# GitHub refuses an App JWT whose `exp` is more than 10 minutes ahead. `iat` is set 60 s in the
# past against clock drift (GitHub's advice), `exp` 540 s ahead: exp - iat = 600, the maximum.
JWT_BACKDATE_SECONDS = 60
JWT_LIFETIME_SECONDS = 540
# Sign a fresh JWT this long before the cached one expires, so none expires in flight.
JWT_REFRESH_MARGIN_SECONDS = 60
# Short: an App removed from a repository (or reinstalled, new id) is noticed within a minute.
INSTALLATION_CACHE_SECONDS = 60.0

PERMISSION_LEVELS = {"read": 1, "write": 2, "admin": 3}
IMPLICIT_PERMISSIONS = {"metadata": "read"}  # granted by GitHub to every repository token

# GitHub's naming rules: owners are 1-39 alphanumerics or single hyphens; repositories 1-100
# of alphanumerics, '.', '-', '_'. Anything else (wildcards, extra path segments) is no repository.
_OWNER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")
_REPO = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_PERMISSION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class GitHubProvider(Provider):
    """Mints GitHub App installation tokens for one repository and the policy's permissions."""

    name: ClassVar[str] = "github"

    def __init__(
        self,
        *,
        api_url: str,
        app_id: str,
        private_key: RSAPrivateKey,
        timeout_seconds: float,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._app_id = app_id
        self._private_key = private_key
        self._clock = clock
        self._lock = threading.Lock()
        self._jwt: tuple[str, float] | None = None  # (token, exp)
        self._installations: dict[tuple[str, str], tuple[int, float]] = {}  # (owner, repo) -> (id, until)
        self._http = httpx.Client(
            base_url=api_url.rstrip("/"),
            timeout=timeout_seconds,
            transport=transport,
            follow_redirects=False,  # a redirect would carry a bearer token somewhere unplanned
            headers={
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": "jit-broker",  # GitHub refuses requests without a User-Agent
            },
        )
        parts = urlsplit(api_url)
        if parts.scheme != "https" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            log.warning("BROKER_GITHUB_API_URL is not https (%s): tokens would cross the network in clear", api_url)

    grammar: ClassVar[ResourceGrammar] = GRAMMAR

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> GitHubProvider:
        """One per context (the github permission source asks through the same App client)."""
        return ctx.shared("github", lambda: cls.from_settings(ctx.settings_for(GitHubSettings),
                                                              ctx.settings.provider_timeout_seconds))

    @classmethod
    def from_settings(cls, s: GitHubSettings, timeout_seconds: float) -> GitHubProvider:
        """Build from settings; refuse at start, naming what to set, if the App is not configured."""
        missing = []
        if not s.github_app_id:
            missing.append("BROKER_GITHUB_APP_ID (the App's id or client id, from its settings page)")
        if s.github_private_key_file is None:
            missing.append("BROKER_GITHUB_PRIVATE_KEY_FILE (path to the App's private key PEM)")
        if missing or s.github_app_id is None or s.github_private_key_file is None:
            raise ProviderMisconfigured("github provider: set " + "; ".join(missing))
        return cls(
            api_url=s.github_api_url,
            app_id=str(s.github_app_id).strip(),
            private_key=_load_private_key(Path(s.github_private_key_file)),
            timeout_seconds=timeout_seconds,
        )

    def close(self) -> None:
        self._http.close()

    # --- Provider protocol ------------------------------------------------------------------

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        # GitHub issues one fixed hour; anything shorter is the sweeper revoking at lease expiry.
        return TtlBounds(min_seconds=1, max_seconds=TOKEN_LIFETIME_SECONDS)

    def mint(self, grant: Grant) -> Minted:
        owner, repo = parse_resource(grant.resource)
        installation_id, token, body, permissions, repositories = self._narrowed_token(
            owner, repo, requested_permissions(grant.options))
        expires_at = _parse_time(body.get("expires_at"))

        return Minted(
            credential={
                "type": "github_token",
                "token": token,
                "expires_at": body["expires_at"],
                "repositories": repositories,
                "permissions": permissions,
            },
            handle={
                "installation_id": installation_id,
                "repositories": repositories,
                "permissions": permissions,
                "expires_at": body["expires_at"],
            },
            expires_at=expires_at,
            fingerprint=fingerprint(token),
            revocation_secret=token,
        )

    def revoke(self, target: RevokeTarget) -> Revoked:
        token = target.revocation_secret
        if not token:
            if target.expires_at <= datetime.now(UTC):
                # GitHub's hour is over: the token is dead with or without us
                return Revoked(detail=f"expired at GitHub at {rfc3339(target.expires_at)}; nothing left to revoke",
                               valid_until=target.expires_at)
            raise ProviderMisconfigured(
                "github: this lease holds no sealed token, and GitHub can revoke an installation token "
                "only when presented with it; it expires by itself at " + rfc3339(target.expires_at)
            )
        resp = self._send("DELETE", "/installation/token", "revoke the installation token", bearer=token)
        if resp.status_code == 204:
            return Revoked(detail="GitHub confirmed: DELETE /installation/token answered 204")
        if resp.status_code == 401:
            # GitHub no longer accepts the token (revoked before, or expired): already gone.
            return Revoked(detail="GitHub no longer accepts the token (401): revoked before, or expired")
        self._raise_for(resp, "revoke the installation token", secret=token)

    def health(self) -> ProviderHealth:
        try:
            resp = self._send("GET", "/app", "read the App", bearer=self._app_jwt())
            if resp.status_code != 200:
                self._raise_for(resp, "read the App")
            app = resp.json()
            return ProviderHealth(ok=True, detail=f"GitHub App {app.get('slug') or app.get('id')} reachable")
        except Exception as exc:  # health never raises: it reports
            return ProviderHealth(ok=False, detail=getattr(exc, "message", None) or type(exc).__name__)

    # --- for the broker's own reads (the github permission source) ------------------------------

    def issue_installation_token(self, owner: str, repo: str, permissions: dict[str, str]) -> tuple[str, datetime]:
        """A token of the App's installation on owner/repo for the broker's own use, never handed
        out; narrowed and checked exactly like a mint. Returns (token, GitHub's expiry)."""
        _, token, body, _, _ = self._narrowed_token(owner, repo, permissions)
        return token, _parse_time(body.get("expires_at"))

    def _narrowed_token(self, owner: str, repo: str, asked: dict[str, str]
                        ) -> tuple[int, str, dict[str, Any], dict[str, str], list[str]]:
        """An installation token for exactly (owner/repo, asked), checked against what GitHub
        answered: (installation id, token, GitHub's body, permissions, repositories). A token
        broader than asked is revoked at once and refused."""
        installation_id, body = self._create_token(owner, repo, asked)
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ProviderRejected("GitHub answered 201 without a token", github_status=201)
        try:
            _parse_time(body.get("expires_at"))
            permissions, repositories = _check_not_broader(body, owner, repo, asked)
        except _Unacceptable as exc:
            revoked = self._revoke_quietly(token)
            log.error(
                "github: token for %s/%s is not what was asked (%s); revoke %s; fingerprint %s",
                owner, repo, exc, "confirmed" if revoked else "FAILED, it expires within the hour",
                fingerprint(token),
            )
            raise ProviderRejected(
                f"GitHub's token for {owner}/{repo} is not what was asked ({exc}); "
                + ("it was revoked" if revoked else "revoking it failed; it expires by itself within the hour"),
                revoked=revoked,
            ) from None
        return installation_id, token, body, permissions, repositories

    def get(self, path: str, action: str, *, bearer: str) -> httpx.Response:
        """One GET as the given token; transport failures are ProviderUnavailable."""
        return self._send("GET", path, action, bearer=bearer)

    def raise_for(self, resp: httpx.Response, action: str) -> NoReturn:
        """GitHub's unwanted answer as the broker's error (5xx and rate limits: ProviderUnavailable)."""
        self._raise_for(resp, action)

    def discard_token(self, token: str) -> bool:
        """Revoke a token the broker holds for itself; True when GitHub confirmed."""
        return self._revoke_quietly(token)

    # --- GitHub calls -------------------------------------------------------------------------

    def _create_token(self, owner: str, repo: str, asked: dict[str, str]) -> tuple[int, dict[str, Any]]:
        action = f"create an installation token for {owner}/{repo}"
        for attempt in (1, 2):
            installation_id, cached = self._installation_id(owner, repo)
            resp = self._send(
                "POST",
                f"/app/installations/{installation_id}/access_tokens",
                action,
                bearer=self._app_jwt(),
                json={"repositories": [repo], "permissions": asked},
            )
            if resp.status_code == 404 and cached and attempt == 1:
                self._forget_installation(owner, repo)  # uninstalled or reinstalled: look it up again
                continue
            if resp.status_code != 201:
                self._raise_for(resp, action)
            return installation_id, _json_object(resp, action)
        raise AssertionError("unreachable")

    def _installation_id(self, owner: str, repo: str) -> tuple[int, bool]:
        key = (owner.lower(), repo.lower())
        now = self._clock()
        with self._lock:
            hit = self._installations.get(key)
            if hit and hit[1] > now:
                return hit[0], True
        action = f"find the App's installation for {owner}/{repo}"
        resp = self._send("GET", f"/repos/{owner}/{repo}/installation", action, bearer=self._app_jwt())
        if resp.status_code == 404:
            raise ProviderRejected(
                f"the GitHub App is not installed on {owner}/{repo} (or cannot see it)", github_status=404
            )
        if resp.status_code != 200:
            self._raise_for(resp, action)
        body = _json_object(resp, action)
        installation_id = body.get("id")
        if not isinstance(installation_id, int) or isinstance(installation_id, bool):
            raise ProviderRejected(f"GitHub could not {action}: the answer has no installation id")
        if body.get("suspended_at"):
            raise ProviderRejected(f"the GitHub App's installation for {owner} is suspended", github_status=200)
        with self._lock:
            self._installations[key] = (installation_id, now + INSTALLATION_CACHE_SECONDS)
        return installation_id, False

    def _forget_installation(self, owner: str, repo: str) -> None:
        with self._lock:
            self._installations.pop((owner.lower(), repo.lower()), None)

    def _app_jwt(self) -> str:
        now = self._clock()
        with self._lock:
            if self._jwt and self._jwt[1] - JWT_REFRESH_MARGIN_SECONDS > now:
                return self._jwt[0]
            iat = int(now) - JWT_BACKDATE_SECONDS
            exp = int(now) + JWT_LIFETIME_SECONDS
            token = jwt.encode(
                {"iat": iat, "exp": exp, "iss": self._app_id},
                self._private_key,
                algorithm="RS256",  # the only algorithm GitHub accepts for App JWTs
            )
            self._jwt = (token, float(exp))
            return token

    def _revoke_quietly(self, token: str) -> bool:
        try:
            resp = self._send("DELETE", "/installation/token", "revoke the installation token", bearer=token)
        except ProviderUnavailable:
            return False
        return resp.status_code in (204, 401)

    def _send(self, method: str, path: str, action: str, *, bearer: str, json: Any = None) -> httpx.Response:
        """One request; transport failures become ProviderUnavailable, without the request attached."""
        try:
            return self._http.request(method, path, json=json, headers={"Authorization": f"Bearer {bearer}"})
        except httpx.TimeoutException:
            problem = "timed out"
        except httpx.TransportError as exc:
            problem = f"unreachable ({type(exc).__name__}: {exc})"
            if bearer:
                problem = problem.replace(bearer, "[redacted]")
        # Outside the except blocks and `from None`: the httpx exception holds the request, whose
        # Authorization header is a credential; it must not ride along in tracebacks.
        raise ProviderUnavailable(f"GitHub could not {action}: {self._http.base_url} {problem}") from None

    def _raise_for(self, resp: httpx.Response, action: str, *, secret: str | None = None) -> NoReturn:
        """Translate an unwanted GitHub answer into the broker's errors, with GitHub's own message."""
        status = resp.status_code
        message = _github_message(resp)
        if secret:
            message = message.replace(secret, "[redacted]")
        details: dict[str, Any] = {"github_status": status}
        if request_id := resp.headers.get("x-github-request-id"):
            details["github_request_id"] = request_id
        text = f"GitHub could not {action}: {status} {message}"
        rate_limited = status == 429 or (status == 403 and resp.headers.get("x-ratelimit-remaining") == "0")
        if status >= 500 or rate_limited:
            raise ProviderUnavailable(text, **details)
        raise ProviderRejected(text, **details)


# --- pure helpers -----------------------------------------------------------------------------


def parse_resource(resource: str) -> tuple[str, str]:
    """`github://<owner>/<repo>` -> (owner, repo); anything else is not a repository."""
    scheme, sep, path = resource.partition("://")
    owner, _, repo = path.partition("/")
    if (scheme != "github" or not sep or not _OWNER.fullmatch(owner) or not _REPO.fullmatch(repo)
            or repo in (".", "..") or grammar_problem(resource) is not None):
        # The grammar's canonical form is what the policy allowed; anything else never reaches GitHub.
        raise InvalidRequest(f"not a GitHub repository resource: {resource!r} (expected github://<owner>/<repo>)",
                             code="invalid-resource")
    return owner, repo


def requested_permissions(options: dict[str, Any]) -> dict[str, str]:
    """The access entry's `permissions`, checked. Required: without it GitHub grants everything."""
    permissions = options.get("permissions")
    if not isinstance(permissions, dict) or not permissions:
        raise ProviderMisconfigured(
            "github access entries must list `permissions` (e.g. {contents: read}); without them GitHub "
            "would grant every permission the installation holds"
        )
    checked: dict[str, str] = {}
    for name, level in permissions.items():
        if not isinstance(name, str) or not _PERMISSION_NAME.match(name) or level not in PERMISSION_LEVELS:
            raise ProviderMisconfigured(
                f"github permission {name!r}: {level!r} is not <permission name>: read|write|admin"
            )
        checked[name] = level
    return checked


class _Unacceptable(Exception):
    """GitHub's answer grants more than asked, or cannot be checked: revoke and fail closed."""


def _check_not_broader(
    body: dict[str, Any], owner: str, repo: str, asked: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """What GitHub granted, as (permissions, ["owner/repo"]); raises _Unacceptable on anything more."""
    granted = body.get("permissions")
    if not isinstance(granted, dict):
        raise _Unacceptable("no permissions in the answer")
    for name, level in granted.items():
        want = asked.get(name) or IMPLICIT_PERMISSIONS.get(name)
        if want is None:
            raise _Unacceptable(f"{name}: {level} was not asked for")
        if PERMISSION_LEVELS.get(level, 99) > PERMISSION_LEVELS[want]:
            raise _Unacceptable(f"{name}: {level} is more than {want}")

    if body.get("repository_selection", "selected") != "selected":
        raise _Unacceptable(f"repository_selection is {body.get('repository_selection')!r}")
    repos = body.get("repositories")
    if not isinstance(repos, list) or not repos:
        raise _Unacceptable("no repository list in the answer")
    names = []
    for item in repos:
        full = item.get("full_name") if isinstance(item, dict) else None
        if not isinstance(full, str):
            raise _Unacceptable("a repository without full_name in the answer")
        names.append(full)
    if {n.lower() for n in names} != {f"{owner}/{repo}".lower()}:
        raise _Unacceptable(f"repositories {sorted(names)} instead of {owner}/{repo}")
    return dict(granted), names


def _parse_time(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise _Unacceptable(f"unreadable expires_at {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _json_object(resp: httpx.Response, action: str) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ProviderRejected(f"GitHub could not {action}: {resp.status_code} answer is not a JSON object")
    return body


def _github_message(resp: httpx.Response) -> str:
    """GitHub's `message` (and validation `errors`), short; the reason phrase if there is none."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not body.get("message"):
        return resp.reason_phrase or "no message"
    message = str(body["message"])
    errors = body.get("errors")
    if isinstance(errors, list) and errors:
        message += " (" + "; ".join(str(e.get("message") or e) if isinstance(e, dict) else str(e) for e in errors[:3]) + ")"
    return message[:500]


def _load_private_key(path: Path) -> RSAPrivateKey:
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise ProviderMisconfigured(f"BROKER_GITHUB_PRIVATE_KEY_FILE {path}: cannot read it ({exc.strerror})") from None
    except (ValueError, TypeError):
        raise ProviderMisconfigured(
            f"BROKER_GITHUB_PRIVATE_KEY_FILE {path}: not an unencrypted PEM private key "
            "(use the .pem GitHub offers for download on the App's settings page)"
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise ProviderMisconfigured(f"BROKER_GITHUB_PRIVATE_KEY_FILE {path}: GitHub App keys are RSA keys")
    if path.stat().st_mode & 0o077:
        log.warning("BROKER_GITHUB_PRIVATE_KEY_FILE %s is readable by others than its owner; chmod 600 it", path)
    return key
