"""Machines with no shared secret, end to end over real HTTP: an orchestrator with only its
platform's token provisions a session bound to an agent runtime's SPIFFE ID, the agent uses it,
the orchestrator ends it by task id; the refusal corpus, each refusal audited; and every record
a machine caused names its issuer, subject and trust rule.

The broker under test has no orchestrator API key, no admin token, no local human token and no
webhook secret configured: only BROKER_TRUSTED_ISSUERS and the policy's trust rules.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlmodel import select

from broker.audit.service import query
from broker.db import transaction
from broker.identity.workload import WORKLOAD_HEADER
from broker.models import Lease, SessionRow
from tests.support.brokers import TEST_POLICY, BrokerSecrets, LiveServer, build_broker
from tests.support.workload_issuers import IssuerKey, LoopbackIssuer, SpiffeTrustDomain, new_key

AUD = "jit-broker"
AGENT_ID = "spiffe://example.org/ns/agents/sa/claude"
OTHER_AGENT_ID = "spiffe://example.org/ns/agents/sa/other"


@pytest.fixture(scope="module")
def github() -> Iterator[LoopbackIssuer]:
    issuer = LoopbackIssuer("github")
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def kubernetes() -> Iterator[LoopbackIssuer]:
    issuer = LoopbackIssuer("kubernetes")
    yield issuer
    issuer.close()


@pytest.fixture(scope="module")
def outsider() -> Iterator[LoopbackIssuer]:
    issuer = LoopbackIssuer("github")
    yield issuer
    issuer.close()


def trust_policy(github: LoopbackIssuer, kubernetes: LoopbackIssuer, outsider: LoopbackIssuer) -> str:
    return TEST_POLICY + f"""\
trust:
  - name: gha-prod
    role: orchestrator
    orchestrator: gha-acme
    issuer: {github.url}
    audience: {AUD}
    subject: "repo:acme/app:environment:prod"
    claim_pattern:
      repository: acme/app
      job_workflow_ref: "acme/app/.github/workflows/agent.yml@refs/heads/main"
  - name: k8s-runners
    role: orchestrator
    orchestrator: k8s-runners
    issuer: {kubernetes.url}
    audience: {AUD}
    subject_pattern: "system:serviceaccount:agents:*"
    claim_pattern: {{kubernetes.io.namespace: agents}}
  - name: spiffe-agents
    role: agent
    issuer: spiffe://example.org
    audience: {AUD}
    subject_pattern: "spiffe://example.org/ns/agents/sa/*"
  - name: outsider
    role: orchestrator
    orchestrator: outsider
    issuer: {outsider.url}
    audience: {AUD}
    subject_pattern: "**"
