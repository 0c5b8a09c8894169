"""The console's presentation rules: which task references become links, and the per-record
chain check its timeline shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.audit import service as audit
from broker.audit import verification
from broker.audit.events import AgentRef, AuditEvent, RequestRef
from broker.config import Settings
from broker.console.browser import Browser, check_csrf
from broker.console.signin import safe_next
from broker.console.views import task_link
from broker.db import make_engine, transaction, utcnow
from broker.migrate import upgrade
from broker.models import AuditRecord
from tests.support.hostile_text import ONE_PER_CLASS, ids

SETTINGS = Settings()


@pytest.mark.parametrize(("task_id", "repository", "labels", "link"), [
    ("acme/widgets#42", None, {}, "https://github.com/acme/widgets/issues/42"),
    ("PAY-1", "acme/payments", {"issue_number": "7"}, "https://github.com/acme/payments/issues/7"),
    ("PAY-1", None, {"task_url": "https://linear.app/acme/issue/PAY-1"}, "https://linear.app/acme/issue/PAY-1"),
    ("acme/widgets#42", None, {"issue_url": "javascript:alert(1)"}, "https://github.com/acme/widgets/issues/42"),
    ("PAY-1", None, {"url": "javascript:alert(1)"}, None),
    ("PAY-1", "acme/payments", {}, None),
    ("PAY-1", "acme/pay ments", {"issue_number": "7"}, None),
    ("PAY-1", "acme/payments", {"issue_number": "7; rm"}, None),
])
def test_only_http_links_and_well_formed_references_become_task_links(
    task_id: str, repository: str | None, labels: dict[str, str], link: str | None
) -> None:
    assert task_link(SETTINGS, task_id, repository, labels) == link


@pytest.mark.parametrize(("kind", "code"), ONE_PER_CLASS, ids=ids(ONE_PER_CLASS))
def test_no_link_from_text_carrying_a_hidden_character(kind: str, code: int) -> None:
    c = chr(code)
    assert task_link(SETTINGS, "PAY-1", None, {"task_url": f"https://github.com/acme/app/issues/1{c}"}) is None
    assert task_link(SETTINGS, f"acme/app#4{c}2", None, {}) is None
    assert task_link(SETTINGS, "PAY-1", f"acme/app{c}", {"issue_number": "7"}) is None


@pytest.mark.parametrize("issue", ["\u0667", "\uff17", "4\u0662"])  # Arabic-Indic and full-width digits
def test_only_ascii_digits_make_an_issue_link(issue: str) -> None:
    assert task_link(SETTINGS, f"acme/app#{issue}", None, {}) is None
    assert task_link(SETTINGS, "PAY-1", "acme/app", {"issue_number": issue}) is None


@pytest.mark.parametrize(("value", "expected"), [
    ("/console/sessions", "/console/sessions"), ("https://evil.example/console/", "/console/approvals"),
    ("//evil.example/console/", "/console/approvals"), ("/console/\\evil", "/console/approvals"),
    ("/v1/sessions", "/console/approvals"), (None, "/console/approvals"),
])
def test_after_sign_in_only_console_paths(value: str | None, expected: str) -> None:
    assert safe_next(value) == expected


def test_csrf_needs_this_sessions_token() -> None:
    browser = Browser()
    assert not check_csrf(browser, "")  # no session, no token
    browser.ensure(utcnow())
    token = browser.csrf_token
    assert check_csrf(browser, token) and not check_csrf(browser, None) and not check_csrf(browser, token + "x")


def _event(session_id: str, n: int) -> AuditEvent:
    return AuditEvent(type="capability.minted", outcome="minted", actor="agent:claude-code",
                      human_principal="alice@example.com", agent=AgentRef("claude-code", session_id, "t"),
                      request=RequestRef(operation="request", resource=f"jwt://svc/{n}", access="read"))


def test_a_sessions_records_are_checked_where_they_sit_in_the_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/audit.db"
    upgrade(url)
    engine = make_engine(url)
    with transaction(engine) as db:
        audit.ensure_head(db)
    for n in range(6):  # two sessions' records interleaved in the log, each session its own chain
        with transaction(engine) as db:
            audit.append(db, _event("ses_a" if n % 2 == 0 else "ses_b", n))
    with transaction(engine) as db:
        mine = audit.query(db, session_id="ses_a")
        assert [r.seq for r in mine] == [1, 3, 5]
        assert all(c.ok for c in verification.check_records(db, mine))

        tampered = [AuditRecord(**{**r.model_dump(), "record": r.record.replace("jwt://svc/2", "jwt://svc/9")})
                    if r.seq == 3 else r for r in mine]
        checks = {c.seq: c for c in verification.check_records(db, tampered)}
        assert checks[3].problem == "the hash does not match the record's content" and checks[1].ok and checks[5].ok

        # A record rewritten with a fresh hash no longer links to its neighbours.
        from broker.audit.chain import chain_hash

        body = mine[1].record.replace("jwt://svc/2", "jwt://svc/9")
        rehashed = AuditRecord(**{**mine[1].model_dump(), "record": body, "hash": chain_hash(mine[1].prev_hash, body)})
        (check,) = verification.check_records(db, [rehashed])
        assert check.problem == "record 5 does not name this record's hash"  # the session's next record

        # The newest record must be where the chain's head is.
        last = audit.query(db, session_id="ses_b")[-1]
        assert last.seq == 6 and verification.check_records(db, [last])[0].ok
        ahead = AuditRecord(**{**mine[0].model_dump(), "seq": 7, "prev_hash": last.hash})
        assert not verification.check_records(db, [ahead])[0].ok
    engine.dispose()
