"""Every audit event type carries the same fields, and `policy.loaded` is written only on change."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

from broker.app import record_policy_loaded
from broker.audit.service import query
from broker.db import transaction
from broker.identity.webhooks import HEADER, sign
from tests.support.brokers import TEST_POLICY, Api, LiveServer, build_broker

TOP = {"event_id", "seq", "timestamp", "type", "actor", "human_principal", "agent", "request", "policy_decision",
       "jit_grant", "outcome", "detail", "prev_hash", "hash",
       "chain_id", "chain_pos"}  # since 0007: the record's own chain (session or broker) and place in it
AGENT = {"id", "session_id", "task_id"}
REQUEST = {"operation", "tool", "resource", "access", "tier", "parameters", "purpose", "reason"}
DECISION = {"result", "reason", "matched_rule", "policy_version", "human_permission", "shadow", "approval", "grant",
            "rule_name", "layer"}
GRANT = {"status", "ttl_seconds", "capability_id", "provider", "expires_at", "credential_fingerprint", "approval_id",
         "attempts", "grant_id", "uses"}


def audit(api: Api, **params: Any) -> list[dict[str, Any]]:
    r = api.client.get("/v1/audit", params={"limit": 5000, **params}, headers=api.as_admin())
    assert r.status_code == 200, r.text
    return r.json()["records"]  # type: ignore[no-any-return]


def signed_webhook(api: Api, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    r = api.client.post("/v1/webhooks/orchestrator", content=raw,
                        headers={"Content-Type": "application/json", HEADER: sign(raw, api.secrets.webhook_secret)})
    assert r.status_code == 200, r.text


def test_every_event_type_has_the_same_fields(api: Api) -> None:
    session = api.new_session()
    minted = api.request(session, {"resource": "jwt://payments-api", "access": "read"})
    assert minted.status_code == 201, minted.text
    assert api.request(session, {"resource": "jwt://payments-api", "access": "deploy"}).status_code == 202
    assert api.request(session, {"resource": "jwt://payments-api", "access": "drop"}).status_code == 403
    r = api.client.delete(f"/v1/capabilities/{minted.json()['capability_id']}", headers=api.as_admin())
    assert r.status_code == 200, r.text
    api.request(session, {"resource": "jwt://svc/a", "access": "read"})
    r = api.client.post("/v1/revocations", json={"session_id": session["session_id"]}, headers=api.as_admin())
    assert r.status_code == 200, r.text
    other = api.new_session(task_id="task-2")
    signed_webhook(api, {"id": str(uuid.uuid4()), "type": "task.completed", "session_id": other["session_id"]})

    records = audit(api)
    types = {rec["type"] for rec in records}
    assert types >= {"policy.loaded", "session.created", "capability.minted", "capability.pending",
                     "capability.denied", "capability.revoked", "revocation.requested", "session.ended",
                     "webhook.received"}
    for rec in records:
        assert set(rec) == TOP, rec["type"]
        assert set(rec["agent"]) == AGENT, rec["type"]
        assert set(rec["request"]) == REQUEST, rec["type"]
        assert rec["policy_decision"] is None or set(rec["policy_decision"]) == DECISION, rec["type"]
        assert rec["jit_grant"] is None or set(rec["jit_grant"]) == GRANT, rec["type"]
        assert isinstance(rec["detail"], dict), rec["type"]
        assert (isinstance(rec["actor"], str) and ":" in rec["actor"]) or rec["actor"] == "broker", rec
    by_type = {rec["type"]: rec for rec in records}
    assert by_type["capability.minted"]["actor"] == "agent:claude-code"
    assert by_type["capability.denied"]["actor"] == "agent:claude-code"
    assert by_type["capability.denied"]["policy_decision"]["reason"] == "agent-ceiling"
    assert by_type["capability.revoked"]["actor"] == "admin:admin"
    assert by_type["session.created"]["actor"] == "orchestrator:orch"
    assert by_type["webhook.received"]["actor"] == "webhook:orchestrator"
    # No credential in any record: only its fingerprint.
    token = minted.json()["credential"]["token"]
    assert all(token not in json.dumps(rec) for rec in records)
    first = next(rec for rec in records if rec["type"] == "capability.minted"
                 and rec["jit_grant"]["capability_id"] == minted.json()["capability_id"])
    assert first["jit_grant"]["credential_fingerprint"] == "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def policy_loaded(api: Api) -> list[dict[str, Any]]:
    with transaction(api.broker.engine) as db:
        return [json.loads(r.record) for r in query(db, types=["policy.loaded"], limit=1000)]


def test_policy_loaded_is_recorded_only_when_the_policy_changed(api: Api, tmp_path: Path, database_url: str) -> None:
    first = policy_loaded(api)
    assert len(first) == 1 and first[0]["detail"]["trigger"] == "start"
    version = api.broker.policies.current.version
    assert first[0]["detail"]["version"] == version

    # The same policy again (a reload of an unchanged file, another start): nothing new.
    assert api.broker.policies.reload()
    assert record_policy_loaded(api.broker, "reload") is False
    restarted = build_broker(tmp_path, database_url, api.secrets)
    with LiveServer(restarted):
        pass
    assert len(policy_loaded(api)) == 1

    # A changed file: one record, naming the version it replaced.
    assert api.broker.policies.path is not None
    api.broker.policies.path.write_text(TEST_POLICY.replace("max_issued_per_session: 50", "max_issued_per_session: 49"))
    assert api.broker.policies.reload()
    assert record_policy_loaded(api.broker, "reload") is True
    assert record_policy_loaded(api.broker, "reload") is False
    records = policy_loaded(api)
    assert len(records) == 2
    assert records[1]["detail"]["previous_version"] == version
    assert records[1]["detail"]["version"] == api.broker.policies.current.version != version
