"""The github permission source: the human's role on the repository, as GitHub reports it now.

Asks `GET /repos/{owner}/{repo}/collaborators/{username}/permission` (GitHub's "Get repository
permissions for a user") with an installation token of the broker's GitHub App, narrowed to the
one repository and `metadata: read` (the permission that endpoint needs). The App JWT and the
token come from the App client the github provider uses too (client.py); the token is the
broker's, never handed out, kept until five minutes before GitHub's hour ends and revoked when
the broker stops.

GitHub's answer has `permission` (the legacy base role: admin, write, read, none; maintain
reads as write, triage as read) and `role_name` (the role really held: admin, maintain, write,
triage, read, or a custom role). Both are matched against the rule's `require[access]`, so
`require: {merge: [maintain, admin]}` sees a maintainer by `role_name` and a custom role by its
name or by its base role. `none` and a 404 (no such user) are deny; a GitHub that cannot answer
(unreachable, 5xx, rate limited, the App not installed) is unknown.

Who the human is at GitHub: the claim named by the rule's option `login_claim` in the human's
verified identity claims, else the policy's `humans.<email>.github_login`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import Any, ClassVar
from urllib.parse import quote

from pydantic_settings import BaseSettings

from broker.errors import BrokerError, InvalidRequest
from broker.permissions.base import PermissionQuery, PermissionSource, SourceAnswer, SourceContext, SourceHealth, judge
from broker.providers.github.client import GitHubClient
from broker.providers.github.provider import github_client, parse_resource
from broker.providers.github.settings import GitHubSettings

log = logging.getLogger(__name__)

READER_PERMISSIONS = {"metadata": "read"}  # all "Get repository permissions for a user" needs
# Renew the reader token this long before GitHub's hour ends, so none expires in flight.
TOKEN_MARGIN_SECONDS = 300
# GitHub logins: alphanumerics and single inner hyphens, at most 39 characters.
_LOGIN = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")


class GitHubPermissionSource(PermissionSource):
    settings_model: ClassVar[type[BaseSettings]] = GitHubSettings
    name: ClassVar[str] = "github"

    def __init__(self, app: GitHubClient) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}  # (owner, repo) -> (token, reuse until, epoch s)

    @classmethod
    def from_context(cls, ctx: SourceContext) -> GitHubPermissionSource:
        # The same App settings as the github provider (BROKER_GITHUB_*); refused at start if missing.
        # The App client the github provider uses too (BROKER_GITHUB_*); refused at start if missing.
        return cls(github_client(ctx))

    def check(self, query: PermissionQuery) -> SourceAnswer:
        try:
            owner, repo = parse_resource(query.resource)
        except InvalidRequest as exc:
            return SourceAnswer.unknown(f"github source: {exc.message}")
        login, via = _login_of(query)
        if login is None:
            return SourceAnswer.deny(f"no GitHub login is known for {query.human} ({via})")
        if not _LOGIN.match(login):
            return SourceAnswer.deny(f"{login!r} ({via}) is not a GitHub login", login=login)
        action = f"read {login}'s permission on {owner}/{repo}"
        path = f"/repos/{owner}/{repo}/collaborators/{quote(login, safe='')}/permission"
        try:
            for attempt in (1, 2):
                token = self._reader_token(owner, repo)
                resp = self._app.get(path, action, bearer=token)
                if resp.status_code == 401 and attempt == 1:
                    self._forget(owner, repo, token)  # revoked or expired under us: one fresh token
                    continue
                break
            if resp.status_code == 404:
                return SourceAnswer.deny(f"GitHub knows no user {login} (404)", login=login,
                                         repository=f"{owner}/{repo}", github_status=404)
            if resp.status_code != 200:
                self._app.raise_for(resp, action)
            body = resp.json()
        except BrokerError as exc:
            return SourceAnswer.unknown(exc.message[:300], error=exc.code, login=login, repository=f"{owner}/{repo}")
        except ValueError:
            return SourceAnswer.unknown(f"GitHub could not {action}: the answer is not JSON", login=login)
        if not isinstance(body, dict) or not isinstance(body.get("permission"), str):
            return SourceAnswer.unknown(f"GitHub could not {action}: no `permission` in the answer", login=login)
        permission = body["permission"]
        role = body.get("role_name") if isinstance(body.get("role_name"), str) else None
        held = {v for v in (permission, role) if v and v.lower() != "none"}
        shown = f"role {role}" if role else "no role name"
        return judge(held, query, f"GitHub: {login} has {shown} (permission {permission}) on {owner}/{repo}",
                     login=login, login_from=via, repository=f"{owner}/{repo}", permission=permission, role_name=role)

    def health(self) -> SourceHealth:
        return self._app.health()

    def close(self) -> None:
        with self._lock:
            tokens, self._tokens = list(self._tokens.values()), {}
        for token, _ in tokens:
            self._app.discard_token(token)
        self._app.close()

    def _reader_token(self, owner: str, repo: str) -> str:
        key = (owner.lower(), repo.lower())
        with self._lock:
            hit = self._tokens.get(key)
            if hit and hit[1] > time.time():
                return hit[0]
        token, expires_at = self._app.issue_installation_token(owner, repo, dict(READER_PERMISSIONS))
        with self._lock:
            old = self._tokens.get(key)
            self._tokens[key] = (token, expires_at.timestamp() - TOKEN_MARGIN_SECONDS)
        if old is not None and old[0] != token:
            self._app.discard_token(old[0])
        return token

    def _forget(self, owner: str, repo: str, token: str) -> None:
        with self._lock:
            key = (owner.lower(), repo.lower())
            if self._tokens.get(key, ("",))[0] == token:
                del self._tokens[key]


def _login_of(query: PermissionQuery) -> tuple[str | None, str]:
    """(login, where it came from)."""
    claim = query.options.get("login_claim")
    if isinstance(claim, str) and claim:
        value: Any = query.claims.get(claim)
        if isinstance(value, str) and value:
            return value, f"claim {claim}"
    login = query.identity.get("github_login")
    if login:
        return login, f"humans.{query.human}.github_login"
    return None, "no github_login under humans, no login claim"
