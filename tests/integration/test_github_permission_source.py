"""The github permission source alone against the GitHub stand-in: what it asks, with what, and how it reads the answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker.config import Settings
from broker.permissions.base import ALLOW, DENY, UNKNOWN, PermissionQuery, SourceContext
from broker.providers.github.source import GitHubPermissionSource
from tests.support.github_standin import GitHubStandIn

PERMISSION_ENDPOINT = "GET /repos/{owner}/{repo}/collaborators/{username}/permission"
TOKEN_ENDPOINT = "POST /app/installations/{installation_id}/access_tokens"


@pytest.fixture
def gh(github_standin: GitHubStandIn) -> GitHubStandIn:
    github_standin.reset()
    return github_standin


@pytest.fixture
def source(gh: GitHubStandIn) -> Iterator[GitHubPermissionSource]:
    settings = Settings(github_api_url=gh.url, github_app_id=gh.app_id, github_private_key_file=gh.private_key_path,
                        provider_timeout_seconds=5.0)
    s = GitHubPermissionSource.from_context(SourceContext(settings=settings))
    yield s
    s.close()


def query(login: str | None = "alice-gh", *require: str, resource: str = "github://acme/widgets",
          claims: dict[str, str] | None = None, login_claim: str | None = None) -> PermissionQuery:
    return PermissionQuery(
        human="alice@example.com", resource=resource, access="write", require=frozenset(require or ("write",)),
        options={"login_claim": login_claim} if login_claim else {},
        identity={"github_login": login} if login else {}, claims=claims or {},
    )


def test_it_asks_the_documented_endpoint_with_a_narrow_installation_token_of_its_own(source, gh):
    gh.set_collaborator("acme", "widgets", "alice-gh", "maintain")
    answer = source.check(query("alice-gh", "maintain", "admin"))
    assert answer.verdict == ALLOW
    assert answer.evidence["role_name"] == "maintain" and answer.evidence["permission"] == "write"
    asked = gh.requests("GET", "/collaborators/alice-gh/permission")
    assert len(asked) == 1 and asked[0].auth == "token"
    issued = list(gh.tokens.values())
    assert len(issued) == 1
    assert issued[0].permissions == {"metadata": "read"} and issued[0].repositories == ["widgets"]
    assert asked[0].bearer_sha256 is not None
    # The reader token is reused for the next question, not minted again.
    source.check(query("alice-gh", "write"))
    assert gh.calls(TOKEN_ENDPOINT) == 1 and gh.calls(PERMISSION_ENDPOINT) == 2


@pytest.mark.parametrize(("role", "require", "verdict"), [
    ("admin", ("write", "maintain", "admin"), ALLOW),
    ("write", ("write", "maintain", "admin"), ALLOW),
    ("triage", ("write", "maintain", "admin"), DENY),
    ("triage", ("read", "triage"), ALLOW),
    ("read", ("maintain", "admin"), DENY),
    (None, ("read",), DENY),  # a user who is no collaborator: permission none
])
def test_roles_map_through_require(source, gh, role, require, verdict):
    if role:
        gh.set_collaborator("acme", "widgets", "alice-gh", role)
    assert source.check(query("alice-gh", *require)).verdict == verdict


def test_a_custom_role_matches_by_name_or_by_its_base_role(source, gh):
    gh.custom_roles["security-reviewer"] = "write"
    gh.set_collaborator("acme", "widgets", "alice-gh", "security-reviewer")
    assert source.check(query("alice-gh", "security-reviewer")).verdict == ALLOW
    assert source.check(query("alice-gh", "write")).verdict == ALLOW
    assert source.check(query("alice-gh", "admin")).verdict == DENY


def test_unknown_users_missing_logins_and_claims(source, gh):
    missing = source.check(query("ghost-gh"))
    assert missing.verdict == DENY and missing.evidence["github_status"] == 404
    unmapped = source.check(query(None))
    assert unmapped.verdict == DENY and gh.calls(PERMISSION_ENDPOINT) == 1
    assert source.check(query("-bad-")).verdict == DENY  # not a GitHub login: never sent
    gh.set_collaborator("acme", "widgets", "bob-gh", "admin")
    by_claim = source.check(query("alice-gh", "admin", claims={"gh": "bob-gh"}, login_claim="gh"))
    assert by_claim.verdict == ALLOW and by_claim.evidence["login_from"] == "claim gh"
    fallback = source.check(query("alice-gh", "admin", login_claim="gh"))  # no such claim: the mapping
    assert fallback.evidence["login"] == "alice-gh"


def test_a_revoked_reader_token_is_replaced_once(source, gh):
    gh.set_collaborator("acme", "widgets", "alice-gh", "write")
    assert source.check(query()).verdict == ALLOW
    for token in gh.tokens.values():
        token.revoked = True
    assert source.check(query()).verdict == ALLOW
    assert gh.calls(TOKEN_ENDPOINT) == 2
    assert [r.status for r in gh.requests("GET", "/collaborators/")] == [200, 401, 200]


@pytest.mark.parametrize("status", [500, 502, 429])
def test_a_github_that_cannot_answer_is_unknown(source, gh, status):
    gh.set_collaborator("acme", "widgets", "alice-gh", "write")
    gh.outage("GET", "/repos/acme/widgets/collaborators/", status)
    answer = source.check(query())
    assert answer.verdict == UNKNOWN and answer.evidence["error"] == "provider-unavailable"


def test_an_app_not_installed_on_the_repository_is_unknown(source, gh):
    answer = source.check(query(resource="github://nowhere/repo"))
    assert answer.verdict == UNKNOWN and answer.evidence["error"] == "provider-rejected"
    assert source.check(query(resource="github://acme/*")).verdict == UNKNOWN  # no repository at all


def test_close_revokes_the_reader_tokens(gh):
    settings = Settings(github_api_url=gh.url, github_app_id=gh.app_id, github_private_key_file=gh.private_key_path)
    s = GitHubPermissionSource.from_context(SourceContext(settings=settings))
    gh.set_collaborator("acme", "widgets", "alice-gh", "write")
    s.check(query())
    s.close()
    assert [t.revoked for t in gh.tokens.values()] == [True]
