"""The human in the loop, end to end as people and programs would do it, against a real IdP.

Every party is its own process: `broker-cli serve` (configured for the OpenID provider, with a
notification receiver), the OpenID provider (npm's oidc-provider), the agent (a Python process
that asks, long-polls and retries over HTTP), the approver and the delegating human (each with
their own `broker-cli` and config directory, signed in by the device flow). The orchestrator
provisions with a client-credentials token from the same IdP.

bob is a maintainer only through his IdP's groups claim (the policy's `maintainers` group has no
members), so the approval also proves that token groups reach the approver rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import STANDARD_TIERS, BrokerSecrets
from tests.support.oidc import ORCHESTRATOR_CLIENT_ID, OidcProvider, cli_login
from tests.support.processes import BROKER_CLI, BrokerProcess, _die_with_parent, migrate, terminate
from tests.support.receiver import Receiver

POLICY = STANDARD_TIERS + """\
resources:
  - match: "jwt://payments-api"
    provider: native
    access:
      read:   {tier: read, scope: "ledger:read"}
      deploy: {tier: merge_deploy, scope: "ledger:deploy"}
humans:
  alice@example.com:
    grants: [{resource: "jwt://payments-api", access: [read, deploy]}]
  bob@example.com:
    grants: [{resource: "jwt://payments-api", access: [read, deploy]}]
groups:
  maintainers:
    members: []
agents:
  claude-code: {max_tier: merge_deploy}
"""

# The agent: asks, waits on the approval without a tight loop, retries with approval_id.
# One JSON line per step on stdout, so the test (and a person watching) sees where it is.
AGENT = r"""
import json, os, sys, httpx
url, auth = os.environ["BROKER_URL"], {"Authorization": "Bearer " + os.environ["AGENT_TOKEN"]}
ask = {"resource": "jwt://payments-api", "access": "deploy", "purpose": "deploy 1.4.2 to prod",
       "tool": "deploy-cli", "parameters": {"env": "prod", "version": "1.4.2"}}
def say(step, r):
    print(json.dumps({"step": step, "status": r.status_code, "body": r.json()}), flush=True)
r = httpx.post(url + "/v1/capabilities", json=ask, headers=auth, timeout=30)
say("requested", r)
if r.status_code != 202:
    sys.exit(1)
aid = r.json()["approval_id"]
while True:
    r = httpx.get(url + "/v1/approvals/" + aid, params={"wait": 60}, headers=auth, timeout=90)
    if r.status_code != 200 or r.json()["status"] != "pending":
        break