"""


@dataclass
class MachineBroker:
    client: httpx.Client
    server: LiveServer
    github: LoopbackIssuer
    kubernetes: LoopbackIssuer
    outsider: LoopbackIssuer
    spiffe: SpiffeTrustDomain

    @property
    def broker(self) -> Any:
        return self.server.broker

    def gha(self, **kw: Any) -> dict[str, str]:
        return {"Authorization": "Bearer " + self.github.github_token(audience=AUD, **kw)}

    def provision(self, headers: dict[str, str], *, task_id: str = "acme/app#42", bound: str | None = AGENT_ID,
                  **extra: Any) -> httpx.Response:
        body: dict[str, Any] = {"human": "alice@example.com", "agent": "claude-code", "task_id": task_id,
                                "ttl_seconds": 3600,
                                "scope": [{"resource": "jwt://payments-api", "access": ["read", "write"]}], **extra}
        if bound is not None:
            body["workload"] = {"issuer": "spiffe://example.org", "subject": bound}
        return self.client.post("/v1/sessions", json=body, headers=headers)

    def capability(self, session: dict[str, Any], workload_token: str | None, access: str = "read") -> httpx.Response:
        headers = {"Authorization": f"Bearer {session['session_token']}"}
        if workload_token is not None:
            headers[WORKLOAD_HEADER] = workload_token
        return self.client.post("/v1/capabilities", headers=headers, json={
            "resource": "jwt://payments-api", "access": access, "purpose": "read the ledger"})

    def end_by_task(self, headers: dict[str, str], task_id: str, type_: str = "task.completed") -> httpx.Response:
        return self.client.post("/v1/webhooks/orchestrator", headers=headers, json={
            "id": "evt-" + uuid.uuid4().hex, "type": type_, "task_id": task_id,
            "occurred_at": "2026-01-01T00:00:00Z"})

    def records(self, **kw: Any) -> list[dict[str, Any]]:
        with transaction(self.broker.engine) as db:
            return [json.loads(r.record) for r in query(db, limit=10_000, **kw)]


@contextlib.contextmanager
def machine_broker(tmp_path: Path, database_url: str, github: LoopbackIssuer, kubernetes: LoopbackIssuer,
                   outsider: LoopbackIssuer) -> Iterator[MachineBroker]:
    domain = SpiffeTrustDomain("example.org", tmp_path)
    allow = json.dumps([github.url, kubernetes.url,
                        {"issuer": "spiffe://example.org", "algorithms": ["ES256"], "bundle": str(domain.bundle_path)}])
    broker = build_broker(
        tmp_path, database_url, BrokerSecrets(), trust_policy(github, kubernetes, outsider),
        # No shared secret of any kind: no API keys, no admin or human tokens, no webhook secret.
        orchestrator_api_keys="", admin_token_sha256=None, human_tokens="", webhook_secrets=None,
        trusted_issuers=allow,
    )
    assert broker.settings.orchestrator_key_hashes() == {} and broker.settings.webhook_secret_list() == []
    assert broker.settings.admin_token_sha256 is None and broker.settings.human_token_hashes() == {}
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        yield MachineBroker(client, server, github, kubernetes, outsider, domain)


@pytest.fixture
def machines(tmp_path: Path, database_url: str, github: LoopbackIssuer, kubernetes: LoopbackIssuer,
             outsider: LoopbackIssuer) -> Iterator[MachineBroker]:
    with machine_broker(tmp_path, database_url, github, kubernetes, outsider) as m:
        yield m


@pytest.fixture
def sqlite_machines(tmp_path: Path, github: LoopbackIssuer, kubernetes: LoopbackIssuer,
                    outsider: LoopbackIssuer) -> Iterator[MachineBroker]:
    """For the corpus: identity does not depend on the database."""
    with machine_broker(tmp_path, f"sqlite:///{tmp_path}/broker.db", github, kubernetes, outsider) as m:
        yield m


def code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


# --- acceptance 1: provision, use, end by task id; no shared secret anywhere ------------------


def test_orchestrator_with_only_a_workload_token_provisions_and_ends_by_task(machines: MachineBroker) -> None:
    m = machines
    r = m.provision(m.gha())
    assert r.status_code == 201, r.text
    session = r.json()
    assert jwt.decode(session["session_token"], options={"verify_signature": False})["wl"] == \
        {"iss": "spiffe://example.org", "sub": AGENT_ID}

    svid = m.spiffe.svid("ns/agents/sa/claude", audience=AUD)
    r = m.capability(session, svid)
    assert r.status_code == 201, r.text
    capability = r.json()
    assert capability["status"] == "active" and capability["credential"]["type"] == "jwt"

    # The orchestrator reads its session with the same kind of token (a fresh one: no reuse needed).
    r = m.client.get(f"/v1/sessions/{session['session_id']}", headers=m.gha())
    assert r.status_code == 200 and r.json()["status"] == "active"

    r = m.end_by_task(m.gha(), "acme/app#42")
    assert r.status_code == 200, r.text
    outcome = r.json()
    assert outcome["status"] == "processed" and [s["session_id"] for s in outcome["sessions"]] == \
        [session["session_id"]]
    assert outcome["sessions"][0]["receipts"][0]["capability_id"] == capability["capability_id"]
    with transaction(m.broker.engine) as db:
        row = db.get(SessionRow, session["session_id"])
        assert row is not None and row.status == "ended" and row.end_reason == "completed"
        assert row.created_by == "gha-acme"
        lease = db.get(Lease, capability["capability_id"])
        assert lease is not None and lease.status == "revoked"
    # The session token is now useless.
    assert m.capability(session, m.spiffe.svid("ns/agents/sa/claude", audience=AUD)).status_code == 403

    # Every record the machines caused names issuer, subject and trust rule.
    records = m.records(session_id=session["session_id"])
    by_type: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_type.setdefault(record["type"], []).append(record)
    orchestrator = {"issuer": m.github.url, "subject": "repo:acme/app:environment:prod", "trust_rule": "gha-prod",
                    "matched_rule": "trust[0]", "role": "orchestrator"}
    agent = {"issuer": "spiffe://example.org", "subject": AGENT_ID, "trust_rule": "spiffe-agents",
             "matched_rule": "trust[2]", "role": "agent"}
    assert by_type["session.created"][0]["detail"]["workload"] == orchestrator
    assert by_type["session.created"][0]["actor"] == "orchestrator:gha-acme"
    assert by_type["session.created"][0]["detail"]["workload_binding"] == {"iss": "spiffe://example.org",
                                                                           "sub": AGENT_ID}
    minted = [r for r in records if r["jit_grant"] and r["jit_grant"]["capability_id"] == capability["capability_id"]]
    assert minted and all(r["detail"]["workload"] == agent for r in minted if r["actor"].startswith("agent:"))
    assert any(r["actor"].startswith("agent:") for r in minted)
    ended = by_type["session.ended"]
    assert ended and all(r["detail"]["workload"] == orchestrator for r in ended)
    revoked = [r for r in records if r["type"].startswith("capability.revo")]
    assert revoked and all(r["detail"]["workload"] == orchestrator for r in revoked), revoked
    received = list(m.records(types=["webhook.received"]))
    assert received[-1]["actor"] == "orchestrator:gha-acme" and received[-1]["detail"]["proof"] == "bearer"
    assert received[-1]["detail"]["workload"] == orchestrator


def test_an_orchestrator_ends_only_its_own_sessions_by_task(machines: MachineBroker) -> None:
    m = machines
    mine = m.provision(m.gha(), task_id="acme/app#7").json()
    k8s = {"Authorization": "Bearer " + m.kubernetes.kubernetes_token(audience=AUD)}
    r = m.end_by_task(k8s, "acme/app#7")
    assert r.status_code == 200 and r.json()["status"] == "unmatched"
    r = m.client.post(f"/v1/sessions/{mine['session_id']}/end", headers=k8s)
    assert r.status_code == 404
    with transaction(m.broker.engine) as db:
        row = db.get(SessionRow, mine["session_id"])
        assert row is not None and row.status == "active"
    # Its own orchestrator ends it through the REST teardown too.
    r = m.client.post(f"/v1/sessions/{mine['session_id']}/end", headers=m.gha())
    assert r.status_code == 200 and r.json()["session_id"] == mine["session_id"]
    # Event ids are each orchestrator's own: one cannot spend another's (and block its teardown).
    other = m.provision(m.gha(), task_id="acme/app#8").json()
    body = {"id": "evt-shared", "type": "task.completed", "task_id": "acme/app#8"}
    r = m.client.post("/v1/webhooks/orchestrator", headers=k8s, json=body)
    assert r.status_code == 200 and r.json()["status"] == "unmatched"
    r = m.client.post("/v1/webhooks/orchestrator", headers=m.gha(), json=body)
    assert r.status_code == 200 and [s["session_id"] for s in r.json()["sessions"]] == [other["session_id"]]
    r = m.client.post("/v1/webhooks/orchestrator", headers=m.gha(), json=body)
    assert r.status_code == 409 and code(r) == "webhook-replayed"
    # A webhook without signature or token is still refused (no secret configured means no HMAC path).
    r = m.client.post("/v1/webhooks/orchestrator", json={"id": "x", "task_id": "acme/app#7"})
    assert r.status_code == 401 and code(r) == "invalid-signature"


# --- acceptance 2: the refusal corpus, each refused with a code and an audit record ------------


def _forged_kid(m: MachineBroker) -> str:
    return m.github.sign(m.github.github_claims(audience=AUD), key=IssuerKey("not-published", new_key().private, "RS256"))


ORCHESTRATOR_REFUSALS: dict[str, tuple[Any, int, str]] = {
    "unknown-issuer": (lambda m: m.outsider.sign({**m.outsider.github_claims(audience=AUD),
                                                  "iss": "https://issuer.unknown.example"}), 401, "untrusted-issuer"),
    "policy-names-it-server-does-not": (lambda m: m.outsider.github_token(audience=AUD), 401, "untrusted-issuer"),
    "wrong-audience": (lambda m: m.github.github_token(audience="sts.amazonaws.com"), 401, "invalid-audience"),
    "expired": (lambda m: m.github.sign(m.github.github_claims(audience=AUD, ttl=-300)), 401, "token-expired"),
    "alg-rs384": (lambda m: m.github.sign(m.github.github_claims(audience=AUD), alg="RS384"), 401,
                  "algorithm-not-allowed"),
    "alg-none": (lambda m: jwt.encode(m.github.github_claims(audience=AUD), "", algorithm="none",
                                      headers={"kid": m.github.active.kid}), 401, "algorithm-not-allowed"),
    "kid-not-in-jwks": (_forged_kid, 401, "unknown-signing-key"),
    "repo-prefix-trick": (lambda m: m.github.github_token(audience=AUD, repository="acme/app-evil"), 403,
                          "no-matching-trust-rule"),
    "other-workflow": (lambda m: m.github.github_token(audience=AUD, workflow_file="x.yml"), 403,
                       "no-matching-trust-rule"),
    "k8s-other-namespace": (lambda m: m.kubernetes.kubernetes_token(audience=AUD, namespace="default"), 403,
                            "no-matching-trust-rule"),
    "spiffe-other-trust-domain": (lambda m: m.spiffe.svid("x", audience=AUD,
                                                          spiffe_id="spiffe://evil.org/ns/agents/sa/claude"), 401,
                                  "untrusted-issuer"),
    "agent-svid-as-orchestrator": (lambda m: m.spiffe.svid("ns/agents/sa/claude", audience=AUD), 403,
                                   "no-matching-trust-rule"),
}


def test_orchestrator_refusal_corpus_each_audited(sqlite_machines: MachineBroker) -> None:
    m = sqlite_machines
    for name, (make, status, expected) in ORCHESTRATOR_REFUSALS.items():
        token = make(m)
        r = m.provision({"Authorization": f"Bearer {token}"}, task_id=f"t-{name}")
        assert (r.status_code, code(r)) == (status, expected), (name, r.text)
        assert r.json()["error"]["message"], name
        refusals = m.records(types=["workload.refused"])
        last = refusals[-1]
        assert last["outcome"] == expected and last["detail"]["error"]["code"] == expected, name
        assert last["detail"]["workload"]["verified"] is False and last["detail"]["workload"]["role"] == "orchestrator"
        iss = jwt.decode(token, options={"verify_signature": False})
        assert last["detail"]["workload"]["subject"] == iss["sub"], name
    assert len(m.records(types=["workload.refused"])) == len(ORCHESTRATOR_REFUSALS)
    metrics = m.client.get("/metrics").text
    assert 'broker_workload_authentications_total{outcome="no-matching-trust-rule",role="orchestrator",' \
           'trust_rule=""}' in metrics
    # Nothing was provisioned by any of them.
    assert m.records(types=["session.created"]) == []
    r = m.client.get("/v1/sessions", headers=m.gha())
    assert r.status_code == 200 and r.json() == []


def test_a_capability_request_from_another_workload_is_refused(sqlite_machines: MachineBroker) -> None:
    m = sqlite_machines
    session = m.provision(m.gha()).json()
    cases = [
        (None, 401, "workload-token-required"),
        (m.spiffe.svid("ns/agents/sa/other", audience=AUD), 403, "workload-mismatch"),  # a genuine other agent
        (m.spiffe.svid("ns/agents/sa/claude", audience="other-aud"), 401, "invalid-audience"),
        (m.spiffe.svid("ns/agents/sa/claude", audience=AUD, spiffe_id="spiffe://evil.org/ns/agents/sa/claude"),
         401, "untrusted-issuer"),
        (m.spiffe.svid("ns/agents/sa/claude", audience=AUD, ttl=-120), 401, "token-expired"),
        (m.github.github_token(audience=AUD), 403, "no-matching-trust-rule"),  # an orchestrator's token
        ("not-a-jwt", 401, "invalid-token"),
    ]
    for token, status, expected in cases:
        r = m.capability(session, token)
        assert (r.status_code, code(r)) == (status, expected), (expected, r.text)
    refusals = m.records(types=["workload.refused"], session_id=session["session_id"])
    assert [r["outcome"] for r in refusals] == [c[2] for c in cases]
    assert all(r["agent"]["session_id"] == session["session_id"] and r["detail"]["workload"]["role"] == "agent"
               for r in refusals)
    with transaction(m.broker.engine) as db:
        assert db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all() == []
    # The bound workload itself still gets its capability.
    assert m.capability(session, m.spiffe.svid("ns/agents/sa/claude", audience=AUD)).status_code == 201


def test_binding_needs_an_allowlisted_issuer_and_unbound_sessions_work_as_before(
        sqlite_machines: MachineBroker) -> None:
    m = sqlite_machines
    r = m.client.post("/v1/sessions", headers=m.gha(), json={
        "human": "alice@example.com", "agent": "claude-code", "task_id": "t", "ttl_seconds": 600,
        "scope": [{"resource": "jwt://payments-api", "access": ["read"]}],
        "workload": {"issuer": "spiffe://evil.org", "subject": "spiffe://evil.org/x"}})
    assert r.status_code == 400 and code(r) == "untrusted-issuer"
    bad_subjects = ["", " spiffe://example.org/x", "spiffe://example.org/x\n", "spiffe://example.org/\u202ex",
                    "a" * 1025, "spiffe://example.org/x y"]
    for subject in bad_subjects:
        r = m.provision(m.gha(), bound=subject)
        assert r.status_code == 422, (subject, r.text)
    for subject in ("spiffe://other.org/ns/agents/sa/claude", "spiffe://example.org", "spiffe://example.org/",
                    "spiffe://example.org/ns/../admin", "spiffe://example.org.evil/x", "https://example.org/x"):
        r = m.provision(m.gha(), bound=subject)
        assert r.status_code == 400 and code(r) == "invalid-workload-binding", (subject, r.text)
    unbound = m.provision(m.gha(), bound=None).json()
    assert "wl" not in jwt.decode(unbound["session_token"], options={"verify_signature": False})
    assert m.capability(unbound, None).status_code == 201
    # A workload token sent with an unbound session is still checked: a bad one is refused.
    r = m.capability(unbound, m.spiffe.svid("x", audience=AUD, spiffe_id="spiffe://evil.org/x"))
    assert r.status_code == 401 and code(r) == "untrusted-issuer"


def test_token_exchange_checks_the_binding_too(sqlite_machines: MachineBroker) -> None:
    m = sqlite_machines
    session = m.provision(m.gha()).json()

    def exchange(workload_token: str | None) -> httpx.Response:
        headers = {WORKLOAD_HEADER: workload_token} if workload_token else {}
        return m.client.post("/v1/oauth/token", headers=headers, data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": session["session_token"],
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt", "resource": "jwt://payments-api",
            "scope": "read"})

    r = exchange(None)
    assert r.status_code == 400 and r.json()["error"] == "invalid_grant", r.text
    assert r.json()["code"] == "workload-token-required"
    r = exchange(m.spiffe.svid("ns/agents/sa/other", audience=AUD))
    assert r.status_code == 403 and r.json()["code"] == "workload-mismatch", r.text
    r = exchange(m.spiffe.svid("ns/agents/sa/claude", audience=AUD))
    assert r.status_code == 200, r.text
    assert r.json()["access_token"]
    refusals = m.records(types=["workload.refused"], session_id=session["session_id"])
    assert [x["outcome"] for x in refusals] == ["workload-token-required", "workload-mismatch"]
    minted = m.records(types=["capability.minted"], session_id=session["session_id"])
    assert minted and minted[-1]["detail"]["workload"]["subject"] == AGENT_ID


# --- acceptance 3 over HTTP: rotation without a restart ---------------------------------------


def test_issuer_key_rotation_is_picked_up_by_the_running_broker(sqlite_machines: MachineBroker) -> None:
    m = sqlite_machines
    assert m.provision(m.gha(), task_id="before").status_code == 201
    reads = m.github.jwks_reads()
    m.github.rotate(keep_old=True)
    # The first token of the new key re-reads the JWKS (once); the cooldown has not started for
    # this broker's cache, since no unknown kid was seen before.
    assert m.provision(m.gha(), task_id="after").status_code == 201
    assert m.github.jwks_reads() == reads + 1
    for i in range(40):
        r = m.provision({"Authorization": "Bearer " + m.github.sign(
            m.github.github_claims(audience=AUD), key=IssuerKey(f"storm-{i}", m.github.active.private, "RS256"))},
            task_id=f"storm-{i}")
        assert code(r) == "unknown-signing-key"
    assert m.github.jwks_reads() == reads + 1


def test_a_policy_reload_narrows_machines_at_the_next_request(sqlite_machines: MachineBroker, tmp_path: Path) -> None:
    m = sqlite_machines
    token = {"Authorization": "Bearer " + m.github.github_token(audience=AUD)}
    assert m.provision(token, task_id="before-reload").status_code == 201
    policy_file = Path(m.broker.settings.policy_file)
    text = policy_file.read_text()
    policy_file.write_text(text.replace('subject: "repo:acme/app:environment:prod"',
                                        'subject: "repo:acme/app:environment:staging"'))
    assert m.broker.policies.reload() is True
    # The very same token, verified moments ago: no cached "yes" outlives the rule that gave it.
    r = m.provision(token, task_id="after-reload")
    assert r.status_code == 403 and code(r) == "no-matching-trust-rule"
    # And a policy cannot widen the allowlist: naming a new issuer there lets nothing in.
    policy_file.write_text(text + f"""\
  - name: widened
    role: orchestrator
    orchestrator: widened
    issuer: https://issuer.unknown.example
    audience: {AUD}
    subject_pattern: "**"
