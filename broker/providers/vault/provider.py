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
  grant there), named by what it grants (`jit-cap_acl-<hash>`, `acl.py`), so every
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
import logging
import posixpath
import time
from collections.abc import Iterable
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from pydantic_settings import BaseSettings

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
)
from broker.providers.vault.acl import (
    DEFAULT_MAX_TTL_SECONDS,
    TOKEN_MOUNT,
    bootstrap_token_role,
    broker_policy_hcl,
    capability_of_policy,
    is_shared_policy,
    narrowed_policy_name,
)
from broker.providers.vault.client import OpenBaoClient
from broker.providers.vault.minting import PROBE_TTL, TokenMinting, delete_policy, lookup_accessor
from broker.providers.vault.settings import VaultSettings

log = logging.getLogger(__name__)

# Characters a path segment may carry that neither quote() escapes nor OpenBao's router reads
# as anything but themselves (the resource grammar's segment set, minus the alphanumerics).
_PATH_SAFE = "._~@+=,:-"


class VaultProvider(TokenMinting, Provider):
    name: ClassVar[str] = "vault"
    searchable: ClassVar[bool] = True  # by the token's `meta.capability`

    grammar: ClassVar[ResourceGrammar] = ResourceGrammar("vault")  # any non-empty run of segments, as written
    settings_model: ClassVar[type[BaseSettings]] = VaultSettings

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
                except Exception as exc:  # noqa: BLE001  # a bound is advice; the role still caps at mint time
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
                detail = self._confirm_token_gone(accessor)
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

    def _confirm_token_gone(self, accessor: str) -> str:
        """revoke-accessor refused with "token not found": ask what OpenBao still holds under the accessor.

        OpenBao answers so both when nothing is left and when the token is *tainted*: a revocation
        that a seal or a shutdown cut off marked it `num_uses: -1` (revocation pending) and never
        finished, and revoke-accessor will not finish it. A tainted token is refused on every use
        (OpenBao authenticates with the untainted lookup), but its entry and accessor stay until
        its own expiry, when OpenBao's expiration manager removes it. Anything else here is no
        confirmation: the lease stays pending and is retried (fail closed).
        """
        try:
            info = self.client.call("confirm revocation", functools.partial(lookup_accessor, accessor=accessor))
        except ProviderRejected as exc:
            if _gone(exc, "invalid accessor"):
                return "OpenBao/Vault no longer knows the token's accessor: revoked before, or expired"
            if "bad token" in exc.message.lower():  # an accessor left behind with no token entry under it
                return "OpenBao/Vault holds no token under the accessor: revoked before, or never created"
            raise
        data = (info or {}).get("data") or {}
        uses = data.get("num_uses")
        if isinstance(uses, int) and uses < 0:
            return ("OpenBao/Vault refuses the token: its revocation is pending there (num_uses -1, left by a "
                    "revocation cut off by a seal or shutdown); OpenBao deletes its entry at the token's expiry, "
                    f"{data.get('expire_time') or 'unknown'}")
        raise ProviderUnavailable("vault revoke token: OpenBao answered \"token not found\" but still holds a "
                                  "token under the accessor; not confirmed, retried")

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
                info = self.client.call("lookup accessor", functools.partial(lookup_accessor, accessor=accessor))
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
                self.client.call("delete shared policy", functools.partial(delete_policy, name=name))
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




def openbao_client(ctx: ProviderContext) -> OpenBaoClient:
    """This broker's OpenBao client, one for the vault provider and the openbao source (BROKER_VAULT_*)."""
    return ctx.shared("vault", lambda: OpenBaoClient.from_settings(ctx.settings_for(VaultSettings),
                                                                   ctx.settings.provider_timeout_seconds))


__all__ = ["PROBE_TTL", "TOKEN_MOUNT", "VaultProvider", "bootstrap_token_role", "broker_policy_hcl", "openbao_client",
           "vault_path"]
