"""Issue 13's acceptance: the human's live GitHub permission, through a real broker and the GitHub stand-in.

The broker runs over real HTTP (uvicorn), mints real installation tokens at the stand-in and
asks the stand-in's "Get repository permissions for a user" endpoint; the stand-in's
collaborators are changed while the test runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.github_standin import GitHubStandIn

PERMISSION_ENDPOINT = "GET /repos/{owner}/{repo}/collaborators/{username}/permission"
TOKEN_ENDPOINT = "POST /app/installations/{installation_id}/access_tokens"

POLICY = STANDARD_TIERS + """\
resources:
  - match: "github://acme/*"
    provider: github
    access:
      read:  {tier: read,  permissions: {contents: read}}
      write: {tier: write, permissions: {contents: write}}
      merge: {tier: write, permissions: {contents: write, pull_requests: write}}
    human_permission:
      source: github
      require:
        read:  [read, triage, write, maintain, admin]
        write: [write, maintain, admin]
        merge: [maintain, admin]
humans:
  alice@example.com:
    github_login: alice-gh
    grants: [{resource: "github://acme/*", access: [read, write, merge]}]
  bob@example.com:
    github_login: bob-gh
    grants: [{resource: "github://acme/*", access: [read]}]
  carol@example.com:
    grants: [{resource: "github://acme/*", access: [read]}]
agents:
  claude-code: {max_tier: review}
