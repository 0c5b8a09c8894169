"""OpenID SSF 1.0 streams that receivers manage themselves: a receiver creates a stream, verifies
it, receives CAEP session-revoked and credential-change SETs by push (RFC 8935, to a loopback
receiver that verifies each SET against the broker's JWKS) and by poll (RFC 8936), and deletes
it; another receiver can neither read nor change it (404, as for a stream that does not exist)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import select

from broker.db import transaction
from broker.models import OutboxMessage
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.set_receiver import SetReceiver

PUSH, POLL = "urn:ietf:rfc:8935", "urn:ietf:rfc:8936"
CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
SESSION_REVOKED, CREDENTIAL_CHANGE = CAEP + "session-revoked", CAEP + "credential-change"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
ISSUER = "http://127.0.0.1:8080"  # BROKER_ISSUER's default


@dataclass
class Ssf:
    api: Api
    tokens: dict[str, str]  # receiver name -> its bearer token

    def as_receiver(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}

    def call(self, who: str, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.api.client.request(method, path, headers=self.as_receiver(who), **kw)

    def poll_stream(self, who: str) -> str:
        r = self.call(who, "POST", "/v1/ssf/streams", json={"delivery": {"method": POLL},
                                                           "events_requested": [SESSION_REVOKED, CREDENTIAL_CHANGE]})
        assert r.status_code == 201, r.text
        return str(r.json()["stream_id"])

    def poll(self, who: str, stream_id: str, **body: Any) -> dict[str, Any]:
        r = self.call(who, "POST", "/v1/ssf/poll", params={"stream_id": stream_id}, json=body)
        assert r.status_code == 200, r.text
        return dict(r.json())


@pytest.fixture
def ssf(database_url: str, tmp_path: Path) -> Iterator[Ssf]:
    tokens = {name: "ssf-" + secrets.token_urlsafe(24) for name in ("siem", "gateway")}
    setting = ",".join(f"{n}={hashlib.sha256(t.encode()).hexdigest()}" for n, t in tokens.items())
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, ssf_receiver_tokens=setting, outbox_interval_seconds=0.2)
    with LiveServer(broker, outbox=True) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Ssf(Api(server.base_url, secrets_, broker, client), tokens)


def _revoke_and_end(api: Api) -> tuple[dict[str, Any], str]:
    """A session with one native capability: revoke it (credential-change), end the session (session-revoked)."""
    session = api.new_session()
    cap = api.request(session, {"resource": "jwt://svc/a", "access": "read"})
    assert cap.status_code == 201, cap.text
    cap_id = cap.json()["capability_id"]
    assert api.client.delete(f"/v1/capabilities/{cap_id}", headers=api.as_admin()).status_code == 200
    assert api.client.post(f"/v1/sessions/{session['session_id']}/end", headers=api.as_admin()).status_code == 200
    return session, cap_id


def _event(claims: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    ((uri, body),) = claims["events"].items()
    return uri, body


def test_the_configuration_names_every_endpoint(ssf: Ssf) -> None:
    r = ssf.api.client.get("/.well-known/ssf-configuration")
    assert r.status_code == 200
    body = r.json()
    base = ssf.api.broker.settings.public_base_url()
    assert body["spec_version"] == "1_0" and body["issuer"] == ISSUER
    assert body["delivery_methods_supported"] == [PUSH, POLL]
    assert body["configuration_endpoint"] == f"{base}/v1/ssf/streams"
    assert body["verification_endpoint"] == f"{base}/v1/ssf/verify"
    assert body["add_subject_endpoint"] == f"{base}/v1/ssf/subjects:add"
    assert body["jwks_uri"] == f"{base}/.well-known/jwks.json"


def test_push_stream_lifecycle(ssf: Ssf, set_receivers: list[SetReceiver]) -> None:
    api = ssf.api
    receiver = SetReceiver(audience="siem", issuer=ISSUER, token="rt-" + secrets.token_urlsafe(16))
    set_receivers.append(receiver)
    receiver.trust(api.base_url)
    created = ssf.call("siem", "POST", "/v1/ssf/streams", json={
        "delivery": {"method": PUSH, "endpoint_url": receiver.url, "authorization_header": f"Bearer {receiver.token}"},
        "events_requested": [SESSION_REVOKED, CREDENTIAL_CHANGE, "https://example.com/not-supported"],
        "description": "SIEM"})
    assert created.status_code == 201, created.text
    stream = created.json()
    assert stream["events_delivered"] == [SESSION_REVOKED, CREDENTIAL_CHANGE] and stream["aud"] == "siem"
    assert stream["delivery"] == {"method": PUSH, "endpoint_url": receiver.url}  # never the authorization header
    sid = stream["stream_id"]
    assert ssf.call("siem", "GET", "/v1/ssf/streams", params={"stream_id": sid}).json() == stream
    assert ssf.call("siem", "GET", "/v1/ssf/status", params={"stream_id": sid}).json()["status"] == "enabled"

    # Verification: the event arrives, with the receiver's state, about the stream.
    state = secrets.token_hex(8)
    assert ssf.call("siem", "POST", "/v1/ssf/verify", json={"stream_id": sid, "state": state}).status_code == 204
    (first,) = receiver.wait_for(1)
    assert _event(first["claims"]) == (VERIFICATION, {"state": state})
    assert first["claims"]["sub_id"] == {"format": "opaque", "id": sid}
    too_soon = ssf.call("siem", "POST", "/v1/ssf/verify", json={"stream_id": sid})
    assert too_soon.status_code == 429 and too_soon.json()["error"]["code"] == "rate-limited"
    assert 1 <= int(too_soon.headers["Retry-After"]) <= stream["min_verification_interval"]

    session, cap_id = _revoke_and_end(api)
    got = receiver.wait_for(3)
    assert len(got) == 3, receiver.rejected
    change = receiver.events("credential-change")
    revoked = receiver.events("session-revoked")
    assert len(change) == 1 and _event(change[0])[1]["capability_id"] == cap_id
    assert change[0]["sub_id"]["session"] == {"format": "opaque", "id": session["session_id"]}
    assert len(revoked) == 1 and revoked[0]["sub_id"]["session"]["id"] == session["session_id"]
    assert receiver.rejected == []

    # Changed: it asks for session-revoked only.
    patched = ssf.call("siem", "PATCH", "/v1/ssf/streams", json={"stream_id": sid, "events_requested": [SESSION_REVOKED]})
    assert patched.status_code == 200 and patched.json()["events_delivered"] == [SESSION_REVOKED]
    _revoke_and_end(api)
    got = receiver.wait_for(4)
    assert [next(iter(g["claims"]["events"])) for g in got[3:]] == [SESSION_REVOKED]

    receiver.fail_next = 1000  # down: a SET waits in the outbox when the stream is deleted
    _revoke_and_end(api)
    assert ssf.call("siem", "DELETE", "/v1/ssf/streams", params={"stream_id": sid}).status_code == 204
    receiver.fail_next = 0
    with transaction(api.broker.engine) as db:
        left = db.exec(select(OutboxMessage).where(OutboxMessage.receiver == sid,
                                                   OutboxMessage.status == "pending")).all()
    assert left == []
    gone = ssf.call("siem", "GET", "/v1/ssf/streams", params={"stream_id": sid})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "stream-not-found"
    before = receiver.requests
    _revoke_and_end(api)
    assert receiver.wait_for_requests(before + 1, timeout=2) == before  # nothing more after deletion
    # Who was told what, and how, is in the audit log.
    records = api.client.get("/v1/audit", params={"limit": 1000}, headers=api.as_admin()).json()["records"]
    mine = [r for r in records if r["type"].startswith("ssf.") and r["detail"]["stream_id"] == sid]
    assert [r["type"] for r in mine] == ["ssf.stream-created", "ssf.stream-updated", "ssf.stream-deleted"]
    assert {r["actor"] for r in mine} == {"ssf-receiver:siem"}
    assert all(receiver.token not in str(r) for r in mine)  # the authorization header never


def test_poll_stream_lifecycle(ssf: Ssf) -> None:
    api = ssf.api
    checker = SetReceiver(audience="gateway", issuer=ISSUER, listening=False)
    checker.trust(api.base_url)
    try:
        sid = ssf.poll_stream("gateway")
        stream = ssf.call("gateway", "GET", "/v1/ssf/streams", params={"stream_id": sid}).json()
        assert stream["delivery"]["endpoint_url"].endswith(f"/v1/ssf/poll?stream_id={sid}")
        assert ssf.poll("gateway", sid) == {"sets": {}, "moreAvailable": False}
        assert ssf.call("gateway", "POST", "/v1/ssf/verify", json={"stream_id": sid}).status_code == 204
        session, cap_id = _revoke_and_end(api)

        first = ssf.poll("gateway", sid, maxEvents=1)
        assert len(first["sets"]) == 1 and first["moreAvailable"] is True
        seen: dict[str, dict[str, Any]] = {}
        for jti, token in first["sets"].items():
            _, claims = checker.verify(token)
            assert claims["jti"] == jti
            seen[jti] = claims
        assert _event(next(iter(seen.values())))[0] == VERIFICATION
        # Not acknowledged: handed out again, then acknowledged with the rest taken.
        rest = ssf.poll("gateway", sid, ack=list(seen), maxEvents=10)
        assert not set(rest["sets"]) & set(seen) and rest["moreAvailable"] is False
        kinds = {}
        for token in rest["sets"].values():
            _, claims = checker.verify(token)
            kinds[_event(claims)[0]] = claims
        assert set(kinds) == {SESSION_REVOKED, CREDENTIAL_CHANGE}
        assert _event(kinds[CREDENTIAL_CHANGE])[1]["capability_id"] == cap_id
        assert kinds[SESSION_REVOKED]["sub_id"]["session"]["id"] == session["session_id"]
        assert ssf.poll("gateway", sid, ack=list(rest["sets"])) == {"sets": {}, "moreAvailable": False}
        assert ssf.call("gateway", "DELETE", "/v1/ssf/streams", params={"stream_id": sid}).status_code == 204
        assert ssf.call("gateway", "POST", "/v1/ssf/poll", params={"stream_id": sid}, json={}).status_code == 404
    finally:
        checker.close()


def test_subjects_narrow_a_stream(ssf: Ssf) -> None:
    api = ssf.api
    sid = ssf.poll_stream("gateway")
    mine = api.new_session(task_id="mine")
    add = ssf.call("gateway", "POST", "/v1/ssf/subjects:add",
                   json={"stream_id": sid, "subject": {"format": "opaque", "id": mine["session_id"]}})
    assert add.status_code == 200, add.text
    _revoke_and_end(api)  # another session: not for this stream
    assert api.client.post(f"/v1/sessions/{mine['session_id']}/end", headers=api.as_admin()).status_code == 200
    sets = ssf.poll("gateway", sid)["sets"]
    assert len(sets) == 1
    # By the human instead: every session of alice.
    body = {"stream_id": sid, "subject": {"format": "email", "email": "alice@example.com"}}
    assert ssf.call("gateway", "POST", "/v1/ssf/subjects:add", json=body).status_code == 200
    ssf.poll("gateway", sid, ack=list(sets))
    _revoke_and_end(api)
    assert len(ssf.poll("gateway", sid)["sets"]) == 2
    assert ssf.call("gateway", "POST", "/v1/ssf/subjects:remove", json=body).status_code == 204
    again = ssf.call("gateway", "POST", "/v1/ssf/subjects:remove", json=body)
    assert again.status_code == 404 and again.json()["error"]["code"] == "subject-not-found"


def test_paused_push_stream_holds_events_until_enabled_and_disabled_drops_them(
        ssf: Ssf, set_receivers: list[SetReceiver]) -> None:
    api = ssf.api
    receiver = SetReceiver(audience="siem", issuer=ISSUER)
    set_receivers.append(receiver)
    receiver.trust(api.base_url)
    sid = ssf.call("siem", "POST", "/v1/ssf/streams", json={
        "delivery": {"method": PUSH, "endpoint_url": receiver.url},
        "events_requested": [SESSION_REVOKED]}).json()["stream_id"]

    def status(value: str) -> None:
        r = ssf.call("siem", "POST", "/v1/ssf/status", json={"stream_id": sid, "status": value, "reason": "test"})
        assert r.status_code == 200 and r.json() == {"stream_id": sid, "status": value, "reason": "test"}

    status("paused")
    _revoke_and_end(api)
    assert receiver.wait_for_requests(1, timeout=1.5) == 0
    status("enabled")
    assert len(receiver.wait_for(1)) == 1
    status("disabled")
    _revoke_and_end(api)
    status("enabled")
    assert receiver.wait_for_requests(2, timeout=1.5) == 1  # what came while disabled is gone


OPERATIONS = [
    ("GET", "/v1/ssf/streams", "params", None),
    ("PATCH", "/v1/ssf/streams", "json", {"description": "taken over"}),
    ("DELETE", "/v1/ssf/streams", "params", None),
    ("GET", "/v1/ssf/status", "params", None),
    ("POST", "/v1/ssf/status", "json", {"status": "disabled"}),
    ("POST", "/v1/ssf/subjects:add", "json", {"subject": {"format": "opaque", "id": "x"}}),
    ("POST", "/v1/ssf/subjects:remove", "json", {"subject": {"format": "opaque", "id": "x"}}),
    ("POST", "/v1/ssf/verify", "json", {}),
    ("POST", "/v1/ssf/poll", "params+json", {}),
]


@pytest.mark.parametrize(("method", "path", "how", "extra"), OPERATIONS)
def test_another_receiver_cannot_read_or_change_a_stream(ssf: Ssf, method: str, path: str, how: str,
                                                         extra: dict[str, Any] | None) -> None:
    sid = ssf.poll_stream("gateway")
    missing = "ssf_" + secrets.token_hex(12)
    answers = []
    for stream_id in (sid, missing):
        kw: dict[str, Any] = {}
        if how == "params":
            kw["params"] = {"stream_id": stream_id}
        elif how == "json":
            kw["json"] = {"stream_id": stream_id, **(extra or {})}
        else:
            kw["params"], kw["json"] = {"stream_id": stream_id}, extra
        r = ssf.call("siem", method, path, **kw)
        answers.append((r.status_code, r.json()["error"]["code"]))
    assert answers[0] == answers[1] == (404, "stream-not-found")  # no oracle: mine-not-yours looks like none
    assert ssf.call("gateway", "GET", "/v1/ssf/status", params={"stream_id": sid}).json()["status"] == "enabled"
    assert len(ssf.call("gateway", "GET", "/v1/ssf/streams").json()) == 1
    assert ssf.call("siem", "GET", "/v1/ssf/streams").json() == []
    # Without a receiver token, or with another caller's: 401.
    for headers in ({}, ssf.api.as_admin(), {"Authorization": "Bearer " + ssf.tokens["gateway"] + "x"}):
        r = ssf.api.client.get("/v1/ssf/streams", params={"stream_id": sid}, headers=headers)
        assert r.status_code == 401, (headers, r.text)


HOSTILE_CREATES = [
    {"delivery": {"method": PUSH}},
    {"delivery": {"method": PUSH, "endpoint_url": "javascript:alert(1)"}},
    {"delivery": {"method": PUSH, "endpoint_url": "http://attacker.example/hook"}},
    {"delivery": {"method": PUSH, "endpoint_url": "file:///etc/passwd"}},
    {"delivery": {"method": PUSH, "endpoint_url": "https://x.example/\r\nX-Injected: 1"}},
    {"delivery": {"method": PUSH, "endpoint_url": "https://x.example/", "authorization_header": "Bearer a\r\nX: y"}},
    {"delivery": {"method": PUSH, "endpoint_url": "https://x.example/", "authorization_header": "Bearer \u202e"}},
    {"delivery": {"method": POLL, "endpoint_url": "https://x.example/"}},
    {"delivery": {"method": "urn:ietf:rfc:9999"}},
    {"delivery": {"method": POLL}, "description": "approve\u202egnp.exe"},
    {"delivery": {"method": POLL}, "description": "zero\u200bwidth"},
    {"delivery": {"method": POLL}, "description": "nul\x00byte"},
    {"delivery": {"method": POLL}, "description": "x" * 256},
    {"delivery": {"method": POLL}, "events_requested": ["e"] * 17},
    {"delivery": {"method": POLL}, "events_requested": ["line\nbreak"]},
    {"delivery": {"method": POLL}, "events_requested": "not a list"},
    {"delivery": {"method": POLL}, "unknown": 1},
    {"delivery": {"method": POLL, "extra": True}},
    {"delivery": None},
    {},
    [],
    "'; DROP TABLE ssf_streams; --",
    {"delivery": {"method": POLL}, "description": "$(rm -rf /)\u0085"},
]


@pytest.mark.parametrize("body", HOSTILE_CREATES)
def test_hostile_stream_requests_are_refused_with_a_code_and_nothing_is_created(ssf: Ssf, body: Any) -> None:
    r = ssf.call("siem", "POST", "/v1/ssf/streams", json=body)
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["code"] in ("invalid-endpoint", "invalid-delivery", "validation-failed", "nul-byte"), r.text
    assert ssf.call("siem", "GET", "/v1/ssf/streams").json() == []


HOSTILE_SUBJECTS: list[Any] = [
    {}, {"format": "unknown", "id": "x"}, {"format": "opaque", "id": ""}, {"format": "opaque", "id": "a\u202eb"},
    {"format": "opaque", "id": "x" * 321}, {"format": "opaque", "id": 5}, {"format": "opaque", "ID": "x"},
    {"format": "complex", "session": {"format": "complex", "user": {"format": "opaque", "id": "x"}}},
    {"format": "complex", "session": "flat"}, {"format": "opaque", "id": "a\nb"}, "opaque", None, [],
    {"format": "opaque", **{f"k{i}": "v" for i in range(9)}},
]


@pytest.mark.parametrize("subject", HOSTILE_SUBJECTS)
def test_hostile_subjects_are_refused(ssf: Ssf, subject: Any) -> None:
    sid = ssf.poll_stream("gateway")
    r = ssf.call("gateway", "POST", "/v1/ssf/subjects:add", json={"stream_id": sid, "subject": subject})
    expected = (400, "invalid-subject") if isinstance(subject, dict) else (422, "validation-failed")
    assert (r.status_code, r.json()["error"]["code"]) == expected, r.text


def test_poll_errors_are_dropped_and_logged(ssf: Ssf, caplog: pytest.LogCaptureFixture) -> None:
    sid = ssf.poll_stream("gateway")
    assert ssf.call("gateway", "POST", "/v1/ssf/verify", json={"stream_id": sid}).status_code == 204
    (jti,) = ssf.poll("gateway", sid)["sets"]
    with caplog.at_level(logging.WARNING, logger="broker.ssf"):
        answer = ssf.poll("gateway", sid, setErrs={jti: {"err": "invalid_key", "description": "cannot verify"}})
    assert answer == {"sets": {}, "moreAvailable": False}
    assert any(jti in r.getMessage() and "invalid_key" in r.getMessage() for r in caplog.records)
