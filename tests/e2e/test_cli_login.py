"""`broker-cli login / whoami / logout` as a person runs them, against a real OpenID provider.

The CLI runs as a subprocess; the test plays the person at the browser, completing the device
flow on the provider's own pages while `broker-cli login` waits.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.brokers import TEST_POLICY, BrokerSecrets, LiveServer, build_broker
from tests.support.children import die_with_parent, terminate
from tests.support.oidc import OidcProvider, cli_login
from tests.support.processes import BROKER_CLI


@pytest.fixture
def broker_url(tmp_path: Path, oidc_provider: OidcProvider) -> Iterator[str]:
    settings = {k.removeprefix("BROKER_").lower(): v for k, v in oidc_provider.broker_env().items()}
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", BrokerSecrets(), TEST_POLICY, **settings)
    with LiveServer(broker) as server:
        yield server.base_url


@pytest.fixture
def person(tmp_path: Path, broker_url: str) -> dict[str, str]:
    """The environment of a person's shell: their own config dir, the broker's URL, no token."""
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    return {**base, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"), "BROKER_URL": broker_url,
            "BROKER_STATE_DIR": str(tmp_path / "no-local-broker")}


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BROKER_CLI, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def stored(env: dict[str, str]) -> dict[str, Any]:
    path = Path(env["XDG_CONFIG_HOME"]) / "jit-broker" / "tokens.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_login_whoami_refresh_logout(oidc_provider: OidcProvider, person: dict[str, str], broker_url: str) -> None:
    done = cli_login(oidc_provider, person, "alice")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Signed in to" in done.stdout and "alice@example.com (human)" in done.stdout

    path = Path(person["XDG_CONFIG_HOME"]) / "jit-broker" / "tokens.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    entry = stored(person)["brokers"][broker_url]
    assert entry["issuer"] == oidc_provider.issuer and entry["token"]["refresh_token"]

    me = cli(person, "whoami", "--json")
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout) == {"kind": "human", "name": "alice@example.com", "groups": ["payments-oncall"],
                                     "idp_groups": ["payments-oncall"], "session_id": None}
    assert cli(person, "whoami").stdout.splitlines() == [
        "alice@example.com (human), groups: payments-oncall", "  token from your sign-in (`broker-cli login`)"]

    # Near expiry: the next command refreshes first, with the refresh token, and stores the result.
    data = stored(person)
    old_access = data["brokers"][broker_url]["token"]["access_token"]
    data["brokers"][broker_url]["token"]["expires_at"] = int(time.time()) + 5
    path.write_text(json.dumps(data))
    me = cli(person, "whoami", "--json")
    assert me.returncode == 0, me.stderr
    assert json.loads(me.stdout)["name"] == "alice@example.com"
    renewed = stored(person)["brokers"][broker_url]["token"]
    assert renewed["access_token"] != old_access and renewed["expires_at"] > time.time() + 60
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    # A refresh the IdP refuses: the CLI asks for a new login instead of sending a dead token.
    data = stored(person)
    data["brokers"][broker_url]["token"].update(expires_at=int(time.time()) - 1, refresh_token="revoked-or-garbage")
    path.write_text(json.dumps(data))
    me = cli(person, "whoami")
    assert me.returncode == 4 and "broker-cli login" in me.stderr, me.stderr

    out = cli(person, "logout")
    assert out.returncode == 0 and not path.exists()
    me = cli(person, "whoami")
    assert me.returncode == 4 and "missing-credentials" in me.stderr


def test_token_file_readable_by_others_is_refused(oidc_provider: OidcProvider, person: dict[str, str]) -> None:
    assert cli_login(oidc_provider, person, "bob").returncode == 0
    path = Path(person["XDG_CONFIG_HOME"]) / "jit-broker" / "tokens.json"
    path.chmod(0o644)
    me = cli(person, "whoami")
    assert me.returncode == 4 and "readable by others" in me.stderr


def test_login_token_is_sent_to_its_own_broker_only(oidc_provider: OidcProvider, person: dict[str, str],
                                                     tmp_path: Path) -> None:
    assert cli_login(oidc_provider, person, "bob").returncode == 0
    seen: list[str | None] = []

    # Another broker URL (a listener that records what it is sent): the CLI has no sign-in for it.
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.send_header("content-type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"code": "invalid-token", "message": "no"}}')

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        other = {**person, "BROKER_URL": f"http://127.0.0.1:{server.server_address[1]}"}
        assert cli(other, "whoami").returncode == 4  # 401: not signed in there
    finally:
        server.shutdown()
    assert seen == [None], "the person's IdP token must not be sent to a broker it was not obtained for"


def test_login_refused_when_the_person_declines(oidc_provider: OidcProvider, person: dict[str, str]) -> None:
    proc = subprocess.Popen([BROKER_CLI, "login"], env=person, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=die_with_parent(signal.SIGTERM))
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = re.search(r"open (\S+) and enter the code (\S+)", line)
            if found:
                with httpx.Client(follow_redirects=True, timeout=10) as browser:
                    page = browser.get(found.group(1))
                    page = oidc_provider._submit(browser, page, "op.deviceInputForm", user_code=found.group(2))
                    page = oidc_provider._submit(browser, page, "op.deviceConfirmForm", abort="yes")
                break
        _, err = proc.communicate(timeout=120)
    finally:
        terminate(proc)
    assert proc.returncode == 1 and "declined" in err
    assert not (Path(person["XDG_CONFIG_HOME"]) / "jit-broker" / "tokens.json").exists()


def test_logout_revokes_the_refresh_token(oidc_provider: OidcProvider, person: dict[str, str], broker_url: str) -> None:
    assert cli_login(oidc_provider, person, "bob").returncode == 0
    refresh_token = stored(person)["brokers"][broker_url]["token"]["refresh_token"]
    out = cli(person, "logout")
    assert out.returncode == 0 and "warning" not in out.stderr, out.stderr
    # A copy of the file taken before logout is worth nothing now.
    r = httpx.post(oidc_provider.issuer + "/token", data={"grant_type": "refresh_token", "client_id": "jit-broker-cli",
                                                          "refresh_token": refresh_token}, timeout=10)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant"


def test_login_without_an_identity_provider_says_what_to_set(tmp_path: Path) -> None:
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/plain.db", BrokerSecrets(), TEST_POLICY)
    with LiveServer(broker) as server:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("BROKER_")},
               "BROKER_URL": server.base_url, "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
        out = cli(env, "login")
    assert out.returncode == 2 and "names no identity provider" in out.stderr and "--issuer" in out.stderr
    assert not (tmp_path / "cfg" / "jit-broker" / "tokens.json").exists()
