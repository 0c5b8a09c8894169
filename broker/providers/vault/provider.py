"""The vault provider: OpenBao/Vault tokens minted through a token role, and dynamic secrets.

Two kinds of access, picked by the access entry's options:

- `policies: [...]` present -> a *token*. Created with `auth/token/create/<vault_token_role>`
  so it is an orphan (it does not die with the broker's own token) and the role's
  `allowed_policies` are a second ceiling beside the policy file. `ttl` = `explicit_max_ttl` =
  the grant's TTL, not renewable, no `default` policy, and its `meta` names session, capability,
  agent, human and task, so OpenBao's audit log ties every use to a person. Revoked with
  `auth/token/revoke-accessor`; the handle is the accessor, never the token.

  By default the token is *narrowed* to the requested path: it carries only one policy granting
  exactly that path with the access's `capabilities` (default: whatever the rule's policies
  grant there), named by what it grants (`jit-cap_acl-<hash>`, `vault_acl.py`), so every
  capability for the same path and capabilities shares it: written once, then reused (rewritten
  at most every POLICY_REFRESH_SECONDS). It never exceeds the rule's `policies`: what they grant
  on the path is asked of OpenBao itself, through a short-lived probe token minted with those
  policies through the same role (`sys/capabilities-accessor`), and a capability they do not
  grant is refused. That answer is kept per (policies, path) for CEILING_TTL_SECONDS and dropped
  when the broker's policy is reloaded. So a mint in the steady state is one OpenBao call (the
  token), and a revocation is one (revoke the accessor). A shared policy no live capability
  carries is deleted by the sweeper (`collect_shared`) once it has been unused for
  SHARED_POLICY_GRACE_SECONDS. Tokens minted before carry a policy of their own, `jit-<capability
  id>`, deleted after the token is revoked (or by `leftover_capabilities` once its lease has
  ended). `narrow: false` on the access: the token carries the rule's policies whole.
- otherwise -> a *dynamic secret*: `read <path>` (e.g. `database/creds/ledger-test`). If the
  lease is longer than the grant, it is shortened with `sys/leases/renew` (the increment counts
  from now, so a smaller increment shortens it; OpenBao then also moves PostgreSQL's
  `VALID UNTIL`). Revoked with `sys/leases/revoke`; the handle is the lease id. Nothing to
  narrow: the secret engine's role decides what the credential may do.

The broker's own identity is `BROKER_VAULT_TOKEN` or an AppRole login. Its token is renewed
lazily, before a call, once less than a third of its TTL remains; when renewal fails or hits the
token's max TTL, the provider logs in again with AppRole (a static token cannot be replaced).

Operator setup (the broker's own policy is `broker_policy_hcl()`):

    bao policy write jit-broker-self jit-broker-self.hcl
    bao write auth/token/roles/jit-broker \\
        allowed_policies="kv-allowed,ledger-read" allowed_policies_glob="jit-cap_*" \\
        disallowed_policies="root" orphan=true renewable=false token_type=service \\
        token_no_default_policy=true token_explicit_max_ttl=24h
    bao auth enable approle
    bao write auth/approle/role/jit-broker token_policies=jit-broker-self \\
        token_ttl=1h token_max_ttl=24h
"""

from __future__ import annotations

import functools
import json
import logging
import posixpath
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote, unquote

import hvac

from broker.errors import InvalidRequest, ProviderMisconfigured, ProviderRejected, ProviderUnavailable
from broker.grammar import ResourceGrammar
from broker.policy.resources import parse_resource
from broker.providers.base import (
    Grant,
    Minted,
    Provider,
    ProviderContext,
    ProviderHealth,
    Revoked,
    RevokeTarget,
    TtlBounds,
    fingerprint,
)
from broker.providers.vault.acl import (
    DEFAULT_MAX_TTL_SECONDS,
    NARROWABLE,
    TOKEN_MOUNT,
    bootstrap_token_role,
    broker_policy_hcl,
    capability_of_policy,
    is_shared_policy,
    narrowable_path,
    narrowed_policy,
    narrowed_policy_name,
    shared_policy_name,
)
from broker.providers.vault.client import OpenBaoClient
from broker.providers.vault.settings import VaultSettings
from broker.times import rfc3339

