"""`broker-cli git-credential` driven by the real git binary, over smart HTTP, against tokens the
GitHub stand-in issued: clone, push, a push refused for want of write, a push to another repository."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.git_server import GIT, GitServer
from tests.support.github_standin import GitHubStandIn
from tests.support.processes import BROKER_CLI

POLICY = STANDARD_TIERS + """\
resources:
  - match: "github://acme/*"
    provider: github
    access:
      read:  {tier: read,  permissions: {contents: read}}
      write: {tier: write, permissions: {contents: write}}
humans:
  alice@example.com:
    grants: [{resource: "github://acme/*", access: [read, write]}]
agents:
  claude-code: {max_tier: write}
"""


@pytest.fixture
def github_broker(tmp_path: Path, github_standin: GitHubStandIn) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", secrets_, POLICY,
                          github_api_url=github_standin.url, github_app_id=github_standin.app_id,
                          github_private_key_file=github_standin.private_key_path)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def git_env(home: Path, api: Api, session: dict[str, Any], server: GitServer, **extra: str) -> dict[str, str]:
    """A git with no system or user config but ours: the helper, useHttpPath, never a prompt."""
    home.mkdir(exist_ok=True)
    config = {"credential.helper": f'!"{BROKER_CLI}" git-credential', "credential.useHttpPath": "true",
              "user.name": "agent", "user.email": "agent@example.com", "init.defaultBranch": "main"}
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
           "GIT_ASKPASS": "", "SSH_ASKPASS": "", "GIT_CONFIG_COUNT": str(len(config)),
           "BROKER_URL": api.base_url, "BROKER_SESSION_TOKEN": session["session_token"],
           "BROKER_GIT_HOSTS": server.host(), **extra}
    for i, (key, value) in enumerate(config.items()):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    return env


def git(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GIT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def commit(work: Path, env: dict[str, str], name: str) -> str:
    (work / name).write_text(f"{name}\n")
    assert git("add", name, env=env, cwd=work).returncode == 0
    assert git("commit", "-q", "-m", f"add {name}", env=env, cwd=work).returncode == 0
    return git("rev-parse", "HEAD", env=env, cwd=work).stdout.strip()


def test_clone_and_push_with_real_git(github_broker: Api, git_server: GitServer, tmp_path: Path) -> None:
    api = github_broker
    session = api.new_session(scope=[{"resource": "github://acme/widgets", "access": ["read", "write"]},
                                     {"resource": "github://acme/gadgets", "access": ["read"]}])
    env = git_env(tmp_path / "home", api, session, git_server)
    work = tmp_path / "widgets"

    cloned = git("clone", git_server.remote("acme/widgets"), str(work), env=env)
    assert cloned.returncode == 0, cloned.stderr
    assert (work / "README.md").read_text() == "# acme/widgets\n"
    # git tried without credentials first, got the challenge, then came back with the broker's token.
    fetches = [r for r in git_server.log if r.repository == "acme/widgets"]
    assert fetches[0].status == 401 and fetches[-1].status == 200 and fetches[-1].user == "x-access-token"

    # The default access is read: the token cannot push, and the server says so.
    head = commit(work, env, "one.txt")
    refused = git("push", "origin", "main", env=env, cwd=work)
    assert refused.returncode != 0
    assert git_server.pushes() == [] and [r.status for r in git_server.log if r.service == "git-receive-pack"][-1] == 403
    assert git_server.head("acme/widgets") != head

    # Asking for write (as an agent about to push would) mints a token that can.
    pushed = git("push", "origin", "main", env={**env, "BROKER_GIT_ACCESS": "write"}, cwd=work)
    assert pushed.returncode == 0, pushed.stderr
    assert git_server.head("acme/widgets") == head

    caps = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    assert sorted((c["resource"], c["access"]) for c in caps) == [
        ("github://acme/widgets", "read"), ("github://acme/widgets", "read"), ("github://acme/widgets", "write")]

    # Another repository: write is outside the session's scope, so the broker refuses and git stops.
    other = tmp_path / "gadgets"
    assert git("clone", git_server.remote("acme/gadgets"), str(other), env=env).returncode == 0
    commit(other, env, "two.txt")
    denied = git("push", "origin", "main", env={**env, "BROKER_GIT_ACCESS": "write"}, cwd=other)
    assert denied.returncode != 0
    assert "outside-task-scope" in denied.stderr
    assert not [r for r in git_server.log if r.repository == "acme/gadgets" and r.service == "git-receive-pack"
                and r.status == 200]

    # A token for widgets, smuggled into a push to gadgets, is refused by the server itself.
    token = _token_via_helper(env, git_server, "acme/widgets", "write")
    smuggled = git("push", git_server.remote("acme/gadgets").replace("http://", f"http://x-access-token:{token}@"),
                   "main", env={**env, "GIT_CONFIG_COUNT": "0"}, cwd=other)
    assert smuggled.returncode != 0
    assert git_server.log[-1].repository == "acme/gadgets" and git_server.log[-1].status == 404

    # Teardown revokes: the token dies at "GitHub", and the helper gets nothing more for this session.
    api.client.post(f"/v1/sessions/{session['session_id']}/end", json={"reason": "completed"}, headers=api.as_orchestrator())
    assert git_server.standin.authorize_git(token, "acme", "widgets", push=True) == 401
    after = git("fetch", "origin", env=env, cwd=work)
    assert after.returncode != 0 and "session-ended" in after.stderr


def _token_via_helper(env: dict[str, str], server: GitServer, repository: str, access: str) -> str:
    answer = helper("get", f"protocol=http\nhost={server.host()}\npath={repository}.git\n\n", env, "--access", access)
    assert answer.returncode == 0, answer.stderr
    return dict(line.split("=", 1) for line in answer.stdout.splitlines())["password"]


def helper(operation: str, stdin: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BROKER_CLI, "git-credential", operation, *args], input=stdin, env=env,
                          capture_output=True, text=True, timeout=60)


def test_helper_protocol_answers(github_broker: Api, git_server: GitServer, tmp_path: Path) -> None:
    """The protocol as git's documentation writes it: attributes in, username/password/expiry out."""
    api = github_broker
    session = api.new_session(scope=[{"resource": "github://acme/widgets", "access": ["read"]}])
    env = git_env(tmp_path / "home", api, session, git_server)
    host = git_server.host()

    answer = helper("get", f"protocol=http\nhost={host}\npath=acme/widgets.git\nwwwauth[]=Basic realm=\"GitHub\"\n"
                           "capability[]=authtype\nsomething-new=ignored\n\n", env)
    assert answer.returncode == 0, answer.stderr
    got = dict(line.split("=", 1) for line in answer.stdout.splitlines())
    assert set(got) == {"username", "password", "password_expiry_utc"} and got["username"] == "x-access-token"
    cap = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()[0]
    assert int(got["password_expiry_utc"]) == int(datetime.fromisoformat(cap["expires_at"].replace("Z", "+00:00")).timestamp())
    assert git_server.standin.authorize_git(got["password"], "acme", "widgets", push=False) == 200
    assert got["password"] not in answer.stderr

    # Not ours: another host, clear text to a non-loopback host, no path. Silent, so git moves on.
    for stdin in ("protocol=https\nhost=example.com\npath=acme/widgets.git\n",
                  "protocol=http\nhost=github.com\npath=acme/widgets\n",
                  f"protocol=http\nhost={host}\n", f"protocol=http\nhost={host}\npath=a/b/c.git\n"):
        quiet = helper("get", stdin + "\n", {**env, "BROKER_GIT_HOSTS": f"{host},github.com"})
        assert quiet.returncode == 0 and quiet.stdout == "", stdin
    assert "useHttpPath" in helper("get", f"protocol=http\nhost={host}\n\n", env).stderr

    # store is a no-op; an unknown operation is ignored as git expects.
    for operation in ("store", "frobnicate"):
        done = helper(operation, f"protocol=http\nhost={host}\npath=acme/widgets.git\nusername=x\npassword=y\n\n", env)
        assert done.returncode == 0 and done.stdout == ""

    # erase (git's answer to a refused credential) revokes the capability behind that token.
    erased = helper("erase", f"protocol=http\nhost={host}\npath=acme/widgets.git\nusername=x-access-token\n"
                             f"password={got['password']}\n\n", env)
    assert erased.returncode == 0, erased.stderr
    shown = api.client.get(f"/v1/capabilities/{cap['capability_id']}", headers=api.as_admin()).json()
    assert shown["status"] == "revoked"
    assert git_server.standin.authorize_git(got["password"], "acme", "widgets", push=False) == 401

    # Denied by the broker: a message on stderr and quit=1, so git does not prompt for a password.
    denied = helper("get", f"protocol=http\nhost={host}\npath=acme/gadgets.git\n\n", env)
    assert denied.stdout == "quit=1\n" and "outside-task-scope" in denied.stderr
    missing = helper("get", f"protocol=http\nhost={host}\npath=acme/widgets.git\n\n",
                     {k: v for k, v in env.items() if k != "BROKER_SESSION_TOKEN"})
    assert missing.stdout == "" and "BROKER_SESSION_TOKEN" in missing.stderr
