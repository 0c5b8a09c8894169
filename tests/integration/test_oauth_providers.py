"""Token exchange and revocation for every provider against its real backend: bearer tokens as
`access_token`, non-bearer credentials (AWS keys, Vault dynamic secrets) whole in `broker_credential`,
and RFC 7009 revocation of provider tokens found by their stored fingerprint."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import hvac
import psycopg
import pytest

from tests.integration.test_all_providers import serve_all_providers
from tests.support.aws_moto import MOTO_REGION, AwsRole
from tests.support.brokers import Api
from tests.support.github_standin import GitHubStandIn
from tests.support.openbao import VaultDatabase, VaultSetup

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@pytest.fixture
def providers_api(database_url: str, tmp_path: Path, vault_setup: VaultSetup, vault_database: VaultDatabase,
                  aws_endpoint: str, aws_role: AwsRole, github_standin: GitHubStandIn) -> Iterator[Api]:
    with serve_all_providers(database_url, tmp_path, vault_setup, aws_endpoint, github_standin) as api:
        yield api


def _exchange(api: Api, session: dict[str, Any], resource: str, access: str, **extra: Any) -> dict[str, Any]:
    r = api.client.post("/v1/oauth/token", data={
        "grant_type": GRANT, "subject_token": session["session_token"], "subject_token_type": JWT_TYPE,
        "authorization_details": json.dumps([{"type": "jit-broker-capability", "resource": resource,
                                              "access": access, **extra}])})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _revoke(api: Api, session: dict[str, Any], token: str) -> None:
    r = api.client.post("/v1/oauth/revoke", data={"token": token},
                        headers={"Authorization": f"Bearer {session['session_token']}"})
    assert r.status_code == 200, r.text


def _status(api: Api, answer: dict[str, Any]) -> str:
    cap = answer["authorization_details"][0]["capability_id"]
    return str(api.client.get(f"/v1/capabilities/{cap}", headers=api.as_admin()).json()["status"])


def test_each_provider_through_token_exchange_and_revocation(
    providers_api: Api, vault_setup: VaultSetup, vault_database: VaultDatabase, aws_role: AwsRole,
    aws_endpoint: str, github_standin: GitHubStandIn,
) -> None:
    api = providers_api
    session = api.new_session(scope=[{"resource": f"{scheme}://**", "access": ["*"]}
                                     for scheme in ("jwt", "vault", "aws", "github")])

    vault = _exchange(api, session, "vault://secret/data/allowed", "read", ttl_seconds=300)
    assert (vault["issued_token_type"], vault["token_type"]) == (ACCESS, "Bearer")
    assert vault["broker_credential"]["vault_addr"] == vault_setup.server.addr
    reader = hvac.Client(url=vault_setup.server.addr, token=vault["access_token"])
    assert reader.secrets.kv.v2.read_secret_version("allowed", mount_point="secret",
                                                    raise_on_deleted_version=True)["data"]["data"]["value"]

    db = _exchange(api, session, "vault://database/creds/ledger-test", "test-write")
    assert (db["issued_token_type"], db["token_type"]) == ("urn:jit-broker:token-type:vault-secret", "N_A")
    user, password = db["broker_credential"]["data"]["username"], db["broker_credential"]["data"]["password"]
    psycopg.connect(vault_database.dsn(user, password)).close()
    assert db["access_token"] == db["broker_credential"]["lease_id"]

    aws = _exchange(api, session, f"aws://123456789012/role/{aws_role.name}", "read", ttl_seconds=900)
    assert (aws["issued_token_type"], aws["token_type"]) == ("urn:jit-broker:token-type:aws-sts", "N_A")
    keys = aws["broker_credential"]
    assert aws["access_token"] == keys["session_token"]
    ident = boto3.client("sts", endpoint_url=aws_endpoint, region_name=MOTO_REGION,
                         aws_access_key_id=keys["access_key_id"], aws_secret_access_key=keys["secret_access_key"],
                         aws_session_token=keys["session_token"]).get_caller_identity()
    assert ident["Arn"].endswith(f"/{aws_role.name}/{aws['authorization_details'][0]['capability_id']}")

    github = _exchange(api, session, "github://acme/widgets", "read")
    assert (github["issued_token_type"], github["token_type"]) == (ACCESS, "Bearer")
    assert github["broker_credential"]["repositories"] == ["acme/widgets"]

    # RFC 7009 with the provider's own token: found by its fingerprint, revoked at the backend.
    _revoke(api, session, vault["access_token"])
    assert _status(api, vault) == "revoked"
    with pytest.raises(hvac.exceptions.Forbidden):
        reader.auth.token.lookup_self()
    _revoke(api, session, github["access_token"])
    assert _status(api, github) == "revoked"
    gh = httpx.get(f"{github_standin.url}/repos/acme/widgets/contents/README.md",
                   headers={"Authorization": f"Bearer {github['access_token']}", "User-Agent": "t"})
    assert gh.status_code == 401
    # AWS is fingerprinted by its secret key (docs/oauth.md); the session token alone is not known.
    _revoke(api, session, aws["access_token"])
    assert _status(api, aws) == "active"
    _revoke(api, session, keys["secret_access_key"])
    assert _status(api, aws) == "revoked"
    _revoke(api, session, password)
    assert _status(api, db) == "revoked"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(vault_database.dsn(user, password)).close()