""")
    assert m.broker.policies.reload() is True
    forged = m.outsider.sign({**m.outsider.github_claims(audience=AUD), "iss": "https://issuer.unknown.example"})
    r = m.provision({"Authorization": f"Bearer {forged}"}, task_id="widened")
    assert r.status_code == 401 and code(r) == "untrusted-issuer" and "cannot widen" in r.json()["error"]["message"]


def test_the_agent_helpers_send_the_runtimes_token_from_a_file(sqlite_machines: MachineBroker, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.cli.agent import AgentClient, HelperError

    m = sqlite_machines
    session = m.provision(m.gha(), task_id="helpers").json()
    client = AgentClient(token=session["session_token"], base_url=m.server.base_url)
    with pytest.raises(HelperError) as raised:
        client.request_capability("jwt://payments-api", "read", purpose="p", tool="t")
    assert raised.value.code == "workload-token-required"
    token_file = tmp_path / "svid.jwt"
    monkeypatch.setenv("BROKER_WORKLOAD_TOKEN_FILE", str(token_file))
    token_file.write_text(m.spiffe.svid("ns/agents/sa/other", audience=AUD) + "\n")
    with pytest.raises(HelperError) as raised:
        client.request_capability("jwt://payments-api", "read", purpose="p", tool="t")
    assert raised.value.code == "workload-mismatch"
    # The platform rewrote the file (rotation): the next call reads the new token.
    token_file.write_text(m.spiffe.svid("ns/agents/sa/claude", audience=AUD) + "\n")
    minted = client.request_capability("jwt://payments-api", "read", purpose="p", tool="t")
    assert minted["status"] == "active"
    monkeypatch.setenv("BROKER_WORKLOAD_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(HelperError) as raised:
        client.request_capability("jwt://payments-api", "read", purpose="p", tool="t")
    assert raised.value.code == "no-workload-token"


def test_exec_under_a_bound_session_keeps_both_agent_tokens_from_the_child(sqlite_machines: MachineBroker,
                                                                          tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.support.processes import BROKER_CLI

    m = sqlite_machines
    session = m.provision(m.gha(), task_id="exec").json()
    out = tmp_path / "env.json"
    script = ("import json, os, sys; json.dump({k: os.environ.get(k) for k in "
              "('BROKER_SESSION_TOKEN', 'BROKER_WORKLOAD_TOKEN', 'BROKER_TOKEN_PAYMENTS_API')}, open(sys.argv[1], 'w'))")
    env = {**os.environ, "BROKER_URL": m.server.base_url, "BROKER_SESSION_TOKEN": session["session_token"],
           "BROKER_WORKLOAD_TOKEN": m.spiffe.svid("ns/agents/sa/claude", audience=AUD)}
    done = subprocess.run([BROKER_CLI, "exec", "-c", "jwt://payments-api=read", "--", sys.executable, "-c", script,
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(out.read_text())
    assert seen["BROKER_SESSION_TOKEN"] is None and seen["BROKER_WORKLOAD_TOKEN"] is None
    assert seen["BROKER_TOKEN_PAYMENTS_API"]
    # Without the runtime's token the same command gets nothing and runs nothing.
    out.unlink()
    env.pop("BROKER_WORKLOAD_TOKEN")
    done = subprocess.run([BROKER_CLI, "exec", "-c", "jwt://payments-api=read", "--", sys.executable, "-c", script,
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "workload-token-required" in done.stderr and not out.exists()
