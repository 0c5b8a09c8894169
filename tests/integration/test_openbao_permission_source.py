"""The openbao permission source against a real OpenBao: entities, groups, policies, changed while the test runs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.permissions.base import ALLOW, DENY, UNKNOWN, PermissionQuery
from broker.providers.vault.acl import is_shared_policy
from broker.providers.vault.client import OpenBaoClient
from broker.providers.vault.source import OpenBaoPermissionSource, openbao_source_policy_hcl
from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.openbao import OpenBaoServer, VaultSetup
from tests.support.ports import free_port

READER_POLICY = "jb-live-permission-reader"


@pytest.fixture
def bao(openbao: OpenBaoServer) -> dict[str, Any]:
    """A fresh entity in a fresh group, and a token that may read the identity store and nothing else."""
    root = openbao.client()
    root.sys.create_or_update_policy(READER_POLICY, openbao_source_policy_hcl())
    run = secrets.token_hex(4)
    entity = root.secrets.identity.create_or_update_entity(name=f"alice-{run}", policies=[f"reader-{run}"])["data"]
    team = root.secrets.identity.create_or_update_group(name=f"ledger-team-{run}", policies=[f"writer-{run}"],
                                                        member_entity_ids=[entity["id"]])["data"]
    parent = root.secrets.identity.create_or_update_group(name=f"ledger-owners-{run}", policies=[f"admin-{run}"],
                                                          member_group_ids=[team["id"]])["data"]
    token = root.auth.token.create_orphan(policies=[READER_POLICY], ttl="1h")["auth"]["client_token"]
    return {"run": run, "root": root, "entity": entity, "team": team, "parent": parent, "token": token,
            "name": f"alice-{run}"}


@pytest.fixture
def source(openbao: OpenBaoServer, bao: dict[str, Any]) -> Iterator[OpenBaoPermissionSource]:
    s = OpenBaoPermissionSource(OpenBaoClient(addr=openbao.addr, token=bao["token"], timeout=3.0))
    yield s
    s.close()


def _query(entity: str | None, *require: str) -> PermissionQuery:
    return PermissionQuery(human="alice@example.com", resource="vault://kv/ledger", access="write",
                           require=frozenset(require), identity={"openbao_entity": entity} if entity else {})


def test_policies_come_from_the_entity_its_groups_and_their_parents(source, bao):
    run = bao["run"]
    own = source.check(_query(bao["name"], f"reader-{run}"))
    assert own.verdict == ALLOW
    via_group = source.check(_query(bao["name"], f"writer-{run}"))
    assert via_group.verdict == ALLOW
    assert via_group.evidence["groups"] == sorted([f"ledger-team-{run}", f"ledger-owners-{run}"])
    inherited = source.check(_query(bao["name"], f"admin-{run}"))
    assert inherited.verdict == ALLOW
    assert inherited.evidence["policies"] == sorted([f"reader-{run}", f"writer-{run}", f"admin-{run}"])
    assert inherited.evidence["entity_id"] == bao["entity"]["id"]
    assert source.check(_query(bao["name"], "root")).verdict == DENY


def test_leaving_the_group_takes_its_policies_away_at_the_next_check(source, bao):
    run = bao["run"]
    assert source.check(_query(bao["name"], f"writer-{run}")).verdict == ALLOW
    bao["root"].secrets.identity.create_or_update_group(
        name=f"ledger-team-{run}", group_id=bao["team"]["id"], policies=[f"writer-{run}"], member_entity_ids=[])
    after = source.check(_query(bao["name"], f"writer-{run}"))
    assert after.verdict == DENY
    assert after.evidence["policies"] == [f"reader-{run}"] and after.evidence["groups"] == []


def test_a_disabled_unknown_or_unmapped_entity_is_denied(source, bao):
    run = bao["run"]
    assert source.check(_query(f"nobody-{run}", "x")).verdict == DENY
    assert source.check(_query("..", "x")).verdict == DENY  # never a path segment
    unmapped = source.check(_query(None, "x"))
    assert unmapped.verdict == DENY and "no OpenBao entity is mapped" in unmapped.evidence["summary"]
    bao["root"].secrets.identity.update_entity(bao["entity"]["id"], disabled=True)
    disabled = source.check(_query(bao["name"], f"reader-{run}"))
    assert disabled.verdict == DENY and "disabled" in disabled.evidence["summary"]


def test_an_openbao_that_cannot_answer_is_unknown_never_allow(openbao, bao):
    gone = OpenBaoPermissionSource(OpenBaoClient(addr=f"http://127.0.0.1:{free_port()}", token="s.x" * 8, timeout=1.0))
    answer = gone.check(_query(bao["name"], f"reader-{bao['run']}"))
    assert answer.verdict == UNKNOWN and answer.evidence["error"] == "provider-unavailable"
    # A broker token that may not read the identity store: refused, so unknown (not deny, not allow).
    weak = bao["root"].auth.token.create_orphan(policies=["default"], ttl="10m")["auth"]["client_token"]
    refused = OpenBaoPermissionSource(OpenBaoClient(addr=openbao.addr, token=weak, timeout=3.0))
    assert refused.check(_query(bao["name"], f"reader-{bao['run']}")).verdict == UNKNOWN
    gone.close()
    refused.close()


def test_through_the_broker_a_vault_token_needs_the_entity_to_hold_the_policy(database_url: str, tmp_path: Path,
                                                                             vault_setup: VaultSetup, bao):
    run = bao["run"]
    policy = STANDARD_TIERS + f"""\
resources:
  - match: "vault://secret/data/allowed"
    provider: vault
    access:
      read: {{tier: read, policies: [kv-allowed]}}
    human_permission: {{source: openbao, require: {{read: [writer-{run}]}}}}
humans:
  alice@example.com:
    openbao_entity: {bao["name"]}
    grants: [{{resource: "vault://secret/data/allowed", access: [read]}}]
agents:
  claude-code: {{max_tier: review}}
"""
    root = bao["root"]
    # The broker's own token: what the vault provider needs, plus reading the identity store.
    token = root.auth.token.create_orphan(policies=["jit-broker-self", READER_POLICY], ttl="1h")["auth"]["client_token"]
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, policy, vault_addr=vault_setup.server.addr,
                          vault_token=token, vault_token_role=vault_setup.token_role, provider_timeout_seconds=3.0,
                          permission_cache_seconds=0)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=30) as client:
        api = Api(server.base_url, secrets_, broker, client)
        session = api.new_session(scope=[{"resource": "vault://secret/**", "access": ["*"]}])
        r = api.request(session, {"resource": "vault://secret/data/allowed", "access": "read"})
        assert r.status_code == 201, r.text
        (narrowed,) = r.json()["credential"]["policies"]
        assert is_shared_policy(narrowed)  # narrowed under kv-allowed
        root.secrets.identity.create_or_update_group(
            name=f"ledger-team-{run}", group_id=bao["team"]["id"], policies=[f"writer-{run}"], member_entity_ids=[])
        denied = api.request(session, {"resource": "vault://secret/data/allowed", "access": "read"})
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "human-lacks-permission"
        assert denied.json()["error"]["decision"]["human_permission"]["source"] == "openbao"
