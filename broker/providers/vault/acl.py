"""What the vault provider writes into OpenBao's ACL: narrowed policies, the token role, its own policy.

A *narrowed* token carries one policy granting the requested path and nothing else. The policy
is named by what it grants, `jit-cap_acl-<sha-256 of its document>`: every capability for the
same path and capabilities carries the same one, written once and reused (the name stays inside
the `jit-cap_*` glob the token role and the broker's own policy already allow). Capabilities
minted before that carry one policy each, `jit-<capability id>` (e.g. `jit-cap_3f9c...`),
deleted when they end. A policy is built here,
from the canonical path segments the resource grammar produced (never from the raw request), as
JSON through `json.dumps`, so no character of a path can close a string or open a block. Two
more checks keep the path meaning only itself in OpenBao's ACL language, where `*` at the end is
a prefix glob and a `+` segment matches any one segment: `*` cannot occur in a concrete resource,
and a path with `+` is refused. The capabilities are a subset of what the rule's own policies
grant on that path (asked of OpenBao, see `VaultProvider._ceiling`), minus `sudo`, `list`
and `deny`, which a single-path policy cannot carry meaningfully.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable

import hvac

from broker.errors import InvalidRequest, ProviderMisconfigured

TOKEN_MOUNT = "token"  # noqa: S105  # the token auth mount's name, not a secret
DEFAULT_MAX_TTL_SECONDS = 86400  # the role's token_explicit_max_ttl when it cannot be read

# The narrowed policy of a capability is this prefix + the capability id ("cap_<hex>").
NARROWED_POLICY_PREFIX = "jit-"
# What the token role must allow (allowed_policies_glob) and the broker may write and delete.
NARROWED_POLICY_GLOB = "jit-cap_*"
_CAPABILITY_ID = re.compile(r"cap_[A-Za-z0-9_-]{1,96}")
# What a single-path policy may grant. `list` is left out: OpenBao checks LIST on `<path>/`,
# which a resource (no trailing "/") cannot name; `sudo` and `root` are never delegated.
NARROWABLE = ("create", "read", "update", "patch", "delete")


# A policy named by its content: this prefix + the first 40 hex digits of its document's SHA-256.
SHARED_POLICY_PREFIX = "jit-cap_acl-"
_SHARED = re.compile(re.escape(SHARED_POLICY_PREFIX) + r"[0-9a-f]{40}")


def shared_policy_name(document: str) -> str:
    """The name of a narrowed policy: what it grants, hashed. Same grant, same name."""
    return SHARED_POLICY_PREFIX + hashlib.sha256(document.encode()).hexdigest()[:40]


def is_shared_policy(name: str) -> bool:
    return _SHARED.fullmatch(name) is not None


def narrowed_policy_name(capability_id: str) -> str:
    """`jit-<capability id>`: derived, so nothing needs storing to find it again."""
    if _CAPABILITY_ID.fullmatch(capability_id) is None:
        raise ProviderMisconfigured(f"vault: capability id {capability_id!r} cannot name a narrowed policy")
    return NARROWED_POLICY_PREFIX + capability_id


def capability_of_policy(name: str) -> str | None:
    """The capability id a per-capability narrowed policy was made for; None for any other
    policy, a shared one included."""
    if not name.startswith(NARROWED_POLICY_PREFIX) or is_shared_policy(name):
        return None
    capability_id = name[len(NARROWED_POLICY_PREFIX):]
    return capability_id if _CAPABILITY_ID.fullmatch(capability_id) else None


def narrowable_path(segments: Iterable[str]) -> str:
    """The ACL path for exactly these (canonical) segments, or InvalidRequest when OpenBao's ACL
    would read it as a pattern."""
    parts = list(segments)
    if not parts or any("+" in s or "*" in s or not s for s in parts):
        raise InvalidRequest(
            "vault: a path with '+' or '*' cannot be narrowed: OpenBao policies read them as wildcards",
            code="invalid-resource")
    return "/".join(parts)


def narrowed_policy(path: str, capabilities: Iterable[str]) -> str:
    """The policy document (JSON, which OpenBao's policy parser reads like HCL)."""
    caps = sorted(set(capabilities))
    if not caps or any(c not in NARROWABLE for c in caps):
        raise ProviderMisconfigured(f"vault: cannot narrow to capabilities {caps}; allowed: {list(NARROWABLE)}")
    return json.dumps({"path": {path: {"capabilities": caps}}}, sort_keys=True)


def bootstrap_token_role(client: hvac.Client, role: str, allowed_policies: Iterable[str], *,
                         explicit_max_ttl_seconds: int = DEFAULT_MAX_TTL_SECONDS,
                         allowed_policies_glob: Iterable[str] = (NARROWED_POLICY_GLOB,),
                         mount_point: str = TOKEN_MOUNT) -> None:
    """Create or update the token role capability tokens are minted through.

    Same as `bao write auth/token/roles/<role> allowed_policies=... allowed_policies_glob=jit-cap_*
    disallowed_policies=root orphan=true renewable=false token_type=service
    token_no_default_policy=true token_explicit_max_ttl=<n>s`. Run by an operator (or a test) with a
    token that may write `auth/token/roles/*`; the broker itself never needs that right.
    `allowed_policies` are the rules' own policies (narrowed tokens are checked against them);
    the glob lets the role hand out the narrowed per-capability policies.
    """
    client.write(
        f"auth/{mount_point}/roles/{role}",
        allowed_policies=list(allowed_policies),
        allowed_policies_glob=list(allowed_policies_glob),
        disallowed_policies=["root"],  # a second lock: the role can never hand out root
        orphan=True,  # survives the broker's own token; revoked only by accessor or TTL
        renewable=False,  # the grant's TTL is final
        token_type="service",  # noqa: S106  # batch tokens have no accessor and cannot be revoked
        token_no_default_policy=True,  # exactly the access's policies, nothing implicit
        token_explicit_max_ttl=int(explicit_max_ttl_seconds),  # ceiling whatever the broker asks
    )


def broker_policy_hcl(token_role: str = "jit-broker", dynamic_paths: Iterable[str] = ("database/creds/*",),  # noqa: S107  # a token role's name, not a secret
                      mount_point: str = TOKEN_MOUNT) -> str:
    """The broker's own least-privilege policy (install as `jit-broker-self`)."""
    rules = [
        (f"auth/{mount_point}/create/{token_role}", '"create", "update"'),
        (f"auth/{mount_point}/roles/{token_role}", '"read"'),  # ttl_bounds reads the role's ceiling
        (f"auth/{mount_point}/revoke-accessor", '"update"'),
        (f"auth/{mount_point}/lookup-accessor", '"update"'),
        (f"auth/{mount_point}/accessors", '"list", "sudo"'),  # find_by_capability only
        (f"auth/{mount_point}/lookup-self", '"read"'),
        (f"auth/{mount_point}/renew-self", '"update"'),
        ("sys/capabilities-accessor", '"update"'),  # what the rule's policies grant on a path
        (f"sys/policies/acl/{NARROWED_POLICY_GLOB}", '"create", "update", "delete"'),  # narrowed policies
        ("sys/policies/acl", '"list"'),  # finds narrowed policies left behind
        ("sys/leases/renew", '"update"'),  # shortens a dynamic lease to the grant's TTL
        ("sys/leases/revoke", '"update"'),
        *((p, '"read"') for p in dynamic_paths),
    ]
    return "\n".join(f'path "{path}" {{\n  capabilities = [{caps}]\n}}' for path, caps in rules) + "\n"
