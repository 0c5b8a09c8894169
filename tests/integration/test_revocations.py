"""The kill switch, POST /v1/revocations and `broker-cli revoke`: one test per matcher, who may
use it on what, and the audit it leaves. Real broker over HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select
from typer.testing import CliRunner

from broker.audit.service import query
from broker.audit.verification import verify
from broker.cli.main import app as cli
from broker.config import Settings
from broker.db import transaction
from broker.migrate import upgrade
from broker.models import Lease, SessionRow
from broker.runtime import Broker
from tests.support.brokers import STANDARD_TIERS, BrokerSecrets, LiveServer

POLICY = STANDARD_TIERS + """\
resources:
  - match: "jwt://svc/*"
    provider: native
    access:
      read:  {tier: read}
      write: {tier: write}
humans:
  alice@example.com: {grants: [{resource: "jwt://svc/*", access: [read, write]}]}
  bob@example.com:   {grants: [{resource: "jwt://svc/*", access: [read, write]}]}
agents:
  claude-code: {max_tier: review}
  codex:       {max_tier: review}
budgets: {max_issued_per_session: 100, max_active_per_session: 100}
"""


@dataclass
class KillSwitch:
    client: httpx.Client
    base_url: str
    broker: Broker
    admin: str
    orchestrators: dict[str, str]  # name -> key

    def auth(self, who: str) -> dict[str, str]:
        token = self.admin if who == "admin" else self.orchestrators[who]
        return {"Authorization": f"Bearer {token}"}

    def session(self, *, human: str = "alice@example.com", agent: str = "claude-code", by: str = "orch-a",
                caps: tuple[str, ...] = ("jwt://svc/ledger", "jwt://svc/payments")) -> dict[str, Any]:
        r = self.client.post("/v1/sessions", headers=self.auth(by), json={
            "human": human, "agent": agent, "task_id": "t-" + secrets.token_hex(3), "ttl_seconds": 3600,
            "scope": [{"resource": "jwt://svc/*", "access": ["read", "write"]}]})
        assert r.status_code == 201, r.text
        s = r.json()
        s["caps"] = []
        for resource in caps:
            c = self.client.post("/v1/capabilities", json={"resource": resource, "access": "read", "purpose": "t"},
                                 headers={"Authorization": f"Bearer {s['session_token']}"})
            assert c.status_code == 201, c.text
            s["caps"].append(c.json()["capability_id"])
        return s

    def revoke(self, who: str = "admin", **body: Any) -> httpx.Response:
        return self.client.post("/v1/revocations", json=body, headers=self.auth(who))

    def statuses(self) -> dict[str, str]:
        with transaction(self.broker.engine) as db:
            return {lease.id: lease.status for lease in db.exec(select(Lease)).all()}

    def session_status(self, session_id: str) -> str:
        with transaction(self.broker.engine) as db:
            row = db.get(SessionRow, session_id)
            assert row is not None
            return row.status

    def audit(self, type_: str) -> list[dict[str, Any]]:
        with transaction(self.broker.engine) as db:
            return [json.loads(r.record) for r in query(db, types=[type_], limit=10_000)]


@pytest.fixture
def ks(database_url: str, tmp_path: Path) -> Iterator[KillSwitch]:
    s = BrokerSecrets()
    other = "jborc_" + secrets.token_urlsafe(24)
    keys = {"orch-a": s.orchestrator_key, "orch-b": other}
    env = s.env(tmp_path, database_url, POLICY, BROKER_ORCHESTRATOR_API_KEYS=",".join(
        f"{name}={hashlib.sha256(key.encode()).hexdigest()}" for name, key in keys.items()))
    settings = Settings(**{k.removeprefix("BROKER_").lower(): v for k, v in env.items()})
    upgrade(settings.database_url)
    broker = Broker.build(settings)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield KillSwitch(client, server.base_url, broker, s.admin_token, keys)


def assert_revoked_exactly(ks: KillSwitch, expected: set[str]) -> None:
    statuses = ks.statuses()
    assert {i for i, st in statuses.items() if st == "revoked"} == expected
    assert all(st == "active" for i, st in statuses.items() if i not in expected)


def test_by_session(ks: KillSwitch) -> None:
    a, b = ks.session(), ks.session()
    r = ks.revoke(session_id=a["session_id"])
    assert r.status_code == 200, r.text
    body = r.json()
    receipts = body.pop("receipts")
    assert body == {"matched_sessions": 1, "sessions_ended": 1, "matched_capabilities": 2, "revoked": 2,
                    "revoke_pending": 0, "revoke_pending_ids": []}
    assert [rc["capability_id"] for rc in receipts] == sorted(a["caps"])
    assert {rc["outcome"] for rc in receipts} == {"expires_naturally"} and all(rc["expires_at"] for rc in receipts)
    audited = {rec["jit_grant"]["capability_id"]: rec["detail"]["receipt"] for rec in ks.audit("capability.revoked")}
    assert [audited[rc["capability_id"]] for rc in receipts] == receipts
    assert_revoked_exactly(ks, set(a["caps"]))
    assert ks.session_status(a["session_id"]) == "ended" and ks.session_status(b["session_id"]) == "active"
    # the agent cannot just ask again: its session is over
    again = ks.client.post("/v1/capabilities", json={"resource": "jwt://svc/ledger", "access": "read", "purpose": "t"},
                           headers={"Authorization": f"Bearer {a['session_token']}"})
    assert again.status_code == 403 and again.json()["error"]["code"] == "session-ended"


def test_by_agent(ks: KillSwitch) -> None:
    c1, c2, x = ks.session(agent="codex"), ks.session(agent="codex", human="bob@example.com"), ks.session()
    r = ks.revoke(agent="codex", reason="incident-42")
    assert r.status_code == 200 and r.json()["revoked"] == 4 and r.json()["sessions_ended"] == 2
    assert_revoked_exactly(ks, set(c1["caps"]) | set(c2["caps"]))
    assert ks.session_status(x["session_id"]) == "active"
    [req] = ks.audit("revocation.requested")
    assert req["actor"] == "admin:admin" and req["request"]["reason"] == "incident-42"
    assert req["detail"]["filter"] == {"agent": "codex"} and req["detail"]["matched_capabilities"] == 4
    revoked = ks.audit("capability.revoked")
    assert len(revoked) == 4 and all(rec["request"]["reason"] == "session-ended:kill-switch:incident-42"
                                     for rec in revoked)
    assert all(rec["seq"] > req["seq"] for rec in revoked)  # the request is on record before its effects


def test_by_human(ks: KillSwitch) -> None:
    b1, b2, a = ks.session(human="bob@example.com"), ks.session(human="bob@example.com", agent="codex"), ks.session()
    r = ks.revoke(human="bob@example.com")
    assert r.status_code == 200 and r.json()["revoked"] == 4 and r.json()["matched_sessions"] == 2
    assert_revoked_exactly(ks, set(b1["caps"]) | set(b2["caps"]))
    assert ks.session_status(a["session_id"]) == "active"


def test_by_human_ignores_case(ks: KillSwitch) -> None:
    """The policy matches humans case-insensitively, so the kill switch must: a session provisioned
    for ALICE@Example.COM used to survive `revoke --human alice@example.com` and keep minting."""
    shouty, bob = ks.session(human="ALICE@Example.COM"), ks.session(human="Bob@EXAMPLE.com")
    shown = ks.client.get(f"/v1/sessions/{shouty['session_id']}", headers=ks.auth("admin")).json()
    assert shown["human"] == "alice@example.com"  # stored in its one canonical form
    r = ks.revoke(human="alice@example.com")
    assert r.status_code == 200 and r.json()["revoked"] == 2 and r.json()["matched_sessions"] == 1, r.text
    assert_revoked_exactly(ks, set(shouty["caps"]))
    again = ks.client.post("/v1/capabilities", json={"resource": "jwt://svc/ledger", "access": "read", "purpose": "t"},
                           headers={"Authorization": f"Bearer {shouty['session_token']}"})
    assert again.status_code == 403 and again.json()["error"]["code"] == "session-ended"
    # A row written before sessions stored the canonical form is matched too.
    with transaction(ks.broker.engine) as db:
        row = db.get(SessionRow, bob["session_id"])
        assert row is not None
        row.human = "Bob@EXAMPLE.com"
        db.add(row)
    r = ks.revoke(human="BOB@example.COM")
    assert r.status_code == 200 and r.json()["revoked"] == 2 and r.json()["matched_sessions"] == 1, r.text
    assert ks.session_status(bob["session_id"]) == "ended"
    req = ks.audit("revocation.requested")[-1]
    assert req["detail"]["filter"] == {"human": "bob@example.com"}


def test_by_resource_exact_and_glob(ks: KillSwitch) -> None:
    s1 = ks.session(caps=("jwt://svc/ledger", "jwt://svc/payments"))
    s2 = ks.session(human="bob@example.com", caps=("jwt://svc/ledger", "jwt://svc/ledger-archive"))
    r = ks.revoke(resource="jwt://svc/ledger")
    assert r.status_code == 200 and r.json()["revoked"] == 2 and r.json()["sessions_ended"] == 0
    assert_revoked_exactly(ks, {s1["caps"][0], s2["caps"][0]})
    # sessions go on: the resource was the problem, not them
    assert ks.session_status(s1["session_id"]) == ks.session_status(s2["session_id"]) == "active"

    r = ks.revoke(resource="jwt://svc/ledger*")
    assert r.status_code == 200 and r.json()["revoked"] == 1
    assert_revoked_exactly(ks, {s1["caps"][0], s2["caps"][0], s2["caps"][1]})


def test_matchers_combine(ks: KillSwitch) -> None:
    s1 = ks.session(agent="codex")
    s2 = ks.session(agent="codex", human="bob@example.com")
    r = ks.revoke(agent="codex", human="bob@example.com", resource="jwt://svc/payments", end_sessions=True)
    assert r.status_code == 200 and r.json()["revoked"] == 2 and r.json()["sessions_ended"] == 1
    assert_revoked_exactly(ks, set(s2["caps"]))  # ending the session takes all it holds
    assert ks.session_status(s1["session_id"]) == "active"


def test_a_resource_with_end_sessions_ends_only_the_sessions_that_hold_it(ks: KillSwitch) -> None:
    holder = ks.session(caps=("jwt://svc/ledger", "jwt://svc/payments"))
    bystander = ks.session(caps=("jwt://svc/payments",))
    idle = ks.session(caps=())
    r = ks.revoke(resource="jwt://svc/ledger", end_sessions=True)
    assert r.status_code == 200 and r.json()["sessions_ended"] == 1 and r.json()["revoked"] == 2
    assert_revoked_exactly(ks, set(holder["caps"]))
    assert [ks.session_status(s["session_id"]) for s in (holder, bystander, idle)] == ["ended", "active", "active"]


def test_orchestrators_reach_only_their_own_sessions(ks: KillSwitch) -> None:
    mine, theirs = ks.session(by="orch-a"), ks.session(by="orch-b")
    r = ks.revoke("orch-b", agent="claude-code")
    assert r.status_code == 200 and r.json()["revoked"] == 2 and r.json()["matched_sessions"] == 1
    assert_revoked_exactly(ks, set(theirs["caps"]))
    r = ks.revoke("orch-b", session_id=mine["session_id"])
    assert r.status_code == 200 and r.json()["matched_capabilities"] == 0
    assert ks.session_status(mine["session_id"]) == "active"


def test_refusals(ks: KillSwitch) -> None:
    s = ks.session()
    agent = {"Authorization": f"Bearer {s['session_token']}"}
    r = ks.client.post("/v1/revocations", json={"session_id": s["session_id"]}, headers=agent)
    assert r.status_code == 403
    r = ks.revoke()
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty-revocation-filter"
    r = ks.revoke(end_sessions=True)
    assert r.status_code == 400
    r = ks.revoke(resource="not a uri")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid-resource"
    r = ks.revoke(agent="claude-code", everything=True)
    assert r.status_code == 422
    r = ks.client.post("/v1/revocations", json={"agent": "claude-code"})
    assert r.status_code == 401
    assert ks.audit("revocation.requested") == []
    assert all(st == "active" for st in ks.statuses().values())


def test_cli_revoke(ks: KillSwitch, monkeypatch: pytest.MonkeyPatch) -> None:
    s1, s2 = ks.session(agent="codex"), ks.session()
    monkeypatch.setenv("BROKER_URL", ks.base_url)
    monkeypatch.setenv("BROKER_TOKEN", ks.admin)
    runner = CliRunner()
    out = runner.invoke(cli, ["revoke", "--agent", "codex"])
    assert out.exit_code == 0, out.output
    assert "2 capabilities matched: 2 finished, 0 pending; 1 of 1 sessions ended" in out.output
    assert "receipts (2 expires_naturally):" in out.output
    for cap_id in s1["caps"]:
        assert f"{cap_id}  expires_naturally" in out.output
    out = runner.invoke(cli, ["revoke", "--session", s2["session_id"], "--keep-sessions", "--json"])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.output)
    assert answer["revoked"] == 2 and answer["sessions_ended"] == 0
    assert sorted(rc["capability_id"] for rc in answer["receipts"]) == sorted(s2["caps"])
    assert ks.session_status(s2["session_id"]) == "active"
    out = runner.invoke(cli, ["revoke"])
    assert out.exit_code == 2
    assert_revoked_exactly(ks, set(s1["caps"]) | set(s2["caps"]))
    with transaction(ks.broker.engine) as db:
        assert verify(db).ok
