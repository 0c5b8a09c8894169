"""Revocation receipts (docs/lifecycle.md): every revocation answer (session end, DELETE, the
kill switch, the webhook) says per capability what really happened to its credential, and the
audit record of that revocation holds the same receipt. Real backends: OpenBao (a dedicated,
restartable one where it is taken down), moto, the GitHub stand-in; SQLite and PostgreSQL.

Acceptance 5: a session holding native, vault, aws and github capabilities is torn down while
OpenBao is stopped: native `expires_naturally` at its exp, aws and github `revoked` (and their
backends refuse the credentials), vault `revoke_pending` with its next try, never `revoked`;
OpenBao back, the retry makes it `revoked`, and OpenBao confirms.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import httpx
import hvac
import jwt
import pytest
from typer.testing import CliRunner

from broker.audit.service import query
from broker.cli.main import app as cli
from broker.db import transaction, utcnow
from broker.identity.webhooks import HEADER, sign
from broker.lifecycle.sweeper import sweep_once
from broker.models import Lease
from tests.integration.test_all_providers import five_asks, serve_all_providers
from tests.integration.test_lifecycle_faults import accessor_alive, configure_with_retry
from tests.support.aws_moto import MOTO_REGION, AwsRole
from tests.support.brokers import Api
from tests.support.github_standin import GitHubStandIn
from tests.support.openbao import OpenBaoServer, VaultSetup

pytestmark = pytest.mark.slow

SCOPE = [{"resource": f"{scheme}://**", "access": ["*"]} for scheme in ("jwt", "vault", "aws", "github")]


def four_asks(aws_role: AwsRole) -> dict[str, dict[str, Any]]:
    """native, a vault token, aws and github: one capability per provider."""
    asks = five_asks(aws_role)
    del asks["vault_db"]
    return asks


def mint(api: Api, session: dict[str, Any], asks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    caps = {}
    for name, ask in asks.items():
        r = api.request(session, ask)
        assert r.status_code == 201, (name, r.text)
        caps[name] = r.json()
    return caps


def end(api: Api, session: dict[str, Any]) -> dict[str, Any]:
    r = api.client.post(f"/v1/sessions/{session['session_id']}/end", json={"reason": "completed"},
                        headers=api.as_orchestrator())
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def by_name(caps: dict[str, dict[str, Any]], receipts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    found = {rc["capability_id"]: rc for rc in receipts}
    assert len(found) == len(receipts)
    return {name: found[cap["capability_id"]] for name, cap in caps.items()}


def audited_receipts(api: Api, capability_id: str) -> list[dict[str, Any]]:
    """The receipts in this capability's audit records, oldest first."""
    with transaction(api.broker.engine) as db:
        records = [json.loads(r.record) for r in query(db, limit=100_000)]
    return [r["detail"]["receipt"] for r in records
            if (r.get("jit_grant") or {}).get("capability_id") == capability_id and "receipt" in r["detail"]]


def rfc3339_of_exp(token: str) -> str:
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]  # reading the claim, not trusting it
    return datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def github_accepts(standin: GitHubStandIn, token: str) -> bool:
    r = httpx.get(f"{standin.url}/repos/acme/widgets/contents/README.md",
                  headers={"Authorization": f"Bearer {token}", "User-Agent": "receipts-test"})
    assert r.status_code in (200, 401), r.text
    return r.status_code == 200


def lease(api: Api, capability_id: str) -> Lease:
    with transaction(api.broker.engine) as db:
        row = db.get(Lease, capability_id)
        assert row is not None
        return row