say("decided", r)
r = httpx.post(url + "/v1/capabilities", json={**ask, "approval_id": aid}, headers=auth, timeout=30)
say("minted", r)
"""


@pytest.fixture
def served(tmp_path: Path, database_url: str, oidc_provider: OidcProvider, receiver: Receiver) -> Iterator[BrokerProcess]:
    env = BrokerSecrets().env(tmp_path, database_url, POLICY, **oidc_provider.broker_env(),
                              BROKER_APPROVAL_WEBHOOK_URLS=receiver.url,
                              BROKER_APPROVAL_WEBHOOK_SECRET=receiver.secret.decode())
    migrate(env)
    proc = BrokerProcess(env, tmp_path)
    proc.env["BROKER_ISSUER"] = proc.base_url
    with proc:
        yield proc


def person(tmp_path: Path, name: str, broker_url: str) -> dict[str, str]:
    home = tmp_path / name
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**base, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "BROKER_URL": broker_url,
            "BROKER_STATE_DIR": str(home / "no-local-broker")}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BROKER_CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_merge_waits_for_a_person_who_signs_in_and_approves(
    tmp_path: Path, served: BrokerProcess, oidc_provider: OidcProvider, receiver: Receiver
) -> None:
    url = served.base_url
    # The orchestrator: a client-credentials token from the IdP provisions alice's task.
    orchestrator = oidc_provider.client_credentials(ORCHESTRATOR_CLIENT_ID)
    r = httpx.post(url + "/v1/sessions", headers={"Authorization": f"Bearer {orchestrator}"}, timeout=30, json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "PAY-1729", "ttl_seconds": 1800,
        "scope": [{"resource": "jwt://payments-api", "access": ["read", "deploy"]}]})
    assert r.status_code == 201, r.text
    session = r.json()

    # The agent asks to deploy: merge_deploy needs a maintainer's approval, so it waits.
    agent = subprocess.Popen([sys.executable, "-c", AGENT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "BROKER_URL": url, "AGENT_TOKEN": session["session_token"]},
                             preexec_fn=_die_with_parent)
    try:
        assert agent.stdout is not None
        requested = json.loads(agent.stdout.readline())
        assert requested["status"] == 202, requested
        assert requested["body"]["status"] == "pending_approval"
        aid = requested["body"]["approval_id"]

        # bob signs in by the device flow on his own machine and sees what waits for him.
        bob = person(tmp_path, "bob", url)
        signed_in = cli_login(oidc_provider, bob, "bob")
        assert signed_in.returncode == 0, signed_in.stdout + signed_in.stderr
        assert "bob@example.com (human)" in signed_in.stdout and "maintainers" in signed_in.stdout
        listed = cli(bob, "approvals", "list")
        assert listed.returncode == 0, listed.stderr
        assert aid in listed.stdout and "may approve" in listed.stdout, listed.stdout
        waiting = json.loads(cli(bob, "approvals", "list", "--json").stdout)
        mine = next(a for a in waiting if a["approval_id"] == aid)
        assert mine["parameters"] == {"env": "prod", "version": "1.4.2"} and mine["you_may_approve"] is True
        approved = cli(bob, "approve", aid, "--reason", "release notes reviewed")
        assert approved.returncode == 0, approved.stderr

        # The agent's long poll returns, and its retry with the approval mints.
        out, err = agent.communicate(timeout=120)
    finally:
        terminate(agent)
    steps = {s["step"]: s for s in map(json.loads, out.splitlines())}
    assert steps["decided"]["body"]["status"] == "approved", (out, err)
    assert steps["minted"]["status"] == 201, (out, err)
    capability_id = steps["minted"]["body"]["capability_id"]
    assert steps["minted"]["body"]["credential"]["type"] == "jwt"

    # alice, the delegating human, signs in and reads her task's audit trail.
    alice = person(tmp_path, "alice", url)
    assert cli_login(oidc_provider, alice, "alice").returncode == 0
    tail = cli(alice, "audit", "tail", "--session", session["session_id"], "--limit", "50", "--json")
    assert tail.returncode == 0, tail.stderr
    records = [json.loads(line) for line in tail.stdout.splitlines()]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_type.setdefault(record["type"], []).append(record)
    pending, decided, minted = by_type["capability.pending"][0], by_type["approval.decided"][0], by_type["capability.minted"][0]
    assert pending["seq"] < decided["seq"] < minted["seq"]
    # Linked by ids: the request names the approval, the decision names it and who decided,
    # the mint names the approval and is the capability the agent received.
    assert pending["jit_grant"]["approval_id"] == aid
    assert decided["detail"]["approval_id"] == aid and decided["detail"]["decided_by"] == "bob@example.com"
    assert aid in json.dumps(minted) and capability_id in json.dumps(minted)
    assert "human:bob@example.com" in json.dumps(decided)

    # The notification receiver got both events, each signed (it verified X-Broker-Signature).
    events = receiver.wait_for(2, timeout=60)
    kinds = [e["_headers"]["event"] for e in events if aid in json.dumps(e)]
    assert kinds == ["approval.requested", "approval.decided"], events
    assert receiver.rejected == []
    decided_event = next(e for e in events if e["_headers"]["event"] == "approval.decided")
    assert '"bob@example.com"' in json.dumps(decided_event) and '"1.4.2"' in json.dumps(decided_event)
