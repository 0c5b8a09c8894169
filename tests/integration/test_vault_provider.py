"""The vault provider against a real OpenBao (and a real PostgreSQL for dynamic secrets): no mocks."""

from __future__ import annotations

import secrets
import socket
import time
from datetime import UTC, datetime, timedelta

import hvac.exceptions as hx
import psycopg
import pytest

from broker.errors import ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.providers.base import Grant, Minted, Provider, RevokeTarget, fingerprint
from broker.providers.vault import VaultProvider
from broker.providers.vault.acl import bootstrap_token_role, is_shared_policy, narrowed_policy, shared_policy_name
from tests.support.databases import admin_dsn
from tests.support.openbao import OpenBaoServer, VaultDatabase, VaultSetup, configure_vault

TOKEN_ACCESS = {"policies": ["kv-allowed"]}


def grant(resource: str = "vault://secret/data/allowed", *, ttl: int = 300,
          options: dict | None = None, capability_id: str | None = None) -> Grant:
    return Grant(
        capability_id=capability_id or f"cap_{secrets.token_hex(6)}",
        session_id="ses_123", task_id="task-42", human="alice@example.com", agent="claude-code",
        resource=resource, access="read", tier="auto", ttl_seconds=ttl,
        options=dict(TOKEN_ACCESS) if options is None else options,
    )


def target(g: Grant, minted: Minted) -> RevokeTarget:
    return RevokeTarget(capability_id=g.capability_id, session_id=g.session_id, resource=g.resource,
                        access=g.access, handle=minted.handle, expires_at=minted.expires_at)


def read_kv(server: OpenBaoServer, token: str, name: str) -> dict:
    return server.client(token).secrets.kv.v2.read_secret_version(name, mount_point="secret",
                                                                   raise_on_deleted_version=True)["data"]["data"]


def pg_role_exists(name: str) -> bool:
    with psycopg.connect(admin_dsn()) as conn:
        return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


@pytest.fixture
def provider(vault_setup: VaultSetup):
    p = vault_setup.provider()
    yield p
    p.close()


# --- (a) a token carries exactly its policies, TTL and metadata --------------------------------


def test_minted_token_reads_allowed_and_nothing_else(provider: VaultProvider, vault_setup: VaultSetup) -> None:
    assert isinstance(provider, Provider)
    g = grant(ttl=120)
    minted = provider.mint(g)
    cred = minted.credential
    # Named by what it grants: the rule's kv-allowed is the ceiling, not what the token carries.
    narrowed = shared_policy_name(narrowed_policy("secret/data/allowed", ["read"]))
    assert cred["type"] == "vault_token" and cred["vault_addr"] == vault_setup.server.addr
    assert cred["policies"] == [narrowed]
    assert cred["path"] == "secret/data/allowed" and cred["capabilities"] == ["read"]
    assert minted.handle == {"kind": "token", "accessor": cred["accessor"], "policy": narrowed}
    assert "token" not in minted.handle and minted.fingerprint == fingerprint(cred["token"])
    assert minted.revocation_secret is None
    assert timedelta(0) < minted.expires_at - datetime.now(UTC) <= timedelta(seconds=120)

    server = vault_setup.server
    assert read_kv(server, cred["token"], "allowed") == {"value": vault_setup.secret_values["allowed"]}
    with pytest.raises(hx.Forbidden):
        read_kv(server, cred["token"], "forbidden")

    info = server.client().auth.token.lookup_accessor(cred["accessor"])["data"]
    assert info["policies"] == [narrowed]  # exactly: no "default" either
    assert 0 < info["ttl"] <= 120
    assert info["explicit_max_ttl"] == 120
    assert info["orphan"] is True and info["renewable"] is False
    assert info["role"] == "jit-broker" and info["path"] == "auth/token/create/jit-broker"
    assert info["meta"] == {"session": "ses_123", "capability": g.capability_id, "agent": "claude-code",
                            "human": "alice@example.com", "task": "task-42"}
    provider.revoke(target(g, minted))


def test_ttl_bounds_follow_the_token_role(provider: VaultProvider) -> None:
    assert provider.ttl_bounds("vault://secret/data/allowed", TOKEN_ACCESS).max_seconds == 3600  # role's ceiling
    assert provider.ttl_bounds("vault://database/creds/x", {"max_ttl_seconds": 900}).max_seconds == 900


# --- (b) revoke is real and idempotent ---------------------------------------------------------