log = logging.getLogger(__name__)

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
# Characters a path segment may carry that neither quote() escapes nor OpenBao's router reads
# as anything but themselves (the resource grammar's segment set, minus the alphanumerics).
_PATH_SAFE = "._~@+=,:-"


def _now() -> datetime:
    return datetime.now(UTC)


class VaultProvider(Provider):
    name: ClassVar[str] = "vault"
    searchable: ClassVar[bool] = True  # by the token's `meta.capability`

    def __init__(self, client: OpenBaoClient, *, token_role: str = "jit-broker") -> None:
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

    grammar: ClassVar[ResourceGrammar] = ResourceGrammar("vault")  # any non-empty run of segments, as written

    @classmethod
    def from_context(cls, ctx: ProviderContext) -> VaultProvider:
        return cls(openbao_client(ctx), token_role=ctx.settings_for(VaultSettings).vault_token_role)

    def close(self) -> None:
        self.client.close()

    # --- the Provider protocol ------------------------------------------------------------

    def ttl_bounds(self, resource: str, options: dict[str, Any]) -> TtlBounds:
        """Tokens: the role's token_explicit_max_ttl (read once). Dynamic: options.max_ttl_seconds."""
        ceiling = int(options.get("max_ttl_seconds") or DEFAULT_MAX_TTL_SECONDS)
        if "policies" in options:
            if self._role_max_ttl is None and time.monotonic() - self._role_read_failed_at > 60:
                try:
                    role = self.client.call("read token role", lambda c: c.auth.token.read_role(self.token_role,
                                                                                          mount_point=TOKEN_MOUNT))
                    data = role["data"]
                    self._role_max_ttl = int(data.get("token_explicit_max_ttl") or data.get("explicit_max_ttl") or 0)
                except Exception as exc:  # a bound is advice; the role still caps at mint time
                    self._role_read_failed_at = time.monotonic()
                    log.warning("vault: cannot read token role %s: %s", self.token_role, exc)
            if self._role_max_ttl:
                ceiling = min(ceiling, self._role_max_ttl)
        return TtlBounds(min_seconds=1, max_seconds=ceiling)

    def mint(self, grant: Grant) -> Minted:
        path = vault_path(grant.resource)
        if grant.ttl_seconds < 1:
            raise ProviderMisconfigured("vault: ttl_seconds must be at least 1")
        if "policies" in grant.options:
            return self._mint_token(grant, path)
        return self._mint_dynamic(grant, path)

    def revoke(self, target: RevokeTarget) -> Revoked:
        kind = target.handle.get("kind")
        if kind == "token":
            accessor = target.handle.get("accessor") or ""
            if not accessor:
                raise ProviderMisconfigured("vault: token handle without an accessor cannot be revoked")
            detail = "OpenBao/Vault confirmed: auth/token/revoke-accessor succeeded"
            try:
                self.client.call("revoke token", lambda c: c.auth.token.revoke_accessor(accessor, mount_point=TOKEN_MOUNT))
            except ProviderRejected as exc:
                if not _gone(exc, "invalid accessor"):
                    raise
                detail = "OpenBao/Vault no longer knows the token's accessor: revoked before, or expired"
            # A known but already revoked accessor answers 200 "No token found": also success.
            policy = target.handle.get("policy")
            # A shared policy stays for the capabilities that carry it (`collect_shared` removes it
            # once none does); a capability's own policy goes with its token, never anything else.
            if policy and not is_shared_policy(policy):
                if policy != narrowed_policy_name(target.capability_id):
                    raise ProviderMisconfigured(f"vault: handle names policy {policy!r}, not this capability's")
                self._delete_policy_quietly(policy)
            return Revoked(detail=detail)
        if kind == "lease":
            lease_id = target.handle.get("lease_id") or ""
            if not lease_id:
                raise ProviderMisconfigured("vault: lease handle without a lease_id cannot be revoked")
            try:
                self.client.call("revoke lease", lambda c: c.sys.revoke_lease(lease_id))
            except ProviderRejected as exc:
                if not _gone(exc, "invalid lease"):
                    raise
                return Revoked(detail="OpenBao/Vault no longer knows the lease: revoked before, or expired")
            return Revoked(detail="OpenBao/Vault confirmed: sys/leases/revoke succeeded (the secret's backend revoked it)")
        raise ProviderMisconfigured(f"vault: unknown handle kind {kind!r}")

    def health(self) -> ProviderHealth:
        return self.client.health()

    # --- crash recovery ---------------------------------------------------------------------

    def find_by_capability(self, capability_id: str, resource: str) -> dict[str, Any] | None:
        """The token minted for a capability, found by its `meta.capability`; None if none.

        Cost: one LIST of every token accessor in the namespace plus one lookup per accessor,
        i.e. O(all tokens), needing `sudo` on auth/token/accessors. Meant for the reconciler at
        start-up, not for a request path; use `find_by_capabilities` for several at once.
        Only tokens created through the broker's token role count. Dynamic-secret leases carry
        no metadata and cannot be found this way: they end at their (shortened) lease TTL.
        """
        return self.find_by_capabilities([capability_id]).get(capability_id)

    def find_by_capabilities(self, capability_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        wanted = set(capability_ids)
        found: dict[str, dict[str, Any]] = {}
        if not wanted:
            return found
        listing = self.client.call("list accessors", lambda c: c.auth.token.list_accessors(mount_point=TOKEN_MOUNT))
        for accessor in (listing or {}).get("data", {}).get("keys", []):
            try:
                info = self.client.call("lookup accessor", functools.partial(_lookup_accessor, accessor=accessor))
            except ProviderRejected:
                continue  # revoked or expired while we walked the list
            data = info.get("data") or {}
            cap = (data.get("meta") or {}).get("capability")
            # Only tokens of our role: anyone who may create tokens can also write such meta.
            if cap in wanted and data.get("role") == self.token_role:
                found[cap] = {"kind": "token", "accessor": accessor, "expires_at": data.get("expire_time"),
                              "meta": data.get("meta")}
                carried = data.get("policies") or []
                if narrowed_policy_name(cap) in carried:
                    found[cap]["policy"] = narrowed_policy_name(cap)
                elif len(carried) == 1 and is_shared_policy(carried[0]):
                    found[cap]["policy"] = carried[0]
                if len(found) == len(wanted):
                    break
        return found

    # --- narrowed policies left behind ----------------------------------------------------------

    def leftover_capabilities(self) -> list[str]:
        """Capabilities whose narrowed policy `jit-<id>` still exists (one LIST of the ACL policies)."""
        listing = self.client.call("list policies", lambda c: c.sys.list_acl_policies())
        names = ((listing or {}).get("data") or {}).get("keys") or []
        return sorted(cap for cap in map(capability_of_policy, names) if cap is not None)

    def collect_shared(self, live_handles: Iterable[dict[str, Any]]) -> int:
        """Delete the shared narrowed policies no live capability's handle names, once seen
        unused for `shared_policy_grace_seconds` (and not minted with here meanwhile). One LIST
        of the ACL policies, one DELETE per policy removed; returns how many went."""
        in_use = {h.get("policy") for h in live_handles if h}
        listing = self.client.call("list policies", lambda c: c.sys.list_acl_policies())
        names = [n for n in ((listing or {}).get("data") or {}).get("keys") or [] if is_shared_policy(n)]
        now, grace, removed = time.monotonic(), self.shared_policy_grace_seconds, 0
        for name in names:
            if name in in_use:
                self._unused_since.pop(name, None)
                continue
            first = self._unused_since.setdefault(name, now)
            if now - first < grace or now - self._used.get(name, -1e18) < grace:
                continue
            try:
                self.client.call("delete shared policy", functools.partial(_delete_policy, name=name))
            except ProviderRejected as exc:
                log.warning("vault: could not delete unused policy %s (%s); retried on the next pass", name, exc.code)
                continue
            with self._cache_lock:
                self._unused_since.pop(name, None)
                self._written.pop(name, None)
            removed += 1
        for gone in set(self._unused_since) - set(names):
            self._unused_since.pop(gone, None)
        return removed

    def policy_reloaded(self) -> None:
        """The broker's policy changed: what its rules' policies grant is asked of OpenBao again."""
        with self._cache_lock:
            self._ceilings.clear()

    def release(self, capability_id: str) -> None:
        """Delete the narrowed policy of an ended capability (gone already is success)."""
        name = narrowed_policy_name(capability_id)
        self.client.call("delete narrowed policy", lambda c: c.sys.delete_acl_policy(name))

    # --- minting ---------------------------------------------------------------------------

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
        except Exception as exc:
            log.error("vault: could not revoke a token just minted (accessor %s): %s", accessor, exc)

    def _delete_policy_quietly(self, name: str) -> None:
        """After the token is gone (or was never made): a policy nobody carries grants nothing,
        so a failed delete only leaves a name behind, which `leftover_capabilities` finds."""
        try:
            self.client.call("delete narrowed policy", lambda c: c.sys.delete_acl_policy(name))
        except Exception as exc:
            log.warning("vault: narrowed policy %s is left behind (%s); the sweeper removes it once its lease has ended",
                        name, getattr(exc, "code", type(exc).__name__))

    def _revoke_lease_quietly(self, lease_id: str) -> None:
        try:
            self.client.call("revoke lease", lambda c: c.sys.revoke_lease(lease_id))
        except Exception as exc:
            log.error("vault: could not revoke a lease just read (%s): %s", lease_id, exc)

    # --- the broker's own token and the error boundary ---------------------------------------



def _delete_policy(client: hvac.Client, *, name: str) -> Any:
    return client.sys.delete_acl_policy(name)


def _lookup_accessor(client: hvac.Client, *, accessor: str) -> Any:
    return client.auth.token.lookup_accessor(accessor, mount_point=TOKEN_MOUNT)


def vault_path(resource: str) -> str:
    """The OpenBao path a `vault://` resource names, built from its parsed segments.

    The lease service already decided on the canonical resource; this is the provider's own
    check that OpenBao will read exactly that: no segment its router or the HTTP client would
    decode, clean or re-split (percent-escapes, dot segments, empty segments, `?`, `#`).
    Anything read differently is refused, never sent.
    """
    if not resource.startswith("vault://"):  # a policy rule that routes another scheme here
        raise ProviderMisconfigured(f"vault: resource must look like vault://<path>, got {resource!r}")
    parsed = parse_resource(resource)  # InvalidRequest `invalid-resource` when malformed
    if parsed.uri != resource:
        raise InvalidRequest(f"vault: {resource!r} is not a canonical vault://<path> resource", code="invalid-resource")
    segments = parsed.segments
    path = "/".join(segments)
    as_sent = quote(path, safe="/" + _PATH_SAFE)
    if (as_sent != path or unquote(path) != path or posixpath.normpath(path) != path
            or any(s in (".", "..") or not s for s in segments)):
        raise InvalidRequest(f"vault: OpenBao would read {resource!r} as another path; refused",
                             code="invalid-resource")
    return path


def _gone(exc: ProviderRejected, marker: str) -> bool:
    """Revoking what is already gone is success; OpenBao says so with a 400 and these words."""
    text = exc.message.lower()
    return marker in text or "not found" in text


__all__ = ["PROBE_TTL", "TOKEN_MOUNT", "VaultProvider", "bootstrap_token_role", "broker_policy_hcl", "vault_path"]


def openbao_client(ctx: ProviderContext) -> OpenBaoClient:
    """This broker's OpenBao client, one for the vault provider and the openbao source (BROKER_VAULT_*)."""
    return ctx.shared("vault", lambda: OpenBaoClient.from_settings(ctx.settings_for(VaultSettings),
                                                                   ctx.settings.provider_timeout_seconds))
