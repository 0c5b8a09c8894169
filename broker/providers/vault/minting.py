"""How the vault provider creates what it hands out: narrowed tokens through the token role, dynamic secrets.

`TokenMinting` holds the provider's per-replica state (the ceilings OpenBao answered, the shared
policies written and used) and the steps of a mint; `VaultProvider` (provider.py) adds the
contract around them. The module docstring of provider.py says what a token and a secret are.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import hvac

from broker.errors import ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.providers.base import Grant, Minted, fingerprint
from broker.providers.vault.acl import (
    NARROWABLE,
    TOKEN_MOUNT,
    narrowable_path,
    narrowed_policy,
    shared_policy_name,
)
from broker.providers.vault.client import OpenBaoClient
from broker.times import rfc3339

log = logging.getLogger("broker.providers.vault")

PROBE_TTL = "30s"  # the probe token that asks what a rule's policies grant: one use, revoked at once
# What a rule's policies grant on a path, as OpenBao answered the probe, is reused this long: an
# operator's change to those OpenBao policies reaches new mints within it (a reload of the
# broker's policy at once).
CEILING_TTL_SECONDS = 30.0
# A shared narrowed policy this replica wrote is taken to exist this long before it is written
# again; below the collector's grace, so a policy another replica collected comes back.
POLICY_REFRESH_SECONDS = 30.0
# A shared policy no live capability carries is deleted once it has been seen unused for this
# long (and not used here meanwhile): a mint under way, not yet activated, is never caught.
SHARED_POLICY_GRACE_SECONDS = 120.0

def _now() -> datetime:
    return datetime.now(UTC)


class TokenMinting:
    """The minting half of the vault provider (its base class)."""

    def __init__(self, client: OpenBaoClient, *, token_role: str = "jit-broker") -> None:  # noqa: S107  # a token role's name, not a secret
        if not token_role:
            raise ProviderMisconfigured("vault: set BROKER_VAULT_TOKEN_ROLE")
        self.client = client
        self.token_role = token_role
        self._cache_lock = threading.Lock()
        self._ceilings: dict[tuple[tuple[str, ...], str], tuple[float, frozenset[str]]] = {}
        self._written: dict[str, float] = {}  # shared policy -> when this replica last wrote it (monotonic)
        self._used: dict[str, float] = {}  # shared policy -> when this replica last minted with it
        self._unused_since: dict[str, float] = {}  # shared policy -> first seen carried by no live capability
        self.ceiling_ttl_seconds = CEILING_TTL_SECONDS
        self.shared_policy_grace_seconds = SHARED_POLICY_GRACE_SECONDS
        self._role_max_ttl: int | None = None
        self._role_read_failed_at = -1e9  # monotonic; an unreachable Vault is asked again a minute later

    def _mint_token(self, grant: Grant, path: str) -> Minted:
        policies = grant.options.get("policies")
        if not isinstance(policies, list) or not policies or not all(isinstance(p, str) and p for p in policies):
            raise ProviderMisconfigured("vault: access option `policies` must be a non-empty list of policy names")
        rule_policies = sorted(set(policies))
        narrow = grant.options.get("narrow", True)
        if not isinstance(narrow, bool):
            raise ProviderMisconfigured("vault: access option `narrow` must be true or false")
        if not narrow:
            if "capabilities" in grant.options:
                raise ProviderMisconfigured("vault: access option `capabilities` needs a narrowed token (drop `narrow: false`)")
            return self._create_token(grant, rule_policies)

        path = narrowable_path(path.split("/"))
        granted_by_rule = self._cached_ceiling(grant, rule_policies, path)
        asked = grant.options.get("capabilities")
        if asked is None:
            capabilities = sorted(c for c in granted_by_rule if c in NARROWABLE)
        elif not isinstance(asked, list) or not asked or not all(c in NARROWABLE for c in asked):
            raise ProviderMisconfigured(f"vault: access option `capabilities` must be a non-empty list of {list(NARROWABLE)}")
        else:
            beyond = sorted(set(asked) - granted_by_rule)
            if beyond:
                raise ProviderRejected(f"vault: the rule's policies {rule_policies} do not grant {beyond} on {path}; "
                                       "a narrowed token never carries more than they do")
            capabilities = sorted(set(asked))
        if not capabilities:
            raise ProviderRejected(f"vault: the rule's policies {rule_policies} grant nothing on {path} that a "
                                   f"narrowed token can carry (they grant {sorted(granted_by_rule) or 'nothing'})")
        document = narrowed_policy(path, capabilities)
        name = shared_policy_name(document)
        self._ensure_policy(name, document)
        try:
            return self._create_token(grant, [name], narrowed_to={"path": path, "capabilities": capabilities})
        except BaseException:
            with self._cache_lock:  # written again on the next mint, in case that is why it failed
                self._written.pop(name, None)
            raise

    def _ensure_policy(self, name: str, document: str) -> None:
        """Write the shared policy unless this replica wrote it within POLICY_REFRESH_SECONDS."""
        now = time.monotonic()
        with self._cache_lock:
            fresh = now - self._written.get(name, -1e18) < POLICY_REFRESH_SECONDS
            self._used[name] = now
        if fresh:
            return
        self.client.call("write narrowed policy", lambda c: c.sys.create_or_update_acl_policy(name, document))
        with self._cache_lock:
            self._written[name] = now

    def _cached_ceiling(self, grant: Grant, policies: list[str], path: str) -> set[str]:
        """`_ceiling`, kept per (policies, path) for `ceiling_ttl_seconds`."""
        key, now = (tuple(policies), path), time.monotonic()
        with self._cache_lock:
            cached = self._ceilings.get(key)
        if cached is not None and now - cached[0] < self.ceiling_ttl_seconds:
            return set(cached[1])
        granted = self._ceiling(grant, policies, path)
        with self._cache_lock:
            if len(self._ceilings) >= 4096:
                self._ceilings.clear()  # bounded; rebuilt by the next mints
            self._ceilings[key] = (now, frozenset(granted))
        return granted

    def _ceiling(self, grant: Grant, policies: list[str], path: str) -> set[str]:
        """What `policies` grant on `path`, as OpenBao itself evaluates them (globs, `+`, deny,
        longest prefix): a probe token with exactly those policies, minted through the token
        role (so its `allowed_policies` still bound the rule), asked about with
        `sys/capabilities-accessor` and revoked at once. The probe's secret never leaves this
        method; it can be used once and dies after PROBE_TTL whatever happens."""
        out = self.client.call("create probe token", lambda c: c.auth.token.create(
            role_name=self.token_role, policies=policies, no_default_policy=True, meta={"probe_for": grant.capability_id},
            ttl=PROBE_TTL, explicit_max_ttl=PROBE_TTL, renewable=False, num_uses=1,
            display_name=f"probe-{grant.capability_id}", mount_point=TOKEN_MOUNT))
        auth = out.get("auth") or {}
        accessor = auth.get("accessor") or ""
        if not accessor:
            raise ProviderMisconfigured(f"vault: token role {self.token_role} issued a token without an accessor "
                                        "(batch?); set token_type=service on the role")
        try:
            carried = sorted(auth.get("token_policies") or auth.get("policies") or [])
            if carried != policies:
                raise ProviderMisconfigured(f"vault: token role {self.token_role} issued policies {carried}, asked "
                                            f"{policies}; check the role's settings")
            answer = self.client.call("read capabilities", lambda c: c.sys.get_capabilities(paths=[path], accessor=accessor))
        finally:
            self._revoke_quietly(accessor)
        granted = (answer.get("data") or {}).get(path) if isinstance(answer, dict) else None
        if not isinstance(granted, list):
            raise ProviderMisconfigured(f"vault: sys/capabilities-accessor did not answer for {path}")
        return {c for c in granted if isinstance(c, str)}

    def _create_token(self, grant: Grant, policies: list[str], *,
                      narrowed_to: dict[str, Any] | None = None) -> Minted:
        meta = {"session": grant.session_id, "capability": grant.capability_id, "agent": grant.agent,
                "human": grant.human, "task": grant.task_id}
        ttl = f"{grant.ttl_seconds}s"
        started = _now()
        out = self.client.call("create token", lambda c: c.auth.token.create(
            role_name=self.token_role, policies=policies, no_default_policy=True, meta=meta,
            ttl=ttl, explicit_max_ttl=ttl, renewable=False, display_name=grant.capability_id,
            mount_point=TOKEN_MOUNT))
        auth = out.get("auth") or {}
        token, accessor = auth.get("client_token") or "", auth.get("accessor") or ""
        if not token or not accessor:
            # Batch tokens have no accessor: they cannot be revoked early, which the broker promises.
            raise ProviderMisconfigured(f"vault: token role {self.token_role} issued a token without an accessor "
                                        "(batch?); set token_type=service on the role. It expires at its TTL.")
        granted = sorted(auth.get("token_policies") or auth.get("policies") or [])
        lease = int(auth.get("lease_duration") or 0)
        if granted != policies or not 0 < lease <= grant.ttl_seconds:
            self._revoke_quietly(accessor)
            raise ProviderMisconfigured(
                f"vault: token role {self.token_role} issued policies {granted} for {lease}s, asked "
                f"{policies} for {grant.ttl_seconds}s; revoked it. Check the role's settings.")
        expires_at = started + timedelta(seconds=lease)
        credential: dict[str, Any] = {"type": "vault_token", "token": token, "vault_addr": self.client.addr,
                                      "policies": granted, "accessor": accessor, "expires_at": rfc3339(expires_at)}
        handle: dict[str, Any] = {"kind": "token", "accessor": accessor}
        if narrowed_to is not None:
            credential.update(narrowed_to)  # path and capabilities: what the token may do, all of it
            handle["policy"] = policies[0]
        if self.client.namespace:
            credential["vault_namespace"] = self.client.namespace
        return Minted(credential=credential, handle=handle, expires_at=expires_at, fingerprint=fingerprint(token))

    def _mint_dynamic(self, grant: Grant, path: str) -> Minted:
        started = _now()
        out = self.client.call("read secret", lambda c: c.read(path))
        if not out:
            raise ProviderRejected(f"vault: nothing at {path}")
        lease_id, lease = out.get("lease_id") or "", int(out.get("lease_duration") or 0)
        if not lease_id:
            raise ProviderMisconfigured(
                f"vault: {path} returned no lease, so it cannot be revoked; broker dynamic secrets only, "
                "or give this access `policies` to mint a token instead")
        try:
            if lease > grant.ttl_seconds and out.get("renewable"):
                lease = self._shorten(lease_id, grant.ttl_seconds, lease)
            data = out.get("data") or {}
            password = data.get("password")
            secret = password if isinstance(password, str) else json.dumps(data, sort_keys=True)
            expires_at = started + timedelta(seconds=lease)
            return Minted(
                credential={"type": "vault_secret", "lease_id": lease_id, "lease_duration": lease, "data": data,
                            "expires_at": rfc3339(expires_at)},
                handle={"kind": "lease", "lease_id": lease_id},
                expires_at=expires_at, fingerprint=fingerprint(secret))
        except BaseException:
            self._revoke_lease_quietly(lease_id)
            raise

    def _shorten(self, lease_id: str, ttl: int, lease: int) -> int:
        """Bring a dynamic lease down to the grant's TTL; on failure keep it (the sweeper revokes)."""
        try:
            out = self.client.call("shorten lease", lambda c: c.sys.renew_lease(lease_id, increment=ttl))
            return int(out.get("lease_duration") or lease)
        except (ProviderRejected, ProviderUnavailable) as exc:
            log.warning("vault: could not shorten lease on %s to %ss (%s); the broker revokes it at the "
                        "grant's expiry, the backend at %ss", lease_id.rsplit("/", 1)[0], ttl, exc.code, lease)
            return lease

    def _revoke_quietly(self, accessor: str) -> None:
        try:
            self.client.call("revoke token", lambda c: c.auth.token.revoke_accessor(accessor, mount_point=TOKEN_MOUNT))
        except Exception as exc:  # noqa: BLE001  # best effort after a failed activation; logged, the TTL bounds it
            log.error("vault: could not revoke a token just minted (accessor %s): %s", accessor, exc)

    def _delete_policy_quietly(self, name: str) -> None:
        """After the token is gone (or was never made): a policy nobody carries grants nothing,
        so a failed delete only leaves a name behind, which `leftover_capabilities` finds."""
        try:
            self.client.call("delete narrowed policy", lambda c: c.sys.delete_acl_policy(name))
        except Exception as exc:  # noqa: BLE001  # best effort; the sweeper's collector removes it later
            log.warning("vault: narrowed policy %s is left behind (%s); the sweeper removes it once its lease has ended",
                        name, getattr(exc, "code", type(exc).__name__))

    def _revoke_lease_quietly(self, lease_id: str) -> None:
        try:
            self.client.call("revoke lease", lambda c: c.sys.revoke_lease(lease_id))
        except Exception as exc:  # noqa: BLE001  # best effort after a failed activation; logged, the TTL bounds it
            log.error("vault: could not revoke a lease just read (%s): %s", lease_id, exc)


def delete_policy(client: hvac.Client, *, name: str) -> Any:
    return client.sys.delete_acl_policy(name)


def lookup_accessor(client: hvac.Client, *, accessor: str) -> Any:
    return client.auth.token.lookup_accessor(accessor, mount_point=TOKEN_MOUNT)
