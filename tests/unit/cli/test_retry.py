"""The CLI's and helpers' retry of an outage: which answers are retried, how long it waits
(Retry-After, backoff, the BROKER_RETRY_SECONDS budget) and what it says. A clock that only moves
when the retry sleeps: no real waiting, no timing assertions."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from broker.cli import retry
from tests.support.hostile_text import ALL, ids


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def outage(code: str = "database-unavailable", retry_after: str | None = "1", message: str = "retry shortly") -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(503, headers=headers, json={"error": {"code": code, "message": message}})


def answers(*items: httpx.Response | Exception) -> Callable[[], httpx.Response]:
    queue = list(items)

    def attempt() -> httpx.Response:
        item = queue.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    return attempt


def run(attempt: Callable[[], httpx.Response], t: FakeTime, said: list[str], budget: float = 30,
        refused: bool = True) -> httpx.Response:
    return retry.send(attempt, base_url="http://broker.test", say=said.append, refused=refused, budget=budget,
                      sleep=t.sleep, clock=t.clock)


def test_an_outage_is_waited_out_and_the_answer_returned() -> None:
    t, said = FakeTime(), []
    r = run(answers(outage(), outage(retry_after="3"), httpx.Response(201, json={"ok": 1})), t, said)
    assert r.status_code == 201
    assert t.slept == [1.0, 3.0]  # Retry-After, when longer than the backoff
    assert len(said) == 2 and all("waiting for the broker's database (database-unavailable" in s for s in said)
    assert all(retry.RETRY_ENV in s for s in said)


def test_backoff_grows_when_retry_after_is_short_or_missing() -> None:
    t, said = FakeTime(), []
    run(answers(*[outage(retry_after=None)] * 6, httpx.Response(200)), t, said, budget=300)
    assert t.slept == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]


@pytest.mark.parametrize("answer", [200, 201, 202, 400, 401, 403, 404, 409, 422, 429, 500, 502, 504])
def test_only_503_is_retried(answer: int) -> None:
    t, said = FakeTime(), []
    assert run(answers(httpx.Response(answer)), t, said).status_code == answer
    assert t.slept == [] and said == []


def test_the_budget_bounds_the_wait_and_the_last_503_is_returned() -> None:
    t, said = FakeTime(), []
    r = run(answers(*[outage(code="provider-unavailable", retry_after="4")] * 100), t, said, budget=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "provider-unavailable"
    assert sum(t.slept) == pytest.approx(10)
    assert all("a backend the broker mints from" in s for s in said)


def test_a_zero_budget_never_retries() -> None:
    t, said = FakeTime(), []
    assert run(answers(outage()), t, said, budget=0).status_code == 503
    assert t.slept == [] and said == []


def test_a_refused_connection_is_retried_by_helpers_then_raised() -> None:
    t, said = FakeTime(), []
    refused = httpx.ConnectError("Connection refused")
    assert run(answers(refused, refused, httpx.Response(200)), t, said).status_code == 200
    assert len(said) == 2 and "waiting for the broker at http://broker.test (ConnectError)" in said[0]
    with pytest.raises(httpx.ConnectError):
        run(answers(*[refused] * 100), FakeTime(), [], budget=5)


def test_the_person_s_cli_does_not_wait_on_a_refused_connection() -> None:
    said: list[str] = []
    with pytest.raises(httpx.ConnectError):
        run(answers(httpx.ConnectError("refused"), httpx.Response(200)), FakeTime(), said, refused=False)
    assert said == []


def test_a_lost_answer_is_not_retried() -> None:
    with pytest.raises(httpx.ReadTimeout):  # sent, perhaps carried out: the caller decides
        run(answers(httpx.ReadTimeout("timed out"), httpx.Response(200)), FakeTime(), [])


@pytest.mark.parametrize("value", ["", "abc", "-5", "nan", "1e9", "0", "2.5", "\u0663"])
def test_the_budget_setting_is_read_defensively(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(retry.RETRY_ENV, value)
    got = retry.retry_seconds()
    assert 0 <= got <= 3600
    expected = {"": 30.0, "abc": 30.0, "-5": 0.0, "nan": 30.0, "1e9": 3600.0, "0": 0.0, "2.5": 2.5}
    if value in expected:
        assert got == expected[value]


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", "Wed, 21 Oct 2015 07:28:00 GMT", "\u0661", "99999999"])
def test_an_odd_retry_after_is_bounded(value: str) -> None:
    got = retry.retry_after(httpx.Response(503, headers={"Retry-After": value.encode("utf-8")}))
    assert got is None or 0 <= got <= retry.MAX_DELAY * 4


@pytest.mark.parametrize(("kind", "code"), ALL, ids=ids(ALL))
def test_what_the_broker_said_is_printed_as_plain_ascii(kind: str, code: int) -> None:
    t, said = FakeTime(), []
    hostile = f"db{chr(code)}down\n$(rm -rf ~)" + chr(code) * 3
    body = json.dumps({"error": {"code": "database-unavailable", "message": hostile}})
    run(answers(httpx.Response(503, content=body.encode(), headers={"Retry-After": "1"}), httpx.Response(200)),
        t, said)
    assert len(said) == 1
    assert said[0].isascii() and said[0].isprintable(), said[0]
    assert "\n" not in said[0]


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'{"error": "x"}', b'{"error": {"code": 5}}', b"\xff\xfe"])
def test_an_odd_503_body_still_says_something(body: bytes) -> None:
    t, said = FakeTime(), []
    run(answers(httpx.Response(503, content=body), httpx.Response(200)), t, said)
    assert len(said) == 1 and said[0].startswith("waiting for the broker")
