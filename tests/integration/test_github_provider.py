"""The github provider against the strict GitHub stand-in: mint, narrow, verify, revoke, fail closed."""

from __future__ import annotations

import base64
import socket
import time
import traceback
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.config import Settings
from broker.errors import InvalidRequest, ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.providers.base import Grant, Provider, ProviderContext, RevokeTarget, fingerprint
from broker.providers.github import GitHubProvider
from tests.support.github_standin import GitHubStandIn

READ = {"contents": "read"}


@pytest.fixture
def gh(github_standin: GitHubStandIn) -> GitHubStandIn:
    github_standin.reset()
    return github_standin


def settings_for(gh: GitHubStandIn, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "github_api_url": gh.url,
        "github_app_id": gh.app_id,
        "github_private_key_file": gh.private_key_path,
        "provider_timeout_seconds": 5.0,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def provider(gh: GitHubStandIn) -> Iterator[GitHubProvider]:
    p = GitHubProvider.from_context(ProviderContext(settings=settings_for(gh)))
    yield p
    p.close()


def grant(resource: str = "github://acme/widgets", permissions: dict[str, str] | None = None, **options: object) -> Grant:
    if permissions is not None:
        options["permissions"] = permissions
    return Grant(
        capability_id="cap_1", session_id="ses_1", task_id="task-1", human="alice@example.com",
        agent="claude-code", resource=resource, access="read", tier="read", ttl_seconds=600, options=options,
    )


def target_for(minted_token: str | None, expires_at: datetime | None = None) -> RevokeTarget:
    return RevokeTarget(
        capability_id="cap_1", session_id="ses_1", resource="github://acme/widgets", access="read",
        handle={}, expires_at=expires_at or datetime.now(UTC) + timedelta(hours=1),
        revocation_secret=minted_token,
    )


def as_token(gh: GitHubStandIn, token: str, method: str, path: str, **kwargs: object) -> httpx.Response:
    """Use a token the way an agent's git or gh would."""
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json", "User-Agent": "git/2"}
    return httpx.request(method, gh.url + path, headers=headers, timeout=5, **kwargs)  # type: ignore[arg-type]


def as_app(gh: GitHubStandIn, app_jwt: str, path: str = "/app") -> httpx.Response:
    headers = {"Authorization": f"Bearer {app_jwt}", "Accept": "application/vnd.github+json", "User-Agent": "t"}
    return httpx.get(gh.url + path, headers=headers, timeout=5)


# --- (a) mint: exactly one repository, exactly the permissions asked -----------------------------


def test_mint_reads_only_its_repository_and_cannot_write(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    assert isinstance(provider, Provider)
    minted = provider.mint(grant(permissions=READ))
    cred = minted.credential
    token = cred["token"]

    assert cred["type"] == "github_token"
    assert token.startswith("ghs_")
    assert cred["permissions"] == READ  # exactly as asked, nothing added
    assert cred["repositories"] == ["acme/widgets"]
    assert minted.revocation_secret == token
    assert minted.fingerprint == fingerprint(token)
    assert token not in repr(minted.handle)
    assert minted.handle["installation_id"] == 1001
    assert minted.handle["repositories"] == ["acme/widgets"]
    # GitHub's own hour, not the grant's ttl: the sweeper revokes at the lease's end
    assert timedelta(minutes=59) < minted.expires_at - datetime.now(UTC) <= timedelta(hours=1)
    assert provider.ttl_bounds("github://acme/widgets", {}).max_seconds == 3600

    # what the provider asked GitHub for: one repository name, the permissions of the entry
    (post,) = gh.requests("POST", "/access_tokens")
    assert post.path == "/app/installations/1001/access_tokens"
    assert post.body == {"repositories": ["widgets"], "permissions": READ}
    assert post.headers["accept"] == "application/vnd.github+json"
    assert post.headers["x-github-api-version"] == "2022-11-28"

    # the token reads repository A ...
    assert as_token(gh, token, "GET", "/repos/acme/widgets").status_code == 200
    readme = as_token(gh, token, "GET", "/repos/acme/widgets/contents/README.md")
    assert readme.status_code == 200
    assert base64.b64decode(readme.json()["content"]) == b"# acme/widgets\n"
    # ... and nothing else of the same installation (GitHub hides what a token cannot see: 404)
    assert as_token(gh, token, "GET", "/repos/acme/gadgets").status_code == 404
    assert as_token(gh, token, "GET", "/repos/acme/gadgets/contents/README.md").status_code == 404
    # ... and cannot write (403, GitHub's "Resource not accessible by integration")
    put = as_token(gh, token, "PUT", "/repos/acme/widgets/contents/x.txt",
                   json={"message": "agent was here", "content": base64.b64encode(b"x").decode()})
    assert put.status_code == 403
    assert put.json()["message"] == "Resource not accessible by integration"


def test_write_permission_can_write_and_metadata_read_is_accepted(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    minted = provider.mint(grant(permissions={"contents": "write", "metadata": "read"}))
    token = minted.credential["token"]
    put = as_token(gh, token, "PUT", "/repos/acme/widgets/contents/notes.md",
                   json={"message": "add notes", "content": base64.b64encode(b"hi").decode()})
    assert put.status_code == 201
    assert minted.credential["permissions"] == {"contents": "write", "metadata": "read"}


def test_installation_and_app_jwt_are_cached(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    provider.mint(grant(permissions=READ))
    provider.mint(grant(permissions=READ))
    assert len(gh.requests("GET", "/installation")) == 1  # looked up once per repository
    posts = gh.requests("POST", "/access_tokens")
    assert len(posts) == 2 and posts[0].raw_jwt == posts[1].raw_jwt  # one JWT for both


def test_jwt_is_renewed_before_it_expires(gh: GitHubStandIn) -> None:
    now = [time.time()]
    p = GitHubProvider.from_context(ProviderContext(settings=settings_for(gh)))
    p.client._clock = lambda: now[0]
    first = p.client._app_jwt()
    now[0] += 470  # more than a minute left: reused
    assert p.client._app_jwt() == first
    now[0] += 20  # under a minute left: a new one
    assert p.client._app_jwt() != first
    p.close()


def test_github_enterprise_base_path(gh: GitHubStandIn) -> None:
    p = GitHubProvider.from_context(ProviderContext(settings=settings_for(gh, github_api_url=gh.url + "/api/v3")))
    minted = p.mint(grant(permissions=READ))
    assert gh.requests("POST")[0].path == "/api/v3/app/installations/1001/access_tokens"
    p.revoke(target_for(minted.revocation_secret))
    assert gh.requests("DELETE")[0].path == "/api/v3/installation/token"
    p.close()


# --- (b) the App JWT GitHub received -------------------------------------------------------------


def test_app_jwt_as_github_documents_it(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    provider.mint(grant(permissions=READ))
    now = time.time()
    for logged in gh.requests(path_contains="installation"):
        if logged.auth != "jwt":
            continue
        assert logged.status in (200, 201)
        assert logged.jwt_header is not None and logged.jwt_header["alg"] == "RS256"
        claims = logged.jwt_claims
        assert claims is not None and claims["iss"] == gh.app_id
        assert abs(claims["iat"] - (now - 60)) <= 5
        assert claims["exp"] - claims["iat"] <= 600
        assert claims["exp"] > now
        # and the signature is the App key's
        jwt.decode(logged.raw_jwt, gh.public_key, algorithms=["RS256"], options={"require": ["iat", "exp", "iss"]})


# --- (c) asking beyond the installation ------------------------------------------------------------


@pytest.mark.parametrize("permissions", [{"issues": "write"}, {"administration": "read"}, {"contents": "admin"}])
def test_permissions_beyond_the_installation_are_rejected(
    provider: GitHubProvider, gh: GitHubStandIn, permissions: dict[str, str]
) -> None:
    with pytest.raises(ProviderRejected) as err:
        provider.mint(grant(permissions=permissions))
    assert "The permissions requested are not granted to this installation." in err.value.message
    assert err.value.details["github_status"] == 422
    assert gh.requests("POST")[-1].status == 422
    assert gh.tokens == {}


def test_no_installation_or_suspended_installation_is_rejected(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    with pytest.raises(ProviderRejected, match="not installed on nobody/nothing"):
        provider.mint(grant("github://nobody/nothing", READ))
    with pytest.raises(ProviderRejected, match="suspended"):
        provider.mint(grant("github://frozen/ice", READ))
    assert gh.requests("POST") == []


def test_policy_entry_without_permissions_is_misconfigured(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    for options in ({}, {"permissions": {}}, {"permissions": {"contents": "everything"}}):
        with pytest.raises(ProviderMisconfigured):
            provider.mint(grant(**options))
    assert gh.request_log == []  # nothing asked of GitHub: it would have granted everything


@pytest.mark.parametrize("resource", ["github://acme/*", "github://acme", "github://acme/widgets/extra", "vault://x/y"])
def test_resource_must_name_one_repository(provider: GitHubProvider, resource: str) -> None:
    with pytest.raises(InvalidRequest):
        provider.mint(grant(resource, READ))


def test_missing_app_settings_are_misconfigured(gh: GitHubStandIn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ProviderMisconfigured, match="BROKER_GITHUB_APP_ID"):
        GitHubProvider.from_context(ProviderContext(settings=settings_for(gh, github_app_id=None)))
    with pytest.raises(ProviderMisconfigured, match="BROKER_GITHUB_PRIVATE_KEY_FILE"):
        GitHubProvider.from_context(ProviderContext(settings=settings_for(gh, github_private_key_file=None)))
    not_a_key = tmp_path / "key.pem"
    not_a_key.write_text("hello")
    with pytest.raises(ProviderMisconfigured, match="not an unencrypted PEM"):
        GitHubProvider.from_context(ProviderContext(settings=settings_for(gh, github_private_key_file=not_a_key)))


# --- (d) revoke ----------------------------------------------------------------------------------


def test_revoke_kills_the_token_and_is_idempotent(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    minted = provider.mint(grant(permissions=READ))
    token = minted.credential["token"]
    assert as_token(gh, token, "GET", "/repos/acme/widgets").status_code == 200

    said = provider.revoke(target_for(minted.revocation_secret))
    assert said.valid_until is None and "204" in said.detail  # confirmed: the receipt says `revoked`
    (delete,) = gh.requests("DELETE", "/installation/token")
    assert delete.status == 204
    assert delete.auth == "token" and delete.bearer_sha256 == fingerprint(token).removeprefix("sha256:")

    dead = as_token(gh, token, "GET", "/repos/acme/widgets")
    assert dead.status_code == 401 and dead.json()["message"] == "Bad credentials"

    provider.revoke(target_for(minted.revocation_secret))  # already gone: still success
    assert [r.status for r in gh.requests("DELETE")] == [204, 401]


def test_revoke_without_sealed_token(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    past = datetime.now(UTC) - timedelta(seconds=1)
    said = provider.revoke(target_for(None, past))  # GitHub's hour is over: nothing left to revoke
    assert said.valid_until == past  # the receipt: expires_naturally, at a time already past
    with pytest.raises(ProviderMisconfigured, match="no sealed token"):
        provider.revoke(target_for(None))  # still alive and unrevocable: stays revoke_pending
    assert gh.request_log == []


def test_revoke_server_error_raises(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    minted = provider.mint(grant(permissions=READ))
    token = minted.credential["token"]
    gh.fail_next("DELETE", "/installation/token", 502)
    with pytest.raises(ProviderUnavailable) as err:
        provider.revoke(target_for(token))
    assert token not in _everything_about(err.value)
    gh.fail_next("DELETE", "/installation/token", 403)
    with pytest.raises(ProviderRejected):
        provider.revoke(target_for(token))
    assert as_token(gh, token, "GET", "/repos/acme/widgets").status_code == 200  # never marked revoked on hope
    provider.revoke(target_for(token))
    assert as_token(gh, token, "GET", "/repos/acme/widgets").status_code == 401


# --- (e) the stand-in is as strict as GitHub -------------------------------------------------------


def test_standin_refuses_bad_app_jwts(gh: GitHubStandIn) -> None:
    now = int(time.time())
    assert as_app(gh, gh.app_jwt()).status_code == 200

    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = gh.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    claims = {"iat": now - 60, "exp": now + 540, "iss": gh.app_id}
    bad = {
        "exp - iat = 11 min": gh.app_jwt(iat=now - 60, exp=now + 600),
        "wrong iss": gh.app_jwt(iss="999999"),
        "wrong key": jwt.encode(claims, other_key, algorithm="RS256"),
        "HS256 with the public key as secret": _hs256(claims, public_pem),
        "expired": gh.app_jwt(iat=now - 700, exp=now - 100),
        "iat in the future": gh.app_jwt(iat=now + 120, exp=now + 400),
        "no iss": gh.app_jwt(iss=None),
        "no exp": gh.app_jwt(exp=None),
        "not a JWT": "ghs_" + "a" * 36,
    }
    for why, token in bad.items():
        resp = as_app(gh, token)
        assert resp.status_code == 401, why
        body = resp.json()
        assert body["message"] and body["documentation_url"].startswith("https://docs.github.com/"), why
    # and the same on the endpoints that matter
    assert as_app(gh, bad["wrong key"], "/repos/acme/widgets/installation").status_code == 401


def test_standin_contract_details(gh: GitHubStandIn) -> None:
    app_jwt = gh.app_jwt()
    headers = {"Authorization": f"Bearer {app_jwt}", "User-Agent": "t", "X-GitHub-Api-Version": "2022-11-28"}
    post = lambda body: httpx.post(f"{gh.url}/app/installations/1001/access_tokens", json=body, headers=headers)  # noqa: E731
    # full names are not repository names; repositories outside the installation are refused
    assert post({"repositories": ["acme/widgets"]}).status_code == 422
    assert post({"repositories": ["ledger"]}).status_code == 422
    # repository ids work as names do; no permissions asked -> the installation's all
    whole = post({"repository_ids": [5002]})
    assert whole.status_code == 201
    assert whole.json()["permissions"] == gh.installations[1001].permissions
    assert [r["full_name"] for r in whole.json()["repositories"]] == ["acme/gadgets"]
    # an installation token cannot act as the App; the App JWT cannot revoke
    token = whole.json()["token"]
    assert as_app(gh, token).status_code == 401
    assert httpx.delete(f"{gh.url}/installation/token", headers=headers).status_code == 401
    # GitHub's header rules
    assert httpx.get(f"{gh.url}/app", headers={**headers, "User-Agent": ""}).status_code == 403
    assert httpx.get(f"{gh.url}/app", headers={**headers, "X-GitHub-Api-Version": "2099-01-01"}).status_code == 400
    assert httpx.get(f"{gh.url}/nowhere", headers=headers).json()["message"] == "Not Found"


# --- (f) unreachable GitHub; the token never in error text ------------------------------------------


def test_unreachable_api_is_unavailable(gh: GitHubStandIn) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: refused
    p = GitHubProvider.from_context(ProviderContext(settings=settings_for(gh, github_api_url=dead_url)))
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        p.mint(grant(permissions=READ))
    health = p.health()
    assert not health.ok and health.detail

    token = "ghs_" + "S3cr3t" * 6
    with pytest.raises(ProviderUnavailable) as err:
        p.revoke(target_for(token))
    assert token not in _everything_about(err.value)
    p.close()


def test_timeout_is_unavailable(gh: GitHubStandIn) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        p = GitHubProvider.from_context(
            ProviderContext(settings=settings_for(gh, github_api_url=url, provider_timeout_seconds=0.3))
        )
        token = "ghs_" + "T1meout" * 5 + "x"
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="timed out") as err:
            p.revoke(target_for(token))
        assert time.monotonic() - started < 3
        assert token not in _everything_about(err.value)
        p.close()


def test_server_errors_are_unavailable_and_client_errors_rejected(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    gh.fail_next("POST", "/app/installations/", 503)
    with pytest.raises(ProviderUnavailable):
        provider.mint(grant(permissions=READ))
    gh.fail_next("GET", "/repos/acme/docs/installation", 401)
    with pytest.raises(ProviderRejected):
        provider.mint(grant("github://acme/docs", READ))


def test_health(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    assert provider.health().ok
    assert gh.requests("GET", "/app")[0].status == 200
    gh.fail_next("GET", "/app", 500)
    assert not provider.health().ok


# --- (g) a GitHub that grants more than asked: revoke at once, fail closed --------------------------


@pytest.mark.parametrize(
    "broader",
    [
        {"permissions": {"contents": "write"}},
        {"permissions": {"contents": "read", "pull_requests": "write"}},
        {"permissions": {"contents": "read", "metadata": "write"}},
        {"repositories": ["widgets", "gadgets"]},
        {"repositories": ["gadgets"]},
        {"repositories": []},  # no list to check: as bad as a broader one
    ],
)
def test_broader_token_is_revoked_and_rejected(provider: GitHubProvider, gh: GitHubStandIn, broader: dict) -> None:  # type: ignore[type-arg]
    gh.broaden_next_token = broader
    with pytest.raises(ProviderRejected, match="not what was asked") as err:
        provider.mint(grant(permissions=READ))
    assert err.value.details["revoked"] is True

    (issued,) = gh.tokens.values()
    assert issued.revoked  # dead at GitHub
    (delete,) = gh.requests("DELETE", "/installation/token")
    assert delete.status == 204
    assert delete.bearer_sha256 == fingerprint(issued.token).removeprefix("sha256:")
    assert issued.token not in _everything_about(err.value)
    assert as_token(gh, issued.token, "GET", "/repos/acme/widgets").status_code == 401


def test_implicit_metadata_read_is_accepted(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    # GitHub adds metadata: read to every repository token; that alone is not "broader".
    gh.broaden_next_token = {"permissions": {"contents": "read", "metadata": "read"}}
    minted = provider.mint(grant(permissions=READ))
    assert minted.credential["permissions"] == {"contents": "read", "metadata": "read"}
    assert gh.requests("DELETE") == []


def test_reinstalled_app_is_found_again(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    provider.mint(grant(permissions=READ))
    gh.installations[2001] = gh.installations.pop(1001)  # uninstalled and installed again: new id
    gh.installations[2001].id = 2001
    minted = provider.mint(grant(permissions=READ))
    assert minted.handle["installation_id"] == 2001
    assert [(r.path, r.status) for r in gh.requests("POST")] == [
        ("/app/installations/1001/access_tokens", 201),
        ("/app/installations/1001/access_tokens", 404),
        ("/app/installations/2001/access_tokens", 201),
    ]


def test_broader_token_whose_revoke_fails_still_fails_closed(provider: GitHubProvider, gh: GitHubStandIn) -> None:
    gh.broaden_next_token = {"permissions": {"contents": "admin"}}
    gh.fail_next("DELETE", "/installation/token", 500)
    with pytest.raises(ProviderRejected, match="revoking it failed") as err:
        provider.mint(grant(permissions=READ))
    assert err.value.details["revoked"] is False


# --- helpers ---------------------------------------------------------------------------------------


def _everything_about(exc: BaseException) -> str:
    """Every place a secret could hide in an exception once it is logged or returned."""
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    if hasattr(exc, "to_body"):
        parts.append(repr(exc.to_body()))
    return "\n".join(parts)


def _hs256(claims: dict[str, object], secret: bytes) -> str:
    """An HS256 token keyed with the public key: the classic algorithm-confusion forgery.

    PyJWT refuses to use a PEM as an HMAC secret, so it is assembled by hand.
    """
    import hashlib
    import hmac
    import json

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)
