"""The broker as a user meets it: `broker-cli` processes, real HTTP, real databases.

Runs once on SQLite and once on PostgreSQL: provision, mint a native capability, verify it
against the JWKS with PyJWT, revoke, introspect; then edit one audit row behind the broker's
back and watch `broker-cli audit verify` fail and name that record.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import psycopg
import pytest

from tests.support.brokers import TEST_POLICY, BrokerSecrets
from tests.support.console import ConsoleBrowser
from tests.support.databases import libpq_url
from tests.support.ports import free_port
from tests.support.processes import BROKER_CLI, BrokerProcess, broker_environ, wait_until_ready

CLI = BROKER_CLI


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=broker_environ(env), cwd=cwd, capture_output=True, text=True, timeout=60)


def provision(http: httpx.Client, orchestrator_key: str, *, human: str, task_id: str, resource: str,
              access: str = "read") -> tuple[dict, dict[str, str]]:
    """The orchestrator's step: a session over HTTP; returns it and the agent's auth header."""
    r = http.post("/v1/sessions", headers={"Authorization": f"Bearer {orchestrator_key}"}, json={
        "human": human, "agent": "claude-code", "task_id": task_id, "ttl_seconds": 900,
        "scope": [{"resource": resource, "access": [access]}]})
    assert r.status_code == 201, r.text
    session = r.json()
    return session, {"Authorization": f"Bearer {session['session_token']}"}


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[BrokerProcess, BrokerSecrets, str]]:
    secrets_ = BrokerSecrets()
    env = secrets_.env(tmp_path, database_url)
    migrated = cli("migrate", env=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    proc = BrokerProcess(env, tmp_path)
    proc.env["BROKER_ISSUER"] = proc.base_url
    with proc:
        yield proc, secrets_, database_url


def _tamper(database_url: str, seq: int) -> None:
    """Rewrite one record as a database administrator would: the append-only trigger goes first."""
    sql = "UPDATE audit_records SET record = replace(record, '\"outcome\":\"minted\"', '\"outcome\":\"denied\"') WHERE seq = "
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.execute("DROP TRIGGER audit_records_no_update")
            conn.execute(sql + str(seq))
    else:
        with psycopg.connect(libpq_url(database_url), autocommit=True) as conn:
            conn.execute("ALTER TABLE audit_records DISABLE TRIGGER audit_records_no_update")
            conn.execute(sql + str(seq))


def test_serve_flow_then_tampered_audit_is_caught(served: tuple[BrokerProcess, BrokerSecrets, str], tmp_path: Path) -> None:
    proc, secrets_, database_url = served
    with httpx.Client(base_url=proc.base_url, timeout=30) as http:
        session, agent = provision(http, secrets_.orchestrator_key, human="alice@example.com", task_id="issue-42",
                                   resource="jwt://payments-api")
        r = http.post("/v1/capabilities", headers=agent,
                      json={"resource": "jwt://payments-api", "access": "read", "purpose": "read the ledger"})
        assert r.status_code == 201, r.text
        cap = r.json()
        token = cap["credential"]["token"]
        jwks = jwt.PyJWKClient(proc.base_url + "/.well-known/jwks.json")
        claims = jwt.decode(token, jwks.get_signing_key_from_jwt(token).key, algorithms=["EdDSA"],
                            audience="payments-api", issuer=proc.base_url)
        assert claims["jti"] == cap["capability_id"] and claims["act"] == {"sub": "claude-code"}
        assert http.post("/v1/introspect", data={"token": token}).json()["active"] is True
        assert http.delete(f"/v1/capabilities/{cap['capability_id']}", headers=agent).json()["status"] == "revoked"
        assert http.post("/v1/introspect", data={"token": token}).json() == {"active": False}
        records = http.get("/v1/audit", params={"session_id": session["session_id"]},
                           headers={"Authorization": f"Bearer {secrets_.admin_token}"}).json()["records"]
    minted = next(rec for rec in records if rec["type"] == "capability.minted")

    cli_env = {"BROKER_URL": proc.base_url, "BROKER_TOKEN": secrets_.admin_token}
    ok = cli("audit", "verify", env=cli_env, cwd=tmp_path)
    assert ok.returncode == 0 and "audit chain intact" in ok.stdout, ok.stdout + ok.stderr

    _tamper(database_url, minted["seq"])
    broken = cli("audit", "verify", env=cli_env, cwd=tmp_path)
    assert broken.returncode == 1
    assert f"seq={minted['seq']}" in broken.stdout and minted["event_id"] in broken.stdout
    assert "hash does not match" in broken.stdout
    as_json = cli("audit", "verify", "--json", env=cli_env, cwd=tmp_path)
    assert '"first_bad_seq": ' + str(minted["seq"]) in as_json.stdout

    explained = cli("policy", "explain", "--session", session["session_id"], "--resource", "jwt://payments-api",
                    "--access", "write", env=cli_env, cwd=tmp_path)
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.startswith("DENY: outside-task-scope (session.scope)")
    for layer in ("session", "resource", "human", "task_scope", "agent", "tier", "budget", "escalation", "time"):
        assert f"  {layer}" in explained.stdout

    listed = cli("capabilities", "list", "--session", session["session_id"], env=cli_env, cwd=tmp_path)
    assert cap["capability_id"] in listed.stdout and "revoked" in listed.stdout
    exported = cli("audit", "export", "--session", session["session_id"], env=cli_env, cwd=tmp_path)
    assert len(exported.stdout.strip().splitlines()) == len(records)
    assert token not in exported.stdout


def test_sighup_reload_keeps_last_good_policy(served: tuple[BrokerProcess, BrokerSecrets, str], tmp_path: Path) -> None:
    proc, _, _ = served
    policy = tmp_path / "policy.yaml"
    first = httpx.get(proc.base_url + "/readyz").json()["checks"]["policy"]["version"]
    policy.write_text("version: 1\ntiers: {read: {control: sometimes}}\n")
    proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    time.sleep(1.0)
    assert httpx.get(proc.base_url + "/readyz").json()["checks"]["policy"]["version"] == first
    assert "policy reload refused" in proc.log_tail(200)
    policy.write_text(TEST_POLICY.replace("max_ttl: 1h", "max_ttl: 45m"))
    proc.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while httpx.get(proc.base_url + "/readyz").json()["checks"]["policy"]["version"] == first:
        assert time.monotonic() < deadline, "policy was not reloaded"
        time.sleep(0.1)


def test_policy_check_and_missing_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\ntiers:\n  read: {control: auto, max_ttl: 1h}\n  write: {control: maybe}\nresources: []\n")
    r = cli("policy", "check", str(bad), env={}, cwd=tmp_path)
    assert r.returncode == 1 and f"{bad}:4:" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(TEST_POLICY)
    r = cli("policy", "check", str(good), env={}, cwd=tmp_path)
    assert r.returncode == 0 and "ok (sha256:" in r.stdout
    env = broker_environ()
    r = subprocess.run([CLI, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "BROKER_POLICY_FILE" in r.stderr and "BROKER_ENCRYPTION_KEY" in r.stderr


def test_dev_embedded_default_works_for_a_new_user(tmp_path: Path) -> None:
    """The README's run command: `broker-cli dev`, then curl-like calls with the files it wrote."""
    env = broker_environ()
    port = free_port()
    log = tmp_path / "dev.log"
    proc = subprocess.Popen([CLI, "dev", "--port", str(port)], env=env, cwd=tmp_path, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, log, within=60)  # with `bao` installed, dev starts OpenBao first
        state = tmp_path / ".broker"
        assert oct((state / "admin-token").stat().st_mode)[-3:] == "600"
        assert all(oct(p.stat().st_mode)[-3:] == "600" for p in (state / "signing-keys").glob("*.pem"))
        # The README promises 0600 for everything of the state directory: the SQLite file (and its
        # WAL) and the policy too, whatever the caller's umask was.
        private = [state / "broker.db", state / "policy.yaml", *state.glob("broker.db-*")]
        assert (state / "broker.db").exists() and (state / "policy.yaml").exists()
        assert {p.name: oct(p.stat().st_mode)[-3:] for p in private} == {p.name: "600" for p in private}
        assert oct(state.stat().st_mode)[-3:] == "700"
        orch = (state / "orchestrator-key").read_text().strip()
        with httpx.Client(base_url=url, timeout=30) as http:
            _, agent = provision(http, orch, human="dev@example.com", task_id="try-it", resource="jwt://payments-api")
        r = httpx.post(url + "/v1/capabilities", headers=agent,
                       json={"resource": "jwt://payments-api", "access": "read", "purpose": "try"})
        assert r.status_code == 201, r.text
        cap = r.json()
        token = cap["credential"]["token"]
        key = jwt.PyJWKClient(url + "/.well-known/jwks.json").get_signing_key_from_jwt(token).key
        claims = jwt.decode(token, key, algorithms=["EdDSA"], audience="payments-api", issuer=url)
        assert claims["sub"] == "dev@example.com" and claims["jti"] == cap["capability_id"]
        assert httpx.post(url + "/v1/introspect", data={"token": token}).json()["active"] is True
        assert httpx.delete(url + f"/v1/capabilities/{cap['capability_id']}", headers=agent).json()["status"] == "revoked"
        assert httpx.post(url + "/v1/introspect", data={"token": token}).json() == {"active": False}
        assert "NOT for production" in log.read_text()
        verify = subprocess.run([CLI, "audit", "verify"], env={**env, "BROKER_URL": url}, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert verify.returncode == 0, verify.stdout + verify.stderr  # the CLI found the local admin token
        # The console: `dev` names it, and the trial human signs in with the token it wrote.
        assert f"{url}/console/" in log.read_text()
        with ConsoleBrowser(url) as browser:
            browser.sign_in_with_token((state / "human-token").read_text().strip())
            sessions = browser.http.get("/console/sessions")
            assert sessions.status_code == 200 and "dev@example.com" in sessions.text and "try-it" in sessions.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_serve_with_two_workers_shares_one_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """`broker-cli serve --workers 2`: two replica processes behind one port, one database."""
    secrets_ = BrokerSecrets()
    env = secrets_.env(tmp_path, postgres_url)
    assert cli("migrate", env=env, cwd=tmp_path).returncode == 0
    proc = BrokerProcess(env, tmp_path, serve_args=("--workers", "2"))
    with proc:
        assert proc.proc is not None
        children = Path(f"/proc/{proc.proc.pid}/task/{proc.proc.pid}/children").read_text().split()
        assert len(children) >= 2, children  # uvicorn's supervisor and its two workers
        with httpx.Client(base_url=proc.base_url, timeout=30) as http:
            session, agent = provision(http, secrets_.orchestrator_key, human="alice@example.com", task_id="w",
                                       resource="jwt://svc/*")
            for i in range(20):  # new connections, so both workers answer some
                with httpx.Client(base_url=proc.base_url, timeout=30) as fresh:
                    r = fresh.post("/v1/capabilities", headers=agent,
                                   json={"resource": f"jwt://svc/s{i}", "access": "read", "purpose": "w"})
                    assert r.status_code == 201, r.text
            ended = http.post(f"/v1/sessions/{session['session_id']}/end", headers={
                "Authorization": f"Bearer {secrets_.orchestrator_key}"}).json()
            assert ended["revoked"] == 20
            admin = {"Authorization": f"Bearer {secrets_.admin_token}"}
            verify = http.get("/v1/audit/verify", headers=admin).json()
            assert verify["ok"] is True
            records = http.get("/v1/audit", params={"session_id": session["session_id"], "limit": 1000},
                               headers=admin).json()["records"]
            assert [r["type"] for r in records].count("capability.minted") == 20
