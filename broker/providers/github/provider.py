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
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic_settings import BaseSettings

from broker.errors import InvalidRequest, ProviderMisconfigured
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
from broker.providers.github.client import PERMISSION_LEVELS, GitHubClient, parse_time
from broker.providers.github.grammar import GRAMMAR
from broker.providers.github.settings import GitHubSettings
from broker.times import rfc3339

log = logging.getLogger(__name__)

# GitHub's installation tokens live one hour, fixed; a lease may end earlier (sweeper revokes).
TOKEN_LIFETIME_SECONDS = 3600

# GitHub's naming rules: owners are 1-39 alphanumerics or single hyphens; repositories 1-100
# of alphanumerics, '.', '-', '_'. Anything else (wildcards, extra path segments) is no repository.
_OWNER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")
_REPO = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_PERMISSION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class GitHubProvider(Provider):
    """Mints GitHub App installation tokens for one repository and the policy's permissions."""

    name: ClassVar[str] = "github"
    grammar: ClassVar[ResourceGrammar] = GRAMMAR
    settings_model: ClassVar[type[BaseSettings]] = GitHubSettings

    def __init__(self, client: GitHubClient) -> None:
        self.client = client

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> GitHubProvider:
        """Refused at start, naming what to set, if the App is not configured."""
        return cls(github_client(ctx))

    def close(self) -> None:
        self.client.close()

    # --- Provider protocol ------------------------------------------------------------------

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        # GitHub issues one fixed hour; anything shorter is the sweeper revoking at lease expiry.
        return TtlBounds(min_seconds=1, max_seconds=TOKEN_LIFETIME_SECONDS)

    def mint(self, grant: Grant) -> Minted:
        owner, repo = parse_resource(grant.resource)
        installation_id, token, body, permissions, repositories = self.client.narrowed_token(
            owner, repo, requested_permissions(grant.options))
        expires_at = parse_time(body.get("expires_at"))

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

    def revoke(self, target: RevokeTarget) -> Revoked:  # noqa: RET503  # client.raise_for never returns (NoReturn)
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
        resp = self.client.send("DELETE", "/installation/token", "revoke the installation token", bearer=token)
        if resp.status_code == 204:
            return Revoked(detail="GitHub confirmed: DELETE /installation/token answered 204")
        if resp.status_code == 401:
            # GitHub no longer accepts the token (revoked before, or expired): already gone.
            return Revoked(detail="GitHub no longer accepts the token (401): revoked before, or expired")
        self.client.raise_for(resp, "revoke the installation token", secret=token)

    def health(self) -> ProviderHealth:
        return self.client.health()


def github_client(ctx: ProviderContext) -> GitHubClient:
    """The App client of this broker, one for the provider and the permission source (BROKER_GITHUB_*)."""
    return ctx.shared("github", lambda: GitHubClient.from_settings(ctx.settings_for(GitHubSettings),
                                                                   ctx.settings.provider_timeout_seconds))


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
