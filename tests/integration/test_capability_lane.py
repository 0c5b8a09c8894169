"""The capability lane (broker/api/lane.py) answers exactly what the FastAPI route answers.

Each request of a corpus (content types, duplicated headers, Idempotency-Keys at and past their
bound, bodies that are not JSON objects, that the model refuses, or that carry hostile Unicode,
callers that are not agents) is sent twice, each time in a fresh session: once as served, and
once with the lane stepping aside for every request. Status, error code and the headers that
matter are the same; where the lane is expected to answer, it did (counted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.api import lane
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.databases import PgDatabases
from tests.support.hostile_text import ONE_PER_CLASS

GOOD = {"resource": "jwt://payments-api", "access": "read", "purpose": "lane", "ttl_seconds": 60}
JSON = "application/json"


def _body(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


# (name, headers besides the session token (None: no Authorization), body, whether the lane answers)
Case = tuple[str, list[tuple[str, str]], bytes, bool]
CASES: list[Case] = [
    ("plain", [("Content-Type", JSON)], _body(), True),
    ("no-content-type", [], _body(), False),
    ("charset", [("Content-Type", "application/json; charset=utf-8")], _body(), True),
    ("upper-case-type", [("Content-Type", "APPLICATION/JSON")], _body(), True),
    ("plus-json", [("Content-Type", "application/vnd.api+json")], _body(), True),
    ("text-plus-json", [("Content-Type", "text/x+json")], _body(), False),
    ("json-with-junk-params", [("Content-Type", 'application/json; a="b;c"; ; x')], _body(), True),
    ("text-plain", [("Content-Type", "text/plain")], _body(), False),
    ("form", [("Content-Type", "application/x-www-form-urlencoded")], b"resource=jwt://x&access=read", False),
    ("two-content-types", [("Content-Type", JSON), ("Content-Type", JSON)], _body(), False),
    ("key", [("Content-Type", JSON), ("Idempotency-Key", "k-1")], _body(), True),
    ("key-at-bound", [("Content-Type", JSON), ("Idempotency-Key", "k" * 255)], _body(), True),
    ("key-past-bound", [("Content-Type", JSON), ("Idempotency-Key", "k" * 256)], _body(), False),
    ("key-empty", [("Content-Type", JSON), ("Idempotency-Key", "")], _body(), True),
    ("key-shell", [("Content-Type", JSON), ("Idempotency-Key", "$(rm -rf /);`id`")], _body(), True),
    ("two-keys", [("Content-Type", JSON), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")], _body(), False),
    ("two-authorizations", [("Content-Type", JSON), ("Authorization", "Bearer x")], _body(), False),
    ("invalid-json", [("Content-Type", JSON)], b'{"resource": ', False),
    ("empty-body", [("Content-Type", JSON)], b"", False),
    ("json-list", [("Content-Type", JSON)], b"[1, 2]", False),
    ("json-string", [("Content-Type", JSON)], b'"jwt://x"', False),
    ("json-null", [("Content-Type", JSON)], b"null", False),
    ("missing-purpose", [("Content-Type", JSON)], json.dumps({"resource": "jwt://x", "access": "read"}).encode(), False),
    ("extra-field", [("Content-Type", JSON)], _body(admin=True), False),
    ("ttl-as-string", [("Content-Type", JSON)], _body(ttl_seconds="60"), True),
    ("ttl-as-float", [("Content-Type", JSON)], _body(ttl_seconds=60.0), True),
    ("ttl-as-bool", [("Content-Type", JSON)], _body(ttl_seconds=True), True),
    ("ttl-too-long", [("Content-Type", JSON)], _body(ttl_seconds=10**9), False),
    ("bad-resource", [("Content-Type", JSON)], _body(resource="jwt://../etc"), True),
    ("unknown-access", [("Content-Type", JSON)], _body(access="sudo"), True),
    ("out-of-scope", [("Content-Type", JSON)], _body(resource="vault://secret/x"), True),
    ("duplicate-json-keys", [("Content-Type", JSON)], b'{"resource": "jwt://x", "resource": "jwt://payments-api", '
                                                      b'"access": "read", "purpose": "p"}', True),
    ("parameters", [("Content-Type", JSON)], _body(tool="bash", parameters={"a": [1, {"b": "c"}]}), True),
    ("unknown-approval", [("Content-Type", JSON)], _body(approval_id="apr_" + "0" * 26), False),
    ("not-bearer", None, _body(), True),
    ("no-authorization", [], _body(), False),
]
for kind, code in ONE_PER_CLASS:  # hostile text where an agent writes free text and where it names things
    char = chr(code)
    CASES.append((f"purpose-{kind}", [("Content-Type", JSON)], _body(purpose=f"read{char}it"), True))
    CASES.append((f"resource-{kind}", [("Content-Type", JSON)], _body(resource=f"jwt://pay{char}ments"), True))
    if code >= 0x20 and code != 0x7F:  # an HTTP client refuses controls in a header; the rest go as UTF-8
        CASES.append((f"key-{kind}", [("Content-Type", JSON), ("Idempotency-Key", f"k{char}".encode().decode("latin-1"))],
                      _body(), True))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pg_databases: PgDatabases) -> Iterator[Api]:
    """One broker per database for the whole corpus: each case runs in sessions of its own."""
    directory: Path = tmp_path_factory.mktemp("lane")
    url = f"sqlite:///{directory}/broker.db" if request.param == "sqlite" else pg_databases.create()
    secrets_ = BrokerSecrets()
    broker = build_broker(directory, url, secrets_)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def _send(api: Api, name: str, headers: list[tuple[str, str]] | None, body: bytes) -> httpx.Response:
    session = api.new_session(task_id=f"lane-{name}"[:120])
    sent = [("Authorization", "Basic dXNlcjpwYXNz"), ("Content-Type", JSON)] if headers is None else \
        [("Authorization", f"Bearer {session['session_token']}"), *headers]
    if name == "no-authorization":
        sent = list(headers or [])
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in sent]  # as bytes: UTF-8 on the wire
    return api.client.post("/v1/capabilities", content=body, headers=httpx.Headers(raw))


def _shape(r: httpx.Response) -> tuple[Any, ...]:
    body = r.json()
    code = body["error"]["code"] if "error" in body else sorted(body)
    return (r.status_code, code, r.headers.get("cache-control"), r.headers.get("pragma"),
            r.headers.get("content-type"), r.headers.get("www-authenticate") is not None)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_lane_answers_as_the_route(api: Api, monkeypatch: pytest.MonkeyPatch, case: Case) -> None:
    name, headers, body, taken = case
    answered: list[bool] = []
    real = lane._well_formed

    def counting(scope: Any, raw: bytes) -> Any:
        found = real(scope, raw)
        answered.append(found is not None)
        return found

    monkeypatch.setattr(lane, "_well_formed", counting)
    through_lane = _send(api, name, headers, body)
    assert answered == [taken], f"{name}: the lane {'did not take' if taken else 'took'} it"

    monkeypatch.setattr(lane, "_well_formed", lambda scope, raw: None)  # the lane steps aside
    through_route = _send(api, name, headers, body)
    assert _shape(through_lane) == _shape(through_route), name
    assert through_lane.status_code < 500, through_lane.text


def test_a_non_agent_caller_is_refused_as_by_the_route(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    for headers in (api.as_orchestrator(), api.as_admin()):
        taken = httpx.post(f"{api.base_url}/v1/capabilities", json=GOOD, headers=headers)
        monkeypatch.setattr(lane, "_well_formed", lambda scope, raw: None)
        routed = httpx.post(f"{api.base_url}/v1/capabilities", json=GOOD, headers=headers)
        monkeypatch.undo()
        assert (taken.status_code, taken.json()["error"]["code"]) == (403, "forbidden") == \
            (routed.status_code, routed.json()["error"]["code"])
