"""Least privilege down to the requested resource (issue 11), against the real backends.

Vault (real OpenBao, real KV v2 secrets): a rule `vault://secret/data/payments/*` whose OpenBao
policy reads every secret under payments/ still mints, for a request naming
`secret/data/payments/api-key`, a token that reads that secret and gets 403 on its sibling
`db-password` (acceptance 6). The token's one policy, `jit-<capability id>`, is gone after revoke;
one left behind (a failed delete, a crash between writing it and creating the token) is removed
by the sweeper's and the reconciler's `release_leftovers` once its lease has ended. The narrowed
token never exceeds the rule's own policies, and no request string reaches the policy text
other than as the canonical path. Every test that touches the lease table runs on SQLite and
PostgreSQL.

AWS (moto, which does not enforce IAM, so proven by what reached STS): a rule over a wildcard of
roles assumes only the requested role, with the access's session policy as written.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import hvac
import hvac.exceptions as hx
import pytest
from sqlalchemy import text
from sqlmodel import select

from broker.db import transaction, utcnow
from broker.errors import InvalidRequest
from broker.lifecycle.reconciler import reconcile_at_start, release_leftovers
from broker.lifecycle.sweeper import collect_shared
from broker.metrics import REGISTRY
from broker.models import Lease
from broker.providers.base import Grant
from broker.providers.vault import VaultProvider, broker_policy_hcl
from broker.providers.vault.acl import narrowed_policy, shared_policy_name
from broker.providers.vault.client import OpenBaoClient
from tests.integration.test_resource_escapes import ATTACKS, PROD
from tests.support.aws_moto import MOTO_ACCOUNT, MOTO_REGION, MotoServer, trust_policy
from tests.support.brokers import STANDARD_TIERS, Api, BrokerSecrets, LiveServer, build_broker
from tests.support.openbao import VaultSetup

PAYMENTS = "vault://secret/data/payments/*"
API_KEY = "vault://secret/data/payments/api-key"
SESSION_POLICY = {  # AWS evaluates the variable per session (the broker's `task` tag); the broker sends it as is
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject"],
                   "Resource": ["arn:aws:s3:::acme-artifacts/${aws:PrincipalTag/task}/*"]}],
}
POLICY = STANDARD_TIERS + f"""\
resources:
  - match: "{PAYMENTS}"
    provider: vault
    access:
      read:     {{tier: read,  policies: [kv-payments-read], capabilities: [read]}}
      any:      {{tier: read,  policies: [kv-payments-read]}}                  # whatever the rule's policies grant
      write:    {{tier: write, policies: [kv-payments-read], capabilities: [update]}}  # beyond them
      read-all: {{tier: read,  policies: [kv-payments-read], narrow: false}}     # the rule's policies whole
  - match: "vault://secret/data/forbidden"
    provider: vault
    access:
      read: {{tier: read, policies: [kv-allowed]}}   # kv-allowed grants nothing there
humans:
  alice@example.com:
    grants: [{{resource: "vault://**", access: ["*"]}}, {{resource: "aws://**", access: ["*"]}}]
agents:
  claude-code: {{max_tier: write}}
"""
AWS_POLICY = STANDARD_TIERS + f"""\
resources:
  - match: "aws://{MOTO_ACCOUNT}/role/jit/*"
    provider: aws
    access:
      read: {{tier: read, session_policy: {json.dumps(SESSION_POLICY)}}}
humans:
  alice@example.com:
    grants: [{{resource: "aws://**", access: ["*"]}}]
agents:
  claude-code: {{max_tier: write}}
