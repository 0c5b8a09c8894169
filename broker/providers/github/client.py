"""The GitHub App client: App JWTs, installations, narrowed installation tokens, GitHub's errors.

Shared by the github provider (tokens for agents) and the github permission source (tokens for
the broker's own reads): one per broker (`PluginContext.shared`), so one JWT, one installation
cache and one connection pool. Tokens are checked after GitHub answers: one broader than asked
(another permission, a higher level, another repository) is revoked at once and refused.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from broker.errors import ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.plugins import PluginHealth
from broker.providers.base import fingerprint
from broker.providers.github.settings import GitHubSettings

log = logging.getLogger("broker.providers.github")

API_VERSION = "2022-11-28"
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


class GitHubClient:
    """Talks to GitHub as the broker's App."""

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

    @classmethod
    def from_settings(cls, s: GitHubSettings, timeout_seconds: float) -> GitHubClient:
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

    def health(self) -> PluginHealth:
        try:
            resp = self._send("GET", "/app", "read the App", bearer=self._app_jwt())
            if resp.status_code != 200:
                self._raise_for(resp, "read the App")
            app = resp.json()
            return PluginHealth(ok=True, detail=f"GitHub App {app.get('slug') or app.get('id')} reachable")
        except Exception as exc:  # noqa: BLE001  # health never raises: it reports
            return PluginHealth(ok=False, detail=getattr(exc, "message", None) or type(exc).__name__)

    def issue_installation_token(self, owner: str, repo: str, permissions: dict[str, str]) -> tuple[str, datetime]:
        """A token of the App's installation on owner/repo for the broker's own use, never handed
        out; narrowed and checked exactly like a mint. Returns (token, GitHub's expiry)."""
        _, token, body, _, _ = self.narrowed_token(owner, repo, permissions)
        return token, parse_time(body.get("expires_at"))

    def narrowed_token(self, owner: str, repo: str, asked: dict[str, str]
                        ) -> tuple[int, str, dict[str, Any], dict[str, str], list[str]]:
        """An installation token for exactly (owner/repo, asked), checked against what GitHub
        answered: (installation id, token, GitHub's body, permissions, repositories). A token
        broader than asked is revoked at once and refused."""
        installation_id, body = self._create_token(owner, repo, asked)
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise ProviderRejected("GitHub answered 201 without a token", github_status=201)
        try:
            parse_time(body.get("expires_at"))
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

    def raise_for(self, resp: httpx.Response, action: str, *, secret: str | None = None) -> NoReturn:
        """GitHub's unwanted answer as the broker's error (5xx and rate limits: ProviderUnavailable)."""
        self._raise_for(resp, action, secret=secret)

    def send(self, method: str, path: str, action: str, *, bearer: str) -> httpx.Response:
        """One request as the given token; transport failures are ProviderUnavailable."""
        return self._send(method, path, action, bearer=bearer)

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


def parse_time(value: Any) -> datetime:
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
