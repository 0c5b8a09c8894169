"""The request boundary against a real served broker: body size on the stream, JSON bounds,
NUL bytes, ids and ranges, no-store on secret-bearing answers, the OpenAPI document and 405s.

Each test here failed before the guard (broker/api/guard.py) and the bounds (broker/jsonbounds.py)
existed: chunked bodies were buffered whole, deep or odd JSON answered 500, NUL bytes reached
PostgreSQL, `since=10**30` overflowed the database's integer, the audit reader broke on a deep
record, the session token was answered cacheable, and 405s named no `Allow`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from broker.api.guard import MAX_BODY_BYTES, PATH_BODY_LIMITS
from broker.audit.service import AuditEvent, append
from broker.cli.main import app as cli_app
from broker.db import transaction
from broker.metrics import REGISTRY
from broker.models import SessionRow
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker

CHUNK = 64 * 1024
UPLOAD = 64 * 1024 * 1024  # what the attacker offers; the server must stop long before


def _code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]  # type: ignore[no-any-return]


@pytest.fixture
def sqlite_api(tmp_path: Path) -> Iterator[Api]:
    """For the checks that do not touch the database twice: one served broker on SQLite."""
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", secrets_)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield Api(server.base_url, secrets_, broker, client)


# --- 1. body size on the stream ------------------------------------------------------------------

def _refused() -> tuple[float, float]:
    return (REGISTRY.get_sample_value("broker_refused_body_bytes_count") or 0.0,
            REGISTRY.get_sample_value("broker_refused_body_bytes_sum") or 0.0)


@pytest.mark.parametrize("path,auth", [
    ("/v1/introspect", None),  # unauthenticated
    ("/v1/sessions", None),  # refused before auth: no credentials at all
    ("/v1/sessions", "orchestrator"),
    ("/v1/webhooks/orchestrator", None),
    ("/v1/capabilities", "agent"),
])
def test_chunked_upload_is_refused_once_the_limit_is_passed(sqlite_api: Api, path: str, auth: str | None) -> None:
    headers = {"Content-Type": "application/json"}
    if auth == "orchestrator":
        headers.update(sqlite_api.as_orchestrator())
    elif auth == "agent":
        headers["Authorization"] = f"Bearer {sqlite_api.new_session()['session_token']}"
    offered = {"bytes": 0}

    def body() -> Iterator[bytes]:  # no length known up front: httpx sends it chunked
        while offered["bytes"] < UPLOAD:
            offered["bytes"] += CHUNK
            yield b" " * CHUNK

    count_before, bytes_before = _refused()
    r = sqlite_api.client.post(path, content=body(), headers=headers)
    count_after, bytes_after = _refused()

    assert (r.status_code, _code(r)) == (413, "payload-too-large")
    assert r.headers["connection"] == "close"
    limit = PATH_BODY_LIMITS.get(path, MAX_BODY_BYTES)
    # The server read just past the limit (one receive's worth more at most), then stopped ...
    assert count_after == count_before + 1
    assert limit < bytes_after - bytes_before <= limit + 1024 * 1024
    # ... and closed the connection, so the client's generator never got to the end.
    assert offered["bytes"] < UPLOAD // 2


def test_declared_oversize_is_refused_before_reading(sqlite_api: Api) -> None:
    r = sqlite_api.client.post("/v1/sessions", content=b"x" * (MAX_BODY_BYTES + 1),
                               headers={"Content-Type": "application/json"})
    assert (r.status_code, _code(r)) == (413, "payload-too-large")


def test_a_body_within_the_limit_still_arrives_whole_when_chunked(sqlite_api: Api) -> None:
    body = json.dumps({"human": "alice@example.com", "agent": "claude-code", "task_id": "chunked", "ttl_seconds": 600,
                       "scope": [{"resource": "jwt://payments-api", "access": ["read"]}], "labels": {"pad": "x" * 200}})
    pieces = [body[i:i + 7].encode() for i in range(0, len(body), 7)]
    r = sqlite_api.client.post("/v1/sessions", content=iter(pieces),
                               headers={**sqlite_api.as_orchestrator(), "Content-Type": "application/json"})
    assert r.status_code == 201, r.text


# --- 2. JSON bounds ------------------------------------------------------------------------------

def _ask(api: Api, session: dict[str, Any], raw: str) -> httpx.Response:
    return api.client.post("/v1/capabilities", content=raw.encode(), headers={
        "Authorization": f"Bearer {session['session_token']}", "Content-Type": "application/json"})


def _capability(parameters: str) -> str:
    return '{"resource": "jwt://payments-api", "access": "read", "purpose": "p", "parameters": ' + parameters + "}"


@pytest.mark.parametrize("parameters,code", [
    ('{"a": ' * 300 + "1" + "}" * 300, "json-too-deep"),  # the 700-byte report
    ('{"x": NaN}', "json-number-out-of-range"),
    ('{"x": Infinity}', "json-number-out-of-range"),
    ('{"x": -Infinity}', "json-number-out-of-range"),
    ('{"x": 1e400}', "json-number-out-of-range"),
    ('{"x": ' + "9" * 30 + "}", "json-number-out-of-range"),
    ('{"x": "\\ud800"}', "invalid-unicode"),
    ('{"\\udfff": 1}', "invalid-unicode"),
    ('{"x": "a\\u0000b"}', "nul-byte"),
    ('{"a\\u0000": 1}', "nul-byte"),
])
def test_odd_json_in_parameters_is_refused_at_the_door(sqlite_api: Api, parameters: str, code: str) -> None:
    session = sqlite_api.new_session()
    r = _ask(sqlite_api, session, _capability(parameters))
    assert (r.status_code, _code(r)) == (400, code), r.text
    # Nothing was written: no lease, no audit record of the request.
    r = sqlite_api.client.get("/v1/audit", params={"session_id": session["session_id"]}, headers=sqlite_api.as_admin())
    assert [rec["type"] for rec in r.json()["records"]] == ["session.created"]


@pytest.mark.parametrize("parameters,problem", [
    ('{"a": ' * 9 + "1" + "}" * 9, "json-too-deep"),
    ('{"x": "' + "y" * 4097 + '"}', "json-string-too-long"),
    ('{"x": [' + ",".join(["1"] * 257) + "]}", "json-array-too-long"),
    ("{" + ",".join(f'"k{i}": 1' for i in range(129)) + "}", "json-too-many-keys"),
    ('{"x": ' + str(2**53 + 1) + "}", "json-number-out-of-range"),
])
def test_parameters_have_their_own_tighter_bounds(sqlite_api: Api, parameters: str, problem: str) -> None:
    r = _ask(sqlite_api, sqlite_api.new_session(), _capability(parameters))
    assert (r.status_code, _code(r)) == (422, "validation-failed"), r.text
    assert [p["type"] for p in r.json()["error"]["problems"]] == [problem]


def test_parameters_within_bounds_are_accepted_and_audited(sqlite_api: Api) -> None:
    session = sqlite_api.new_session()
    parameters = {"a": {"b": {"c": [1, 2.5, "x", None, True]}}, "n": 2**53}
    r = sqlite_api.request(session, {"resource": "jwt://payments-api", "access": "read", "parameters": parameters})
    assert r.status_code == 201, r.text
    r = sqlite_api.client.get("/v1/audit", params={"session_id": session["session_id"]}, headers=sqlite_api.as_admin())
    assert r.json()["records"][-1]["request"]["parameters"] == parameters


def test_deep_json_to_introspect_is_a_4xx(sqlite_api: Api) -> None:
    for depth in (10_000, 100_000):
        raw = '{"token": ' + "[" * depth + "]" * depth + "}"
        r = sqlite_api.client.post("/v1/introspect", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, r.text
        assert _code(r) in ("json-too-deep", "payload-too-large")
    raw = '{"token": ' + "[" * 5000 + "]" * 5000 + "}"  # within the size limit: the depth bound answers
    r = sqlite_api.client.post("/v1/introspect", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert (r.status_code, _code(r)) == (400, "json-too-deep")


def test_deep_json_to_the_webhook_is_refused_before_its_signature(sqlite_api: Api) -> None:
    raw = '{"id": "x", "a": ' + "[" * 1000 + "]" * 1000 + "}"
    r = sqlite_api.client.post("/v1/webhooks/orchestrator", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert (r.status_code, _code(r)) == (400, "json-too-deep")


def test_audit_readers_survive_a_deep_record_already_in_the_log(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record as deep as the old door let through (it accepted up to Python's recursion limit):
    the API, `audit verify`, `audit tail` and `audit export` still read it."""
    session = api.new_session()
    deep: Any = 1
    for _ in range(900):
        deep = {"a": deep}
    with transaction(api.broker.engine) as db:
        row = db.get(SessionRow, session["session_id"])
        assert row is not None
        append(db, AuditEvent(type="capability.denied", outcome="denied", human_principal=row.human,
                              agent={"id": row.agent, "session_id": row.id, "task_id": row.task_id},
                              request={"operation": "capability.request", "parameters": deep}))
    r = api.client.get("/v1/audit", headers=api.as_admin())
    assert r.status_code == 200, r.text
    r = api.client.get("/v1/audit/verify", headers=api.as_admin())
    assert r.status_code == 200 and r.json()["ok"] is True, r.text

    monkeypatch.setenv("BROKER_URL", api.base_url)
    monkeypatch.setenv("BROKER_TOKEN", api.secrets.admin_token)
    runner = CliRunner()
    tail = runner.invoke(cli_app, ["audit", "tail", "--limit", "5"])
    assert tail.exit_code == 0, tail.output
    assert "capability.denied" in tail.output
    export = runner.invoke(cli_app, ["audit", "export"])
    assert export.exit_code == 0, export.output
    lines = [line for line in export.output.splitlines() if line.strip()]
    assert any('"capability.denied"' in line for line in lines)
    verify = runner.invoke(cli_app, ["audit", "verify"])
    assert verify.exit_code == 0, verify.output


