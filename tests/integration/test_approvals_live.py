"""An approver must hold the access at its live source too: the same GitHub permission check the
request's own human passes (issue 13's `human_permission`), through the GitHub stand-in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.github_standin import GitHubStandIn

POLICY = STANDARD_TIERS + """\
resources:
  - match: "github://acme/*"
    provider: github
    access:
      read:  {tier: read,  permissions: {contents: read}}
      merge: {tier: merge_deploy, permissions: {contents: write, pull_requests: write}}
    human_permission:
      source: github
      require:
        read:  [read, triage, write, maintain, admin]
        merge: [maintain, admin]
humans:
  alice@example.com:
    github_login: alice-gh
    grants: [{resource: "github://acme/*", access: [read, merge]}]
  bob@example.com:
    github_login: bob-gh
    groups: [maintainers]
    grants: [{resource: "github://acme/*", access: [read, merge]}]
agents:
  claude-code: {max_tier: merge_deploy}
"""
MERGE = {"resource": "github://acme/widgets", "access": "merge", "purpose": "merge #42", "parameters": {"pr": 42}}


@pytest.fixture
def api(database_url: str, tmp_path: Path, github_standin: GitHubStandIn) -> Iterator[Api]:
    github_standin.reset()
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, POLICY, github_api_url=github_standin.url,
                          github_app_id=github_standin.app_id, github_private_key_file=github_standin.private_key_path,
                          provider_timeout_seconds=5.0, permission_cache_seconds=0)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield Api(server.base_url, secrets_, broker, client)


def test_approver_without_the_live_permission_is_refused(api: Api, github_standin: GitHubStandIn) -> None:
    github_standin.set_collaborator("acme", "widgets", "alice-gh", "maintain")
    github_standin.set_collaborator("acme", "widgets", "bob-gh", "write")  # the file says merge; GitHub says no
    session = api.new_session(scope=[{"resource": "github://acme/**", "access": ["*"]}])
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    pending = api.client.post("/v1/capabilities", headers=agent, json=MERGE)
    assert pending.status_code == 202, pending.text
    aid = pending.json()["approval_id"]
    bob = api.as_human("bob@example.com")
    refused = api.client.post(f"/v1/approvals/{aid}/approve", headers=bob)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "approver-lacks-permission"
    assert "github" in refused.json()["error"]["message"]
    grant = api.client.post("/v1/grants", headers=bob, json={"session_id": session["session_id"],
                                                              "resource": "github://acme/widgets", "access": "merge",
                                                              "ttl_seconds": 300})
    assert grant.status_code == 403 and grant.json()["error"]["code"] == "approver-lacks-permission"

    github_standin.set_collaborator("acme", "widgets", "bob-gh", "maintain")
    approved = api.client.post(f"/v1/approvals/{aid}/approve", headers=bob)
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    minted = api.client.post("/v1/capabilities", headers=agent, json={**MERGE, "approval_id": aid})
    assert minted.status_code == 201, minted.text
    assert minted.json()["credential"]["permissions"] == {"contents": "write", "pull_requests": "write"}
