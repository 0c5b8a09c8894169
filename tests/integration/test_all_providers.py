"""Every provider through the HTTP API against its real backend, then a dump of every table:
no minted secret value is anywhere at rest (GitHub tokens only as ciphertext, until revoked)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import hvac
import psycopg
import pytest
from sqlalchemy import text
from sqlmodel import SQLModel

from tests.support.aws_moto import MOTO_REGION, AwsRole
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.github_standin import GitHubStandIn
from tests.support.openbao import VaultDatabase, VaultSetup

POLICY = """\
version: 1
tiers:
  read:   {control: auto, max_ttl: 1h}
  write:  {control: auto, max_ttl: 30m}
  secret: {control: auto, max_ttl: 10m}
resources:
  - match: "jwt://payments-api"
    provider: native
    access: {read: {tier: read}}
  - match: "vault://secret/data/allowed"
    provider: vault
    access: {read: {tier: secret, policies: [kv-allowed]}}
  - match: "vault://database/creds/ledger-test"
    provider: vault
    access: {test-write: {tier: write}}
  - match: "aws://123456789012/role/*"
    provider: aws
    access:
      read:
        tier: read
        session_policy: {Version: "2012-10-17", Statement: [{Effect: Allow, Action: ["s3:GetObject"], Resource: ["*"]}]}
  - match: "github://acme/*"
    provider: github
    access: {read: {tier: read, permissions: {contents: read}}}
humans:
  alice@example.com:
    grants:
      - {resource: "jwt://**", access: ["*"]}
      - {resource: "vault://**", access: ["*"]}
      - {resource: "aws://**", access: ["*"]}
      - {resource: "github://**", access: ["*"]}
agents:
  claude-code: {max_tier: secret}