"""
SCOPE = [{"resource": "vault://**", "access": ["*"]}, {"resource": "aws://**", "access": ["*"]}]

# Strings that try to leave the requested path: the path escapes of issue 7, re-aimed at the
# payments rule, and attempts to close the policy's string or block (HCL and JSON) or to write
# a pattern OpenBao's ACL would expand.
ESCAPES = [a.replace("vault://dbtest/", "vault://secret/data/payments/").replace(PROD, "secret/data/payments/db-password")
           for a in ATTACKS]
SMUGGLING = [
    'vault://secret/data/payments/x"},"secret/data/*":{"capabilities":["read","sudo"]},"y":{"a":"',
    'vault://secret/data/payments/x" {\n  capabilities = ["sudo"]\n}\npath "sys/*',
    'vault://secret/data/payments/x"\\u0022',
    "vault://secret/data/payments/*",
    "vault://secret/data/payments/db-*",
    "vault://secret/data/payments/{{identity.entity.id}}",
    "vault://secret/data/payments/x\u2028path",
    "vault://secret/data/payments/api-key/",
    "vault://secret/data/payments/api-key#",
]
# Valid in the resource grammar, but a `+` segment is a wildcard in an OpenBao policy.
PLUS = "vault://secret/data/payments/+"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def narrowed(capability_id: str) -> str:
    return f"jit-{capability_id}"


def acl_policies(root: hvac.Client) -> set[str]:
    return set(root.sys.list_acl_policies()["data"]["keys"])


def narrowed_policies(root: hvac.Client) -> set[str]:
    return {p for p in acl_policies(root) if p.startswith("jit-cap_")}


def read_kv(vault_setup: VaultSetup, token: str, name: str) -> dict[str, Any]:
    client = vault_setup.server.client(token)
    answer = client.secrets.kv.v2.read_secret_version(name, mount_point="secret", raise_on_deleted_version=True)
    return answer["data"]["data"]  # type: ignore[no-any-return]


def tokens_naming(root: hvac.Client, capability_id: str) -> list[dict[str, Any]]:
    """Live tokens whose meta names the capability, as the minted token or its probe."""
    found = []
    for accessor in root.auth.token.list_accessors()["data"]["keys"]:
        try:
            data = root.auth.token.lookup_accessor(accessor)["data"]
        except hx.InvalidRequest:
            continue  # expired while we listed
        meta = data.get("meta") or {}
        if capability_id in (meta.get("capability"), meta.get("probe_for")):
            found.append(data)
    return found


@contextmanager
def served(database_url: str, tmp_path: Path, vault_setup: VaultSetup, vault_token: str | None = None,
           policy: str = POLICY, **settings: Any) -> Iterator[Api]:
    secrets_ = BrokerSecrets()
    broker = build_broker(tmp_path, database_url, secrets_, policy, vault_addr=vault_setup.server.addr,
                          vault_token=vault_token or vault_setup.broker_token, vault_token_role=vault_setup.token_role,
                          provider_timeout_seconds=5.0, **settings)
    with LiveServer(broker) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield Api(server.base_url, secrets_, broker, client)


@pytest.fixture
def api(database_url: str, tmp_path: Path, vault_setup: VaultSetup) -> Iterator[Api]:
    with served(database_url, tmp_path, vault_setup) as api:
        yield api


# --- acceptance 6 ---------------------------------------------------------------------------------


def test_the_minted_token_reads_the_requested_path_and_is_refused_its_sibling(api: Api,
                                                                              vault_setup: VaultSetup) -> None:
    root = vault_setup.server.client()
    session = api.new_session(scope=SCOPE)
    r = api.request(session, {"resource": API_KEY, "access": "read", "ttl_seconds": 300})
    assert r.status_code == 201, r.text
    cap = r.json()
    cred = cap["credential"]
    # Named by what it grants (path and capabilities), shared by every capability for it.
    name = shared_policy_name(narrowed_policy("secret/data/payments/api-key", ["read"]))
    assert cred["policies"] == [name] and cred["path"] == "secret/data/payments/api-key"
    assert cred["capabilities"] == ["read"]

    token = cred["token"]
    assert read_kv(vault_setup, token, "payments/api-key") == {"value": vault_setup.secret_values["payments/api-key"]}
    with pytest.raises(hx.Forbidden):  # the sibling under the same rule: 403
        read_kv(vault_setup, token, "payments/db-password")
    with pytest.raises(hx.Forbidden):  # read, not write, on the requested path itself
        vault_setup.server.client(token).secrets.kv.v2.create_or_update_secret(
            "payments/api-key", secret={"value": "overwritten"}, mount_point="secret")
    # What OpenBao holds: one path, one capability, as JSON.
    stored = json.loads(root.sys.read_acl_policy(name)["data"]["policy"])
    assert stored == {"path": {"secret/data/payments/api-key": {"capabilities": ["read"]}}}
    assert root.auth.token.lookup_accessor(cred["accessor"])["data"]["policies"] == [name]

    # The same rule without narrowing: the rule's policy really does cover the sibling.
    broad = api.request(session, {"resource": API_KEY, "access": "read-all", "ttl_seconds": 300})
    assert broad.status_code == 201, broad.text
    assert broad.json()["credential"]["policies"] == ["kv-payments-read"]
    assert read_kv(vault_setup, broad.json()["credential"]["token"], "payments/db-password") == {
        "value": vault_setup.secret_values["payments/db-password"]}

    # Revoked: the token is dead (one call); the shared policy goes once no live capability carries it.
    gone = api.client.delete(f"/v1/capabilities/{cap['capability_id']}", headers=bearer(session["session_token"]))
    assert gone.status_code == 200 and gone.json()["status"] == "revoked", gone.text
    with pytest.raises(hx.Forbidden):
        read_kv(vault_setup, token, "payments/api-key")
    assert tokens_naming(root, cap["capability_id"]) == []
    vault = api.broker.providers["vault"]
    assert isinstance(vault, VaultProvider)
    vault.shared_policy_grace_seconds = 0.0
    collect_shared(api.broker)
    assert name not in acl_policies(root)


def test_without_capabilities_the_token_gets_what_the_rules_policies_grant_on_that_path(
        api: Api, vault_setup: VaultSetup) -> None:
    """`any` names no capabilities: kv-payments-read grants read and list there; list cannot be
    carried by a one-path policy (OpenBao checks LIST on `<path>/`), so read it is."""
    session = api.new_session(scope=SCOPE)
    r = api.request(session, {"resource": "vault://secret/data/payments/db-password", "access": "any"})
    assert r.status_code == 201, r.text
    cred = r.json()["credential"]
    assert cred["capabilities"] == ["read"]
    assert read_kv(vault_setup, cred["token"], "payments/db-password")
    with pytest.raises(hx.Forbidden):
        read_kv(vault_setup, cred["token"], "payments/api-key")


# --- never beyond the rule's own policies ---------------------------------------------------------


@pytest.mark.parametrize(("resource", "access", "says"), [
    (API_KEY, "write", "do not grant ['update']"),  # the access asks for more than kv-payments-read grants
    ("vault://secret/data/forbidden", "read", "grant nothing"),  # the rule's policy is for another path
])
def test_a_narrowed_token_never_exceeds_the_rules_policies(api: Api, vault_setup: VaultSetup, resource: str,
                                                           access: str, says: str) -> None:
    root = vault_setup.server.client()
    before = narrowed_policies(root)
    session = api.new_session(scope=SCOPE)
    r = api.request(session, {"resource": resource, "access": access})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "provider-rejected" and says in r.json()["error"]["message"]
    with transaction(api.broker.engine) as db:
        (lease,) = db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all()
        assert lease.status == "failed"
    # Nothing at OpenBao: no policy written, no token, and the probe that asked was revoked.
    assert narrowed_policies(root) == before
    assert tokens_naming(root, lease.id) == []


# --- nothing but the canonical path reaches the policy ----------------------------------------------


@pytest.mark.parametrize("resource", ESCAPES + SMUGGLING, ids=range(len(ESCAPES + SMUGGLING)))
def test_request_strings_cannot_write_the_policy(api: Api, vault_setup: VaultSetup, resource: str) -> None:
    root = vault_setup.server.client()
    before = narrowed_policies(root)
    session = api.new_session(scope=SCOPE)
    r = api.request(session, {"resource": resource, "access": "read"})
    code = "nul-byte" if "\x00" in resource else "invalid-resource"  # a NUL is refused with the body, earlier
    assert r.status_code == 400 and r.json()["error"]["code"] == code, (resource, r.text)
    with transaction(api.broker.engine) as db:
        assert db.exec(select(Lease).where(Lease.session_id == session["session_id"])).all() == []
    assert narrowed_policies(root) == before


def test_a_plus_segment_is_refused_before_any_policy_is_written(api: Api, vault_setup: VaultSetup) -> None:
    """`payments/+` is a valid resource and matches the rule, but in an OpenBao policy `+` is any one
    segment: a policy for it would read every sibling. The provider refuses it."""
    root = vault_setup.server.client()
    before = narrowed_policies(root)
    session = api.new_session(scope=SCOPE)
    r = api.request(session, {"resource": PLUS, "access": "read"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid-resource", r.text
    assert narrowed_policies(root) == before


@pytest.mark.parametrize("resource", [*ESCAPES, *SMUGGLING, PLUS])
def test_the_provider_itself_refuses_them(vault_setup: VaultSetup, resource: str) -> None:
    """Defence in depth: handed such a resource directly, the provider writes nothing either."""
    root = vault_setup.server.client()
    before = narrowed_policies(root)
    grant = Grant(capability_id="cap_" + secrets.token_hex(16), session_id="ses_x", task_id="t", human="alice@example.com",
                  agent="claude-code", resource=resource, access="read", tier="read", ttl_seconds=60,
                  options={"policies": ["kv-payments-read"]})
    provider = vault_setup.provider()
    try:
        with pytest.raises(InvalidRequest) as caught:
            provider.mint(grant)
    finally:
        provider.close()
    assert caught.value.code == "invalid-resource"
    assert narrowed_policies(root) == before


# --- policies left behind ---------------------------------------------------------------------------


def no_delete_token(vault_setup: VaultSetup) -> str:
    """A broker token whose policy lacks `delete` on the narrowed policies: deletes really fail."""
    root = vault_setup.server.client()
    full = broker_policy_hcl(vault_setup.token_role, ())
    weaker = full.replace('"create", "update", "delete"', '"create", "update"')
    assert weaker != full
    root.sys.create_or_update_policy("jit-broker-no-delete", weaker)
    return root.auth.token.create_orphan(policies=["jit-broker-no-delete"], ttl="1h")["auth"]["client_token"]  # type: ignore[no-any-return]


def released(outcome: str) -> float:
    return REGISTRY.get_sample_value("broker_leftovers_total", {"provider": "vault", "outcome": outcome}) or 0.0


def test_a_failed_policy_delete_is_retried_and_only_unused_policies_go(
        database_url: str, tmp_path: Path, vault_setup: VaultSetup) -> None:
    root = vault_setup.server.client()
    token = no_delete_token(vault_setup)
    with served(database_url, tmp_path, vault_setup, vault_token=token) as api:
        vault = api.broker.providers["vault"]
        assert isinstance(vault, VaultProvider)
        vault.shared_policy_grace_seconds = 0.0
        session = api.new_session(scope=SCOPE)
        ended = api.request(session, {"resource": API_KEY, "access": "read"}).json()
        live = api.request(session, {"resource": "vault://secret/data/payments/db-password", "access": "any"}).json()
        unused, carried = ended["credential"]["policies"][0], live["credential"]["policies"][0]
        assert unused != carried

        r = api.client.delete(f"/v1/capabilities/{ended['capability_id']}", headers=bearer(session["session_token"]))
        assert r.status_code == 200 and r.json()["status"] == "revoked", r.text
        with pytest.raises(hx.Forbidden):
            read_kv(vault_setup, ended["credential"]["token"], "payments/api-key")

        # A per-capability policy of an older mint whose lease ended, and one of an id this broker
        # never minted (another deployment on the same OpenBao).
        legacy = plant_minting_lease(api, session["session_id"])
        with transaction(api.broker.engine) as db:
            db.execute(text("UPDATE leases SET status = 'revoked' WHERE id = :id"), {"id": legacy})
        root.sys.create_or_update_acl_policy(narrowed(legacy), '{"path": {"secret/data/x": {"capabilities": ["read"]}}}')
        stranger = narrowed("cap_" + secrets.token_hex(16))
        root.sys.create_or_update_acl_policy(stranger, '{"path": {"secret/data/allowed": {"capabilities": ["read"]}}}')

        failed = released("failed")
        out = release_leftovers(api.broker)  # the broker's token may not delete: visible, retried
        assert (out.released, out.failed) == (0, 1) and released("failed") == failed + 1
        assert collect_shared(api.broker) == 0
        assert {unused, carried, narrowed(legacy)} <= acl_policies(root)

        root.sys.create_or_update_policy("jit-broker-no-delete", broker_policy_hcl(vault_setup.token_role, ()))
        assert release_leftovers(api.broker).released == 1
        assert collect_shared(api.broker) >= 1
        policies = acl_policies(root)
        assert unused not in policies and narrowed(legacy) not in policies
        assert carried in policies  # a live capability carries it
        assert stranger in policies  # not ours to remove
        assert read_kv(vault_setup, live["credential"]["token"], "payments/db-password")
        root.sys.delete_acl_policy(stranger)


def plant_minting_lease(api: Api, session_id: str, *, age_seconds: int = 120) -> str:
    """A lease as a broker leaves it when it dies between reserving the lease and activating it."""
    now = utcnow()
    lease = Lease(id="cap_" + secrets.token_hex(16), session_id=session_id, resource=API_KEY, access="read",
                  tier="read", provider="vault", status="minting", ttl_seconds=600, purpose="crashed mid-mint",
                  created_at=now - timedelta(seconds=age_seconds),
                  expires_at=now - timedelta(seconds=age_seconds) + timedelta(seconds=600))
    with transaction(api.broker.engine) as db:
        db.add(lease)
    return lease.id


def test_a_crash_mid_mint_leaves_no_policy_after_the_start_reconciliation(api: Api, vault_setup: VaultSetup) -> None:
    root = vault_setup.server.client()
    session = api.new_session(scope=SCOPE)
    sid = session["session_id"]
    # Died after writing the policy and before creating the token: only the policy exists.
    policy_only = plant_minting_lease(api, sid)
    root.sys.create_or_update_acl_policy(
        narrowed(policy_only), '{"path": {"secret/data/payments/api-key": {"capabilities": ["read"]}}}')
    # Died after creating the token: policy and token exist, the lease has no handle.
    token_too = plant_minting_lease(api, sid)
    minted = VaultProvider(OpenBaoClient(addr=vault_setup.server.addr, token=vault_setup.broker_token),
                           token_role=vault_setup.token_role).mint(
        Grant(capability_id=token_too, session_id=sid, task_id="task-1", human="alice@example.com",
              agent="claude-code", resource=API_KEY, access="read", tier="read", ttl_seconds=600,
              options={"policies": ["kv-payments-read"], "capabilities": ["read"]}))
    assert {narrowed(policy_only), minted.handle["policy"]} <= acl_policies(root)

    report = reconcile_at_start(api.broker)
    with transaction(api.broker.engine) as db:
        leases = {lease.id: lease for lease in db.exec(select(Lease).where(Lease.session_id == sid)).all()}
    assert leases[policy_only].status == "expired"  # no token found at OpenBao
    assert leases[token_too].status == "revoked"  # found by meta.capability and revoked
    assert leases[token_too].handle["policy"] == minted.handle["policy"]  # shared: the collector's
    with pytest.raises(hx.Forbidden):
        read_kv(vault_setup, minted.credential["token"], "payments/api-key")
    assert report.leftovers.released >= 1
    assert narrowed(policy_only) not in acl_policies(root)


# --- AWS: a wildcard of roles assumes only the requested one -----------------------------------------


@pytest.fixture
def jit_roles(iam_client: Any) -> Iterator[list[str]]:
    names = [f"jit-narrow-{uuid.uuid4().hex[:10]}" for _ in range(2)]
    for name in names:
        iam_client.create_role(RoleName=name, Path="/jit/", AssumeRolePolicyDocument=json.dumps(trust_policy()),
                               MaxSessionDuration=3600)
    yield names
    for name in names:
        for inline in iam_client.list_role_policies(RoleName=name)["PolicyNames"]:
            iam_client.delete_role_policy(RoleName=name, PolicyName=inline)
        iam_client.delete_role(RoleName=name)


def test_a_wildcard_role_rule_assumes_only_the_requested_role_with_the_access_policy(
        tmp_path: Path, vault_setup: VaultSetup, aws_endpoint: str, moto_server: MotoServer,
        jit_roles: list[str]) -> None:
    with served(f"sqlite:///{tmp_path}/broker.db", tmp_path, vault_setup, policy=AWS_POLICY,
                aws_endpoint_url=aws_endpoint, aws_region=MOTO_REGION) as api:
        session = api.new_session(scope=SCOPE)
        wanted = f"aws://{MOTO_ACCOUNT}/role/jit/{jit_roles[0]}"
        r = api.request(session, {"resource": wanted, "access": "read", "ttl_seconds": 900})
        assert r.status_code == 201, r.text
        cap = r.json()
    [sent] = moto_server.requests("AssumeRole", RoleSessionName=cap["capability_id"])
    assert sent.params["RoleArn"] == f"arn:aws:iam::{MOTO_ACCOUNT}:role/jit/{jit_roles[0]}"
    assert json.loads(sent.params["Policy"]) == SESSION_POLICY  # verbatim: no text substituted into it
    assert sent.tags["task"] == "task-1"  # what ${aws:PrincipalTag/task} resolves to at AWS
    assert not moto_server.requests("AssumeRole", RoleArn=f"arn:aws:iam::{MOTO_ACCOUNT}:role/jit/{jit_roles[1]}")
