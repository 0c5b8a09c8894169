"""Security event receivers as configured (BROKER_SECURITY_EVENT_RECEIVERS and their tokens), and
the words a SET uses for who caused it and whom it is about."""

from __future__ import annotations

import json

import pytest

from broker.config import SecurityEventReceiver, Settings
from broker.errors import ConfigError
from broker.models import SessionRow
from broker.security_events import initiating_entity, session_subject

SIEM = {"name": "siem", "url": "https://siem.example.com/events", "audience": "https://siem.example.com"}


def receivers(*entries: object, tokens: str | None = None) -> list[SecurityEventReceiver]:
    return Settings(security_event_receivers=json.dumps(list(entries)),
                    security_event_receiver_tokens=tokens).security_event_receiver_list()


def test_receivers_are_parsed_with_their_tokens() -> None:
    local = {"name": "gw-2", "url": "http://127.0.0.1:9000/set", "audience": "gateway"}
    assert receivers(SIEM, local, tokens="siem=tok-a, gw-2=tok-b") == [
        SecurityEventReceiver("siem", SIEM["url"], SIEM["audience"], "tok-a"),
        SecurityEventReceiver("gw-2", local["url"], "gateway", "tok-b"),
    ]
    assert Settings().security_event_receiver_list() == []  # none configured: no SET is written
    assert receivers(SIEM) == [SecurityEventReceiver("siem", SIEM["url"], SIEM["audience"], None)]


@pytest.mark.parametrize("raw, message", [
    ("siem=https://x", "must be a JSON list"),
    ('{"name": "siem"}', "must be a JSON list"),
    (json.dumps([{**SIEM, "token": "inline"}]), "exactly"),  # a secret never sits in the plain list
    (json.dumps([{"name": "siem", "url": SIEM["url"]}]), "exactly"),
    (json.dumps([{**SIEM, "audience": ""}]), "exactly"),
    (json.dumps([{**SIEM, "name": "SIEM"}]), "lowercase"),
    (json.dumps([SIEM, SIEM]), "used twice"),
    (json.dumps([{**SIEM, "url": "ftp://siem.example.com"}]), "not an http"),
    (json.dumps([{**SIEM, "url": "siem.example.com/events"}]), "not an http"),
])
def test_bad_receivers_are_refused(raw: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings(security_event_receivers=raw).security_event_receiver_list()


@pytest.mark.parametrize("tokens, message", [
    ("nobody=tok", "not configured"),  # a typo in a name would otherwise send no token at all
    ("siem", "name=token"),
    ("siem=", "name=token"),
])
def test_bad_tokens_are_refused(tokens: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        receivers(SIEM, tokens=tokens)


def test_a_token_never_crosses_the_network_over_plain_http() -> None:
    remote = {**SIEM, "url": "http://siem.example.com/events"}
    assert receivers(remote)[0].token is None  # plain http without a token: the SET is signed, allowed
    with pytest.raises(ConfigError, match="plain http"):
        receivers(remote, tokens="siem=tok")


def test_production_start_checks_the_receivers() -> None:
    settings = Settings(embedded=False, policy_file="p.yaml", signing_key_dir="k", encryption_key="x",
                        admin_token_sha256="a" * 64, security_event_receivers="not json")
    with pytest.raises(ConfigError, match="BROKER_SECURITY_EVENT_RECEIVERS"):
        settings.check_for_production()


@pytest.mark.parametrize("reason, actor, entity", [
    ("session-ended:completed", "orchestrator:ci", "system"),
    ("completed", "webhook:orchestrator", "system"),
    ("deadline", "broker:sweeper", "system"),
    ("expired", "broker:sweeper", "system"),
    ("revoked-by-agent", "agent:claude-code", "user"),
    ("revoked-by-agent", "broker:sweeper", "user"),  # a retry keeps the reason first given
    ("revoked-by-human", "human:alice@example.com", "admin"),
    ("api_teardown", "admin:admin", "admin"),
    ("kill-switch", "orchestrator:ci", "admin"),
    ("session-ended:kill-switch:incident-42", "human:bob@example.com", "admin"),
    ("human-permission-lost", "broker:permission-recheck", "policy"),
])
def test_who_initiated_it(reason: str, actor: str, entity: str) -> None:
    assert initiating_entity(reason, actor) == entity


def test_the_subject_names_the_session_and_its_human() -> None:
    session = SessionRow(id="ses_1", human="alice@example.com", agent="a", task_id="t", scope=[], created_by="o")
    assert session_subject("ses_1", session) == {"format": "complex", "session": {"format": "opaque", "id": "ses_1"},
                                                 "user": {"format": "email", "email": "alice@example.com"}}
    session.human = "alice"  # a principal that is not an email (preferred_username)
    assert session_subject("ses_1", session)["user"] == {"format": "opaque", "id": "alice"}
    assert session_subject("ses_1", None) == {"format": "complex", "session": {"format": "opaque", "id": "ses_1"}}
