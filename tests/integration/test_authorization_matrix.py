"""Who may call what: every endpoint x every kind of caller, with the status each must get.

Each case runs against a fresh world on one broker (SQLite and PostgreSQL): session S
(delegated by alice, provisioned by `orch`) holding capability C and waiting on approval A,
and session S2 (mallory's, provisioned by `orch2`). Every refusal is then checked to have
changed nothing: C still active, S still active, A still pending. So no cross-session read,
revoke or approval is possible; lists are checked not to show another session's rows.
Humans use local human tokens (BROKER_HUMAN_TOKENS).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.approvals import APPROVALS_POLICY, DEPLOY
from tests.support.brokers import BrokerSecrets, LiveServer, build_broker
from tests.support.databases import PgDatabases

CALLERS = ("anonymous", "agent", "other_agent", "orchestrator", "other_orchestrator", "delegator", "other_human",
           "approver", "admin")
ALICE, BOB, MALLORY = "alice@example.com", "bob@example.com", "mallory@example.com"
# Every case's world leaves approval A pending in the one broker: the approvers' budget of
# pending approvals (default 50) is raised so the worlds do not run into it.
MATRIX_POLICY = APPROVALS_POLICY.replace("max_active_per_session: 30}",
                                         "max_active_per_session: 30, max_pending_approvals_per_approver: 100000}")
assert MATRIX_POLICY != APPROVALS_POLICY


@dataclass
class World:
    session: str
    capability: str
    approval: str
    other_session: str
    headers: dict[str, dict[str, str]]
    capability_token: str = ""


@dataclass
class Env:
    client: httpx.Client
    secrets: BrokerSecrets
    orch2_key: str

    def world(self) -> World:
        orch = {"Authorization": f"Bearer {self.secrets.orchestrator_key}"}
        orch2 = {"Authorization": f"Bearer {self.orch2_key}"}

        def provision(human: str, headers: dict[str, str]) -> dict[str, Any]:
            r = self.client.post("/v1/sessions", headers=headers, json={
                "human": human, "agent": "claude-code", "task_id": secrets.token_hex(4), "ttl_seconds": 3600,
                "scope": [{"resource": "jwt://payments-api", "access": ["*"]}]})
            assert r.status_code == 201, r.text
            return r.json()  # type: ignore[no-any-return]

        s, s2 = provision(ALICE, orch), provision(MALLORY, orch2)
        agent = {"Authorization": f"Bearer {s['session_token']}"}
        cap = self.client.post("/v1/capabilities", headers=agent,
                               json={"resource": "jwt://payments-api", "access": "read", "purpose": "matrix"})
        assert cap.status_code == 201, cap.text
        pending = self.client.post("/v1/capabilities", headers=agent, json={**DEPLOY, "purpose": "matrix"})
        assert pending.status_code == 202, pending.text
        human = self.secrets.human_tokens
        return World(
            session=s["session_id"], capability=cap.json()["capability_id"], approval=pending.json()["approval_id"],
            other_session=s2["session_id"], capability_token=cap.json()["credential"]["token"],
            headers={
                "anonymous": {},
                "agent": agent,
                "other_agent": {"Authorization": f"Bearer {s2['session_token']}"},
                "orchestrator": orch,
                "other_orchestrator": orch2,
                "delegator": {"Authorization": f"Bearer {human[ALICE]}"},
                "other_human": {"Authorization": f"Bearer {human[MALLORY]}"},
                "approver": {"Authorization": f"Bearer {human[BOB]}"},
                "admin": {"Authorization": f"Bearer {self.secrets.admin_token}"},
            },
        )

    def state(self, w: World) -> tuple[str, str, str]:
        admin = w.headers["admin"]
        return (self.client.get(f"/v1/capabilities/{w.capability}", headers=admin).json()["status"],
                self.client.get(f"/v1/sessions/{w.session}", headers=admin).json()["status"],
                self.client.get(f"/v1/approvals/{w.approval}", headers=admin).json()["status"])


def _row(*statuses: int) -> dict[str, int]:
    assert len(statuses) == len(CALLERS)
    return dict(zip(CALLERS, statuses, strict=True))


Check = Callable[[World, httpx.Response], bool]


def _sees(key: str, field: str) -> Check:
    """A list answer shows the world's row."""
    return lambda w, r: any(item[field] == getattr(w, key) for item in r.json())


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str  # formatted with the world's ids
    expected: dict[str, int]
    body: Callable[[World], Any] | None = None
    # For 200 answers of list-like endpoints: which callers see the world's row.
    visible_to: frozenset[str] | None = None
    sees: Check | None = None
    # A form-encoded body (the OAuth endpoints), given the world and the caller's name.
    form: Callable[[World, str], dict[str, str]] | None = None


