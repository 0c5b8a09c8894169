"""`broker-cli exec`: a command runs with short-lived credentials in its environment, and they are
revoked at the backend when it exits, crashes, or is told to stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions
import pytest

from tests.support.brokers import STANDARD_TIERS, TEST_POLICY, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.openbao import VaultSetup
from tests.support.processes import BROKER_CLI

POLICY = STANDARD_TIERS + """\
resources:
  - match: "jwt://payments-api"
    provider: native
    access: {read: {tier: read, scope: "ledger:read"}}
  - match: "vault://secret/data/allowed"
    provider: vault
    access: {read: {tier: read, policies: [kv-allowed]}}
humans:
  alice@example.com:
    grants: [{resource: "jwt://**", access: ["*"]}, {resource: "vault://**", access: ["*"]}]
agents:
  claude-code: {max_tier: write}
"""
SCOPE = [{"resource": "jwt://payments-api", "access": ["read"]}, {"resource": "vault://secret/data/allowed", "access": ["read"]}]
CAPS = ["-c", "jwt://payments-api=read", "-c", "vault://secret/data/allowed=read"]
SHOWN = ("BROKER_TOKEN_PAYMENTS_API", "VAULT_ADDR", "VAULT_TOKEN", "BROKER_SESSION_TOKEN")


@pytest.fixture
def exec_broker(tmp_path: Path, vault_setup: VaultSetup) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", secrets_, POLICY,
                          vault_addr=vault_setup.server.addr, vault_token=vault_setup.broker_token,
                          vault_token_role=vault_setup.token_role)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def child(script: str, out: Path) -> list[str]:
    """A Python child that writes the variables it sees to `out`, then runs `script`."""
    prelude = ("import json, os, signal, sys, time\n"
               f"json.dump({{k: os.environ.get(k) for k in {SHOWN!r}}}, open({str(out)!r}, 'w'))\n")
    return [sys.executable, "-c", prelude + script]


def environ(api: Api, session: dict[str, Any]) -> dict[str, str]:
    return {**os.environ, "BROKER_URL": api.base_url, "BROKER_SESSION_TOKEN": session["session_token"]}


def assert_all_revoked(api: Api, session: dict[str, Any], seen: dict[str, str], vault_setup: VaultSetup) -> None:
    caps = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    assert len(caps) == 2 and {c["status"] for c in caps} == {"revoked"}
    # The backends agree: the native token is inactive, the Vault token is gone.
    assert api.client.post("/v1/introspect", data={"token": seen["BROKER_TOKEN_PAYMENTS_API"]}).json() == {"active": False}
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=vault_setup.server.addr, token=seen["VAULT_TOKEN"]).auth.token.lookup_self()


def test_child_sees_credentials_and_they_die_with_it(exec_broker: Api, vault_setup: VaultSetup, tmp_path: Path) -> None:
    api = exec_broker
    session = api.new_session(scope=SCOPE)
    out = tmp_path / "seen.json"
    script = ("import hvac\n"
              "c = hvac.Client(url=os.environ['VAULT_ADDR'], token=os.environ['VAULT_TOKEN'])\n"
              "v = c.secrets.kv.v2.read_secret_version('allowed', mount_point='secret', raise_on_deleted_version=True)\n"
              "sys.exit(0 if v['data']['data']['value'] else 1)\n")
    done = subprocess.run([BROKER_CLI, "exec", *CAPS, "--", *child(script, out)], env=environ(api, session),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["VAULT_ADDR"] == vault_setup.server.addr and seen["VAULT_TOKEN"]
    assert seen["BROKER_TOKEN_PAYMENTS_API"].count(".") == 2
    assert seen["BROKER_SESSION_TOKEN"] is None  # the child gets the listed credentials, nothing more
    assert_all_revoked(api, session, seen, vault_setup)


@pytest.mark.parametrize(("script", "status"), [("sys.exit(7)", 7), ("os.kill(os.getpid(), signal.SIGSEGV)", 128 + 11)])
def test_exit_status_and_crash_are_passed_through(exec_broker: Api, vault_setup: VaultSetup, tmp_path: Path,
                                                  script: str, status: int) -> None:
    api = exec_broker
    session = api.new_session(scope=SCOPE)
    out = tmp_path / "seen.json"
    done = subprocess.run([BROKER_CLI, "exec", *CAPS, "--", *child(script, out)], env=environ(api, session),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, done.stderr
    assert_all_revoked(api, session, json.loads(out.read_text()), vault_setup)


def test_sigterm_is_forwarded_then_everything_is_revoked(exec_broker: Api, vault_setup: VaultSetup, tmp_path: Path) -> None:
    api = exec_broker
    session = api.new_session(scope=SCOPE)
    out, marker = tmp_path / "seen.json", tmp_path / "got-sigterm"
    script = (f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').write('yes'), sys.exit(42)))\n"
              "time.sleep(120)\n")
    proc = subprocess.Popen([BROKER_CLI, "exec", *CAPS, "--", *child(script, out)], env=environ(api, session),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.stat().st_size):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        time.sleep(0.3)  # the child's handler is installed right after it writes the file
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 42
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.read_text() == "yes"
    assert_all_revoked(api, session, json.loads(out.read_text()), vault_setup)


def test_refused_capability_runs_nothing_and_revokes_what_was_granted(exec_broker: Api, tmp_path: Path) -> None:
    api = exec_broker
    session = api.new_session(scope=[{"resource": "jwt://payments-api", "access": ["read"]}])
    out = tmp_path / "seen.json"
    done = subprocess.run([BROKER_CLI, "exec", *CAPS, "--", *child("", out)], env=environ(api, session),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 125 and "outside-task-scope" in done.stderr
    assert not out.exists()
    caps = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    assert [c["status"] for c in caps] == ["revoked"]
    missing = subprocess.run([BROKER_CLI, "exec", "-c", "jwt://payments-api=read", "--", str(tmp_path / "no-such-tool")],
                             env=environ(api, session), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 127 and "command not found" in missing.stderr


APPROVAL_POLICY = TEST_POLICY + """\
groups:
  maintainers:
    members: [bob@example.com]
    grants: [{resource: "jwt://payments-api", access: [deploy]}]
