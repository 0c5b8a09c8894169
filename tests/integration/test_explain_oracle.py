"""Explain is not an oracle, and one caller cannot spend the live source's quota (issue 18).

A real broker over HTTP, the GitHub stand-in as the live source: explain for another human is
refused for non-admins before anything is asked or revealed; live-permission calls are budgeted
per caller (agent session on the capability path, human or admin on explain), and one caller
past its budget gets 429 while everyone else goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_live_permissions import PERMISSION_ENDPOINT, POLICY, SCOPE
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.github_standin import GitHubStandIn

REPOS = ("widgets", "gadgets", "docs")  # the stand-in's App is installed on these
# Six distinct live questions (each is one backend call, then cached): (repository, access).
QUESTIONS = [(repo, access) for access in ("read", "write") for repo in REPOS]


@pytest.fixture
def gh(github_standin: GitHubStandIn) -> GitHubStandIn:
    github_standin.reset()
    for repo in REPOS:
        github_standin.set_collaborator("acme", repo, "alice-gh", "maintain")
        github_standin.set_collaborator("acme", repo, "bob-gh", "read")
    return github_standin


@pytest.fixture
def live_broker(database_url: str, tmp_path: Path, gh: GitHubStandIn) -> Callable[..., Any]:
    @contextmanager
    def start(*, budget: int = 20) -> Iterator[Api]:
        secrets_ = BrokerSecrets()
        broker = build_broker(
            tmp_path, database_url, secrets_, POLICY,
            github_api_url=gh.url, github_app_id=gh.app_id, github_private_key_file=gh.private_key_path,
            provider_timeout_seconds=5.0, permission_cache_seconds=60.0,
            live_check_budget=budget, live_check_budget_seconds=3600.0,  # no refill while the test runs
        )
        with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
            yield Api(server.base_url, secrets_, broker, client)

    return start


def explain(api: Api, headers: dict[str, str], human: str, repo: str = "widgets", access: str = "merge") -> httpx.Response:
    return api.client.post("/v1/policy/explain", headers=headers, json={
        "human": human, "agent": "claude-code", "scope": SCOPE, "resource": f"github://acme/{repo}", "access": access})


# Ways of naming alice that are not bob: every one is someone else to bob, none may leak her role.
NOT_BOB = ["alice@example.com", "ALICE@example.com", "Alice@Example.COM", "carol@example.com",
           "alice@example.com ", " alice@example.com", "alice@example.com\u200b", "alice\u0430@example.com",
           "bob@example.com.evil", "bob@example.co", "bob+x@example.com", "b\u00f6b@example.com", "admin",
           "admin@example.com", "*", "alice-gh", "bob@example.com\u202e"]


def test_explain_for_another_human_is_refused_for_humans_and_reveals_nothing(live_broker, gh) -> None:
    with live_broker() as api:
        bob = api.as_human("bob@example.com")
        for human in NOT_BOB:
            r = explain(api, bob, human)
            assert r.status_code in (400, 403, 422), (human, r.text)
            body = r.json()
            if r.status_code == 403:
                assert body["error"]["code"] == "explain-other-human-forbidden", human
            dump = json.dumps(body)
            assert "decision" not in body and "maintain" not in dump and "alice-gh" not in dump, human
        assert gh.calls(PERMISSION_ENDPOINT) == 0  # nothing was asked on anyone's behalf

        # A session bob does not manage is as unknown as a missing one.
        alice_session = api.new_session(human="alice@example.com", scope=SCOPE, task_id="oracle")
        r = api.client.post("/v1/policy/explain", headers=bob, json={
            "session_id": alice_session["session_id"], "resource": "github://acme/widgets", "access": "merge"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "session-not-found"
        assert gh.calls(PERMISSION_ENDPOINT) == 0


def test_broker_cli_policy_explain_for_another_human_is_refused(live_broker, gh, monkeypatch) -> None:
    from typer.testing import CliRunner

    from broker.cli.main import app as cli

    with live_broker() as api:
        monkeypatch.setenv("BROKER_URL", api.base_url)
        monkeypatch.setenv("BROKER_TOKEN", api.secrets.human_tokens["bob@example.com"])
        args = ["policy", "explain", "--resource", "github://acme/widgets", "--access", "merge",
                "--agent", "claude-code", "--scope", "github://acme/**=*"]
        other = CliRunner().invoke(cli, [*args, "--human", "alice@example.com"])
        assert other.exit_code == 1
        assert "error: explain-other-human-forbidden" in other.output and "maintain" not in other.output
        own = CliRunner().invoke(cli, [*args, "--human", "bob@example.com"])
        assert own.exit_code == 0, own.output
        assert "live source github: deny" in own.output and "bob-gh has role read" in own.output
        assert gh.calls(PERMISSION_ENDPOINT) == 1


def test_explain_for_oneself_and_by_admins_still_works(live_broker, gh) -> None:
    with live_broker() as api:
        for who in ("bob@example.com", "BOB@example.com"):  # bob himself, however he writes it
            r = explain(api, api.as_human("bob@example.com"), who, access="read")
            assert r.status_code == 200, r.text
            live = next(layer for layer in r.json()["decision"]["layers"] if layer["layer"] == "human_live")
            assert live["evidence"]["evidence"]["role_name"] == "read"
        admin = explain(api, api.as_admin(), "alice@example.com")
        assert admin.status_code == 200, admin.text
        assert admin.json()["decision"]["result"] == "allow"
        live = next(layer for layer in admin.json()["decision"]["layers"] if layer["layer"] == "human_live")
        assert live["evidence"]["evidence"]["role_name"] == "maintain"


def test_the_live_budget_refuses_one_session_past_its_limit_and_not_the_others(live_broker, gh) -> None:
    with live_broker(budget=3) as api:
        greedy = api.new_session(human="alice@example.com", scope=SCOPE, task_id="greedy")
        modest = api.new_session(human="alice@example.com", scope=SCOPE, task_id="modest")
        for repo, access in QUESTIONS[:3]:
            r = api.request(greedy, {"resource": f"github://acme/{repo}", "access": access})
            assert r.status_code == 201, r.text
        assert gh.calls(PERMISSION_ENDPOINT) == 3
        repo, access = QUESTIONS[3]
        refused = api.request(greedy, {"resource": f"github://acme/{repo}", "access": access})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "live-check-budget-exceeded"
        assert int(refused.headers["Retry-After"]) >= 1
        assert gh.calls(PERMISSION_ENDPOINT) == 3  # refused before the backend
        # What is cached costs nothing: the spent session still gets what it already asked.
        assert api.request(greedy, {"resource": "github://acme/widgets", "access": "read"}).status_code == 201
        # Another session of the same human has its own budget, untouched.
        for repo, access in QUESTIONS[3:]:
            r = api.request(modest, {"resource": f"github://acme/{repo}", "access": access})
            assert r.status_code == 201, r.text
        assert gh.calls(PERMISSION_ENDPOINT) == 6
        # Explain spends the explaining human's budget, not the sessions'.
        bob = api.as_human("bob@example.com")
        for repo, access in QUESTIONS[:3]:
            assert explain(api, bob, "bob@example.com", repo, access).status_code == 200
        repo, access = QUESTIONS[3]
        spent = explain(api, bob, "bob@example.com", repo, access)
        assert spent.status_code == 429 and spent.json()["error"]["code"] == "live-check-budget-exceeded"
        assert "Retry-After" in spent.headers and "decision" not in spent.json()
        assert gh.calls(PERMISSION_ENDPOINT) == 9
        assert explain(api, api.as_admin(), "alice@example.com", "widgets", "merge").status_code == 200
        assert gh.calls(PERMISSION_ENDPOINT) == 10