"""
SCOPE = [{"resource": "github://acme/**", "access": ["*"]}]


@pytest.fixture
def gh(github_standin: GitHubStandIn) -> GitHubStandIn:
    github_standin.reset()
    return github_standin


@pytest.fixture
def live_broker(database_url: str, tmp_path: Path, gh: GitHubStandIn) -> Callable[..., Any]:
    @contextmanager
    def start(*, cache_seconds: float = 60.0, recheck_seconds: float = 300.0, sweeper: bool = False) -> Iterator[Api]:
        secrets_ = BrokerSecrets()
        broker = build_broker(
            tmp_path, database_url, secrets_, POLICY,
            github_api_url=gh.url, github_app_id=gh.app_id, github_private_key_file=gh.private_key_path,
            provider_timeout_seconds=5.0, permission_cache_seconds=cache_seconds,
            permission_recheck_seconds=recheck_seconds,
        )
        with LiveServer(broker, sweeper=sweeper) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
            yield Api(server.base_url, secrets_, broker, client)

    return start


def _ask(api: Api, session: dict[str, Any], access: str, repo: str = "widgets") -> httpx.Response:
    return api.request(session, {"resource": f"github://acme/{repo}", "access": access})


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll for a state (never a timed assertion: the bound only stops a hung test)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.1)


def _audit(api: Api, session_id: str) -> list[dict[str, Any]]:
    r = api.client.get("/v1/audit", params={"session_id": session_id, "limit": 1000}, headers=api.as_admin())
    assert r.status_code == 200, r.text
    return list(r.json()["records"])


# --- 1. lose the permission: the next request is denied, the live capability revoked -----------


def test_losing_the_github_permission_denies_the_next_request_and_revokes_the_live_capability(live_broker, gh):
    gh.set_collaborator("acme", "widgets", "alice-gh", "write")
    with live_broker(cache_seconds=0, recheck_seconds=0.5, sweeper=True) as api:
        session = api.new_session(human="alice@example.com", scope=SCOPE)
        r = _ask(api, session, "write")
        assert r.status_code == 201, r.text
        cap = r.json()
        token = cap["credential"]["token"]
        assert cap["credential"]["permissions"] == {"contents": "write"}
        assert gh.tokens[token].live()

        gh.remove_collaborator("acme", "widgets", "alice-gh")

        denied = _ask(api, session, "write")
        assert denied.status_code == 403, denied.text
        error = denied.json()["error"]
        assert error["code"] == "human-lacks-permission"
        assert error["message"].startswith("denied by the live permission source github: human-lacks-permission")
        decision = error["decision"]
        assert decision["matched_rule"] == "resources[0].human_permission"
        assert decision["human_permission"]["source"] == "github"
        assert decision["human_permission"]["verdict"] == "deny"
        assert decision["human_permission"]["evidence"]["permission"] == "none"
        live_layer = next(layer for layer in decision["layers"] if layer["layer"] == "human_live")
        assert live_layer["verdict"] == "deny" and live_layer["detail"].startswith("github: ")
        grants_layer = next(layer for layer in decision["layers"] if layer["layer"] == "human")
        assert grants_layer["verdict"] == "allow"  # the file still says yes; the truth says no

        def revoked() -> bool:
            got = api.client.get(f"/v1/capabilities/{cap['capability_id']}", headers=api.as_admin())
            return bool(got.json()["status"] == "revoked")

        _wait_for(revoked, "the re-check to revoke the capability")
        view = api.client.get(f"/v1/capabilities/{cap['capability_id']}", headers=api.as_admin()).json()
        assert view["status_reason"] == "human-permission-lost"
        assert not gh.tokens[token].live()  # revoked at GitHub, not only in the broker

        records = _audit(api, session["session_id"])
        lost = [r for r in records if r["type"] == "capability.permission_lost"]
        assert len(lost) == 1
        assert lost[0]["jit_grant"]["capability_id"] == cap["capability_id"]
        assert lost[0]["policy_decision"]["human_permission"]["source"] == "github"
        assert lost[0]["policy_decision"]["human_permission"]["cached"] is False
        assert "no longer allows write" in lost[0]["detail"]["why"]
        revoked_records = [r for r in records if r["type"] == "capability.revoked"]
        assert revoked_records and revoked_records[-1]["request"]["reason"] == "human-permission-lost"
        denied_records = [r for r in records if r["type"] == "capability.denied"]
        assert denied_records[-1]["policy_decision"]["human_permission"]["verdict"] == "deny"


# --- 2. never beyond either: the grant bounds the live answer, the live answer bounds the grant ---


def test_a_policy_grant_wider_than_the_live_permission_mints_only_what_github_allows(live_broker, gh):
    gh.set_collaborator("acme", "widgets", "alice-gh", "triage")  # the file grants read, write, merge
    with live_broker() as api:
        session = api.new_session(human="alice@example.com", scope=SCOPE)
        read = _ask(api, session, "read")
        assert read.status_code == 201, read.text
        assert read.json()["credential"]["permissions"] == {"contents": "read"}
        for access in ("write", "merge"):
            r = _ask(api, session, access)
            assert r.status_code == 403, r.text
            assert r.json()["error"]["code"] == "human-lacks-permission"
            assert r.json()["error"]["decision"]["matched_rule"] == "resources[0].human_permission"
        minted = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]},
                                headers=api.as_admin()).json()
        assert [(c["access"], c["status"]) for c in minted] == [("read", "active")]
        issued = [t.permissions for t in gh.tokens.values() if "contents" in t.permissions]
        assert issued == [{"contents": "read"}]  # GitHub never issued a write token


def test_a_live_permission_wider_than_the_grant_mints_only_what_the_policy_grants(live_broker, gh):
    gh.set_collaborator("acme", "widgets", "bob-gh", "admin")  # the file grants bob read only
    with live_broker() as api:
        session = api.new_session(human="bob@example.com", scope=SCOPE)
        assert _ask(api, session, "read").status_code == 201
        for access in ("write", "merge"):
            r = _ask(api, session, access)
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["code"] == "human-lacks-permission"
            assert error["decision"]["matched_rule"] == "humans.bob@example.com"  # the grant, not the source
        minted = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]},
                                headers=api.as_admin()).json()
        assert [c["access"] for c in minted] == ["read"]
        assert [t.permissions for t in gh.tokens.values() if "contents" in t.permissions] == [{"contents": "read"}]


def test_a_human_with_no_github_login_is_denied_by_the_live_layer(live_broker, gh):
    with live_broker() as api:
        session = api.new_session(human="carol@example.com", scope=SCOPE)
        r = _ask(api, session, "read")
        assert r.status_code == 403
        decision = r.json()["error"]["decision"]
        assert r.json()["error"]["code"] == "human-lacks-permission"
        assert "no GitHub login" in decision["human_permission"]["evidence"]["summary"]
        assert gh.calls(PERMISSION_ENDPOINT) == 0  # nothing to ask GitHub about


# --- 3. the source down: fail closed, nothing minted; back up: allowed ----------------------------


def test_an_unreachable_source_denies_until_it_answers_again_and_nothing_is_minted_meanwhile(live_broker, gh):
    gh.set_collaborator("acme", "widgets", "alice-gh", "write")
    gh.outage("GET", "/repos/acme/widgets/collaborators/", 503)
    with live_broker() as api:
        session = api.new_session(human="alice@example.com", scope=SCOPE)
        for _ in range(2):
            r = _ask(api, session, "write")
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["code"] == "human-permission-unavailable"
            assert error["decision"]["human_permission"]["verdict"] == "unknown"
            assert error["decision"]["human_permission"]["evidence"]["error"] == "provider-unavailable"
        assert gh.calls(PERMISSION_ENDPOINT) == 2  # an unknown answer is never cached
        assert api.client.get("/v1/capabilities", params={"session_id": session["session_id"]},
                              headers=api.as_admin()).json() == []
        assert not [t for t in gh.tokens.values() if "contents" in t.permissions]  # no credential at GitHub

        gh.end_outage()
        r = _ask(api, session, "write")
        assert r.status_code == 201, r.text
        records = _audit(api, session["session_id"])
        decided = [r["policy_decision"]["human_permission"] for r in records
                   if r["type"] in ("capability.denied", "capability.minted")]
        assert [d["verdict"] for d in decided] == ["unknown", "unknown", "allow"]


# --- 4. a burst costs one backend call ------------------------------------------------------------


def test_a_burst_of_100_requests_for_one_human_and_repository_costs_one_backend_call(live_broker, gh):
    gh.set_collaborator("acme", "widgets", "alice-gh", "write")
    with live_broker(cache_seconds=60) as api:
        sessions = [api.new_session(human="alice@example.com", scope=SCOPE, task_id=f"burst-{i}") for i in range(10)]

        def one(i: int) -> int:
            with httpx.Client(base_url=api.base_url, timeout=120) as client:
                r = client.post("/v1/capabilities", json={"purpose": "burst", "resource": "github://acme/widgets",
                                                          "access": "read"},
                                headers={"Authorization": f"Bearer {sessions[i % 10]['session_token']}"})
                return r.status_code

        with ThreadPoolExecutor(max_workers=32) as pool:
            statuses = list(pool.map(one, range(100)))
        assert statuses == [201] * 100
        assert gh.calls(PERMISSION_ENDPOINT) == 1
        records = _audit(api, sessions[0]["session_id"])
        cached = [r["policy_decision"]["human_permission"]["cached"] for r in records if r["type"] == "capability.minted"]
        assert len(cached) == 10
        total_cached = sum(
            r["policy_decision"]["human_permission"]["cached"]
            for s in sessions for r in _audit(api, s["session_id"]) if r["type"] == "capability.minted"
        )
        assert total_cached == 99  # one request asked GitHub; 99 were answered without a call


# --- policy explain shows the live layer ---------------------------------------------------------


def test_policy_explain_shows_the_live_layer_and_its_evidence(live_broker, gh):
    gh.set_collaborator("acme", "widgets", "alice-gh", "maintain")
    with live_broker() as api:
        body = {"human": "alice@example.com", "agent": "claude-code", "scope": SCOPE,
                "resource": "github://acme/widgets", "access": "merge"}
        r = api.client.post("/v1/policy/explain", json=body, headers=api.as_admin())
        assert r.status_code == 200, r.text
        decision = r.json()["decision"]
        assert decision["result"] == "allow"
        live = next(layer for layer in decision["layers"] if layer["layer"] == "human_live")
        assert live["verdict"] == "allow"
        assert live["evidence"]["evidence"]["role_name"] == "maintain"
        assert live["evidence"]["evidence"]["permission"] == "write"  # GitHub's legacy base role
        assert live["evidence"]["evidence"]["matched"] == ["maintain"]
        assert decision["human_permission"]["cached"] is False
        again = api.client.post("/v1/policy/explain", json=body, headers=api.as_admin()).json()["decision"]
        assert again["human_permission"]["cached"] is True
        assert gh.calls(PERMISSION_ENDPOINT) == 1
        ready = api.client.get("/readyz").json()
        assert ready["checks"]["permission_sources"]["github"]["ok"] is True


def test_broker_cli_policy_explain_prints_the_live_verdict_and_evidence(live_broker, gh, monkeypatch):
    from typer.testing import CliRunner

    from broker.cli.main import app as cli

    gh.set_collaborator("acme", "widgets", "alice-gh", "triage")
    with live_broker() as api:
        monkeypatch.setenv("BROKER_URL", api.base_url)
        monkeypatch.setenv("BROKER_TOKEN", api.secrets.admin_token)
        args = ["policy", "explain", "--resource", "github://acme/widgets", "--access", "write",
                "--human", "alice@example.com", "--agent", "claude-code", "--scope", "github://acme/**=*"]
        out = CliRunner().invoke(cli, args)
        assert out.exit_code == 0, out.output
        assert out.output.startswith("DENY: human-lacks-permission (resources[0].human_permission)")
        assert "  human_live  deny" in out.output
        assert "live source github: deny: GitHub: alice-gh has role triage (permission read) on acme/widgets" in out.output
        as_json = CliRunner().invoke(cli, [*args, "--json"])
        assert '"role_name": "triage"' in as_json.output


# --- the re-check: only what was lost, once per interval, once across replicas --------------------


def _age_leases(broker: Any, seconds: int) -> None:
    """Move every lease's mint and last check into the past (instead of sleeping through an interval)."""
    from datetime import timedelta

    from sqlmodel import select

    from broker.db import transaction
    from broker.models import Lease

    with transaction(broker.engine) as db:
        for lease in db.exec(select(Lease)).all():
            for name in ("created_at", "minted_at", "live_checked_at"):
                if getattr(lease, name) is not None:
                    setattr(lease, name, getattr(lease, name) - timedelta(seconds=seconds))
            db.add(lease)