"""


def test_a_helper_waits_for_an_approval_when_told_to(tmp_path: Path) -> None:
    """`deploy` is merge_deploy: approval first. Without BROKER_APPROVAL_WAIT the helper fails naming
    the approval; with it, it long-polls the approval and goes on once a maintainer approves."""
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", secrets_, APPROVAL_POLICY)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session(scope=[{"resource": "jwt://payments-api", "access": ["deploy"]}])
        out = tmp_path / "seen.json"
        argv = [BROKER_CLI, "exec", "-c", "jwt://payments-api=deploy", "--", *child("", out)]
        refused = subprocess.run(argv, env=environ(api, session), capture_output=True, text=True, timeout=120)
        assert refused.returncode == 125 and "needs approval apr_" in refused.stderr and "group:maintainers" in refused.stderr
        assert not out.exists()

        waiting = subprocess.Popen(argv, env={**environ(api, session), "BROKER_APPROVAL_WAIT": "120"},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            bob = api.as_human("bob@example.com")
            deadline = time.monotonic() + 60
            while True:  # the helper's request has reached the broker and waits for a human
                pending = client.get("/v1/approvals", params={"status": "pending"}, headers=bob).json()
                if pending and waiting.poll() is None:
                    break
                assert waiting.poll() is None, waiting.communicate()
                assert time.monotonic() < deadline, "no pending approval appeared"
                time.sleep(0.1)
            time.sleep(0.5)
            assert waiting.poll() is None  # still waiting, not failed
            for approval in pending:
                r = client.post(f"/v1/approvals/{approval['approval_id']}/approve", headers=bob)
                assert r.status_code == 200, r.text
            assert waiting.wait(timeout=120) == 0, waiting.communicate()
        finally:
            if waiting.poll() is None:
                waiting.kill()
        assert json.loads(out.read_text())["BROKER_TOKEN_PAYMENTS_API"]
        caps = client.get("/v1/capabilities", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
        assert [(c["access"], c["status"]) for c in caps] == [("deploy", "revoked")]
