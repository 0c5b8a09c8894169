"""Path escapes against the real OpenBao: a grant on `vault://dbtest/**` must never reach another path.

Before the resource grammar, `vault://dbtest/creds/%2e%2e/%2e%2e/database/creds/ledger-test`
matched the `dbtest/**` rule as a string, and OpenBao decoded and cleaned it into
`database/creds/ledger-test`: 201 with the "production" database's credentials, past the human
layer and the approval that path's tier requires. Each attack string must now be a 400
`invalid-resource` with no lease, no OpenBao lease and no database user made.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import hvac
import psycopg
import pytest
from sqlmodel import Session, select

from broker.models import Lease
from tests.support.brokers import Api, BrokerSecrets, LiveServer, build_broker
from tests.support.databases import admin_dsn
from tests.support.openbao import VaultDatabase, VaultSetup

POLICY = """\
version: 1
tiers:
  read:   {control: auto, max_ttl: 1h}
  write:  {control: auto, max_ttl: 30m}
  secret: {control: approval, max_ttl: 10m, approvers: [group:security]}
resources:
  - match: "vault://dbtest/**"
    provider: vault
    access: {test-write: {tier: write}}
  - match: "vault://database/creds/ledger-test"   # production: approval, and alice holds no grant
    provider: vault
    access: {test-write: {tier: secret}}
humans:
  alice@example.com:
    grants:
      - {resource: "vault://dbtest/**", access: ["*"]}
agents:
  claude-code: {max_tier: secret}
"""

PROD = "database/creds/ledger-test"
ATTACKS = [
    f"vault://dbtest/creds/%2e%2e/%2e%2e/{PROD}",
    f"vault://dbtest/creds/%2E%2E/%2E%2E/{PROD}",
    f"vault://dbtest/creds/.%2e/.%2e/{PROD}",
    f"vault://dbtest/creds/%2e./%2e./{PROD}",
    f"vault://dbtest/x/%2e%2e/%2e%2e/{PROD}",
    f"vault://dbtest/creds/../../{PROD}",
    f"vault://dbtest/creds/%2e%2e%2f%2e%2e%2f{PROD.replace('/', '%2f')}",
    f"vault://dbtest/..%2f..%2f{PROD}",
    f"vault://dbtest/creds/./../../{PROD}",
    f"vault://dbtest//../{PROD}",
    f"vault://dbtest/creds/%252e%252e/%252e%252e/{PROD}",
    f"vault://dbtest/creds/\\..\\..\\{PROD}",
    f"vault://dbtest/x?/../../{PROD}",
    f"vault://dbtest/{PROD}\n",
    f"vault://dbtest/x/\x00/../../{PROD}",
    f"vault://dbtest/\uff0e\uff0e/\uff0e\uff0e/{PROD}",
]


@pytest.fixture
def bao_api(database_url: str, tmp_path: Path, vault_setup: VaultSetup, vault_database: VaultDatabase) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, POLICY, vault_addr=vault_setup.server.addr,
                          vault_token=vault_setup.broker_token, vault_token_role=vault_setup.token_role)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield Api(server.base_url, secrets_, broker, client)


def _openbao_leases(root: hvac.Client) -> set[str]:
    try:
        return set(root.sys.list_leases(PROD)["data"]["keys"])
    except hvac.exceptions.InvalidPath:  # none at all
        return set()


def _database_users(db: VaultDatabase) -> set[str]:
    with psycopg.connect(admin_dsn()) as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (db.user_prefix + "%",)).fetchall()
    return {name for (name,) in rows}


@pytest.mark.parametrize("attack", ATTACKS)
def test_vault_path_escape_is_refused_and_nothing_is_minted(
    bao_api: Api, vault_setup: VaultSetup, vault_database: VaultDatabase, attack: str
) -> None:
    api = bao_api
    root = vault_setup.server.client()
    session = api.new_session(scope=[{"resource": "vault://dbtest/**", "access": ["*"]}])
    leases_before, users_before = _openbao_leases(root), _database_users(vault_database)

    r = api.request(session, {"resource": attack, "access": "test-write"})

    assert r.status_code == 400, r.text
    # A NUL is refused at the request boundary, before the grammar (which refuses it too).
    assert r.json()["error"]["code"] == ("nul-byte" if "\x00" in attack else "invalid-resource")
    assert "credential" not in r.text and "password" not in r.text
    with Session(api.broker.engine) as db:
        assert db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all() == []
    assert _openbao_leases(root) == leases_before
    assert _database_users(vault_database) == users_before


def test_the_escape_target_itself_is_denied_by_the_human_layer(bao_api: Api, vault_setup: VaultSetup) -> None:
    """The control: asked for by its own name, the production path is refused by policy."""
    session = bao_api.new_session(scope=[{"resource": "vault://**", "access": ["*"]}])
    r = bao_api.request(session, {"resource": f"vault://{PROD}", "access": "test-write"})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "human-lacks-permission"


def test_trailing_newline_leaves_no_failed_lease(api: Api) -> None:
    """`$` let "github://acme/x\\n" through to the provider, which left a `failed` lease."""
    session = api.new_session(scope=[{"resource": "jwt://**", "access": ["*"]}])
    for bad in ("jwt://payments-api\n", "jwt://svc/x\n", "jwt://payments-api\r\n"):
        r = api.request(session, {"resource": bad, "access": "read"})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid-resource"), bad
    with Session(api.broker.engine) as db:
        assert db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all() == []
