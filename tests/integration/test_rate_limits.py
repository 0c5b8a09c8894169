"""Rate limits from the policy (`rate_limits.per_session`, `rate_limits.per_agent`) on a real
served broker: a runaway agent gets 429 `rate-limited` with Retry-After while other sessions
keep working; the buckets refill; a policy without limits limits nothing.

Counts, not clocks: the refill rate is set so low (1 per hour) that nothing refills during a
test, and the refill itself is checked on the limiter with an injected clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.identity.ratelimit import RateLimited, RateLimiter
from broker.policy.models import RateLimit, RateLimits
from tests.support.brokers import TEST_POLICY, Api, BrokerSecrets, LiveServer, build_broker

LIMITED_POLICY = TEST_POLICY + """\
rate_limits:
  per_session: {requests: 5, per_seconds: 3600}
  per_agent: {requests: 12, per_seconds: 3600}
"""


@pytest.fixture
def limited(database_url: str, tmp_path: Path) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, policy=LIMITED_POLICY)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield Api(server.base_url, secrets_, broker, client)


def _ask(api: Api, session: dict[str, Any]) -> httpx.Response:
    return api.request(session, {"resource": "jwt://payments-api", "access": "read"})


def test_a_runaway_session_is_stopped_while_another_keeps_working(limited: Api) -> None:
    runaway, other = limited.new_session(task_id="runaway"), limited.new_session(task_id="calm")
    answers = [_ask(limited, runaway) for _ in range(8)]
    assert [r.status_code for r in answers] == [201] * 5 + [429] * 3
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate-limited"
    assert refused.json()["error"]["scope"] == "session"
    assert int(refused.headers["Retry-After"]) >= 1
    # Every endpoint an agent calls is limited, not only minting.
    r = limited.client.get("/v1/capabilities", headers={"Authorization": f"Bearer {runaway['session_token']}"})
    assert r.status_code == 429
    # The other session of the same agent is untouched by the runaway's refusals.
    assert [_ask(limited, other).status_code for _ in range(5)] == [201] * 5
    # Refused requests minted nothing.
    r = limited.client.get("/v1/capabilities", params={"session_id": runaway["session_id"]}, headers=limited.as_admin())
    assert len(r.json()) == 5
    # Orchestrators and admins are not agents: no bucket of theirs was touched.
    assert limited.client.get("/v1/sessions", headers=limited.as_admin()).status_code == 200


def test_the_agent_limit_spans_its_sessions_and_spares_other_agents(limited: Api) -> None:
    sessions = [limited.new_session(task_id=f"t{i}") for i in range(3)]
    codes = [_ask(limited, s).status_code for s in sessions for _ in range(4)]  # 12 = the agent's whole budget
    assert codes == [201] * 12
    r = _ask(limited, limited.new_session(task_id="t-late"))
    assert r.status_code == 429 and r.json()["error"]["scope"] == "agent"
    # Another agent name has its own bucket.
    ops = limited.new_session(agent="ops-bot", task_id="ops")
    assert _ask(limited, ops).status_code == 201


def test_without_rate_limits_in_the_policy_nothing_is_limited(api: Api) -> None:
    session = api.new_session()
    assert {r.status_code for r in (api.client.get("/v1/capabilities", headers={
        "Authorization": f"Bearer {session['session_token']}"}) for _ in range(40))} == {200}


def test_buckets_refill_at_the_configured_rate() -> None:
    now = [1000.0]
    limiter = RateLimiter(clock=lambda: now[0])
    limits = RateLimits(per_session=RateLimit(requests=2, per_seconds=10))
    limiter.check(limits, session_id="s", agent="a")
    limiter.check(limits, session_id="s", agent="a")
    with pytest.raises(RateLimited) as refused:
        limiter.check(limits, session_id="s", agent="a")
    assert refused.value.headers == {"Retry-After": "5"}  # one token per 5 s
    now[0] += 5
    limiter.check(limits, session_id="s", agent="a")
    with pytest.raises(RateLimited):
        limiter.check(limits, session_id="s", agent="a")
    now[0] += 3600  # a long pause fills the bucket only to its burst size
    limiter.check(limits, session_id="s", agent="a")
    limiter.check(limits, session_id="s", agent="a")
    with pytest.raises(RateLimited):
        limiter.check(limits, session_id="s", agent="a")


def test_rate_limits_are_validated_with_the_policy() -> None:
    from broker.errors import PolicyError
    from broker.policy.loader import load_policy_text

    with pytest.raises(PolicyError) as bad:
        load_policy_text(TEST_POLICY + "rate_limits: {per_session: {requests: 0, per_seconds: 1}}\n", "p.yaml")
    assert bad.value.problems[0]["path"] == "rate_limits.per_session.requests"
    with pytest.raises(PolicyError):
        load_policy_text(TEST_POLICY + "rate_limits: {per_sesion: {requests: 1, per_seconds: 1}}\n", "p.yaml")