@pytest.mark.postgres
def test_two_replicas_recheck_each_lease_once_and_revoke_only_what_was_lost(postgres_url: str, tmp_path: Path,
                                                                            gh: GitHubStandIn):
    from broker.lifecycle.recheck import recheck_once

    gh.set_collaborator("acme", "widgets", "alice-gh", "write")
    gh.set_collaborator("acme", "gadgets", "alice-gh", "write")
    secrets_ = BrokerSecrets()
    settings = dict(github_api_url=gh.url, github_app_id=gh.app_id, github_private_key_file=gh.private_key_path,
                    provider_timeout_seconds=5.0, permission_cache_seconds=60, permission_recheck_seconds=30)
    first = build_broker(tmp_path, postgres_url, secrets_, POLICY, **settings)
    second = build_broker(tmp_path, postgres_url, secrets_, POLICY, **settings)
    with LiveServer(first) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        api = Api(server.base_url, secrets_, first, client)
        sessions = [api.new_session(human="alice@example.com", scope=SCOPE, task_id=f"r-{i}") for i in range(3)]
        widgets = [_ask(api, s, "write").json()["capability_id"] for s in sessions for _ in range(4)]
        gadgets = [_ask(api, s, "write", repo="gadgets").json()["capability_id"] for s in sessions]
        _age_leases(first, 60)  # minted a minute ago: due for the 30 s re-check

        asked_before = gh.calls(PERMISSION_ENDPOINT)
        kept = recheck_once(first)
        assert kept.checked == 15 and kept.receipts == []
        assert gh.calls(PERMISSION_ENDPOINT) - asked_before == 2  # one per (human, repository, access), cache bypassed
        assert recheck_once(first).checked == 0  # checked: not due again within the interval

        gh.remove_collaborator("acme", "widgets", "alice-gh")
        _age_leases(first, 60)  # and checked a minute ago: due again
        with ThreadPoolExecutor(max_workers=2) as pool:
            reports = list(pool.map(recheck_once, [first, second]))
        assert sum(r.checked for r in reports) == 15  # each lease by exactly one replica
        receipts = [receipt for r in reports for receipt in r.receipts]
        assert sorted(r["capability_id"] for r in receipts) == sorted(widgets)
        assert {r["status"] for r in receipts} == {"revoked"}
        assert {r["source"] for r in receipts} == {"github"}
        statuses = {c["capability_id"]: c["status"] for s in sessions for c in api.client.get(
            "/v1/capabilities", params={"session_id": s["session_id"]}, headers=api.as_admin()).json()}
        assert all(statuses[c] == "revoked" for c in widgets)
        assert all(statuses[c] == "active" for c in gadgets)
        lost = [r for s in sessions for r in _audit(api, s["session_id"]) if r["type"] == "capability.permission_lost"]
        assert sorted(r["jit_grant"]["capability_id"] for r in lost) == sorted(widgets)  # one record each, no twice
    second.engine.dispose()
    second.permissions.close()
