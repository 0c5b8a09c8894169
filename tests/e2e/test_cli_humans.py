"""The human side as a person meets it on the embedded default: `broker-cli dev` writes a local
human token for dev@example.com (a maintainer in the example policy), and `broker-cli approvals
list / show / approve / deny / grant` drive the approval and grant flow over REST, with the
agent's long poll answered and its retry minting."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import free_port
from tests.support.processes import BROKER_CLI, broker_environ, wait_until_ready

RELEASE = {"resource": "jwt://payments-api", "access": "release", "purpose": "cut release 2.1",
           "tool": "release-cli", "parameters": {"tag": "v2.1.0"}}


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, str]]]:
    env = broker_environ()
    port = free_port()
    log = tmp_path / "dev.log"
    proc = subprocess.Popen([BROKER_CLI, "dev", "--port", str(port)], env=env, cwd=tmp_path, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, log, within=90)
        assert "human token" in log.read_text()
        yield url, tmp_path, {**env, "BROKER_URL": url}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BROKER_CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=90)


def provision(url: str, state: Path, human: str) -> tuple[dict[str, Any], dict[str, str]]:
    orch = (state / "orchestrator-key").read_text().strip()
    r = httpx.post(url + "/v1/sessions", headers={"Authorization": f"Bearer {orch}"}, json={
        "human": human, "agent": "claude-code", "task_id": f"try-{human}", "ttl_seconds": 900,
        "scope": [{"resource": "jwt://payments-api", "access": ["read", "release"]}]})
    assert r.status_code == 201, r.text
    return r.json(), {"Authorization": f"Bearer {r.json()['session_token']}"}


def test_approve_from_the_cli_answers_the_agents_long_poll(dev: tuple[str, Path, dict[str, str]]) -> None:
    url, cwd, env = dev
    state = cwd / ".broker"
    assert oct((state / "human-token").stat().st_mode)[-3:] == "600"
    session, agent = provision(url, state, "alice@example.com")
    pending = httpx.post(url + "/v1/capabilities", headers=agent, json=RELEASE)
    assert pending.status_code == 202, pending.text
    aid = pending.json()["approval_id"]

    listed = cli(env, cwd, "approvals", "list")
    assert listed.returncode == 0, listed.stderr
    assert aid in listed.stdout and "release on jwt://payments-api" in listed.stdout and "may approve" in listed.stdout
    shown = cli(env, cwd, "approvals", "show", aid)
    assert 'parameters: {"tag":"v2.1.0"}' in shown.stdout and "release-cli" in shown.stdout  # canonical JSON, as bound
    assert "Approving lets claude-code (acting for alice@example.com) mint one `release` credential" in shown.stdout
    assert f"binding:    {pending.json()['binding_message'].rsplit('Binding ', 1)[1].rstrip('.')}" in shown.stdout
    as_json = json.loads(cli(env, cwd, "approvals", "list", "--json").stdout)
    assert [a["approval_id"] for a in as_json] == [aid]

    answer: dict[str, httpx.Response] = {}
    poll = threading.Thread(target=lambda: answer.update(
        r=httpx.get(url + f"/v1/approvals/{aid}", params={"wait": 60}, headers=agent, timeout=90)))
    poll.start()
    # The admin token is not a person: refused, with what to do next.
    as_admin = cli(env, cwd, "--as", "admin", "approve", aid)
    assert as_admin.returncode == 1 and "approver-must-be-human" in as_admin.stderr and "next:" in as_admin.stderr
    approved = cli(env, cwd, "approve", aid, "--reason", "tag is signed")
    assert approved.returncode == 0, approved.stderr
    assert "approved" in approved.stdout and "retry" in approved.stdout
    poll.join(90)
    assert answer["r"].json()["status"] == "approved"
    minted = httpx.post(url + "/v1/capabilities", headers=agent, json={**RELEASE, "approval_id": aid})
    assert minted.status_code == 201, minted.text

    again = cli(env, cwd, "approve", aid)
    assert again.returncode == 1 and "approval-not-pending" in again.stderr
    missing = cli(env, cwd, "approvals", "show", "apr_" + "0" * 32)
    assert missing.returncode == 3 and "next:" in missing.stderr
    tail = cli(env, cwd, "audit", "tail", "--session", session["session_id"], "--limit", "50")
    assert tail.returncode == 0, tail.stderr
    types = [line.split()[2] for line in tail.stdout.splitlines()]
    assert types.index("capability.pending") < types.index("approval.decided") < types.index("capability.minted")


def test_self_approval_deny_and_grant_from_the_cli(dev: tuple[str, Path, dict[str, str]]) -> None:
    url, cwd, env = dev
    state = cwd / ".broker"
    # dev@example.com delegates here: their own agent's request is not theirs to approve.
    _, own_agent = provision(url, state, "dev@example.com")
    own_id = httpx.post(url + "/v1/capabilities", headers=own_agent, json=RELEASE).json()["approval_id"]
    refused = cli(env, cwd, "approve", own_id)
    assert refused.returncode == 1 and "self-approval-forbidden" in refused.stderr
    assert "next: ask another approver" in refused.stderr
    assert "own agent" in cli(env, cwd, "approvals", "show", own_id).stdout
    session, agent = provision(url, state, "alice@example.com")
    aid = httpx.post(url + "/v1/capabilities", headers=agent, json=RELEASE).json()["approval_id"]
    denied = cli(env, cwd, "deny", aid, "--reason", "wrong tag", "--json")
    assert denied.returncode == 0 and json.loads(denied.stdout)["status"] == "denied"
    retry = httpx.post(url + "/v1/capabilities", headers=agent, json={**RELEASE, "approval_id": aid})
    assert retry.status_code == 403 and retry.json()["error"]["code"] == "approval-denied"

    usage = cli(env, cwd, "grant", "--session", session["session_id"])
    assert usage.returncode == 2 and "--resource" in usage.stderr
    granted = cli(env, cwd, "grant", "--session", session["session_id"], "--resource", "jwt://payments-api",
                  "--access", "release", "--ttl", "10m", "--uses", "1")
    assert granted.returncode == 0, granted.stderr
    assert "pre-approved" in granted.stdout
    assert re.search(r"1 use, until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", granted.stdout.strip()), granted.stdout
    minted = httpx.post(url + "/v1/capabilities", headers=agent, json={**RELEASE, "parameters": {"tag": "v2.1.1"}})
    assert minted.status_code == 201, minted.text
    assert httpx.post(url + "/v1/capabilities", headers=agent, json=RELEASE).status_code == 202  # used up

    pending = httpx.post(url + "/v1/capabilities", headers=agent, json={**RELEASE, "purpose": "p2",
                                                                        "parameters": {"tag": "v2.2"}}).json()
    by_id = cli(env, cwd, "grant", pending["approval_id"])
    assert by_id.returncode == 0 and "approved" in by_id.stdout
    logged_out = cli({**env, "BROKER_TOKEN": "not-a-token"}, cwd, "approvals", "list")
    assert logged_out.returncode == 4 and "next:" in logged_out.stderr
