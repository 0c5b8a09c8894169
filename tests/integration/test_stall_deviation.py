"""Stall and deviation (issue 26, acceptance 2 and 3): a session silent past its idle timeout is
ended by the sweeper with receipts, a heartbeat keeps it, the timeout survives a restart and
several replicas end it once; N scope/tier refusals in the window suspend it (not N-1), a human
resumes it, and both are in the audit. Real broker over HTTP, SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select
from typer.testing import CliRunner

from broker.audit.service import query
from broker.audit.verification import verify
from broker.cli.main import app as cli
from broker.db import transaction, utcnow
from broker.lifecycle.sweeper import sweep_once
from broker.models import Lease, OutboxMessage, SessionRefusal, SessionRow
from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.console import ConsoleBrowser
from tests.support.hostile_text import ALL, ids

RESOURCES = """\
resources:
  - match: "jwt://svc/*"
    provider: native
    access:
      read:  {tier: read}
      drop:  {tier: destructive}
humans:
  alice@example.com: {grants: [{resource: "jwt://svc/*", access: [read, drop]}]}
  bob@example.com:   {grants: [{resource: "jwt://svc/*", access: [read]}]}
agents:
  claude-code: {max_tier: review}
budgets: {max_issued_per_session: 100, max_active_per_session: 100}
"""
LIVENESS = "liveness: {idle_timeout: 5s, max_idle_timeout: 1h}\n"
POLICY = STANDARD_TIERS + RESOURCES + LIVENESS + "deviation: {refusals: 3, window: 10m, action: suspend}\n"
SCOPE = [{"resource": "jwt://svc/ledger", "access": ["read", "drop"]}]


def serve(tmp_path: Path, database_url: str, policy: str = POLICY, *, sweeper: bool = False,
          secrets_: BrokerSecrets | None = None, **overrides: Any) -> tuple[LiveServer, BrokerSecrets]:
    secrets_ = secrets_ or BrokerSecrets()
    overrides.setdefault("sweep_interval_seconds", 0.2)
    overrides.setdefault("approval_webhook_urls", "http://127.0.0.1:9/approvals")  # never delivered: outbox off
    overrides.setdefault("approval_webhook_secret", "s" * 32)
    broker = build_broker(tmp_path, database_url, secrets_, policy, **overrides)
    return LiveServer(broker, sweeper=sweeper, outbox=False), secrets_


@pytest.fixture
def api(tmp_path: Path, database_url: str) -> Iterator[Api]:
    server, secrets_ = serve(tmp_path, database_url)
    with server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, server.broker, client)


def agent(session: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {session['session_token']}"}


def records(api: Api, session_id: str) -> list[dict[str, Any]]:
    with transaction(api.broker.engine) as db:
        return [json.loads(r.record) for r in query(db, session_id=session_id, limit=10_000)]


def of_type(api: Api, session_id: str, type_: str) -> list[dict[str, Any]]:
    return [r for r in records(api, session_id) if r["type"] == type_]


def session_row(api: Api, session_id: str) -> SessionRow:
    with transaction(api.broker.engine) as db:
        row = db.get(SessionRow, session_id)
        assert row is not None
        return row


def leases(api: Api, session_id: str) -> list[Lease]:
    with transaction(api.broker.engine) as db:
        return list(db.exec(select(Lease).where(Lease.session_id == session_id)).all())


def mint(api: Api, session: dict[str, Any], n: int = 2) -> list[str]:
    caps = []
    for _ in range(n):
        r = api.request(session, {"resource": "jwt://svc/ledger", "access": "read"})
        assert r.status_code == 201, r.text
        caps.append(r.json()["capability_id"])
    return caps


# --- stall: acceptance 2 ---------------------------------------------------------------------------


def test_the_idle_timeout_is_the_policys_default_or_the_sessions_own_within_its_bound(api: Api) -> None:
    default = api.new_session(scope=SCOPE)
    assert session_row(api, default["session_id"]).idle_timeout_seconds == 5
    own = api.new_session(scope=SCOPE, idle_timeout_seconds=600)
    view = api.client.get(f"/v1/sessions/{own['session_id']}", headers=api.as_orchestrator()).json()
    assert view["idle_timeout_seconds"] == 600 and view["idle_until"] is not None
    for too_long in (3601, 86400):
        r = api.client.post("/v1/sessions", headers=api.as_orchestrator(), json={
            "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 7200,
            "scope": SCOPE, "idle_timeout_seconds": too_long})
        assert r.status_code == 400 and r.json()["error"]["code"] == "idle-timeout-out-of-bounds", r.text
    bad: object
    for bad in (0, -1, 4, "ten", "NoneType", 1.5, [], {}):
        r = api.client.post("/v1/sessions", headers=api.as_orchestrator(), json={
            "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 7200,
            "scope": SCOPE, "idle_timeout_seconds": bad})
        assert r.status_code in (400, 422), (bad, r.text)


def test_an_idle_session_is_ended_by_the_sweeper_with_every_capability_revoked(tmp_path: Path,
                                                                               database_url: str) -> None:
    server, secrets_ = serve(tmp_path, database_url, sweeper=True)
    with server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, server.broker, client)
        session = api.new_session(scope=SCOPE)
        caps = mint(api, session, 3)
        sid = session["session_id"]
        # idle 5 s, granularity 1 s: ended after 5..6 s of silence, plus a sweep (0.2 s).
        deadline = time.monotonic() + 15
        while session_row(api, sid).status == "active":
            assert time.monotonic() < deadline, "the idle session was never ended"
            time.sleep(0.2)
        silent = (session_row(api, sid).ended_at - session_row(api, sid).last_seen_at).total_seconds()  # type: ignore[operator]
        assert 5 <= silent <= 6 + 1.5, silent
        row = session_row(api, sid)
        assert row.end_reason == "idle-timeout"
        # The end commits the session's status first, then revokes what it held (as every end
        # does): the revocations follow within a moment.
        while {lease.id: lease.status for lease in leases(api, sid)} != dict.fromkeys(caps, "revoked"):
            assert time.monotonic() < deadline, {lease.id: lease.status for lease in leases(api, sid)}
            time.sleep(0.1)
        ended = of_type(api, sid, "session.ended")
        assert len(ended) == 1 and ended[0]["request"]["reason"] == "idle-timeout"
        revoked = of_type(api, sid, "capability.revoked")
        assert sorted(r["jit_grant"]["capability_id"] for r in revoked) == sorted(caps)
        assert all(r["detail"]["receipt"]["status"] in ("revoked", "expires_naturally") for r in revoked)
        with transaction(api.broker.engine) as db:
            sets = db.exec(select(OutboxMessage).where(OutboxMessage.kind == "set")).all()
            assert verify(db).ok
        # The session token is now refused; nothing more is issued.
        r = api.request(session, {"resource": "jwt://svc/ledger", "access": "read"})
        assert r.status_code in (401, 403), r.text
        assert sets is not None


def test_a_heartbeat_keeps_a_quiet_session_and_silence_after_it_ends_the_session(tmp_path: Path,
                                                                                 database_url: str) -> None:
    server, secrets_ = serve(tmp_path, database_url, sweeper=True)
    with server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, server.broker, client)
        session = api.new_session(scope=SCOPE)
        sid = session["session_id"]
        started = time.monotonic()
        while time.monotonic() - started < 9:  # well past the 5 s timeout
            r = client.post(f"/v1/sessions/{sid}/heartbeat", headers=agent(session))
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "active" and r.json()["idle_timeout_seconds"] == 5
            time.sleep(1.5)
        assert session_row(api, sid).status == "active"
        deadline = time.monotonic() + 12
        while session_row(api, sid).status == "active":
            assert time.monotonic() < deadline, "silence after the heartbeats never ended the session"
            time.sleep(0.2)
        assert session_row(api, sid).end_reason == "idle-timeout"


def test_any_request_with_the_session_token_counts_as_a_sign_of_life(api: Api) -> None:
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    first = session_row(api, sid).idle_until
    assert first is not None
    time.sleep(1.1)  # the 5 s timeout's granularity is 1 s
    r = api.client.get(f"/v1/capabilities?session_id={sid}", headers=agent(session))
    assert r.status_code == 200, r.text
    later = session_row(api, sid).idle_until
    assert later is not None and later > first
    # Within the granularity a second request writes nothing.
    api.client.get(f"/v1/capabilities?session_id={sid}", headers=agent(session))
    assert session_row(api, sid).idle_until == later


def test_a_token_exchange_with_the_session_token_counts_as_a_sign_of_life(api: Api) -> None:
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    first = session_row(api, sid).idle_until
    time.sleep(1.1)
    r = api.client.post("/v1/oauth/token", data={
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange", "subject_token": session["session_token"],
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "resource": "jwt://svc/ledger",
        "scope": "read"})
    assert r.status_code == 200, r.text
    later = session_row(api, sid).idle_until
    assert first is not None and later is not None and later > first


def test_heartbeat_is_for_the_sessions_own_agent_only(api: Api) -> None:
    mine, other = api.new_session(scope=SCOPE), api.new_session(scope=SCOPE)
    for headers in (agent(other), api.as_orchestrator(), api.as_human("alice@example.com"), api.as_admin()):
        r = api.client.post(f"/v1/sessions/{mine['session_id']}/heartbeat", headers=headers)
        assert r.status_code in (403, 404), r.text
    assert api.client.post(f"/v1/sessions/{mine['session_id']}/heartbeat").status_code == 401


def test_a_stalled_session_is_not_revived_and_gets_nothing_new_before_the_sweep(api: Api) -> None:
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    past = utcnow() - timedelta(seconds=1)
    with transaction(api.broker.engine) as db:
        row = db.get(SessionRow, sid)
        assert row is not None
        row.idle_until = past
        db.add(row)
    time.sleep(1.1)  # past this replica's write granularity, so the next request tries to write
    r = api.request(session, {"resource": "jwt://svc/ledger", "access": "read"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "session-stalled", r.text
    r = api.client.post(f"/v1/sessions/{sid}/heartbeat", headers=agent(session))
    assert r.status_code == 200
    assert session_row(api, sid).idle_until == past  # neither request nor heartbeat moved it
    sweep_once(api.broker)
    assert session_row(api, sid).status == "ended" and session_row(api, sid).end_reason == "idle-timeout"


def test_the_idle_timeout_survives_a_restart_and_several_replicas_end_it_once(tmp_path: Path,
                                                                            database_url: str) -> None:
    secrets_ = BrokerSecrets()
    server, _ = serve(tmp_path, database_url, secrets_=secrets_)
    with server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, server.broker, client)
        sessions = [api.new_session(scope=SCOPE) for _ in range(6)]
        caps = {s["session_id"]: mint(api, s, 2) for s in sessions}
    # The first broker is gone. Three new replicas on the same database sweep at once, later.
    replicas = [build_broker(tmp_path, database_url, secrets_, POLICY) for _ in range(3)]
    later = utcnow() + timedelta(seconds=30)
    barrier = threading.Barrier(len(replicas))
    errors: list[BaseException] = []

    def sweep(broker: Any) -> None:
        try:
            barrier.wait()
            sweep_once(broker, now=later)
        except BaseException as exc:  # noqa: BLE001  # a thread's error of any kind is reported below
            errors.append(exc)

    threads = [threading.Thread(target=sweep, args=(b,)) for b in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    view = Api(server.base_url, secrets_, replicas[0], httpx.Client())
    for s in sessions:
        sid = s["session_id"]
        assert session_row(view, sid).status == "ended" and session_row(view, sid).end_reason == "idle-timeout"
        assert len(of_type(view, sid, "session.ended")) == 1
        revoked = Counter(r["jit_grant"]["capability_id"] for r in of_type(view, sid, "capability.revoked"))
        assert revoked == Counter(caps[sid]), revoked
    with transaction(replicas[0].engine) as db:
        assert verify(db).ok
    for b in replicas:
        b.engine.dispose()


# --- deviation: acceptance 3 -----------------------------------------------------------------------


def refuse(api: Api, session: dict[str, Any], resource: str = "jwt://svc/payroll", access: str = "read") -> str:
    r = api.request(session, {"resource": resource, "access": access})
    assert r.status_code == 403, r.text
    return str(r.json()["error"]["code"])


def test_the_nth_refusal_in_the_window_suspends_and_not_before_and_a_human_resumes(api: Api) -> None:
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    assert refuse(api, session) == "outside-task-scope"
    assert refuse(api, session, "jwt://svc/ledger", "drop") == "agent-ceiling"  # destructive, above review
    # A refusal that is not deviation (the policy knows no such resource) does not count.
    assert refuse(api, session, "jwt://elsewhere/x") == "unknown-resource"
    assert session_row(api, sid).suspended_at is None
    assert of_type(api, sid, "session.suspended") == []
    mint(api, session, 1)  # two refusals: still working
    assert refuse(api, session) == "outside-task-scope"  # the third: trips
    row = session_row(api, sid)
    assert row.suspended_at is not None and row.status == "active" and row.suspend_reason == "deviation"
    r = api.request(session, {"resource": "jwt://svc/ledger", "access": "read"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "session-suspended", r.text
    suspended = of_type(api, sid, "session.suspended")
    assert len(suspended) == 1
    detail = suspended[0]["detail"]
    assert [(x["reason"], x["resource"]) for x in detail["refusals"]] == [
        ("outside-task-scope", "jwt://svc/payroll"), ("agent-ceiling", "jwt://svc/ledger"),
        ("outside-task-scope", "jwt://svc/payroll")]
    assert detail["threshold"] == 3 and detail["action"] == "suspend"
    with transaction(api.broker.engine) as db:
        notes = [json.loads(m.body) for m in db.exec(select(OutboxMessage).where(
            OutboxMessage.type == "session.suspended")).all()]
    assert len(notes) == 1 and notes[0]["session_id"] == sid
    assert "user:alice@example.com" in notes[0]["notify"] and "group:maintainers" in notes[0]["notify"]
    # The timeline (the session's audit, as the console shows it) holds both states.
    r = api.client.get(f"/v1/audit?session_id={sid}", headers=api.as_human("alice@example.com"))
    assert r.status_code == 200
    # Who may lift it: its human and admins; not the agent, not another human, not the orchestrator.
    for headers in (agent(session), api.as_human("bob@example.com"), api.as_orchestrator()):
        r = api.client.post(f"/v1/sessions/{sid}/resume", headers=headers, json={})
        assert r.status_code == 404, r.text
    r = api.client.post(f"/v1/sessions/{sid}/resume", headers=api.as_human("alice@example.com"),
                        json={"reason": "looked at it: a typo in the task"})
    assert r.status_code == 200 and r.json()["suspended_at"] is None, r.text
    r = api.client.post(f"/v1/sessions/{sid}/resume", headers=api.as_admin(), json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "session-not-suspended"
    mint(api, session, 1)
    resumed = of_type(api, sid, "session.resumed")
    assert len(resumed) == 1 and resumed[0]["actor"] == "human:alice@example.com"
    types = [r["type"] for r in records(api, sid)]
    assert types.index("session.suspended") < types.index("session.resumed")
    # A fresh window: two more refusals do not trip it again.
    refuse(api, session)
    refuse(api, session)
    assert session_row(api, sid).suspended_at is None


def test_refusals_outside_the_window_do_not_count(tmp_path: Path, database_url: str) -> None:
    policy = STANDARD_TIERS + RESOURCES + "deviation: {refusals: 2, window: 2s, action: suspend}\n"
    server, secrets_ = serve(tmp_path, database_url, policy)
    with server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, server.broker, client)
        session = api.new_session(scope=SCOPE)
        sid = session["session_id"]
        refuse(api, session)
        time.sleep(2.2)
        refuse(api, session)
        assert session_row(api, sid).suspended_at is None
        with transaction(api.broker.engine) as db:  # the old one was pruned, the new one kept
            assert len(db.exec(select(SessionRefusal).where(SessionRefusal.session_id == sid)).all()) == 1
        refuse(api, session)
        assert session_row(api, sid).suspended_at is not None


def test_the_end_action_ends_the_session_with_receipts(tmp_path: Path, database_url: str) -> None:
    policy = STANDARD_TIERS + RESOURCES + "deviation: {refusals: 2, window: 10m, action: end}\n"
    server, secrets_ = serve(tmp_path, database_url, policy)
    with server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, server.broker, client)
        session = api.new_session(scope=SCOPE)
        sid = session["session_id"]
        caps = mint(api, session, 2)
        refuse(api, session)
        refuse(api, session)
        row = session_row(api, sid)
        assert row.status == "ended" and row.end_reason == "deviation"
        assert {lease.status for lease in leases(api, sid)} == {"revoked"} and len(caps) == 2
        types = [r["type"] for r in records(api, sid)]
        assert types.count("session.deviation-tripped") == 1 and types.count("session.ended") == 1
        assert types.index("session.deviation-tripped") < types.index("session.ended")


def test_the_console_timeline_shows_the_suspension_and_its_human_resumes_it(api: Api) -> None:
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    for _ in range(3):
        refuse(api, session)
    with ConsoleBrowser(api.base_url) as alice:
        alice.sign_in_with_token(api.secrets.human_tokens["alice@example.com"])
        page = alice.http.get(f"/console/sessions/{sid}")
        assert page.status_code == 200 and 'id="suspended"' in page.text and "session.suspended" in page.text
        r = alice.post(f"/console/sessions/{sid}/resume", csrf_token="forged")
        assert r.status_code == 403 and session_row(api, sid).suspended_at is not None
        r = alice.post(f"/console/sessions/{sid}/resume", csrf_token=alice.csrf(f"/console/sessions/{sid}"),
                       reason="checked")
        assert r.status_code == 303, r.text
        page = alice.http.get(f"/console/sessions/{sid}")
        assert 'id="suspended"' not in page.text and "session.resumed" in page.text
    assert session_row(api, sid).suspended_at is None


def test_broker_cli_sessions_resume_lifts_the_suspension(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    for _ in range(3):
        refuse(api, session)
    assert session_row(api, sid).suspended_at is not None
    monkeypatch.setenv("BROKER_URL", api.base_url)
    monkeypatch.setenv("BROKER_TOKEN", api.secrets.admin_token)
    out = CliRunner().invoke(cli, ["sessions", "resume", sid, "--reason", "checked"])
    assert out.exit_code == 0, out.output
    assert f"{sid} resumed" in out.output
    assert session_row(api, sid).suspended_at is None
    again = CliRunner().invoke(cli, ["sessions", "resume", sid])
    assert again.exit_code != 0 and "session-not-suspended" in again.output


@pytest.mark.parametrize(("kind", "code"), ALL, ids=ids(ALL))
def test_hostile_resources_and_resume_reasons_are_counted_as_sent_and_never_500(api: Api, kind: str,
                                                                               code: int) -> None:
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    hostile = f"jwt://svc/pay{chr(code)}roll"
    answers = []
    for _ in range(3):
        r = api.request(session, {"resource": hostile, "access": "read"})
        assert r.status_code in (400, 403, 422), (kind, r.status_code, r.text)
        answers.append(r.json()["error"]["code"])
    with transaction(api.broker.engine) as db:
        counted = db.exec(select(SessionRefusal).where(SessionRefusal.session_id == sid)).all()
    tripped = of_type(api, sid, "session.suspended")
    if answers == ["outside-task-scope"] * 3:
        assert len(tripped) == 1
        assert {x["resource"] for x in tripped[0]["detail"]["refusals"]} <= {hostile, hostile.lower()}
        r = api.client.post(f"/v1/sessions/{sid}/resume", headers=api.as_admin(),
                            json={"reason": f"ok {chr(code)} fine"})
        assert r.status_code in (200, 400, 422), r.text
    else:  # refused as malformed before any layer: not deviation, nothing counted
        assert tripped == [] and list(counted) == []
