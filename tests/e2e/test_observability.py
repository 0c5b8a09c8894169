"""Observability of a real `broker-cli serve` process: /metrics scraped over HTTP moves with real
requests (decisions, mints, revocations, approvals, webhooks, the sweeper), and
BROKER_LOG_FORMAT=json writes one JSON object a line, each with the request's id."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.identity.webhooks import sign
from tests.support.brokers import BrokerSecrets
from tests.support.processes import BrokerProcess, migrate

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: httpx.Client) -> Samples:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def served(database_url: str, tmp_path: Path) -> Iterator[tuple[BrokerProcess, BrokerSecrets]]:
    secrets_ = BrokerSecrets()
    env = secrets_.env(tmp_path, database_url, BROKER_LOG_FORMAT="json", BROKER_LOG_LEVEL="info",
                       BROKER_SWEEP_INTERVAL_SECONDS="0.2")
    migrate(env)
    proc = BrokerProcess(env, tmp_path)
    proc.start()
    try:
        yield proc, secrets_
    finally:
        proc.stop()


def provision(http: httpx.Client, secrets_: BrokerSecrets, task_id: str) -> dict[str, Any]:
    r = http.post("/v1/sessions", headers={"Authorization": f"Bearer {secrets_.orchestrator_key}"},
                  json={"human": "alice@example.com", "agent": "claude-code", "task_id": task_id, "ttl_seconds": 3600,
                        "scope": [{"resource": "jwt://**", "access": ["*"]}]})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def ask(http: httpx.Client, session: dict[str, Any], resource: str, access: str, **extra: Any) -> httpx.Response:
    return http.post("/v1/capabilities", headers={"Authorization": f"Bearer {session['session_token']}"},
                     json={"resource": resource, "access": access, "purpose": "observability test", **extra})


def test_metrics_move_after_real_requests(served: tuple[BrokerProcess, BrokerSecrets]) -> None:
    proc, secrets_ = served
    with proc.client() as http:
        before = scrape(http)
        session = provision(http, secrets_, "obs-metrics")
        allowed = [ask(http, session, "jwt://svc/a", "read") for _ in range(3)]
        assert [r.status_code for r in allowed] == [201, 201, 201]
        assert ask(http, session, "jwt://payments-api", "drop").status_code == 403  # destructive, above claude-code's ceiling
        pending = ask(http, session, "jwt://payments-api", "deploy")  # merge_deploy: approval
        assert pending.status_code == 202, pending.text
        cap = allowed[0].json()["capability_id"]
        revoked = http.delete(f"/v1/capabilities/{cap}", headers={"Authorization": f"Bearer {session['session_token']}"})
        assert revoked.status_code == 200, revoked.text
        short = ask(http, session, "jwt://svc/short", "read", ttl_seconds=1)
        assert short.status_code == 201, short.text

        after = scrape(http)
        assert value(after, "broker_decisions_total", result="allow", tier="read", reason="allowed") - \
            value(before, "broker_decisions_total", result="allow", tier="read", reason="allowed") == 4
        assert value(after, "broker_decisions_total", result="deny", tier="destructive", reason="agent-ceiling") - \
            value(before, "broker_decisions_total", result="deny", tier="destructive", reason="agent-ceiling") == 1
        assert value(after, "broker_decisions_total", result="approval_required", tier="merge_deploy",
                     reason="approval-required") == 1
        assert value(after, "broker_approvals_opened_total", tier="merge_deploy") == 1
        assert value(after, "broker_approvals_pending", tier="merge_deploy") == 1
        assert value(after, "broker_approval_oldest_pending_seconds") >= 0
        assert value(after, "broker_mint_seconds_count", provider="native") - \
            value(before, "broker_mint_seconds_count", provider="native") == 4
        assert value(after, "broker_mint_seconds_sum", provider="native") > 0
        assert value(after, "broker_revoke_seconds_count", provider="native") >= 1
        assert value(after, "broker_revocations_total", provider="native", outcome="revoked") >= 1
        # the gauge is the database's truth: two long leases and the short one are live
        assert value(after, "broker_leases", status="active", provider="native") in (2, 3)

        # the sweeper expires the 1-second lease: expiry lag observed, leases gauge drops
        deadline = time.monotonic() + 60
        while value(scrape(http), "broker_expiry_lag_seconds_count") < 1:
            assert time.monotonic() < deadline, "the sweeper never expired the 1-second lease"
            time.sleep(0.2)
        swept = scrape(http)
        assert value(swept, "broker_leases", status="active", provider="native") == 2
        expired_since = 1 if value(after, "broker_leases", status="active", provider="native") == 3 else 0
        assert value(swept, "broker_revocations_total", provider="native", outcome="revoked") - \
            value(after, "broker_revocations_total", provider="native", outcome="revoked") == expired_since
        assert value(swept, "broker_sweep_seconds_count") > value(before, "broker_sweep_seconds_count")
        assert value(swept, "broker_sweep_last_success_timestamp_seconds") > 0
        assert ("broker_sweeper_lag_seconds", frozenset()) in swept

        # a signed teardown webhook: outcome counted, every lease of the session revoked
        body = json.dumps({"id": "evt_" + secrets.token_hex(8), "type": "task.completed",
                           "session_id": session["session_id"]}).encode()
        hook = http.post("/v1/webhooks/orchestrator", content=body,
                         headers={"X-Broker-Signature": sign(body, secrets_.webhook_secret),
                                  "Content-Type": "application/json"})
        assert hook.status_code == 200, hook.text
        replay = http.post("/v1/webhooks/orchestrator", content=body,
                           headers={"X-Broker-Signature": sign(body, secrets_.webhook_secret),
                                    "Content-Type": "application/json"})
        assert replay.status_code == 409
        ended = scrape(http)
        assert value(ended, "broker_webhooks_total", event_type="task.completed", outcome="processed") == 1
        assert value(ended, "broker_webhooks_total", event_type="task.completed", outcome="replayed") == 1
        assert value(ended, "broker_leases", status="active", provider="native") == 0
        assert value(ended, "broker_revocations_total", provider="native", outcome="revoked") - \
            value(swept, "broker_revocations_total", provider="native", outcome="revoked") == 2


def test_json_logs_carry_the_request_id(served: tuple[BrokerProcess, BrokerSecrets]) -> None:
    proc, secrets_ = served
    with proc.client() as http:
        given = http.get("/healthz", headers={"X-Request-ID": "trace-abc.123"})
        assert given.headers["x-request-id"] == "trace-abc.123"
        fresh = http.get("/readyz")
        fresh_id = fresh.headers["x-request-id"]
        assert fresh_id.startswith("req_")
        forged = http.get("/healthz", headers={"X-Request-ID": 'x" "level": "critical'})  # not a plain token: replaced
        assert forged.headers["x-request-id"].startswith("req_")
        session = provision(http, secrets_, "obs-logs")
        minted = ask(http, session, "jwt://svc/logs", "read")
        assert minted.status_code == 201
        token = minted.json()["credential"]["token"]
        # a refused body still gets its id (the middleware is outermost)
        big = http.post("/v1/sessions", content=b"x" * (2 << 20), headers={"X-Request-ID": "too-big"})
        assert big.status_code == 413 and big.headers["x-request-id"] == "too-big"

    proc.stop()  # flush and close the log
    lines = [line for line in proc.log_path.read_text().splitlines() if line and not line.startswith("--- start")]
    records = [json.loads(line) for line in lines]  # every line parses
    assert records, "the broker wrote no log line"
    for record in records:
        assert {"time", "level", "logger", "message", "request_id"} <= record.keys(), record
    by_id = {r["request_id"]: r for r in records if r["logger"] == "broker.http"}
    assert by_id["trace-abc.123"]["path"] == "/healthz" and by_id["trace-abc.123"]["status"] == 200
    assert by_id[fresh_id]["path"] == "/readyz"
    assert by_id["too-big"]["status"] == 413
    assert forged.headers["x-request-id"] in by_id
    assert not any('"critical' in (r["request_id"] or "") for r in records)
    # uvicorn's own lines come through the same handler, as JSON
    assert any(r["logger"].startswith("uvicorn") for r in records)
    text = proc.log_path.read_text()
    for secret in (token, session["session_token"], secrets_.orchestrator_key):
        assert secret not in text