def _own_bearer(w: World, caller: str) -> str:
    return w.headers[caller].get("Authorization", "").removeprefix("Bearer ")


OWN = frozenset({"agent", "orchestrator", "delegator", "admin"})
CASES = [
    #                                            anon agent oagent orch oorch deleg ohum appr admin
    Case("provision", "POST", "/v1/sessions", _row(401, 403, 403, 201, 201, 403, 403, 403, 201),
         body=lambda w: {"human": ALICE, "agent": "claude-code", "task_id": "m", "ttl_seconds": 600,
                         "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]}),
    Case("list sessions", "GET", "/v1/sessions", _row(401, 403, 403, 200, 200, 200, 200, 200, 200),
         visible_to=OWN - {"agent"}, sees=_sees("session", "session_id")),
    Case("read session", "GET", "/v1/sessions/{session}", _row(401, 200, 404, 200, 404, 200, 404, 404, 200)),
    Case("end session", "POST", "/v1/sessions/{session}/end", _row(401, 200, 404, 200, 404, 200, 404, 404, 200)),
    # Stall: only the session's own agent keeps it alive.
    Case("heartbeat", "POST", "/v1/sessions/{session}/heartbeat", _row(401, 200, 404, 403, 403, 403, 403, 403, 403)),
    # Deviation: only its human or an admin lifts a suspension (the world's session is not suspended: 409).
    Case("resume session", "POST", "/v1/sessions/{session}/resume", _row(401, 404, 404, 404, 404, 409, 404, 404, 409),
         body=lambda w: {}),
    # Break-glass post-reviews: people only; a review nobody may see is 404 like a missing one.
    Case("list reviews", "GET", "/v1/reviews", _row(401, 403, 403, 403, 403, 200, 200, 200, 200)),
    Case("close review", "POST", "/v1/reviews/rev_00000000000000000000000000000000/close",
         _row(401, 403, 403, 403, 403, 404, 404, 404, 404), body=lambda w: {"verdict": "appropriate"}),
    Case("request capability", "POST", "/v1/capabilities", _row(401, 201, 201, 403, 403, 403, 403, 403, 403),
         body=lambda w: {"resource": "jwt://payments-api", "access": "read", "purpose": "m"}),
    Case("list capabilities", "GET", "/v1/capabilities", _row(401, 200, 200, 200, 200, 200, 200, 200, 200),
         visible_to=OWN, sees=_sees("capability", "capability_id")),
    Case("list session capabilities", "GET", "/v1/capabilities?session_id={session}",
         _row(401, 200, 403, 200, 404, 200, 404, 404, 200)),
    Case("read capability", "GET", "/v1/capabilities/{capability}", _row(401, 200, 404, 200, 404, 200, 404, 404, 200)),
    Case("revoke capability", "DELETE", "/v1/capabilities/{capability}",
         _row(401, 200, 404, 200, 404, 200, 404, 404, 200)),
    Case("list approvals", "GET", "/v1/approvals", _row(401, 200, 200, 200, 200, 200, 200, 200, 200),
         visible_to=OWN | {"approver"}, sees=_sees("approval", "approval_id")),
    Case("read approval", "GET", "/v1/approvals/{approval}", _row(401, 200, 404, 200, 404, 200, 404, 200, 200)),
    Case("long-poll approval", "GET", "/v1/approvals/{approval}?wait=0",
         _row(401, 200, 404, 200, 404, 200, 404, 200, 200)),
    Case("approve", "POST", "/v1/approvals/{approval}/approve", _row(401, 403, 403, 403, 403, 403, 404, 200, 403)),
    Case("deny", "POST", "/v1/approvals/{approval}/deny", _row(401, 403, 403, 403, 403, 200, 404, 200, 403)),
    Case("grant", "POST", "/v1/grants", _row(401, 403, 403, 403, 403, 403, 404, 201, 403),
         body=lambda w: {"session_id": w.session, "resource": "jwt://payments-api", "access": "deploy",
                         "ttl_seconds": 300, "uses": 1}),
    Case("kill switch", "POST", "/v1/revocations", _row(401, 403, 403, 200, 200, 200, 200, 200, 200),
         body=lambda w: {"session_id": w.session},
         visible_to=frozenset({"orchestrator", "delegator", "admin"}),
         sees=lambda w, r: r.json()["matched_capabilities"] == 1),
    Case("explain", "POST", "/v1/policy/explain", _row(401, 403, 403, 403, 403, 200, 404, 404, 200),
         body=lambda w: {"session_id": w.session, "resource": "jwt://payments-api", "access": "deploy"}),
    Case("read audit", "GET", "/v1/audit?session_id={session}", _row(401, 403, 403, 200, 404, 200, 404, 404, 200)),
    Case("verify audit", "GET", "/v1/audit/verify", _row(401, 403, 403, 403, 403, 403, 403, 403, 200)),
    Case("whoami", "GET", "/v1/whoami", _row(401, 200, 200, 200, 200, 200, 200, 200, 200)),
    Case("tool-call gate", "POST", "/v1/hooks/pre-tool-use", _row(401, 200, 200, 403, 403, 403, 403, 403, 403),
         body=lambda w: {"hook_event_name": "PreToolUse", "tool_name": "Read", "tool_input": {"file_path": "README.md"}}),
    # RFC 8693: the subject token is the caller's own credential; only a session token is exchanged.
    Case("oauth token exchange", "POST", "/v1/oauth/token", _row(400, 200, 200, 400, 400, 400, 400, 400, 400),
         form=lambda w, caller: {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                                 "subject_token": _own_bearer(w, caller),
                                 "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                                 "resource": "jwt://payments-api", "scope": "read"}),
    # RFC 7009: authorised as DELETE on the capability; a real token someone else may not revoke is refused.
    # Without any credentials, holding the token is the right to revoke it (docs/oauth.md), so the
    # anonymous caller's 200 is that token's revocation, recorded as `revoked-by-token-holder`.
    Case("oauth revoke", "POST", "/v1/oauth/revoke", _row(200, 200, 403, 200, 403, 200, 403, 403, 200),
         form=lambda w, caller: {"token": w.capability_token}),
    # MCP consent: a person's own bearer token; an id nobody opened is 404 to every person, never a hint.
    Case("mcp authorization ask", "GET", "/v1/oauth/authorizations/az_00000000000000000000000000000000",
         _row(401, 403, 403, 403, 403, 404, 404, 404, 404)),
    Case("mcp consent decision", "POST", "/v1/oauth/authorizations/az_00000000000000000000000000000000/decision",
         _row(401, 403, 403, 403, 403, 404, 404, 404, 403), body=lambda w: {"decision": "approve"}),
    # Without a signature the bearer is the sender: orchestrators and admin only. Another
    # orchestrator's delivery is answered (200 "unmatched") and ends nothing of the world's:
    # tests/integration/test_workload_identity.py checks that state.
    Case("orchestrator webhook (bearer, no signature)", "POST", "/v1/webhooks/orchestrator",
         _row(401, 403, 403, 200, 200, 403, 403, 403, 200),
         body=lambda w: {"id": secrets.token_hex(8), "type": "session.ended", "session_id": w.session}),
]
PUBLIC = ["/healthz", "/readyz", "/.well-known/jwks.json", "/metrics", "/v1/login",
          "/.well-known/oauth-authorization-server", "/.well-known/oauth-protected-resource",
          "/.well-known/ssf-configuration"]


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        pg_databases: PgDatabases) -> Iterator[Env]:
    directory: Path = tmp_path_factory.mktemp("matrix")
    url = f"sqlite:///{directory}/broker.db" if request.param == "sqlite" else pg_databases.create()
    secrets_ = BrokerSecrets()
    orch2_key = "jborc_" + secrets.token_urlsafe(24)
    keys = (f"orch={hashlib.sha256(secrets_.orchestrator_key.encode()).hexdigest()},"
            f"orch2={hashlib.sha256(orch2_key.encode()).hexdigest()}")
    broker = build_broker(directory, url, secrets_, MATRIX_POLICY, orchestrator_api_keys=keys)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Env(client, secrets_, orch2_key)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_caller_gets_the_expected_status(env: Env, case: Case) -> None:
    mismatches = []
    for caller in CALLERS:
        world = env.world()
        path = case.path.format(session=world.session, capability=world.capability, approval=world.approval)
        body = case.body(world) if case.body else None
        if case.form is not None:
            r = env.client.request(case.method, path, headers=world.headers[caller], data=case.form(world, caller))
        else:
            r = env.client.request(case.method, path, headers=world.headers[caller], json=body)
        want = case.expected[caller]
        if r.status_code != want:
            mismatches.append(f"{caller}: got {r.status_code} want {want}: {r.text[:200]}")
            continue
        if r.status_code >= 400:
            error = r.json()["error"]  # the broker's {"code", ...}, or an OAuth error name with `code` beside it
            assert (error["code"] if isinstance(error, dict) else error and r.json()["code"]), r.text
            # A refusal changed nothing: no cross-session read, revoke or approval slipped through.
            assert env.state(world) == ("active", "active", "pending"), (caller, case.name)
        elif (case.sees is not None and case.visible_to is not None
              and case.sees(world, r) != (caller in case.visible_to)):
            mismatches.append(f"{caller}: {'sees' if caller not in case.visible_to else 'misses'} "
                              f"the world's row in {case.name}")
    assert not mismatches, "\n".join(mismatches)


def test_public_endpoints_need_no_identity(env: Env) -> None:
    for path in PUBLIC:
        assert env.client.get(path).status_code == 200, path
    # Introspection answers anyone, and says nothing about tokens it did not issue.
    assert env.client.post("/v1/introspect", data={"token": "x.y.z"}).json() == {"active": False}


def test_a_session_token_is_not_a_human_and_a_human_token_is_not_an_agent(env: Env) -> None:
    w = env.world()
    # A human token cannot ask for capabilities (no session), an agent cannot grant to itself.
    r = env.client.post("/v1/capabilities", headers=w.headers["approver"],
                        json={"resource": "jwt://payments-api", "access": "read", "purpose": "x"})
    assert r.status_code == 403
    r = env.client.post("/v1/grants", headers=w.headers["agent"], json={
        "session_id": w.session, "resource": "jwt://payments-api", "access": "deploy", "ttl_seconds": 60})
    assert r.status_code == 403 and r.json()["error"]["code"] == "granter-must-be-human"
    # Another session's agent presenting this session's approval id mints nothing.
    approved = env.client.post(f"/v1/approvals/{w.approval}/approve", headers=w.headers["approver"])
    assert approved.status_code == 200
    r = env.client.post("/v1/capabilities", headers=w.headers["other_agent"],
                        json={**DEPLOY, "purpose": "matrix", "approval_id": w.approval})
    assert r.status_code == 404 and r.json()["error"]["code"] == "approval-not-found"
    assert env.state(w) == ("active", "active", "approved")