"""


def _dump(api: Api) -> str:
    """Every row of every table, as text."""
    out = []
    with api.broker.engine.connect() as conn:
        for table in SQLModel.metadata.sorted_tables:
            rows = conn.execute(text(f'SELECT * FROM "{table.name}"'))
            out.extend(json.dumps([str(v) for v in row]) for row in rows)
    return "\n".join(out)


@contextlib.contextmanager
def serve_all_providers(database_url: str, tmp_path: Path, vault_setup: VaultSetup, aws_endpoint: str,
                        github_standin: GitHubStandIn, **settings: Any) -> Iterator[Api]:
    """A served broker with every provider configured against its real (or stand-in) backend."""
    github_standin.reset()
    secrets_ = BrokerSecrets()
    broker = build_broker(
        tmp_path, database_url, secrets_, POLICY,
        vault_addr=vault_setup.server.addr, vault_token=vault_setup.broker_token, vault_token_role=vault_setup.token_role,
        aws_endpoint_url=aws_endpoint, aws_region=MOTO_REGION,
        github_api_url=github_standin.url, github_app_id=github_standin.app_id,
        github_private_key_file=github_standin.private_key_path, **settings,
    )
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield Api(server.base_url, secrets_, broker, client)


def five_asks(aws_role: AwsRole) -> dict[str, dict[str, Any]]:
    """One request per kind of credential: native, vault token, vault DB secret, AWS, GitHub."""
    return {
        "native": {"resource": "jwt://payments-api", "access": "read"},
        "vault_token": {"resource": "vault://secret/data/allowed", "access": "read", "ttl_seconds": 300},
        "vault_db": {"resource": "vault://database/creds/ledger-test", "access": "test-write"},
        "aws": {"resource": f"aws://123456789012/role/{aws_role.name}", "access": "read", "ttl_seconds": 900},
        "github": {"resource": "github://acme/widgets", "access": "read"},
    }


@pytest.fixture
def everything(database_url: str, tmp_path: Path, vault_setup: VaultSetup, vault_database: VaultDatabase,
               aws_endpoint: str, aws_role: AwsRole, github_standin: GitHubStandIn) -> Iterator[Api]:
    with serve_all_providers(database_url, tmp_path, vault_setup, aws_endpoint, github_standin) as api:
        yield api


def test_every_provider_mints_and_revokes_and_no_secret_is_at_rest(
    everything: Api, vault_setup: VaultSetup, vault_database: VaultDatabase, aws_role: AwsRole,
    aws_endpoint: str, github_standin: GitHubStandIn,
) -> None:
    api = everything
    session = api.new_session(scope=[{"resource": f"{scheme}://**", "access": ["*"]}
                                     for scheme in ("jwt", "vault", "aws", "github")])
    asks = five_asks(aws_role)
    caps: dict[str, dict[str, Any]] = {}
    for name, ask in asks.items():
        r = api.request(session, ask, **{"Idempotency-Key": f"key-{name}"})
        assert r.status_code == 201, (name, r.text)
        caps[name] = r.json()

    cred = {name: cap["credential"] for name, cap in caps.items()}
    assert cred["vault_token"]["type"] == "vault_token" and cred["vault_db"]["type"] == "vault_secret"
    assert cred["aws"]["type"] == "aws_sts" and cred["github"]["type"] == "github_token"
    secrets_at_risk = {
        "session token": session["session_token"],
        "native token": cred["native"]["token"],
        "vault token": cred["vault_token"]["token"],
        "db password": cred["vault_db"]["data"]["password"],
        "aws secret key": cred["aws"]["secret_access_key"],
        "aws session token": cred["aws"]["session_token"],
        "github token": cred["github"]["token"],
    }

    # The credentials work against their real backends.
    assert hvac.Client(url=vault_setup.server.addr, token=cred["vault_token"]["token"]).secrets.kv.v2.read_secret_version(
        "allowed", mount_point="secret", raise_on_deleted_version=True)["data"]["data"]["value"]
    user, password = cred["vault_db"]["data"]["username"], cred["vault_db"]["data"]["password"]
    psycopg.connect(vault_database.dsn(user, password)).close()
    ident = boto3.client("sts", endpoint_url=aws_endpoint, region_name=MOTO_REGION,
                         aws_access_key_id=cred["aws"]["access_key_id"], aws_secret_access_key=cred["aws"]["secret_access_key"],
                         aws_session_token=cred["aws"]["session_token"]).get_caller_identity()
    assert ident["Arn"].endswith(f"/{aws_role.name}/{caps['aws']['capability_id']}")

    ready = api.client.get("/readyz").json()
    assert {name: p["ok"] for name, p in ready["checks"]["providers"].items()} == {
        "aws": True, "github": True, "native": True, "vault": True}

    dump = _dump(api)
    for what, value in secrets_at_risk.items():
        assert value not in dump, f"{what} found at rest"
    assert dump.count("v1:") >= 1  # the sealed GitHub token (and sealed replays) are there as ciphertext

    # Teardown revokes at every backend.
    r = api.client.post(f"/v1/sessions/{session['session_id']}/end", json={"reason": "completed"},
                        headers=api.as_orchestrator())
    assert r.json()["revoked"] == 5 and r.json()["revoke_pending"] == 0
    with pytest.raises(hvac.exceptions.Forbidden):
        hvac.Client(url=vault_setup.server.addr, token=cred["vault_token"]["token"]).auth.token.lookup_self()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(vault_database.dsn(user, password)).close()
    iam = boto3.client("iam", endpoint_url=aws_endpoint, region_name=MOTO_REGION)
    deny = iam.get_role_policy(RoleName=aws_role.name, PolicyName="jit-broker-revoked-sessions")["PolicyDocument"]
    assert f"{aws_role.role_id}:{caps['aws']['capability_id']}" in json.dumps(deny)
    gh = httpx.get(f"{github_standin.url}/repos/acme/widgets/contents/README.md",
                   headers={"Authorization": f"Bearer {cred['github']['token']}", "User-Agent": "t"})
    assert gh.status_code == 401

    dump = _dump(api)
    for what, value in secrets_at_risk.items():
        assert value not in dump, f"{what} found at rest after teardown"
    shown = api.client.get("/v1/capabilities", params={"session_id": session["session_id"]}, headers=api.as_admin()).json()
    assert sorted(c["status"] for c in shown) == ["revoked"] * 5


def test_role_revocations_are_serialised_across_replicas(postgres_url: str) -> None:
    """Two replicas revoking on one AWS role take the role's advisory lock in turn."""
    import threading
    import time as _time

    from broker.db import advisory_lock, make_engine

    engine = make_engine(postgres_url, pool_size=2)
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with advisory_lock(engine, "aws-role:arn:aws:iam::123456789012:role/r"):
            order.append("first-in")
            inside.set()
            _time.sleep(0.5)
            order.append("first-out")

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with advisory_lock(engine, "aws-role:arn:aws:iam::123456789012:role/r"):
        order.append("second-in")
    with advisory_lock(engine, "aws-role:arn:aws:iam::123456789012:role/other"):
        order.append("other-role")  # another role is not held up
    t.join()
    engine.dispose()
    assert order == ["first-in", "first-out", "second-in", "other-role"]


def test_remote_mint_whose_audit_fails_is_revoked_at_the_backend(
    database_url: str, tmp_path: Path, vault_setup: VaultSetup
) -> None:
    """Fail closed: a Vault token minted for a request that cannot be audited dies at OpenBao."""
    from sqlmodel import Session, select

    from broker.models import Lease
    from tests.integration.test_errors import _block_audit

    policy = POLICY.split('  - match: "vault://database')[0] + (
        'humans:\n  alice@example.com:\n    grants: [{resource: "vault://**", access: ["*"]}]\n'
        "agents:\n  claude-code: {max_tier: secret}\n"
    )
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, policy, vault_addr=vault_setup.server.addr,
                          vault_token=vault_setup.broker_token, vault_token_role=vault_setup.token_role)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session(scope=[{"resource": "vault://**", "access": ["*"]}])
        _block_audit(api)
        r = api.request(session, {"resource": "vault://secret/data/allowed", "access": "read", "ttl_seconds": 300})
        assert (r.status_code, r.json()["error"]["code"]) == (500, "audit-write-failed")
        with Session(broker.engine) as db:
            (lease,) = db.exec(select(Lease)).all()
        assert lease.status == "failed" and lease.status_reason == "activation-failed"
        assert vault_setup.provider().find_by_capability(lease.id, lease.resource) is None  # no live token carries its id
        assert f"jit-{lease.id}" not in vault_setup.server.client().sys.list_acl_policies()["data"]["keys"]  # nor its policy