def cli_as_admin(api: Api, monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    monkeypatch.setenv("BROKER_URL", api.base_url)
    monkeypatch.setenv("BROKER_TOKEN", api.secrets.admin_token)
    out = CliRunner().invoke(cli, list(args))
    assert out.exit_code == 0, out.output
    return out.output


# --- acceptance 5: teardown with one backend down ---------------------------------------------------


def test_teardown_with_one_backend_down_answers_each_capabilitys_true_outcome(
    database_url: str, tmp_path: Path, openbao_restartable: OpenBaoServer, aws_endpoint: str, aws_role: AwsRole,
    github_standin: GitHubStandIn, monkeypatch: pytest.MonkeyPatch,
) -> None:
    bao = openbao_restartable  # a dedicated OpenBao: stopping it breaks no other test
    setup = configure_with_retry(bao)
    with serve_all_providers(database_url, tmp_path, setup, aws_endpoint, github_standin,
                             provider_timeout_seconds=3.0) as api:
        session = api.new_session(scope=SCOPE)
        caps = mint(api, session, four_asks(aws_role))
        cred = {name: cap["credential"] for name, cap in caps.items()}
        accessor = cred["vault_token"]["accessor"]
        assert accessor_alive(bao.client(), accessor) and github_accepts(github_standin, cred["github"]["token"])

        bao.stop()  # OpenBao is down, for real: connection refused
        before = utcnow().replace(microsecond=0)
        answer = end(api, session)
        receipts = by_name(caps, answer["receipts"])
        assert answer["revoked"] == 3 and answer["revoke_pending"] == 1

        # native: marked revoked, introspection inactive; offline verifiers accept it until exp.
        native = receipts["native"]
        assert native["outcome"] == "expires_naturally" and native["revoked_at"] is None
        assert native["expires_at"] == rfc3339_of_exp(cred["native"]["token"]) and native["status"] == "revoked"
        assert api.client.post("/v1/introspect", data={"token": cred["native"]["token"]}).json() == {"active": False}

        # aws: the deny naming only this session is on the role, confirmed by IAM.
        aws = receipts["aws"]
        userid = f"{aws_role.role_id}:{caps['aws']['capability_id']}"
        assert aws["outcome"] == "revoked" and aws["revoked_at"] >= before.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert aws["expires_at"] is None and f"aws:userid {userid} only" in aws["detail"]
        iam = boto3.client("iam", endpoint_url=aws_endpoint, region_name=MOTO_REGION)
        deny = iam.get_role_policy(RoleName=aws_role.name, PolicyName="jit-broker-revoked-sessions")["PolicyDocument"]
        assert userid in json.dumps(deny)

        # github: DELETE /installation/token answered 204; the stand-in refuses the token now.
        gh = receipts["github"]
        assert gh["outcome"] == "revoked" and gh["revoked_at"] and "204" in gh["detail"]
        assert not github_accepts(github_standin, cred["github"]["token"])

        # vault: OpenBao is down, so not revoked: pending, with the next try and the TTL bound.
        vault = receipts["vault_token"]
        assert vault["outcome"] == "revoke_pending" and vault["revoked_at"] is None
        assert vault["status"] == "revoke_pending" and vault["error"] == "provider-unavailable"
        assert vault["next_attempt_at"] >= before.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert vault["expires_at"] >= caps["vault_token"]["expires_at"]

        # The audit holds the very same receipts.
        for name, cap in caps.items():
            assert audited_receipts(api, cap["capability_id"])[-1] == receipts[name], name

        # OpenBao comes back; the sweeper's retry revokes, and OpenBao confirms.
        bao.start()
        wait_until = lease(api, caps["vault_token"]["capability_id"]).next_attempt_at
        assert wait_until is not None
        time.sleep(max(0.0, (wait_until - utcnow()).total_seconds()) + 0.1)
        assert accessor_alive(bao.client(), accessor)  # still alive: nothing was revoked on hope
        retried = sweep_once(api.broker).receipts[caps["vault_token"]["capability_id"]]
        assert retried.outcome == "revoked" and retried.revoked_at is not None and retried.status == "revoked"
        assert not accessor_alive(bao.client(), accessor)
        with pytest.raises(hvac.exceptions.Forbidden):
            hvac.Client(url=bao.addr, token=cred["vault_token"]["token"]).auth.token.lookup_self()
        trail = audited_receipts(api, caps["vault_token"]["capability_id"])
        assert trail[0] == vault and trail[-1] == retried.record()
        assert [rc["outcome"] for rc in trail] == ["revoke_pending"] * (len(trail) - 1) + ["revoked"]

        # Asking again answers what is so now, without touching a backend.
        again = api.client.delete(f"/v1/capabilities/{caps['vault_token']['capability_id']}", headers=api.as_admin())
        assert again.json()["receipt"]["outcome"] == "already_ended" and again.json()["status"] == "revoked"
        assert "audit chain intact" in cli_as_admin(api, monkeypatch, "audit", "verify")


# --- DELETE, the kill switch and the webhook ---------------------------------------------------------


@pytest.fixture
def everything(database_url: str, tmp_path: Path, vault_setup: VaultSetup, aws_endpoint: str,
               github_standin: GitHubStandIn) -> Any:
    with serve_all_providers(database_url, tmp_path, vault_setup, aws_endpoint, github_standin) as api:
        try:
            yield api
        finally:
            github_standin.end_outage()


def test_delete_answers_the_receipt_of_its_capability(
    everything: Api, aws_role: AwsRole, vault_setup: VaultSetup, github_standin: GitHubStandIn,
) -> None:
    api = everything
    session = api.new_session(scope=SCOPE)
    caps = mint(api, session, four_asks(aws_role))

    def delete(name: str) -> dict[str, Any]:
        r = api.client.delete(f"/v1/capabilities/{caps[name]['capability_id']}", headers=api.as_admin())
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    github_standin.outage("DELETE", "/installation/token")  # GitHub answers 503 to every revoke
    down = delete("github")
    assert down["status"] == "revoke_pending" and down["receipt"]["outcome"] == "revoke_pending"
    assert down["receipt"]["next_attempt_at"] and down["receipt"]["error"] == "provider-unavailable"
    assert github_accepts(github_standin, caps["github"]["credential"]["token"])  # truly not revoked
    github_standin.end_outage()
    up = delete("github")  # asked again, DELETE tries again at once (the backoff is the sweeper's)
    assert up["receipt"]["outcome"] == "revoked" and up["status"] == "revoked"
    assert not github_accepts(github_standin, caps["github"]["credential"]["token"])

    vault = delete("vault_token")
    assert vault["receipt"]["outcome"] == "revoked" and "revoke-accessor" in vault["receipt"]["detail"]
    assert not accessor_alive(vault_setup.server.client(), caps["vault_token"]["credential"]["accessor"])
    aws = delete("aws")
    assert aws["receipt"]["outcome"] == "revoked" and aws["receipt"]["revoked_at"]
    native = delete("native")
    assert native["receipt"]["outcome"] == "expires_naturally"
    assert native["receipt"]["expires_at"] == rfc3339_of_exp(caps["native"]["credential"]["token"])

    for name in ("github", "vault_token", "aws", "native"):
        body = delete(name)  # again: nothing to do, and it says so
        assert body["receipt"]["outcome"] == "already_ended" and body["receipt"]["ended_at"] == body["ended_at"]
    assert audited_receipts(api, caps["github"]["capability_id"]) == [down["receipt"], up["receipt"]]
    assert audited_receipts(api, caps["aws"]["capability_id"]) == [aws["receipt"]]


def test_kill_switch_answers_receipts_for_every_capability_it_matched(
    everything: Api, aws_role: AwsRole, github_standin: GitHubStandIn, monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = everything
    session = api.new_session(scope=SCOPE)
    asks = four_asks(aws_role)
    caps = mint(api, session, {"native": asks["native"], "github": asks["github"]})
    github_standin.outage("DELETE", "/installation/token")
    r = api.client.post("/v1/revocations", json={"session_id": session["session_id"], "reason": "incident-7"},
                        headers=api.as_admin())
    assert r.status_code == 200, r.text
    body = r.json()
    receipts = by_name(caps, body["receipts"])
    assert receipts["native"]["outcome"] == "expires_naturally" and receipts["github"]["outcome"] == "revoke_pending"
    assert body["revoke_pending_ids"] == [caps["github"]["capability_id"]] and body["revoked"] == 1
    for name, cap in caps.items():
        assert audited_receipts(api, cap["capability_id"])[-1] == receipts[name]

    # The CLI prints them, to people and to scripts.
    github_standin.end_outage()
    text = cli_as_admin(api, monkeypatch, "revoke", "--session", session["session_id"])
    assert "receipts (1 revoked):" in text and f"{caps['github']['capability_id']}  revoked" in text
    assert "GitHub confirmed" in text
    answer = json.loads(cli_as_admin(api, monkeypatch, "revoke", "--session", session["session_id"], "--json"))
    assert answer["receipts"] == [] and answer["matched_capabilities"] == 0  # nothing live is left


def test_webhook_answers_receipts_per_session(everything: Api, aws_role: AwsRole, vault_setup: VaultSetup) -> None:
    api = everything
    session = api.new_session(scope=SCOPE, task_id="acme/widgets#11")
    asks = four_asks(aws_role)
    caps = mint(api, session, {"vault_token": asks["vault_token"], "native": asks["native"]})
    raw = json.dumps({"id": "evt-receipts-" + session["session_id"], "type": "task.completed",
                      "repository": "acme/widgets", "issue_number": 11}).encode()
    r = api.client.post("/v1/webhooks/orchestrator", content=raw,
                        headers={"Content-Type": "application/json", HEADER: sign(raw, api.secrets.webhook_secret)})
    assert r.status_code == 200, r.text
    [ended] = r.json()["sessions"]
    receipts = by_name(caps, ended["receipts"])
    assert receipts["vault_token"]["outcome"] == "revoked" and receipts["native"]["outcome"] == "expires_naturally"
    assert not accessor_alive(vault_setup.server.client(), caps["vault_token"]["credential"]["accessor"])
    for name, cap in caps.items():
        assert audited_receipts(api, cap["capability_id"]) == [receipts[name]]


def test_cli_sessions_end_and_capabilities_revoke_print_receipts(
    everything: Api, aws_role: AwsRole, monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = everything
    session = api.new_session(scope=SCOPE)
    asks = four_asks(aws_role)
    caps = mint(api, session, {"aws": asks["aws"], "native": asks["native"], "github": asks["github"]})
    text = cli_as_admin(api, monkeypatch, "capabilities", "revoke", caps["aws"]["capability_id"])
    assert f"{caps['aws']['capability_id']}: revoked" in text and "receipts (1 revoked):" in text
    assert "IAM accepted the deny" in text
    shown = json.loads(cli_as_admin(api, monkeypatch, "capabilities", "revoke", caps["aws"]["capability_id"], "--json"))
    assert shown["receipt"]["outcome"] == "already_ended"

    text = cli_as_admin(api, monkeypatch, "sessions", "end", session["session_id"])
    assert "2 finished, 0 pending" in text and "receipts (1 expires_naturally, 1 revoked):" in text
    assert f"{caps['native']['capability_id']}  expires_naturally" in text and "verifies the token offline" in text
    assert json.loads(cli_as_admin(api, monkeypatch, "sessions", "end", session["session_id"], "--json"))["receipts"] == []
