"""Every documented error status is reachable, with its kebab-case code, and nothing is
left half-written: bad input is 4xx (never 500), audit failure fails closed, provider
failures leave an audited `failed` lease."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlmodel import Session, select

from broker.models import AuditRecord, Lease, SessionRow
from tests.support.brokers import TEST_POLICY, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.github_standin import GitHubStandIn
from tests.support.ports import free_port


def _code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_400_bad_input(api: Api) -> None:
    session = api.new_session()
    agent = {"Authorization": f"Bearer {session['session_token']}", "Content-Type": "application/json"}
    r = api.client.post("/v1/capabilities", content=b'{"resource": ', headers=agent)
    assert (r.status_code, _code(r)) == (400, "invalid-json")
    for bad in ("not-a-uri", "jwt://", "jwt://a b", "jwt://../etc", "JWT://x", "jwt://svc/*"):
        r = api.request(session, {"resource": bad, "access": "read"})
        assert (r.status_code, _code(r)) == (400, "invalid-resource"), bad
    r = api.client.post("/v1/sessions", headers=api.as_orchestrator(), json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 6 * 86400,
        "scope": [{"resource": "jwt://x", "access": ["read"]}]})
    assert (r.status_code, _code(r)) == (400, "ttl-out-of-bounds")
    r = api.client.post("/v1/policy/explain", headers=api.as_admin(), json={"resource": "jwt://x", "access": "read"})
    assert (r.status_code, _code(r)) == (400, "explain-needs-session")


def test_401_identity(api: Api) -> None:
    session = api.new_session()
    body = {"resource": "jwt://payments-api", "access": "read", "purpose": "p"}
    r = api.client.post("/v1/capabilities", json=body)
    assert (r.status_code, _code(r)) == (401, "missing-credentials")
    # RFC 6750 with RFC 9728's pointer to the protected resource metadata (docs/oauth.md).
    assert r.headers["www-authenticate"].startswith("Bearer ")
    assert 'resource_metadata="' in r.headers["www-authenticate"]
    r = api.client.post("/v1/capabilities", json=body, headers={"Authorization": "Bearer nonsense"})
    assert (r.status_code, _code(r)) == (401, "invalid-token")
    head, payload, sig = session["session_token"].split(".")
    forged = f"{head}.{payload}.{sig[:-4]}AAAA"
    r = api.client.post("/v1/capabilities", json=body, headers={"Authorization": f"Bearer {forged}"})
    assert (r.status_code, _code(r)) == (401, "invalid-token")
    # A capability token is not a session token, even though the broker signed both.
    cap = api.request(session, {"resource": "jwt://payments-api", "access": "read"}).json()
    r = api.client.post("/v1/capabilities", json=body, headers={"Authorization": f"Bearer {cap['credential']['token']}"})
    assert (r.status_code, _code(r)) == (401, "invalid-token")


def test_403_wrong_caller_and_denial(api: Api) -> None:
    session = api.new_session()
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    r = api.client.post("/v1/sessions", headers=agent, json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
        "scope": [{"resource": "jwt://x", "access": ["read"]}]})
    assert (r.status_code, _code(r)) == (403, "forbidden")
    r = api.client.post("/v1/capabilities", headers=api.as_orchestrator(),
                        json={"resource": "jwt://payments-api", "access": "read", "purpose": "p"})
    assert (r.status_code, _code(r)) == (403, "forbidden")
    r = api.client.get("/v1/audit/verify", headers=agent)
    assert (r.status_code, _code(r)) == (403, "forbidden")


def test_404_and_405(api: Api) -> None:
    r = api.client.get("/v1/capabilities/cap_doesnotexist", headers=api.as_admin())
    assert (r.status_code, _code(r)) == (404, "capability-not-found")
    r = api.client.get("/v1/sessions/ses_nope", headers=api.as_admin())
    assert (r.status_code, _code(r)) == (404, "session-not-found")
    r = api.client.get("/v1/nothing-here")
    assert (r.status_code, _code(r)) == (404, "not-found")
    r = api.client.put("/v1/capabilities")
    assert (r.status_code, _code(r)) == (405, "method-not-allowed")


def test_409_and_413(api: Api) -> None:
    session = api.new_session()
    api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "k"})
    r = api.request(session, {"resource": "jwt://payments-api", "access": "write"}, **{"Idempotency-Key": "k"})
    assert (r.status_code, _code(r)) == (409, "idempotency-key-reused")
    r = api.client.post("/v1/capabilities", content=b"x" * (1024 * 1024 + 1),
                        headers={"Authorization": f"Bearer {session['session_token']}", "Content-Type": "application/json"})
    assert (r.status_code, _code(r)) == (413, "payload-too-large")


@pytest.mark.parametrize(
    "body",
    [
        {"resource": "jwt://payments-api", "access": "read", "purpose": "p", "extra": 1},  # unknown field
        {"resource": "jwt://payments-api", "access": "read", "purpose": "p", "ttl_seconds": "soon"},  # wrong type
        {"resource": "jwt://payments-api", "access": "read", "purpose": "p", "ttl_seconds": 0},  # ttl too small
        {"resource": "jwt://payments-api", "access": "read", "purpose": "p", "ttl_seconds": 86401},  # too large
        {"resource": "jwt://payments-api", "access": "read", "purpose": "p" * 1001},  # oversize string
        {"resource": "jwt://" + "a" * 600, "access": "read", "purpose": "p"},  # oversize resource
        {"resource": "jwt://payments-api", "access": "READ", "purpose": "p"},  # access name syntax
        {"resource": "jwt://payments-api", "access": "read"},  # purpose missing
        {"resource": "jwt://payments-api", "access": "read", "purpose": "p", "parameters": {"x": "y" * 20000}},
        [1, 2, 3],  # not an object
    ],
    ids=["unknown-field", "wrong-type", "ttl-zero", "ttl-huge", "long-purpose", "long-resource", "access-case",
         "no-purpose", "huge-parameters", "array"],
)
def test_422_schema(api: Api, body: object) -> None:
    session = api.new_session()
    r = api.client.post("/v1/capabilities", json=body, headers={"Authorization": f"Bearer {session['session_token']}"})
    assert (r.status_code, _code(r)) == (422, "validation-failed")
    assert r.json()["error"]["problems"]
    assert all("input" not in p and "ctx" not in p for p in r.json()["error"]["problems"])  # values not echoed


def test_422_session_schema(api: Api) -> None:
    for body in (
        {"human": "", "agent": "x", "task_id": "t", "ttl_seconds": 600, "scope": [{"resource": "jwt://x",
                                                                                 "access": ["read"]}]},
        {"human": "a@b", "agent": "x", "task_id": "t", "ttl_seconds": 10, "scope": [{"resource": "jwt://x",
                                                                                   "access": ["read"]}]},
        {"human": "a@b", "agent": "x", "task_id": "t", "ttl_seconds": 600, "scope": []},
        {"human": "a@b", "agent": "x", "task_id": "t", "ttl_seconds": 600, "scope": [{"resource": "nope", "access": ["read"]}]},
    ):
        r = api.client.post("/v1/sessions", json=body, headers=api.as_orchestrator())
        assert (r.status_code, _code(r)) == (422, "validation-failed"), body
    # A human the schema admits (1 to 320 characters) but that has no canonical form is one answer,
    # whatever is wrong with it: 400 invalid-principal (docs/identity.md).
    for human in ("a b", "a\u00a0b@example.com", "\u212aate@example.com"):
        r = api.client.post("/v1/sessions", headers=api.as_orchestrator(), json={
            "human": human, "agent": "x", "task_id": "t", "ttl_seconds": 600,
            "scope": [{"resource": "jwt://x", "access": ["read"]}]})
        assert (r.status_code, _code(r)) == (400, "invalid-principal"), human


def _block_audit(api: Api) -> None:
    with api.broker.engine.begin() as conn:
        if api.broker.engine.dialect.name == "sqlite":
            conn.execute(text("CREATE TRIGGER audit_offline BEFORE INSERT ON audit_records "
                              "BEGIN SELECT RAISE(ABORT, 'audit offline'); END"))
        else:
            conn.execute(text("CREATE FUNCTION audit_offline() RETURNS trigger AS $$ BEGIN "
                              "RAISE EXCEPTION 'audit offline'; END $$ LANGUAGE plpgsql"))
            conn.execute(text("CREATE TRIGGER audit_offline BEFORE INSERT ON audit_records "
                              "FOR EACH ROW EXECUTE FUNCTION audit_offline()"))


def test_500_when_the_audit_cannot_be_written_nothing_is_granted(api: Api) -> None:
    session = api.new_session()
    _block_audit(api)
    r = api.request(session, {"resource": "jwt://payments-api", "access": "read"})
    assert (r.status_code, _code(r)) == (500, "audit-write-failed")
    assert "credential" not in r.text
    with Session(api.broker.engine) as db:
        leases = db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all()
        # Native mints in the decision's own transaction: without its audit record, nothing
        # of it was committed (remote providers end `failed`, see test_all_providers).
        assert leases == []
    before = api.client.get("/v1/sessions", headers=api.as_admin()).json()
    r = api.client.post("/v1/sessions", headers=api.as_orchestrator(), json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
        "scope": [{"resource": "jwt://x", "access": ["read"]}]})
    assert (r.status_code, _code(r)) == (500, "audit-write-failed")
    assert len(api.client.get("/v1/sessions", headers=api.as_admin()).json()) == len(before)  # nothing half-written


GITHUB_POLICY = TEST_POLICY.replace(
    "humans:",
    """  - match: "github://acme/*"
    provider: github
    access:
      read: {tier: read, permissions: {contents: read}}
  - match: "github://nobody/*"
    provider: github
    access:
      read: {tier: read, permissions: {contents: read}}
