"""A workload issuer that is a real OpenID provider (npm's oidc-provider), beside the human IdP.

The human IdP's tokens keep their own path (BROKER_OIDC_ISSUER); a second provider's
client-credentials access tokens (RFC 9068, `typ: at+jwt`, `sub` = the client) are machine
tokens under a trust rule; the kid storm is counted at the real provider's JWKS endpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from broker.errors import ConfigError
from tests.support.brokers import TEST_POLICY, BrokerSecrets, LiveServer, build_broker
from tests.support.oidc import (
    AUDIENCE,
    ORCHESTRATOR_CLIENT_ID,
    OTHER_AUDIENCE,
    UNMAPPED_CLIENT_ID,
    OidcProvider,
    SigningKey,
)


def policy(machine_issuer: str) -> str:
    return TEST_POLICY + f"""\
trust:
  - name: idp-machine
    role: orchestrator
    orchestrator: idp-machine
    issuer: {machine_issuer}
    audience: "{AUDIENCE}"
    subject: {ORCHESTRATOR_CLIENT_ID}
    claim_pattern: {{client_id: {ORCHESTRATOR_CLIENT_ID}}}
"""


def session_body(task: str) -> dict[str, object]:
    return {"human": "alice@example.com", "agent": "claude-code", "task_id": task, "ttl_seconds": 600,
            "scope": [{"resource": "jwt://payments-api", "access": ["read"]}]}


def test_a_real_oidc_provider_as_workload_issuer_beside_the_human_idp(
        tmp_path: Path, oidc_provider: OidcProvider, oidc_provider_factory: Callable[..., OidcProvider]) -> None:
    machines = oidc_provider_factory()
    settings = {k.removeprefix("BROKER_").lower(): v for k, v in oidc_provider.broker_env().items()}
    broker = build_broker(tmp_path, f"sqlite:///{tmp_path}/b.db", BrokerSecrets(), policy(machines.issuer),
                          **settings, orchestrator_api_keys="", webhook_secrets=None,
                          trusted_issuers=json.dumps([machines.issuer]),
                          workload_jwks_refresh_cooldown_seconds=3600)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        def provision(token: str, task: str) -> httpx.Response:
            return client.post("/v1/sessions", json=session_body(task), headers={"Authorization": f"Bearer {token}"})

        r = provision(machines.client_credentials(), "machine")
        assert r.status_code == 201, r.text
        # The human IdP's own client-credentials orchestrator still goes its own way.
        r = provision(oidc_provider.client_credentials(), "idp-orchestrator")
        assert r.status_code == 201, r.text
        r = client.get("/v1/sessions", headers={"Authorization": f"Bearer {machines.client_credentials()}"})
        assert [s["task_id"] for s in r.json()] == ["machine"]
        # Another client of the machine issuer: a genuine token no rule names.
        r = provision(machines.client_credentials(UNMAPPED_CLIENT_ID), "unmapped")
        assert r.status_code == 403 and r.json()["error"]["code"] == "no-matching-trust-rule"
        # A token for another API of the same provider.
        r = provision(machines.client_credentials(resource=OTHER_AUDIENCE), "other-aud")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid-audience"

        # A storm of made-up kids: one JWKS read at the provider, however many tokens.
        before = machines.stats()["jwks"]
        for i in range(60):
            forged = machines.forge(key=SigningKey(kid=f"storm-{i}", private=machines.key.private),
                                    sub=ORCHESTRATOR_CLIENT_ID, client_id=ORCHESTRATOR_CLIENT_ID)
            r = provision(forged, f"storm-{i}")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unknown-signing-key", r.text
        assert machines.stats()["jwks"] - before == 1


def test_the_human_idp_cannot_be_a_workload_issuer(tmp_path: Path, oidc_provider: OidcProvider) -> None:
    settings = {k.removeprefix("BROKER_").lower(): v for k, v in oidc_provider.broker_env().items()}
    with pytest.raises(ConfigError, match="the broker's own issuer or the human IdP"):
        build_broker(tmp_path, f"sqlite:///{tmp_path}/b.db", BrokerSecrets(), policy(oidc_provider.issuer),
                     **settings, trusted_issuers=oidc_provider.issuer)