def test_revoke_kills_the_token_everywhere_and_twice_is_fine(provider: VaultProvider,
                                                             vault_setup: VaultSetup) -> None:
    g = grant()
    minted = provider.mint(g)
    token, accessor = minted.credential["token"], minted.credential["accessor"]
    said = provider.revoke(target(g, minted))
    assert said.valid_until is None and "revoke-accessor" in said.detail  # confirmed: the receipt says `revoked`

    server = vault_setup.server
    with pytest.raises(hx.Forbidden):
        read_kv(server, token, "allowed")
    with pytest.raises(hx.Forbidden):
        server.client(token).auth.token.lookup_self()
    with pytest.raises(hx.InvalidRequest, match="invalid accessor"):
        server.client().auth.token.lookup_accessor(accessor)

    provider.revoke(target(g, minted))  # already revoked
    never = RevokeTarget(capability_id="cap_x", session_id="s", resource=g.resource, access="read",
                         handle={"kind": "token", "accessor": "no-such-accessor"}, expires_at=minted.expires_at)
    provider.revoke(never)  # never existed


# --- (c) the backend's own TTL ends the token --------------------------------------------------


def test_token_expires_on_its_own(provider: VaultProvider, vault_setup: VaultSetup) -> None:
    minted = provider.mint(grant(ttl=2))
    token = minted.credential["token"]
    assert read_kv(vault_setup.server, token, "allowed")
    time.sleep(2.5)
    with pytest.raises(hx.Forbidden):
        read_kv(vault_setup.server, token, "allowed")


# --- (d) dynamic database credentials ----------------------------------------------------------