humans:""",
).replace(
    '      - {resource: "jwt://svc/*", access: [read]}',
    '      - {resource: "jwt://svc/*", access: [read]}\n      - {resource: "github://**", access: [read]}',
)


def test_github_through_the_api_and_502_503_from_providers(
    database_url: str, tmp_path: Path, github_standin: GitHubStandIn
) -> None:
    github_standin.reset()
    secrets_ = BrokerSecrets()
    gh = {"github_api_url": github_standin.url, "github_app_id": github_standin.app_id,
          "github_private_key_file": github_standin.private_key_path}
    broker = build_broker(tmp_path, database_url, secrets_, GITHUB_POLICY, **gh)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session(scope=[{"resource": "github://**", "access": ["read"]}])
        r = api.request(session, {"resource": "github://acme/widgets", "access": "read"})
        assert r.status_code == 201, r.text
        cred = r.json()["credential"]
        assert cred["type"] == "github_token" and cred["permissions"] == {"contents": "read"}
        auth = {"Authorization": f"Bearer {cred['token']}"}
        headers = {**auth, "User-Agent": "t"}
        assert httpx.get(f"{github_standin.url}/repos/acme/widgets/contents/README.md", headers=headers).status_code == 200
        assert httpx.get(f"{github_standin.url}/repos/acme/gadgets/contents/README.md", headers=headers).status_code == 404
        with Session(broker.engine) as db:
            lease = db.get(Lease, r.json()["capability_id"])
            assert lease.sealed_secret and cred["token"] not in lease.sealed_secret  # ciphertext only
        agent = {"Authorization": f"Bearer {session['session_token']}"}
        assert client.delete(f"/v1/capabilities/{r.json()['capability_id']}", headers=agent).json()["status"] == "revoked"
        dead = httpx.get(f"{github_standin.url}/repos/acme/widgets/contents/README.md", headers={**auth, "User-Agent": "t"})
        assert dead.status_code == 401
        with Session(broker.engine) as db:
            assert db.get(Lease, r.json()["capability_id"]).sealed_secret is None  # gone once revoked

        r = api.request(session, {"resource": "github://nobody/repo", "access": "read"})
        assert (r.status_code, _code(r)) == (502, "provider-rejected")
        with Session(broker.engine) as db:
            failed = db.exec(select(Lease).where(Lease.status == "failed")).all()
            assert [lease.resource for lease in failed] == ["github://nobody/repo"]
            kinds = [a.type for a in db.exec(select(AuditRecord).where(AuditRecord.session_id == session["session_id"])).all()]
            assert kinds.count("capability.mint_failed") == 1

    down = build_broker(tmp_path, database_url, secrets_, GITHUB_POLICY,
                        **{**gh, "github_api_url": f"http://127.0.0.1:{free_port()}", "provider_timeout_seconds": 2})
    with LiveServer(down) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, down, client)
        session = api.new_session(scope=[{"resource": "github://**", "access": ["read"]}])
        r = api.request(session, {"resource": "github://acme/widgets", "access": "read"})
        assert (r.status_code, _code(r)) == (503, "provider-unavailable")
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["providers"]["github"]["ok"] is False
        with Session(down.engine) as db:
            assert db.get(SessionRow, session["session_id"]) is not None