# --- 3. NUL bytes: both databases ----------------------------------------------------------------

def test_nul_bytes_are_a_400_everywhere(api: Api) -> None:
    admin = api.as_admin()
    session = api.new_session()
    agent = {"Authorization": f"Bearer {session['session_token']}"}
    base = {"human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
            "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]}
    attempts = [
        api.client.post("/v1/sessions", json={**base, "task_id": "a\x00b"}, headers=api.as_orchestrator()),
        api.client.post("/v1/sessions", json={**base, "labels": {"k\x00": "v"}}, headers=api.as_orchestrator()),
        api.client.post("/v1/sessions", json={**base, "human": "al\x00ice@example.com"}, headers=api.as_orchestrator()),
        api.client.get("/v1/sessions/ses_%00", headers=admin),
        api.client.post(f"/v1/sessions/{session['session_id']}%00/end", headers=admin),
        api.client.get("/v1/capabilities/cap_%00", headers=admin),
        api.client.delete("/v1/capabilities/cap_%00", headers=admin),
        api.client.get("/v1/capabilities", params={"session_id": "ses_\x00"}, headers=admin),
        api.client.get("/v1/capabilities", params={"status": "active\x00"}, headers=admin),
        api.client.get("/v1/audit", params={"type": "session.created\x00"}, headers=admin),
        api.client.post("/v1/capabilities", json={"resource": "jwt://payments-api", "access": "read", "purpose": "a\x00"},
                        headers=agent),
        api.client.post("/v1/capabilities", json={"resource": "jwt://payments-api\x00", "access": "read", "purpose": "p"},
                        headers=agent),
        api.client.post("/v1/revocations", json={"human": "alice\x00@example.com"}, headers=admin),
        api.client.post("/v1/policy/explain", json={"resource": "jwt://x\x00", "access": "read",
                                                    "human": "alice@example.com", "agent": "claude-code",
                                                    "scope": [{"resource": "jwt://x", "access": ["read"]}]}, headers=admin),
        api.client.post("/v1/introspect", data={"token": "a\x00b"}),
        api.client.post("/v1/webhooks/orchestrator", json={"id": "a\x00", "session_id": session["session_id"]}),
    ]
    for r in attempts:
        assert (r.status_code, _code(r)) == (400, "nul-byte"), (r.request.method, r.request.url, r.text)
    # Nothing half-written: still the one session, and its one record.
    r = api.client.get("/v1/sessions", headers=admin)
    assert [s["session_id"] for s in r.json()] == [session["session_id"]]
    r = api.client.get("/v1/audit", headers=admin)
    assert [rec["type"] for rec in r.json()["records"] if rec["type"] != "policy.loaded"] == ["session.created"]


def test_nul_in_a_header_is_a_400(sqlite_api: Api) -> None:
    """httpx will not send a NUL in a header, so this request is written by hand."""
    import socket

    host, port = sqlite_api.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\x00b\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status == 400  # refused by the HTTP parser or by the guard, never passed on


# --- 4. since, limit, ids ------------------------------------------------------------------------

def test_ranges_and_ids_are_validated(api: Api) -> None:
    admin = api.as_admin()
    for params in ({"since": 10**30}, {"since": -1}, {"since": "x"}, {"limit": 0}, {"limit": 10**30},
                   {"session_id": "not-a-session"}, {"session_id": "ses_" + "0" * 33}, {"type": "NOT A TYPE"}):
        r = api.client.get("/v1/audit", params=params, headers=admin)
        assert (r.status_code, _code(r)) == (422, "validation-failed"), (params, r.text)
    r = api.client.get("/v1/audit", params={"since": 2**31 - 1}, headers=admin)
    assert r.status_code == 200 and r.json()["records"] == []
    for params in ({"limit": 10**30}, {"session_id": "x" * 65}):
        r = api.client.get("/v1/capabilities", params=params, headers=admin)
        assert (r.status_code, _code(r)) == (422, "validation-failed"), (params, r.text)
    # An id without the broker's shape names nothing: not found, without asking the database.
    for path in ("/v1/sessions/" + "s" * 5000, "/v1/sessions/ses_\u00e9t\u00e9", "/v1/capabilities/cap_" + "f" * 200):
        r = api.client.get(path, headers=admin)
        assert r.status_code == 404 and _code(r) in ("session-not-found", "capability-not-found"), r.text
    r = api.client.post("/v1/sessions/ses_x/end", headers=admin)
    assert (r.status_code, _code(r)) == (404, "session-not-found")
    session = api.new_session()
    r = api.request(session, {"resource": "jwt://payments-api", "access": "read", "approval_id": "apr_../../x"})
    assert (r.status_code, _code(r)) == (422, "validation-failed")
    r = api.client.post("/v1/revocations", json={"session_id": "'; drop table sessions; --"}, headers=admin)
    assert (r.status_code, _code(r)) == (422, "validation-failed")


# --- 5. no-store on secrets ----------------------------------------------------------------------

def _no_store(r: httpx.Response) -> bool:
    return r.headers.get("cache-control") == "no-store" and r.headers.get("pragma") == "no-cache"


def test_answers_carrying_secrets_are_never_cacheable(sqlite_api: Api) -> None:
    r = sqlite_api.client.post("/v1/sessions", json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
        "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]}, headers=sqlite_api.as_orchestrator())
    assert r.status_code == 201 and "session_token" in r.json() and _no_store(r)
    session = r.json()
    first = sqlite_api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "k1"})
    replay = sqlite_api.request(session, {"resource": "jwt://payments-api", "access": "read"}, **{"Idempotency-Key": "k1"})
    assert first.status_code == replay.status_code == 201
    assert replay.json()["credential"] == first.json()["credential"]
    assert _no_store(first) and _no_store(replay)
    r = sqlite_api.client.post("/v1/introspect", data={"token": first.json()["credential"]["token"]})
    assert r.json()["active"] is True and _no_store(r)
    for r in (sqlite_api.client.get(f"/v1/sessions/{session['session_id']}", headers=sqlite_api.as_admin()),
              sqlite_api.client.get("/v1/audit", headers=sqlite_api.as_admin()),
              sqlite_api.client.get("/v1/capabilities", headers=sqlite_api.as_admin()),
              sqlite_api.client.get("/v1/sessions/ses_x", headers=sqlite_api.as_admin())):
        assert _no_store(r), r.request.url
    # Public documents keep their own caching.
    r = sqlite_api.client.get("/.well-known/jwks.json")
    assert r.headers["cache-control"].startswith("public")


# --- 6. the OpenAPI document and 405 -------------------------------------------------------------

def test_openapi_documents_introspect_400_and_metrics_as_text() -> None:
    doc = yaml.safe_load((Path(__file__).parents[2] / "openapi.yaml").read_text())
    assert "400" in doc["paths"]["/v1/introspect"]["post"]["responses"]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_metrics_are_prometheus_text(sqlite_api: Api) -> None:
    r = sqlite_api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert "# TYPE broker_refused_body_bytes histogram" in r.text


@pytest.mark.parametrize("method,path,allow", [
    ("PUT", "/v1/capabilities", "GET, POST"),
    ("PUT", "/v1/capabilities/cap_x", "DELETE, GET"),
    ("DELETE", "/v1/sessions", "GET, POST"),
    ("GET", "/v1/introspect", "POST"),
    ("POST", "/healthz", "GET"),
])
def test_405_names_what_is_allowed(sqlite_api: Api, method: str, path: str, allow: str) -> None:
    r = sqlite_api.client.request(method, path, headers=sqlite_api.as_admin())
    assert (r.status_code, _code(r)) == (405, "method-not-allowed")
    assert r.headers["allow"] == allow