@pytest.mark.postgres
def test_dynamic_db_credentials_log_in_then_revoke_drops_the_role(provider: VaultProvider,
                                                                   vault_database: VaultDatabase,
                                                                   vault_setup: VaultSetup) -> None:
    g = grant(f"vault://database/creds/{vault_database.role}", ttl=600, options={})
    minted = provider.mint(g)
    cred = minted.credential
    user, password = cred["data"]["username"], cred["data"]["password"]
    assert cred["type"] == "vault_secret" and cred["lease_id"].startswith("database/creds/ledger-test/")
    assert minted.handle == {"kind": "lease", "lease_id": cred["lease_id"]}
    assert minted.fingerprint == fingerprint(password)
    # The role's default_ttl is 1h; the lease was brought down to the grant's 10 minutes.
    assert 0 < cred["lease_duration"] <= 600
    lease = vault_setup.server.client().sys.read_lease(cred["lease_id"])["data"]
    assert 0 < lease["ttl"] <= 600

    with psycopg.connect(vault_database.dsn(user, password)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
        valid_until = conn.execute("SELECT rolvaliduntil FROM pg_roles WHERE rolname = current_user").fetchone()[0]
    assert valid_until <= datetime.now(UTC) + timedelta(seconds=660)  # PostgreSQL agrees on the expiry

    said = provider.revoke(target(g, minted))
    assert said.valid_until is None and "sys/leases/revoke" in said.detail
    assert not pg_role_exists(user)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(vault_database.dsn(user, password)).close()
    provider.revoke(target(g, minted))  # already gone: still success


@pytest.mark.postgres
def test_dynamic_lease_expires_on_its_own(provider: VaultProvider, vault_database: VaultDatabase) -> None:
    minted = provider.mint(grant(f"vault://database/creds/{vault_database.role}", ttl=2, options={}))
    user = minted.credential["data"]["username"]
    assert pg_role_exists(user)
    deadline = time.monotonic() + 10
    while pg_role_exists(user) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not pg_role_exists(user), "OpenBao did not drop the role at the shortened lease's expiry"


# --- (e) errors are translated, and carry no secrets -------------------------------------------


def test_unreachable_vault_is_unavailable(vault_setup: VaultSetup) -> None:
    dead = vault_setup.provider(vault_addr="http://127.0.0.1:9", provider_timeout_seconds=1.0)
    with pytest.raises(ProviderUnavailable) as err:
        dead.mint(grant())
    assert err.value.code == "provider-unavailable" and err.value.status == 503
    with pytest.raises(ProviderUnavailable):
        dead.revoke(RevokeTarget(capability_id="c", session_id="s", resource="vault://x", access="read",
                                 handle={"kind": "token", "accessor": "a"}, expires_at=datetime.now(UTC)))
    assert vault_setup.broker_token not in str(err.value)


def test_a_silent_vault_times_out_as_unavailable(vault_setup: VaultSetup) -> None:
    """provider_timeout_seconds bounds every call: a peer that accepts and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        p = vault_setup.provider(vault_addr=f"http://127.0.0.1:{silent.getsockname()[1]}",
                                 provider_timeout_seconds=0.5)
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable, match="ReadTimeout"):
            p.mint(grant())
        assert time.monotonic() - started < 3
        assert not p.health().ok


def test_policy_outside_the_role_is_rejected(provider: VaultProvider) -> None:
    with pytest.raises(ProviderRejected) as err:
        provider.mint(grant(options={"policies": ["kv-allowed", "root"]}))
    assert err.value.code == "provider-rejected"
    with pytest.raises(ProviderRejected):
        provider.mint(grant(options={"policies": ["jit-broker-self"]}))  # exists, but not in the role


def test_error_messages_never_carry_secrets(vault_setup: VaultSetup, provider: VaultProvider) -> None:
    messages: list[str] = []
    bogus = "s." + secrets.token_urlsafe(18)
    with pytest.raises(ProviderRejected) as err:
        vault_setup.provider(vault_token=bogus).mint(grant())
    messages.append(str(err.value))
    with pytest.raises(ProviderRejected) as err:  # the broker's own policy cannot read KV
        provider.mint(grant("vault://secret/data/forbidden", options={}))
    messages.append(str(err.value))
    with pytest.raises(ProviderRejected) as err:
        provider.mint(grant(options={"policies": ["root"]}))
    messages.append(str(err.value))
    with pytest.raises(ProviderRejected) as err:
        vault_setup.provider(vault_token=None, vault_role_id=vault_setup.role_id,
                             vault_secret_id="not-" + vault_setup.secret_id).mint(grant())
    messages.append(str(err.value))
    forbidden = [bogus, vault_setup.broker_token, vault_setup.server.root_token, vault_setup.secret_id,
                 *vault_setup.secret_values.values()]
    for message in messages:
        assert message
        for secret in forbidden:
            assert secret not in message, message


def test_missing_config_is_misconfigured(vault_setup: VaultSetup) -> None:
    with pytest.raises(ProviderMisconfigured):
        vault_setup.provider(vault_addr=None)
    with pytest.raises(ProviderMisconfigured) as err:
        vault_setup.provider(vault_token=None)
    assert err.value.code == "provider-misconfigured"
    with pytest.raises(ProviderMisconfigured):
        vault_setup.provider().mint(grant("github://acme/widgets"))
    with pytest.raises(ProviderMisconfigured):
        vault_setup.provider().mint(grant(options={"policies": "kv-allowed"}))


def test_a_path_without_a_lease_is_refused(vault_setup: VaultSetup) -> None:
    """A static KV read cannot be revoked, so the broker will not hand it out as a dynamic secret."""
    root_provider = vault_setup.provider(vault_token=vault_setup.server.root_token)
    with pytest.raises(ProviderMisconfigured, match="no lease"):
        root_provider.mint(grant("vault://secret/data/allowed", options={}))


# --- (f) health -----------------------------------------------------------------------------------


def test_health(vault_setup: VaultSetup, provider: VaultProvider) -> None:
    ok = provider.health()
    assert ok.ok, ok.detail
    down = vault_setup.provider(vault_addr="http://127.0.0.1:9", provider_timeout_seconds=1.0).health()
    assert not down.ok and down.detail
    bogus = "s." + secrets.token_urlsafe(18)
    refused = vault_setup.provider(vault_token=bogus).health()
    assert not refused.ok and bogus not in refused.detail


# --- the broker's own identity: AppRole, renewal, re-login ------------------------------------------


def test_approle_login_mints(vault_setup: VaultSetup) -> None:
    p = vault_setup.provider(vault_token=None, vault_role_id=vault_setup.role_id,
                             vault_secret_id=vault_setup.secret_id)
    g = grant()
    minted = p.mint(g)
    assert read_kv(vault_setup.server, minted.credential["token"], "allowed")
    p.revoke(target(g, minted))


def test_approle_logs_in_again_when_its_token_is_revoked(vault_setup: VaultSetup) -> None:
    p = vault_setup.provider(vault_token=None, vault_role_id=vault_setup.role_id,
                             vault_secret_id=vault_setup.secret_id)
    assert p.health().ok
    vault_setup.server.client().auth.token.revoke(p.client.hvac.token)
    minted = p.mint(grant())  # 403 -> own token dead -> login -> retry
    assert minted.credential["token"]


def test_broker_token_is_renewed_before_it_expires(vault_setup: VaultSetup) -> None:
    root = vault_setup.server.client()
    short = root.auth.token.create_orphan(policies=["jit-broker-self"], ttl="3s", explicit_max_ttl="1h",
                                          renewable=True)["auth"]["client_token"]
    p = vault_setup.provider(vault_token=short)
    p.mint(grant())
    time.sleep(2.2)  # past two thirds of its TTL
    p.mint(grant())  # renew-self happens lazily, before this call
    time.sleep(1.5)  # past the original expiry
    assert p.mint(grant()).credential["token"]


def test_approle_logs_in_again_when_renewal_hits_max_ttl(vault_setup: VaultSetup) -> None:
    root = vault_setup.server.client()
    root.auth.approle.create_or_update_approle("jit-broker-short", token_policies=["jit-broker-self"],
                                               token_ttl="3s", token_max_ttl="3s")
    role_id = root.auth.approle.read_role_id("jit-broker-short")["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id("jit-broker-short")["data"]["secret_id"]
    p = vault_setup.provider(vault_token=None, vault_role_id=role_id, vault_secret_id=secret_id)
    p.mint(grant())
    first = p.client.hvac.token
    time.sleep(2.2)
    assert p.mint(grant()).credential["token"]
    assert p.client.hvac.token != first


# --- (g) a restart of the backend -------------------------------------------------------------------


@pytest.mark.slow
def test_backend_down_then_back(openbao_restartable: OpenBaoServer) -> None:
    setup = configure_vault(openbao_restartable, dynamic_paths=())
    p = setup.provider()
    g = grant()
    minted = p.mint(g)

    openbao_restartable.stop()
    with pytest.raises(ProviderUnavailable):
        p.mint(grant())
    with pytest.raises(ProviderUnavailable):
        p.revoke(target(g, minted))
    assert not p.health().ok

    openbao_restartable.start()  # raft state survives; unsealed again
    assert p.health().ok

    openbao_restartable.seal()
    with pytest.raises(ProviderUnavailable):
        p.mint(grant())
    health = p.health()
    assert not health.ok and "sealed" in health.detail
    openbao_restartable.unseal()
    assert read_kv(openbao_restartable, minted.credential["token"], "allowed")  # minted before: still alive
    p.revoke(target(g, minted))
    with pytest.raises(hx.InvalidRequest):
        openbao_restartable.client().auth.token.lookup_accessor(minted.credential["accessor"])
    with pytest.raises(hx.Forbidden):
        read_kv(openbao_restartable, minted.credential["token"], "allowed")


# --- (h) crash recovery -----------------------------------------------------------------------------


def test_find_by_capability(provider: VaultProvider) -> None:
    g1, g2 = grant(), grant()
    m1, m2 = provider.mint(g1), provider.mint(g2)
    found = provider.find_by_capability(g2.capability_id, g2.resource)
    assert found is not None
    assert found["kind"] == "token" and found["accessor"] == m2.credential["accessor"]
    assert found["policy"] == m2.handle["policy"]  # the shared policy it carries (left for the collector)
    assert found["meta"]["session"] == "ses_123"
    assert provider.find_by_capabilities([g1.capability_id, g2.capability_id]).keys() == {
        g1.capability_id, g2.capability_id}
    assert provider.find_by_capability("cap_never_minted", g2.resource) is None
    provider.revoke(RevokeTarget(capability_id=g2.capability_id, session_id="ses_123", resource=g2.resource,
                                 access="read", handle={k: found[k] for k in ("kind", "accessor")},
                                 expires_at=m2.expires_at))
    assert provider.find_by_capability(g2.capability_id, g2.resource) is None
    provider.revoke(target(g1, m1))


@pytest.mark.parametrize("resource", [
    "vault://dbtest/creds/%2e%2e/%2e%2e/database/creds/ledger-test", "vault://dbtest/creds/../../database/creds/x",
    "vault://dbtest//x", "vault://dbtest/x?y", "vault://dbtest/x\n",
])
def test_the_provider_refuses_a_path_openbao_would_read_differently(vault_setup: VaultSetup, resource: str) -> None:
    """Defence in depth at the provider boundary: nothing but the canonical path is ever sent."""
    from broker.errors import InvalidRequest

    with pytest.raises(InvalidRequest) as caught:
        vault_setup.provider().mint(grant(resource, options={}))
    assert caught.value.code == "invalid-resource"


# --- (i) narrowed policies are named by what they grant, and shared ----------------------------------


def acl_policies(server: OpenBaoServer) -> set[str]:
    return set(server.client().sys.list_acl_policies()["data"]["keys"])


def test_two_capabilities_for_one_path_share_one_policy_and_outlive_each_other(
        provider: VaultProvider, vault_setup: VaultSetup) -> None:
    server = vault_setup.server
    g1, g2 = grant(), grant()
    m1, m2 = provider.mint(g1), provider.mint(g2)
    name = m1.handle["policy"]
    assert is_shared_policy(name) and m2.handle["policy"] == name
    assert m1.credential["policies"] == m2.credential["policies"] == [name]
    assert m1.credential["accessor"] != m2.credential["accessor"]
    stored = server.client().sys.read_acl_policy(name)["data"]["policy"]
    assert shared_policy_name(stored) == name  # the name is the content's hash

    provider.revoke(target(g1, m1))
    with pytest.raises(hx.Forbidden):
        read_kv(server, m1.credential["token"], "allowed")
    assert name in acl_policies(server)  # the other capability still carries it
    assert read_kv(server, m2.credential["token"], "allowed") == {"value": vault_setup.secret_values["allowed"]}
    provider.revoke(target(g2, m2))


def test_the_collector_removes_a_policy_no_live_token_carries(provider: VaultProvider,
                                                              vault_setup: VaultSetup) -> None:
    server = vault_setup.server
    kept, dropped = grant(options={**TOKEN_ACCESS, "capabilities": ["read"]}), grant(
        resource="vault://secret/data/payments/api-key", options={"policies": ["kv-payments-read"]})
    m_kept, m_dropped = provider.mint(kept), provider.mint(dropped)
    live, unused = m_kept.handle["policy"], m_dropped.handle["policy"]
    assert live != unused and {live, unused} <= acl_policies(server)
    provider.revoke(target(dropped, m_dropped))

    # Within the grace period nothing goes, even what no live capability names.
    assert provider.collect_shared([m_kept.handle]) == 0
    assert {live, unused} <= acl_policies(server)
    provider.shared_policy_grace_seconds = 0.0
    assert provider.collect_shared([m_kept.handle]) >= 1
    policies = acl_policies(server)
    assert unused not in policies and live in policies
    assert read_kv(server, m_kept.credential["token"], "allowed")  # the live token still works
    # Collected, then needed again: the next mint writes it back.
    again = grant(resource="vault://secret/data/payments/api-key", options={"policies": ["kv-payments-read"]})
    m_again = provider.mint(again)
    assert m_again.handle["policy"] == unused and unused in acl_policies(server)
    assert read_kv(server, m_again.credential["token"], "payments/api-key")
    provider.revoke(target(again, m_again))
    provider.revoke(target(kept, m_kept))


def test_a_policy_reload_drops_the_cached_ceilings(provider: VaultProvider, vault_setup: VaultSetup) -> None:
    """What a rule's policies grant on a path is asked once and kept; the broker's policy reload
    forgets it, so what OpenBao says now decides the next mint."""
    root = vault_setup.server.client()
    rule_policy = f"kv-reload-{secrets.token_hex(4)}"
    root.sys.create_or_update_policy(rule_policy, 'path "secret/data/allowed" { capabilities = ["read"] }')
    bootstrap_token_role(root, vault_setup.token_role, ["kv-allowed", "kv-payments-read", rule_policy],
                         explicit_max_ttl_seconds=3600)
    options = {"policies": [rule_policy]}
    try:
        first = provider.mint(grant(options=options))
        assert first.credential["capabilities"] == ["read"]
        # The operator takes the grant away in OpenBao: the cached ceiling still says read ...
        root.sys.create_or_update_policy(rule_policy, 'path "secret/data/other" { capabilities = ["read"] }')
        cached = provider.mint(grant(options=options))
        assert cached.credential["capabilities"] == ["read"]
        # ... until the broker's policy is reloaded: asked again, the rule grants nothing there.
        provider.policy_reloaded()
        with pytest.raises(ProviderRejected, match="grant nothing"):
            provider.mint(grant(options=options))
    finally:
        bootstrap_token_role(root, vault_setup.token_role, ["kv-allowed", "kv-payments-read"],
                             explicit_max_ttl_seconds=3600)
        root.sys.delete_policy(rule_policy)


def test_a_steady_state_mint_is_one_openbao_call(provider: VaultProvider, vault_setup: VaultSetup,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Ceiling cached, policy written: the token create is the only request sent to OpenBao."""
    warm = provider.mint(grant())
    sent: list[str] = []
    session = provider.client.hvac.adapter.session
    real = session.request

    def counting(method: str, url: str, *args: object, **kwargs: object) -> object:
        sent.append(f"{method.upper()} {url.split('/v1/', 1)[-1]}")
        return real(method, url, *args, **kwargs)

    monkeypatch.setattr(session, "request", counting)
    g = grant()
    minted = provider.mint(g)
    assert sent == [f"POST auth/token/create/{vault_setup.token_role}"]
    sent.clear()
    provider.revoke(target(g, minted))
    assert sent == ["POST auth/token/revoke-accessor"]  # revocation stays one call
    monkeypatch.undo()
    provider.revoke(target(grant(), warm))
